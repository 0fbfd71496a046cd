"""Tolerances from the arithmetic, not from one machine's rounding.

Two float32 programs that compute the same sums in different orders (chunked
against whole logits, a rerun against kept activations, SSE against AVX2
against AVX-512 vectors) differ by round-off that depends on the order, and
the order depends on the CPU. The bound used here is the classical one for
recursive summation (Higham, "Accuracy and Stability of Numerical
Algorithms", 2nd ed., section 4.2): a sum of n terms in any order is off by
at most (n - 1) * u * sum(|t|), u = 2**-24 the unit round-off of float32, so
two orders are at most 2 (n - 1) u sum(|t|) = (n - 1) * eps apart.

Gradients chain several sums (positions, the vocabulary's softmax, the width,
the keys); their lengths add to first order, so a test passes the total
length of its chain. sum(|t|) is not at hand after the fact; the largest
magnitude of the same array stands in for it (an element's terms are products
of the same activations and cotangents that make the array's largest element),
or the root mean square of the whole tree where that is larger: a leaf that
is zero by symmetry (the key bias's gradient: softmax ignores one shift of
every score) is a cancelling sum of terms of the tree's usual size.
"""

from __future__ import annotations

import jax
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23 = 2 u


def order_tolerance(n_terms: int, eps: float = EPS32) -> float:
    """Relative distance two summation orders of n_terms terms can be apart."""
    return max(n_terms - 1, 1) * eps


def assert_close_in_any_order(got, want, n_terms: int, *, eps: float = EPS32, err_msg: str = "") -> None:
    """Leaf by leaf: |got - want| <= order_tolerance(n_terms) * max(max|leaf|, rms(want)).

    The bound is what a change of summation order can do, so a test using it
    holds on any CPU; a wrong piece, a lost term or a missing scale moves an
    element by far more (an O(1) fraction of the leaf's scale).
    """
    tol = order_tolerance(n_terms, eps)
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves), (len(got_leaves), len(want_leaves))
    squares = [np.square(np.asarray(b, np.float64)) for b in want_leaves]
    rms = float(np.sqrt(sum(x.sum() for x in squares) / max(sum(x.size for x in squares), 1)))
    for i, (a, b) in enumerate(zip(got_leaves, want_leaves)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape, (i, a.shape, b.shape)
        scale = max(float(np.max(np.abs(b))) if b.size else 0.0, rms)
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * scale,
                                   err_msg=f"leaf {i}: {n_terms} terms in any order (bound {tol:.2e} of {scale:.3g})"
                                           f" {err_msg}")

"""Recomputation in the backward pass (activation checkpointing), behind one entry: `recompute`.

`recompute(f)` computes f, keeps only f's arguments for the backward pass,
and reruns f there to get its VJP: a block of a deep model then holds one
activation (its input) instead of all of its intermediates.

The forms (`impl`):
  "jax"   `jax.checkpoint`: the rerun is marked with optimization barriers so
          that XLA does not merge it with the forward pass. XLA:GPU and TPU
          honour them.
  "cond"  a custom VJP whose backward pass reruns f inside a `lax.cond` (on
          a predicate that is always true but that XLA cannot fold): the
          rerun is a computation of its own, which XLA cannot merge with the
          forward pass's values. XLA:CPU before jaxlib 0.11.1 drops the
          barriers of the "jax" form early and merges: in straight-line code
          (a Python loop over blocks) the forward values are kept and the
          rerun is lost (measured: the starcoderbase-1b train step at
          T = 8192 kept 27.8 GiB of temporaries under `jax.checkpoint`,
          9.4 GiB with this form; BENCHMARKS.md, "Recomputation on XLA:CPU");
          from 0.11.1 on it honours them. The forward pass runs
          f inside a conditional as well: XLA:CPU schedules work that needs
          parameters only (every block's kernel conversions: int8 to
          bfloat16, float32 to bfloat16) at the start of the program, and
          then holds all of it at once (measured: the 15.5B LoRA step on an
          int8 base kept 0.71 GiB a layer of bfloat16 kernels; jaxlib 0.12.1
          still does this under `jax.checkpoint`). Random bits
          drawn inside f (dropout) may still be hoisted out of the rerun and
          kept.
  "auto"  "cond" on XLA:CPU, "jax" elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from starcoder_jax.ops.backend import on_cpu

REMAT_IMPLS = ("auto", "jax", "cond")


def resolve(impl: str) -> str:
    if impl == "auto":
        return "cond" if on_cpu() else "jax"
    if impl not in REMAT_IMPLS:
        raise ValueError(f"recompute impl must be one of {', '.join(REMAT_IMPLS)}, got {impl!r}")
    return impl


def recompute(f: Callable, *, impl: str = "auto") -> Callable:
    """f, whose backward pass keeps f's arguments only and reruns f (see the module)."""
    if resolve(impl) == "jax":
        return jax.checkpoint(f)
    return _rerun_in_cond(f)


def _differentiable(leaf) -> bool:
    return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def _rerun_in_cond(f: Callable) -> Callable:
    @jax.custom_vjp
    def g(*args):
        return f(*args)

    def forward(*args):
        # symbolic_zeros: each leaf comes as CustomVJPPrimal(value, perturbed). Only the
        # leaves the caller differentiates are rerun for: a LoRA step's frozen base
        # kernels get no cotangent (no x^T dy product each), which XLA could not drop
        # from inside the conditional. The mask rides in the residuals' structure:
        # () for a differentiated leaf, None for the others.
        primal = jax.tree.map(lambda p: p.value, args, is_leaf=_is_primal)
        mask = tuple(() if p.perturbed else None for p in jax.tree.leaves(args, is_leaf=_is_primal))
        # The block itself runs inside a conditional too, on a predicate read
        # from its float inputs: XLA:CPU schedules work that depends on
        # parameters only (casts of every block's kernels) at the start of
        # the program, which keeps all of them alive at once; inside the
        # conditional it can run only when the block does.
        return _when_reached(f, primal), (primal, mask)

    def backward(residuals, cotangent):
        args, mask = residuals
        cotangent = jax.tree.map(_materialized, cotangent, is_leaf=_is_symbolic_zero)
        leaves, tree = jax.tree.flatten(args)
        where = [m is not None and _differentiable(leaf) for leaf, m in zip(leaves, mask)]
        floats = [leaf for leaf, d in zip(leaves, where) if d]

        def with_floats(new):
            it = iter(new)
            return jax.tree.unflatten(tree, [next(it) if d else leaf for leaf, d in zip(leaves, where)])

        def rerun(floats, cotangent):
            return jax.vjp(lambda fl: f(*with_floats(fl)), floats)[1](cotangent)[0]

        def zeros(floats, cotangent):
            return [jnp.zeros_like(leaf) for leaf in floats]

        grads = iter(jax.lax.cond(_always(cotangent), rerun, zeros, floats, cotangent))
        # integer and key arguments (positions, segment ids, dropout keys) and what the
        # caller does not differentiate get no cotangent
        return tuple(jax.tree.unflatten(tree, [next(grads) if d else None for d in where]))

    g.defvjp(forward, backward, symbolic_zeros=True)
    return g


def _is_primal(x) -> bool:
    return isinstance(x, jax.custom_derivatives.CustomVJPPrimal)


def _is_symbolic_zero(x) -> bool:
    return isinstance(x, jax.custom_derivatives.SymbolicZero)


def _materialized(c):
    return jnp.zeros(c.shape, c.dtype) if _is_symbolic_zero(c) else c


def _always(tree) -> jax.Array:
    """True, computed from a value of `tree` (its first float leaf), which XLA cannot fold."""
    probe = next(leaf for leaf in jax.tree.leaves(tree) if _differentiable(leaf)).reshape(-1)[0]
    return jnp.isnan(probe) | ~jnp.isnan(probe)


def _when_reached(f: Callable, args: tuple):
    """f(*args), computed inside a conditional that runs once `args` are ready."""
    shapes = jax.eval_shape(f, *args)
    return jax.lax.cond(_always(args), lambda a: f(*a),
                        lambda a: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), args)

"""The projection entry point: every form, forced by name, against the reference.

The reference is the float32 product x @ w (for an int8 weight, of its
dequantized float32 matrix). Float32 forms agree with it to float32
round-off; bfloat16 compute rounds activations and weights to bfloat16
(relative 2^-9 each), so those are compared at 2e-2 of the output scale;
int8 forms at 1e-2 (tests/ops/test_int8.py). Gradients of the float forms
are compared with the reference's gradients at the same tolerances.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import assert_close_in_any_order

from starcoder_jax.config import MATMUL_IMPLS
from starcoder_jax.ops import int8 as quant
from starcoder_jax.ops.matmul import bfloat16_matmul, project, resolve

RNG = np.random.default_rng(5)
FORMS = [impl for impl in MATMUL_IMPLS if impl != "auto"]


def _contract(x, w, n_in):
    """x [..., *in] @ w [*in, *out] in float32 at full precision."""
    axes = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    return jnp.tensordot(x.astype(jnp.float32), w.astype(jnp.float32), axes=axes,
                         precision=jax.lax.Precision.HIGHEST)


def test_auto_resolves_per_backend_and_mesh():
    assert jax.default_backend() == "cpu"  # these tests run on XLA:CPU
    assert resolve("auto") == "cpu" and resolve("auto", sharded=True) == "xla"
    with jax.set_mesh(jax.make_mesh((1,), ("data",))):
        assert resolve("auto") == "xla"  # a traced projection under a mesh
    assert resolve("cpu", sharded=True) == "cpu" and resolve("xla") == "xla"
    with pytest.raises(ValueError, match="matmul_impl must be one of auto, xla, cpu, got 'gpu'"):
        resolve("gpu")


@pytest.mark.parametrize("impl", FORMS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("in_shape, out_shape, out_major", [
    ((48,), (4, 8), False), ((4, 8), (40,), False), ((48,), (72,), True)])
def test_float_forms_equal_the_reference_in_values_and_gradients(impl, dtype, in_shape, out_shape, out_major):
    n_in = len(in_shape)
    x = jnp.asarray(RNG.standard_normal((3, 5, *in_shape)), jnp.float32).astype(dtype)
    w_in_out = jnp.asarray(RNG.standard_normal((*in_shape, *out_shape)), jnp.float32)
    # out_major: the weight is given as a table [*out, *in] (the tied LM head)
    w = jnp.transpose(w_in_out, (1, 0)) if out_major else w_in_out
    c = jnp.asarray(RNG.standard_normal((3, 5, *out_shape)), jnp.float32)

    def ours(x, w):
        return jnp.sum(project(x, w, n_in, impl=impl, dtype=dtype, out_major=out_major) * c)

    def reference(x, w):
        return jnp.sum(_contract(x, jnp.transpose(w) if out_major else w, n_in) * c)

    y = project(x, w, n_in, impl=impl, dtype=dtype, out_major=out_major)
    want = _contract(x, w_in_out, n_in)
    assert y.dtype == jnp.float32 and y.shape == (3, 5, *out_shape)
    tol = (1e-5 if dtype == jnp.float32 else 2e-2) * float(jnp.abs(want).max())
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=0, atol=tol)
    (dx, dw), (rx, rw) = jax.grad(ours, (0, 1))(x, w), jax.grad(reference, (0, 1))(x, w)
    assert dx.dtype == x.dtype and dw.dtype == w.dtype and dw.shape == w.shape
    for got, ref in ((dx, rx), (dw, rw)):
        ref = np.asarray(ref, np.float32)
        gtol = (1e-5 if dtype == jnp.float32 else 2e-2) * np.abs(ref).max()
        np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=0, atol=gtol)


@pytest.mark.parametrize("impl", FORMS)
@pytest.mark.parametrize("rows", [1, 3, 9])
def test_int8_weights_through_the_entry_equal_the_dequantized_product(impl, rows):
    w = jnp.asarray(RNG.standard_normal((4, 16, 40)), jnp.float32)  # [N, H, D]: two input axes
    qw = quant.quantize(w, 2)
    x = jnp.asarray(RNG.standard_normal((rows, 1, 4, 16)), jnp.float32)
    want = _contract(x, quant.dequantize(qw), 2)
    for layout in (qw, qw.for_cpu()):
        got = jax.jit(lambda x, w: project(x, w, 2, impl=impl))(x, layout)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-2 * float(jnp.abs(want).max()))
    with pytest.raises(ValueError, match="2 input axes, n_in is 1"):
        project(x, qw, 1, impl=impl)


def test_project_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match=r"does not end with the weight's input axes \(6,\)"):
        project(jnp.ones((2, 5)), jnp.ones((6, 3)), 1, impl="xla")


@pytest.mark.parametrize("out_major", [False, True])
def test_bfloat16_matmul_gradients(out_major):
    """For bfloat16-exact cotangents the hand-written backward is the exact
    gradient of the forward: the weight gradient to float32 round-off (kept in
    the weight's float32, never rounded to bfloat16), the input gradient to
    its bfloat16 rounding."""
    f32, bf16 = jnp.float32, jnp.bfloat16
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((12, 40)), bf16)
    w = jnp.asarray(rng.standard_normal((40, 24)), f32)
    c = jnp.asarray(rng.standard_normal((12, 24)), bf16).astype(f32)
    w_arg = w.T if out_major else w
    y = bfloat16_matmul(x, w_arg, out_major)
    dx, dw = jax.grad(lambda x, w: jnp.sum(bfloat16_matmul(x, w, out_major) * c), (0, 1))(x, w_arg)

    xf, wb = x.astype(f32), w.astype(bf16).astype(f32)
    assert_close_in_any_order(y, xf @ wb, 40)  # float32 sums of 40 exact products
    assert dx.dtype == bf16 and dw.dtype == f32 and dw.shape == w_arg.shape
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(c @ wb.T), rtol=2**-8, atol=1e-6)
    ref_dw = xf.T @ c
    assert_close_in_any_order(dw, ref_dw.T if out_major else ref_dw, 12)  # sums over the 12 rows

"""Projections on XLA:CPU: bfloat16 products with a hand-written gradient.

`bfloat16_matmul` is the CPU form of a bfloat16 projection (training and
inference in bfloat16 compute); `as_rows` flattens a projection to one
[M, I] x [I, O] product. Measurements: BENCHMARKS.md.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp


def on_cpu_without_mesh() -> bool:
    """Whether the program being traced runs on XLA:CPU with no mesh set: where
    the CPU-specific product forms (int8 tiles, bfloat16_matmul) apply."""
    return jax.default_backend() == "cpu" and jax.sharding.get_abstract_mesh().empty


def cpu_bfloat16_products(dtype) -> bool:
    """Whether `bfloat16_matmul` serves a projection: bfloat16 compute on XLA:CPU, no mesh."""
    return dtype == jnp.bfloat16 and on_cpu_without_mesh()


def as_rows(x: jax.Array, n_in: int, product, out_shape) -> jax.Array:
    """x [..., *in] (n_in trailing input axes) seen as rows [M, I], through
    `product` ([M, I] -> [M, O]), back to [..., *out_shape]."""
    lead = x.shape[:x.ndim - n_in]
    return product(x.reshape(math.prod(lead), -1)).reshape(*lead, *out_shape)


def _transposed_copy(a: jax.Array) -> jax.Array:
    """a [M, I] -> a.T as an [I, M] array in row-major order.

    Written as a rank-3 transpose so that XLA cannot fold it into the dot that
    consumes it (which would make that dot's left operand column-major).
    """
    m, i = a.shape
    return jnp.transpose(a.reshape(m, i, 1), (1, 2, 0)).reshape(i, m)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def bfloat16_matmul(x2: jax.Array, w2: jax.Array, out_major: bool) -> jax.Array:
    """x2 [M, I] @ w2 -> float32 [M, O], bfloat16 products with float32 sums, for XLA:CPU.

    w2 is [I, O], or [O, I] with out_major (the tied LM head: the token
    table), in any float dtype (float32 master weights are cast here).

    The gradient is written by hand. XLA:CPU runs a bfloat16 dot with its
    fast kernels only when both operands are row-major with the contraction
    last in the left one; autodiff's weight gradient x.T @ g contracts the
    first axes of both and is computed in float32 after converting both
    operands (a 1024 x 2048 x 8192 training projection, forward and backward:
    273 GFLOP/s by autodiff, 490 GFLOP/s here, 2-core EPYC with AVX512-BF16).
    Here the cotangent is rounded to bfloat16 (as the forward's bfloat16
    output would have it; under torch autocast the same), the weight gradient
    is summed in float32 from bfloat16 products and returned in w2's dtype
    without a round trip through bfloat16.
    """
    return _bf16_forward(x2, w2, out_major)


def _bf16_forward(x2, w2, out_major):
    w = w2.astype(jnp.bfloat16)
    contract = (1,) if out_major else (0,)
    return jax.lax.dot_general(x2.astype(jnp.bfloat16), w, (((1,), contract), ((), ())),
                               preferred_element_type=jnp.float32)


def _bf16_matmul_fwd(x2, w2, out_major):
    return _bf16_forward(x2, w2, out_major), (x2, w2)


def _bf16_matmul_bwd(out_major, residuals, g):
    x2, w2 = residuals
    xb, w, gb = x2.astype(jnp.bfloat16), w2.astype(jnp.bfloat16), g.astype(jnp.bfloat16)
    f32 = jnp.float32
    if out_major:  # y = x @ w.T: dx = g @ w, dw = g.T @ x
        dx = jnp.dot(gb, w, preferred_element_type=f32)
        dw = jnp.dot(_transposed_copy(gb), xb, preferred_element_type=f32)
    else:  # y = x @ w: dx = g @ w.T, dw = x.T @ g
        dx = jax.lax.dot_general(gb, w, (((1,), (1,)), ((), ())), preferred_element_type=f32)
        dw = jnp.dot(_transposed_copy(xb), gb, preferred_element_type=f32)
    return dx.astype(x2.dtype), dw.astype(w2.dtype)


bfloat16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)

"""Projections: the one entry point `project` for every matmul weight of the model.

`project(x, w, n_in, impl=..., dtype=...)` computes x [..., *in] @ w in
float32 for a float kernel w [*in, *out] (or, with out_major, a table
[*out, *in]: the tied LM head) or a `QuantizedWeight` (ops.int8). `impl`
(config.MATMUL_IMPLS) picks the forms:

- "xla": the float product as one dot with float32 sums (the weight cast to
  the compute dtype); int8 weights as "dot", or "reduce" for one row on a
  GPU; 4-bit weights (ops.int4) as "dot";
- "cpu": bfloat16 compute through `bfloat16_matmul` (its hand-written
  gradient; float32 compute is the plain dot), int8 weights through the
  CPU tile loop ("cpu_rows" up to INT8_CPU_ROWS_MAX rows: 4 on CPUs with
  AVX512-BF16, 32 elsewhere; "cpu_tiles" above), 4-bit
  weights through the native kernel ("native", ops.native: int4 always,
  nf4 up to NF4_NATIVE_MAX_ROWS rows) or their tile loop ("cpu": nf4 above
  that, and both where the kernel cannot be built);
- "auto": "cpu" on XLA:CPU with no mesh set, else "xla" (`resolve`).

Measurements behind the choices: BENCHMARKS.md ("CPU bfloat16 projections",
"int8 product forms").
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from starcoder_jax.config import MATMUL_IMPLS
from starcoder_jax.ops import native
from starcoder_jax.ops.backend import cpu_has_bfloat16, cpu_without_mesh, on_gpu
from starcoder_jax.ops.int4 import NATIVE_GROUPS, int4_product
from starcoder_jax.ops.int4 import native_serves as int4_native_serves
from starcoder_jax.ops.int8 import CPU_ROWS_ONE_BY_ONE, QuantizedWeight, int8_product
from starcoder_jax.ops.quant import is_quantized, mode_of

# nf4 products of up to this many rows of x take the native kernel, more the
# tile loop; int4 takes the kernel at every row count (BENCHMARKS.md, "4-bit weights").
NF4_NATIVE_MAX_ROWS = 64
# int8 products of up to this many rows take the per-row tile loop ("cpu_rows"), more
# the bfloat16 tile products ("cpu_tiles"), which only CPUs with AVX512-BF16 run fast:
# there the tiles won from 8 rows on; on an AVX2-only EPYC (one 2048 x 8192 weight,
# ms, cpu_rows / cpu_tiles) 1 row 1.7 / 25.5, 8 rows 5.6 / 31.8, 16 rows 8.2 / 22.1,
# 32 rows 14.1 / 30.3 (BENCHMARKS.md, "int8 product forms").
INT8_CPU_ROWS_MAX = {True: CPU_ROWS_ONE_BY_ONE, False: 32}


def resolve(impl: str, *, sharded: bool | None = None) -> str:
    """The form `impl` stands for here: "auto" -> "cpu" on XLA:CPU with no mesh, else "xla".

    sharded: whether the program runs under a mesh; None asks the mesh set
    now (`jax.set_mesh`), which is what a traced projection sees.
    """
    if impl not in MATMUL_IMPLS:
        raise ValueError(f"matmul_impl must be one of {', '.join(MATMUL_IMPLS)}, got {impl!r}")
    if impl != "auto":
        return impl
    return "cpu" if cpu_without_mesh(sharded) else "xla"


def _int4_form(form: str, rows: int, w) -> str:
    """The 4-bit form for `rows` rows of x on XLA:CPU: "native" (int4 at any
    row count, so that a prompt's rows see the same rounding of x whatever
    the batch; nf4 up to NF4_NATIVE_MAX_ROWS rows), else the tile loop
    "cpu", which also serves where the kernel cannot be built; "dot" off the CPU."""
    if form != "cpu":
        return "dot"
    if w.kind == "nf4" and rows > NF4_NATIVE_MAX_ROWS:
        return "cpu"
    if not int4_native_serves(w):
        if w.group in NATIVE_GROUPS:
            native.warn_unavailable("4-bit product")
        return "cpu"
    return "native"


def project(x: jax.Array, w, n_in: int, *, impl: str = "auto", dtype=jnp.float32,
            out_major: bool = False) -> jax.Array:
    """x [..., *in] (n_in trailing input axes) @ w -> float32 [..., *out].

    w: a float kernel [*in, *out], a float table [*out, *in] with out_major,
    or a quantized weight (ops.quant: it knows its own layout). dtype: the compute
    dtype of float products (activations and weights are cast to it).
    """
    form = resolve(impl)
    if is_quantized(w):
        if w.n_in != n_in:
            raise ValueError(f"project: the {mode_of(w)} weight has {w.n_in} input axes, n_in is {n_in}")
        if isinstance(w, QuantizedWeight):
            return int8_product(x, w, _int8_form(form, math.prod(x.shape[:x.ndim - n_in])))
        return int4_product(x.astype(dtype), w, _int4_form(form, math.prod(x.shape[:x.ndim - n_in]), w))
    in_shape = w.shape[w.ndim - n_in:] if out_major else w.shape[:n_in]
    out_shape = w.shape[:w.ndim - n_in] if out_major else w.shape[n_in:]
    if tuple(x.shape[x.ndim - n_in:]) != tuple(in_shape):
        raise ValueError(f"project: x {x.shape} does not end with the weight's input axes {tuple(in_shape)}")
    if form == "cpu" and dtype == jnp.bfloat16:
        w2 = _matrix(w, in_shape, out_major)
        return as_rows(x, n_in, lambda x2: bfloat16_matmul(x2, w2, out_major), out_shape)
    x, w = x.astype(dtype), w.astype(dtype)
    if n_in == 1:  # one contraction: the dot reads the weight as it lies
        contract = (w.ndim - 1,) if out_major else (0,)
        return jax.lax.dot_general(x, w, (((x.ndim - 1,), contract), ((), ())),
                                   preferred_element_type=jnp.float32)
    # Contracting two axes (N, H) at once, XLA:CPU reads the [N, H, D] kernel
    # about 3x slower than the same bytes as one [N*H, D] matrix (BENCHMARKS.md,
    # "CPU bfloat16 projections").
    w2 = _matrix(w, in_shape, out_major)
    contract = (1,) if out_major else (0,)
    return as_rows(x, n_in, lambda x2: jax.lax.dot_general(
        x2, w2, (((1,), contract), ((), ())), preferred_element_type=jnp.float32), out_shape)


def _matrix(w: jax.Array, in_shape, out_major: bool) -> jax.Array:
    """A kernel [*in, *out] as one [I, O] matrix; with out_major a table [*out, *in] as [O, I]."""
    i = math.prod(in_shape)
    return w.reshape(-1, i) if out_major else w.reshape(i, -1)


def _int8_form(form: str, rows: int) -> str:
    """The ops.int8 form of a resolved matmul form for a product of `rows` rows."""
    if form == "cpu":
        return "cpu_rows" if rows <= INT8_CPU_ROWS_MAX[cpu_has_bfloat16()] else "cpu_tiles"
    return "reduce" if rows == 1 and on_gpu() else "dot"


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

    The gradient is written by hand: XLA:CPU runs a bfloat16 dot with its
    fast kernels only when both operands are row-major with the contraction
    last in the left one, and autodiff's weight gradient x.T @ g is neither
    (BENCHMARKS.md, "CPU bfloat16 projections"). Here the cotangent is
    rounded to bfloat16 (as the forward's bfloat16 output would have it;
    under torch autocast the same), the weight gradient is summed in float32
    from bfloat16 products and returned in w2's dtype without a round trip
    through bfloat16.
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

"""Weight-only int8 quantization: symmetric, one float32 scale per output channel.

A quantized weight is stored output-major, `q [*out, *in]` int8 with
`scale [*out]`, so that w[..., o] ~= q[o, ...] * scale[o]. Every matmul weight
is quantized (attention and MLP projections, the token embedding that is also
the tied LM head, an untied LM head); LayerNorms, biases and the position table
stay in floating point.

How `int8_matmul` computes x @ dequant(q), chosen per backend by measurement
(`starcoder-jax bench`, BENCHMARKS.md):

- XLA:CPU, no mesh. Converting a whole int8 matrix to float before the dot
  makes XLA write and re-read the converted matrix, which is slower than
  reading float32 weights in the first place (a 2048x8192 matrix-vector
  product: 25 ms vs 1.7 ms for float32). A `lax.scan` over blocks of output
  rows converts one block at a time while it is still in cache. Measured on
  the starcoderbase-1b shapes, one product of M rows:
  - M = 1 (decoding one sequence): blocks of 256 rows converted to float32,
    a row-wise product against the contiguous int8 rows (hence the
    output-major layout): 0.5 ms for 2048x8192, the bandwidth limit for one
    byte per weight.
  - M > 1 (batched decoding, prefill): blocks converted to bfloat16 and one
    bfloat16 product of all rows with float32 accumulation; XLA:CPU's
    bfloat16 products run about 1.7x faster than float32 ones on this class
    of CPU (AVX512-BF16). Blocks of 256 rows up to 8 rows of x, of about 1M
    weights beyond.
- GPU, TPU, or any program under a mesh: `x @ q.astype(bfloat16).T * scale`
  as one expression; XLA fuses the conversion into the matmul, and each shard
  of q keeps its scale (scales are split like their weight's output axes).

Every form rounds the activations to bfloat16 first (weight-only int8 with
bfloat16 activations, float32 sums): int8 values are exact in bfloat16 and a
product of two bfloat16 numbers is exact in float32, so all forms, on every
backend, with or without a mesh, compute the same sums up to float32
round-off; a row gives the same result alone or in a batch; and the only
error beyond the weights' own is the activations' rounding (relative 2^-9).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

MODES = ("int8",)
CPU_BLOCK_ROWS = 256  # output rows per converted block, up to CPU_SMALL_BATCH rows of x
CPU_SMALL_BATCH = 8
CPU_MATMUL_BLOCK_ELEMENTS = 2**20  # weights per converted block, more rows of x
CPU_TRANSPOSED_DOT_MAX_IN = 2048  # the longest input for which `x @ block.T` is the fast form


class QuantizedWeight(nnx.Variable):
    """int8 values of a quantized matrix (not an nnx.Param: never trained)."""


class QuantScale(nnx.Variable):
    """float32 per-output-channel scales of a QuantizedWeight."""


def check_mode(mode: str | None) -> str | None:
    if mode is not None and mode not in MODES:
        raise ValueError(f"quantize must be one of {MODES} or None, got {mode!r}")
    return mode


def quantize_int8(w: jax.Array, n_in: int) -> tuple[jax.Array, jax.Array]:
    """w [*in, *out] (n_in leading input axes) -> (q [*out, *in] int8, scale [*out] float32).

    Symmetric: scale = max |w| over the inputs / 127, q = round(w / scale) in
    [-127, 127]; an all-zero column gets scale 1 (and q = 0).
    """
    w = jnp.asarray(w, jnp.float32)
    in_axes = tuple(range(n_in))
    amax = jnp.max(jnp.abs(w), axis=in_axes)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0).astype(jnp.float32)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    perm = tuple(range(n_in, w.ndim)) + in_axes
    return jnp.transpose(q, perm), scale


def dequantize(q: jax.Array, scale: jax.Array, n_in: int, dtype=jnp.float32) -> jax.Array:
    """The float matrix [*in, *out] that (q, scale) stand for."""
    w = q.astype(jnp.float32) * scale.reshape(scale.shape + (1,) * n_in)
    n_out = q.ndim - n_in
    perm = tuple(range(n_out, q.ndim)) + tuple(range(n_out))
    return jnp.transpose(w, perm).astype(dtype)


def _block(n: int, target: int) -> int:
    """The largest divisor of n that is <= target (the block of output rows)."""
    for b in range(min(n, target), 0, -1):
        if n % b == 0:
            return b
    return 1


def _use_cpu_blocks() -> bool:
    return jax.default_backend() == "cpu" and jax.sharding.get_abstract_mesh().empty


def _blocked(x2: jax.Array, q2: jax.Array, rows: int, *, transposed_dot: bool) -> jax.Array:
    """x2 [M, I] @ q2 [O, I]^T, converting `rows` output rows of q2 at a time to x2's dtype."""
    o, i = q2.shape
    blocks = q2.reshape(o // rows, rows, i)

    def body(_, qb):
        qb = qb.astype(x2.dtype)
        # The same product written two ways: XLA:CPU's code for each differs by
        # an order of magnitude with the shapes (a 1 x I @ I x O product:
        # x @ qb.T is 0.5 ms for I = 2048 but 26 ms for I >= 4096, where the
        # dot_general form takes 1.3 ms; in bfloat16 with 512 rows the
        # dot_general form is the fast one).
        if transposed_dot:
            return None, jnp.dot(x2, jnp.transpose(qb), preferred_element_type=jnp.float32)
        return None, jax.lax.dot_general(x2, qb, (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32)  # [M, rows]

    _, ys = jax.lax.scan(body, None, blocks)  # [O / rows, M, rows]
    return jnp.transpose(ys, (1, 0, 2)).reshape(x2.shape[0], o)


def int8_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, n_in: int) -> jax.Array:
    """x [..., *in] @ dequant(q [*out, *in], scale [*out]) -> float32 [..., *out]."""
    out_shape = q.shape[:q.ndim - n_in]
    in_shape = q.shape[q.ndim - n_in:]
    lead = x.shape[:x.ndim - n_in]
    if tuple(x.shape[x.ndim - n_in:]) != tuple(in_shape):
        raise ValueError(f"int8_matmul: x {x.shape} does not end with the weight's input axes {in_shape}")
    m, i, o = math.prod(lead), math.prod(in_shape), math.prod(out_shape)
    x2 = x.reshape(m, i)
    q2 = q.reshape(o, i)
    if _use_cpu_blocks():
        x2 = x2.astype(jnp.bfloat16)  # the same rounded activations in every form
        if m == 1:
            y = _blocked(x2.astype(jnp.float32), q2, _block(o, CPU_BLOCK_ROWS),
                         transposed_dot=i <= CPU_TRANSPOSED_DOT_MAX_IN)
        else:
            target = CPU_BLOCK_ROWS if m <= CPU_SMALL_BATCH else max(1, CPU_MATMUL_BLOCK_ELEMENTS // i)
            y = _blocked(x2, q2, _block(o, target), transposed_dot=False)
    else:
        y = jnp.einsum("MI,OI->MO", x2.astype(jnp.bfloat16), q2.astype(jnp.bfloat16),
                       preferred_element_type=jnp.float32)
    y = y * scale.reshape(o).astype(jnp.float32)
    return y.reshape(*lead, *out_shape)


def int8_lookup(q: jax.Array, scale: jax.Array, ids: jax.Array, dtype) -> jax.Array:
    """Rows `ids` of a quantized table q [V, D], scale [V] -> [..., D] in `dtype`."""
    rows = jnp.take(q, ids, axis=0).astype(jnp.float32)
    return (rows * jnp.take(scale, ids, axis=0)[..., None]).astype(dtype)

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
  product: 25 ms vs 1.7 ms for float32). A loop over tiles of at most 512
  output rows x 2048 inputs converts one tile at a time while it is in cache
  and adds up the partial products of a row's input tiles. Measured on the
  starcoderbase-1b shapes (2-core EPYC, 30 GB/s):
  - M = 1 (decoding one sequence): tiles converted to float32, the product
    written `x @ tile.T`: 0.47 ms for the 8192x2048 MLP input projection,
    0.78 ms for the 2048x8192 output projection (weights in cache; 0.55 ms
    is the bandwidth limit for one byte per weight; one block of whole rows
    runs the latter at 1.3 ms, and `x @ block.T` with 8192-long rows at
    26 ms), 3.0 ms for the 49152x2048 LM head (limit 3.3). Out of cache the
    output projection takes 1.2 ms: its tiles are 2048-byte pieces of
    8192-byte rows (the same bytes stored tile after tile run at the limit).
  - M > 1 (batched decoding, prefill): tiles converted to bfloat16 and a
    bfloat16 `dot_general` with float32 accumulation; XLA:CPU's bfloat16
    products run about 1.7x faster than float32 ones on this class of CPU
    (AVX512-BF16). At 8 rows the tiles halve the LM head's time against
    blocks of whole rows (12.6 vs 25 ms); at 512 rows every form is bound by
    the products (~365 GFLOP/s) and the tiles match the best of them.
- GPU, M = 1: `sum(x[None, :] * q, axis=-1) * scale` in float32, a
  multiply-and-reduce that XLA:GPU fuses into one pass over q. Measured on an
  H100 (jax 0.11.2, `docs/gpu/int8_forms.py`, 8 distinct weights so none
  comes from cache): 16.6 us for the 8192x2048 MLP input projection (1.0 TB/s
  of int8 weights) and 59 us for the 49152x2048 LM head (1.7 TB/s), where the
  einsum below takes 72 and 350 us and the same product with bfloat16 weights
  76 and 369 us (XLA:GPU's matrix-vector dots run at 0.3-0.6 TB/s).
- GPU with M > 1, TPU, or any program under a mesh on the CPU:
  `x @ q.astype(bfloat16).T * scale` as one expression; XLA fuses the
  conversion into the matmul, and each shard of q keeps its scale (scales
  are split like their weight's output axes). On the H100 at M = 8 this runs
  at 0.38 TB/s of int8 weights (44 us for the MLP input projection, bfloat16
  weights 24 us).

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

from starcoder_jax.config import QUANTIZATION_MODES as MODES
from starcoder_jax.sharding import on_cpu_without_mesh

CPU_TILE_ROWS = 512  # output rows per converted tile (the largest divisor of the output size up to this)
CPU_TILE_INPUTS = 2048  # inputs per converted tile (likewise)


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


def _tiled(x2: jax.Array, q2: jax.Array, *, transposed_dot: bool) -> jax.Array:
    """x2 [M, I] @ q2 [O, I]^T in float32, converting one tile of q2 at a time to x2's dtype."""
    m = x2.shape[0]
    o, i = q2.shape
    rows, cols = _block(o, CPU_TILE_ROWS), _block(i, CPU_TILE_INPUTS)

    def row_block(b, y):
        def add_tile(c, acc):
            tile = jax.lax.dynamic_slice(q2, (b * rows, c * cols), (rows, cols)).astype(x2.dtype)
            xc = jax.lax.dynamic_slice(x2, (0, c * cols), (m, cols))
            # The same product written two ways: XLA:CPU's code for each
            # differs several-fold with the dtype (x @ tile.T is the fast
            # float32 matrix-vector form, dot_general the fast bfloat16 one).
            if transposed_dot:
                return acc + jnp.dot(xc, jnp.transpose(tile), preferred_element_type=jnp.float32)
            return acc + jax.lax.dot_general(xc, tile, (((1,), (1,)), ((), ())),
                                             preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, i // cols, add_tile, jnp.zeros((m, rows), jnp.float32))
        return jax.lax.dynamic_update_slice(y, acc, (0, b * rows))

    return jax.lax.fori_loop(0, o // rows, row_block, jnp.zeros((m, o), jnp.float32))


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
    if on_cpu_without_mesh():
        x2 = x2.astype(jnp.bfloat16)  # the same rounded activations in every form
        if m == 1:
            y = _tiled(x2.astype(jnp.float32), q2, transposed_dot=True)
        else:
            y = _tiled(x2, q2, transposed_dot=False)
    elif m == 1 and jax.default_backend() == "gpu":
        # one fused pass over q: each int8 weight read once, converted in registers
        xf = x2.astype(jnp.bfloat16).astype(jnp.float32)
        y = jnp.sum(xf[:, None, :] * q2.astype(jnp.float32)[None], axis=-1)
    else:
        y = jnp.einsum("MI,OI->MO", x2.astype(jnp.bfloat16), q2.astype(jnp.bfloat16),
                       preferred_element_type=jnp.float32)
    y = y * scale.reshape(o).astype(jnp.float32)
    return y.reshape(*lead, *out_shape)


def int8_lookup(q: jax.Array, scale: jax.Array, ids: jax.Array, dtype) -> jax.Array:
    """Rows `ids` of a quantized table q [V, D], scale [V] -> [..., D] in `dtype`."""
    rows = jnp.take(q, ids, axis=0).astype(jnp.float32)
    return (rows * jnp.take(scale, ids, axis=0)[..., None]).astype(dtype)

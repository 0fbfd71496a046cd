"""Weight-only int8 quantization: symmetric, one float32 scale per output channel.

A quantized weight is stored output-major, `q [*out, *in]` int8 with
`scale [*out]`, so that w[..., o] ~= q[o, ...] * scale[o]. A projection with
more inputs than one CPU tile (2048) is stored in C input blocks,
`q [C, *out, in0 / C, *in_rest]` (`input_blocks`, e.g. starcoderbase-1b's MLP
output projection: [4, 2048, 2048]), so that each tile is contiguous. Every matmul weight
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
    26 ms), 3.0 ms for the 49152x2048 LM head (limit 3.3). Out of cache
    (8 distinct weights) the output projection took 1.2-1.4 ms while its
    tiles were 2048-byte pieces of 8192-byte rows; stored in input blocks,
    so that each tile is one contiguous 1 MB piece, it takes 0.50 ms
    (34 GB/s), like the input projection (0.54 ms). Smaller tiles (64-256
    rows) are slower for every starcoderbase-1b shape.
  - 1 < M <= 4 (decoding a few sequences): the M = 1 product once per row,
    every row reading the same converted tile while it is in cache. The MLP
    input projection at 2 rows: 0.96 ms against 1.68 for the bfloat16 tile
    product below (at 4 rows 1.66 vs 1.89, at 8 rows 3.0 vs 2.1); a whole
    int8 decode step of starcoderbase-1b at batch 2: 68 ms instead of 151,
    at batch 4 128 instead of 158.
  - M > 4 (batched decoding, prefill): tiles converted to bfloat16 and a
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
  76 and 369 us (upper bounds: those dots read slices of one stacked array,
  which may have been copied first). In the whole model (no slices) int8
  decodes one sequence 1.6x faster than bfloat16 weights (BENCHMARKS.md).
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

from starcoder_jax.ops.matmul import on_cpu_without_mesh

CPU_TILE_ROWS = 512  # output rows per converted tile (the largest divisor of the output size up to this)
CPU_TILE_INPUTS = 2048  # inputs per converted tile (likewise)
CPU_ROWS_ONE_BY_ONE = 4  # up to this many rows: a float32 matrix-vector product per row


class QuantizedWeight(nnx.Variable):
    """int8 values of a quantized matrix (not an nnx.Param: never trained)."""


class QuantScale(nnx.Variable):
    """float32 per-output-channel scales of a QuantizedWeight."""


def input_blocks(in_shape) -> int:
    """How many blocks a projection's quantized weight stores its inputs in.

    A weight with more than CPU_TILE_INPUTS inputs is stored as C blocks of
    at most that many inputs each (C must divide the first input axis), so
    that every tile the CPU loop reads is contiguous; 1 means not blocked.
    """
    i = math.prod(in_shape)
    if i <= CPU_TILE_INPUTS:
        return 1
    c = i // _block(i, CPU_TILE_INPUTS)
    return c if in_shape[0] % c == 0 else 1


def quantize_int8(w: jax.Array, n_in: int, blocks: int = 1) -> tuple[jax.Array, jax.Array]:
    """w [*in, *out] (n_in leading input axes) -> (q int8, scale [*out] float32).

    Symmetric: scale = max |w| over the inputs / 127, q = round(w / scale) in
    [-127, 127]; an all-zero column gets scale 1 (and q = 0). q is stored
    output-major, [*out, *in]; with blocks = C > 1 the first input axis in0
    is cut into C blocks that lead: [C, *out, in0 / C, *in_rest].
    """
    w = jnp.asarray(w, jnp.float32)
    in_axes = tuple(range(n_in))
    amax = jnp.max(jnp.abs(w), axis=in_axes)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0).astype(jnp.float32)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    if blocks > 1:
        q = q.reshape(blocks, w.shape[0] // blocks, *w.shape[1:])
        # [C, in0/C, *in_rest, *out] -> [C, *out, in0/C, *in_rest]
        n_out = w.ndim - n_in
        perm = (0,) + tuple(range(n_in + 1, n_in + 1 + n_out)) + tuple(range(1, n_in + 1))
        return jnp.transpose(q, perm), scale
    perm = tuple(range(n_in, w.ndim)) + in_axes
    return jnp.transpose(q, perm), scale


def _in_out(q: jax.Array, n_in: int, blocks: int) -> jax.Array:
    """A stored q -> [*out, *in] (the unblocked, output-major layout)."""
    if blocks == 1:
        return q
    n_out = q.ndim - 1 - n_in
    q = jnp.moveaxis(q, 0, n_out)  # [*out, C, in0/C, *in_rest]
    return q.reshape(*q.shape[:n_out], -1, *q.shape[n_out + 2:])


def dequantize(q: jax.Array, scale: jax.Array, n_in: int, dtype=jnp.float32, blocks: int = 1) -> jax.Array:
    """The float matrix [*in, *out] that (q, scale) stand for."""
    q = _in_out(q, n_in, blocks)
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


def _tiled(x2: jax.Array, q3: jax.Array, *, per_row: bool) -> jax.Array:
    """x2 [M, I] @ q3 [C, O, I/C] (C input blocks) in float32, converting one
    tile of q3 at a time to x2's dtype; per_row: one matrix-vector product
    per row of x2, each reading the same converted tile."""
    m = x2.shape[0]
    c, o, k = q3.shape
    rows, cols = _block(o, CPU_TILE_ROWS), _block(k, CPU_TILE_INPUTS)
    per_block = k // cols
    if rows == o and cols == k and c == 1 and o % 2 == 0:
        # At least two tiles, so that the conversion stays inside a loop. A
        # weight converted whole (one tile) is loop-invariant inside the
        # decode loop, and XLA hoists its conversion out of it: the program
        # then converts starcoderbase-1b's 48 key/value kernels to float32 on
        # every call (0.5 ms each, 29 ms per call: per token when streaming)
        # and reads them at four bytes a weight on every step.
        rows = o // 2

    def row_block(b, y):
        def add_tile(t, acc):
            # input tile t: block t // per_block, columns (t % per_block) * cols...
            # of it, which are x2's columns t * cols...
            start = (t // per_block, b * rows, (t % per_block) * cols)
            tile = jax.lax.dynamic_slice(q3, start, (1, rows, cols))[0].astype(x2.dtype)
            xc = jax.lax.dynamic_slice(x2, (0, t * cols), (m, cols))
            # The same product written two ways: XLA:CPU's code for each
            # differs several-fold with the dtype (x @ tile.T is the fast
            # float32 matrix-vector form, dot_general the fast bfloat16 one).
            if per_row:
                t_tile = jnp.transpose(tile)
                return acc + jnp.concatenate(
                    [jnp.dot(xc[r:r + 1], t_tile, preferred_element_type=jnp.float32) for r in range(m)])
            return acc + jax.lax.dot_general(xc, tile, (((1,), (1,)), ((), ())),
                                             preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, c * per_block, add_tile, jnp.zeros((m, rows), jnp.float32))
        return jax.lax.dynamic_update_slice(y, acc, (0, b * rows))

    return jax.lax.fori_loop(0, o // rows, row_block, jnp.zeros((m, o), jnp.float32))


def int8_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, n_in: int, blocks: int = 1) -> jax.Array:
    """x [..., *in] @ dequant(q, scale) -> float32 [..., *out], for q stored as
    `quantize_int8(w, n_in, blocks)` stores it."""
    lead_q = 1 if blocks > 1 else 0
    n_out = q.ndim - lead_q - n_in
    out_shape = q.shape[lead_q:lead_q + n_out]
    in_shape = q.shape[lead_q + n_out:]
    if blocks > 1:
        in_shape = (in_shape[0] * blocks, *in_shape[1:])
        if q.shape[0] != blocks:
            raise ValueError(f"int8_matmul: q {q.shape} does not lead with its {blocks} input blocks")
    lead = x.shape[:x.ndim - n_in]
    if tuple(x.shape[x.ndim - n_in:]) != tuple(in_shape):
        raise ValueError(f"int8_matmul: x {x.shape} does not end with the weight's input axes {in_shape}")
    m, i, o = math.prod(lead), math.prod(in_shape), math.prod(out_shape)
    x2 = x.reshape(m, i)
    # [C, O, K]: the rows of block c hold inputs c*K...(c+1)*K (C = 1: unblocked)
    q3 = q.reshape(blocks, o, i // blocks) if blocks > 1 else q.reshape(1, o, i)
    c, k = q3.shape[0], q3.shape[2]
    if on_cpu_without_mesh():
        x2 = x2.astype(jnp.bfloat16)  # the same rounded activations in every form
        if m <= CPU_ROWS_ONE_BY_ONE:
            y = _tiled(x2.astype(jnp.float32), q3, per_row=True)
        else:
            y = _tiled(x2, q3, per_row=False)
    elif m == 1 and jax.default_backend() == "gpu":
        # one fused pass over q: each int8 weight read once, converted in registers
        xf = x2.astype(jnp.bfloat16).astype(jnp.float32).reshape(c, 1, k)
        y = jnp.sum(xf * q3.astype(jnp.float32), axis=(0, 2))[None]
    else:
        y = jnp.einsum("MCK,COK->MO", x2.reshape(m, c, k).astype(jnp.bfloat16), q3.astype(jnp.bfloat16),
                       preferred_element_type=jnp.float32)
    y = y * scale.reshape(o).astype(jnp.float32)
    return y.reshape(*lead, *out_shape)


def int8_lookup(q: jax.Array, scale: jax.Array, ids: jax.Array, dtype) -> jax.Array:
    """Rows `ids` of a quantized table q [V, D], scale [V] -> [..., D] in `dtype`."""
    rows = jnp.take(q, ids, axis=0).astype(jnp.float32)
    return (rows * jnp.take(scale, ids, axis=0)[..., None]).astype(dtype)

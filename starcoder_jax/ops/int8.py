"""Weight-only int8 quantization: symmetric, one float32 scale per output channel.

A `QuantizedWeight` stands for a float matrix w [*in, *out]: int8 values
`q [*out, *in]` (output-major) and float32 `scale [*out]`, with
w[..., o] ~= q[o, ...] * scale[o]. That is the layout every backend reads and
the only one ever written to disk. The XLA:CPU tile loop reads a weight with
more inputs than one CPU tile faster from input blocks,
`q [C, *out, in0 / C, *in_rest]`, so that each tile is one contiguous piece
(`QuantizedWeight.for_cpu`, applied when a model is laid out for the "cpu"
form; `neutral` undoes it). Every matmul weight is quantized (attention and MLP
projections, the token embedding that is also the tied LM head, an untied LM
head); LayerNorms, biases and the position table stay in floating point.

The products (`int8_product`), each a named form that any backend can run:

- "cpu_rows": a loop over tiles of at most 512 output rows x 2048 inputs,
  each converted to float32 while it is in cache, one matrix-vector product
  per row of x (XLA:CPU, up to ops.matmul.INT8_CPU_ROWS_MAX rows: 4 where the
  CPU has AVX512-BF16, 32 elsewhere);
- "cpu_tiles": the same tiles converted to bfloat16 and one bfloat16
  product with float32 sums per tile (XLA:CPU, more rows);
- "reduce": `sum(x * q) * scale` in float32 for one row, which XLA:GPU
  fuses into one pass over q;
- "dot": `x @ q.astype(bfloat16).T * scale` as one expression (GPU with
  more rows, TPU, any program under a mesh: each shard of q keeps its scales).

Why each backend takes its forms, with the measurements: BENCHMARKS.md,
"int8 product forms".

Every form rounds the activations to bfloat16 first (weight-only int8 with
bfloat16 activations, float32 sums): int8 values are exact in bfloat16 and a
product of two bfloat16 numbers is exact in float32, so all forms, on every
backend, with or without a mesh, compute the same sums up to float32
round-off; a row gives the same result alone or in a batch; and the only
error beyond the weights' own is the activations' rounding (relative 2^-9).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

CPU_TILE_ROWS = 512  # output rows per converted tile (the largest divisor of the output size up to this)
CPU_TILE_INPUTS = 2048  # inputs per converted tile (likewise)
CPU_ROWS_ONE_BY_ONE = 4  # up to this many rows: a float32 matrix-vector product per row
INT8_FORMS = ("cpu_rows", "cpu_tiles", "reduce", "dot")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A float matrix w [*in, *out] (n_in input axes) as int8 values and scales.

    q: int8 [*out, *in], or with blocks = C > 1 the CPU input-blocked
    [C, *out, in0 / C, *in_rest]; scale: float32 [*out]. `shape` is w's
    shape, so that code reading logical axes ([*in, *out]) treats it like
    the float weight it replaces.
    """

    q: jax.Array
    scale: jax.Array
    n_in: int = dataclasses.field(metadata=dict(static=True))
    blocks: int = dataclasses.field(default=1, metadata=dict(static=True))

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.scale.shape)

    @property
    def in_shape(self) -> tuple[int, ...]:
        n_out = len(self.scale.shape)
        if self.blocks == 1:
            return tuple(self.q.shape[n_out:])
        rest = self.q.shape[1 + n_out:]
        return (rest[0] * self.blocks, *rest[1:])

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.in_shape, *self.out_shape)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def neutral(self) -> QuantizedWeight:
        """The same weight in the stored layout, q [*out, *in]."""
        if self.blocks == 1:
            return self
        n_out = len(self.out_shape)
        q = jnp.moveaxis(self.q, 0, n_out)  # [*out, C, in0/C, *in_rest]
        q = q.reshape(*self.out_shape, *self.in_shape)
        return QuantizedWeight(q, self.scale, self.n_in)

    def for_cpu(self) -> QuantizedWeight:
        """The same weight in the CPU tile loop's layout: input blocks when it
        has more inputs than one tile (`cpu_input_blocks`), else as it is."""
        c = cpu_input_blocks(self.in_shape)
        if c == self.blocks:
            return self
        w = self.neutral()
        if c == 1:
            return w
        n_out = len(self.out_shape)
        q = w.q.reshape(*self.out_shape, c, self.in_shape[0] // c, *self.in_shape[1:])
        return QuantizedWeight(jnp.moveaxis(q, n_out, 0), self.scale, self.n_in, c)

    def rows(self) -> jax.Array:
        """q as [C, O, I / C]: block c holds inputs c * I/C ... (C = 1 unblocked)."""
        o, i = math.prod(self.out_shape), math.prod(self.in_shape)
        return self.q.reshape(self.blocks, o, i // self.blocks)

    def leaf_axes(self, axes) -> QuantizedWeight:
        """The logical axes of q and scale in the stored layout, from w's axes [*in, *out]."""
        in_axes, out_axes = tuple(axes[:self.n_in]), tuple(axes[self.n_in:])
        return QuantizedWeight(out_axes + in_axes, out_axes, self.n_in)

    def neutral_shapes(self) -> QuantizedWeight:
        """The shapes of q and scale in the stored layout."""
        return QuantizedWeight((*self.out_shape, *self.in_shape), self.out_shape, self.n_in)


def cpu_input_blocks(in_shape) -> int:
    """How many blocks the CPU layout cuts a weight's inputs into.

    A weight with more than CPU_TILE_INPUTS inputs takes C blocks of at most
    that many inputs each (C must divide the first input axis), so that
    every tile the CPU loop reads is contiguous; 1 means not blocked.
    """
    i = math.prod(in_shape)
    if i <= CPU_TILE_INPUTS:
        return 1
    c = i // largest_divisor(i, CPU_TILE_INPUTS)
    return c if in_shape[0] % c == 0 else 1


def quantize(w: jax.Array, n_in: int) -> QuantizedWeight:
    """w [*in, *out] (n_in leading input axes) -> its QuantizedWeight (stored layout).

    Symmetric: scale = max |w| over the inputs / 127, q = round(w / scale) in
    [-127, 127]; an all-zero column gets scale 1 (and q = 0).
    """
    w = jnp.asarray(w, jnp.float32)
    in_axes = tuple(range(n_in))
    amax = jnp.max(jnp.abs(w), axis=in_axes)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0).astype(jnp.float32)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return QuantizedWeight(jnp.transpose(q, tuple(range(n_in, w.ndim)) + in_axes), scale, n_in)


def dequantize(w: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
    """The float matrix [*in, *out] that w stands for."""
    n = w.neutral()
    q = n.q.astype(jnp.float32) * n.scale.reshape(n.scale.shape + (1,) * w.n_in)
    n_out = len(w.out_shape)
    return jnp.transpose(q, tuple(range(n_out, q.ndim)) + tuple(range(n_out))).astype(dtype)


def largest_divisor(n: int, target: int) -> int:
    """The largest divisor of n that is <= target (a tile's rows or inputs in the CPU loops)."""
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
    rows, cols = largest_divisor(o, CPU_TILE_ROWS), largest_divisor(k, CPU_TILE_INPUTS)
    per_block = k // cols
    if rows == o and cols == k and c == 1 and o % 2 == 0:
        # At least two tiles, so that the conversion stays inside a loop. A
        # weight converted whole (one tile) is loop-invariant inside the
        # decode loop, and XLA hoists its conversion out of it: the program
        # then converts every such kernel to float32 on each call and reads
        # it at four bytes a weight on every step.
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


def int8_product(x: jax.Array, w: QuantizedWeight, form: str) -> jax.Array:
    """x [..., *in] @ dequantize(w) -> float32 [..., *out], computed by `form`
    (one of INT8_FORMS; every form reads either layout of w).

    The CPU forms (cpu_rows, cpu_tiles, reduce) round the activations to
    bfloat16, which XLA:CPU multiplies fastest. "dot", the accelerators' and
    training's form, multiplies in the activations' own dtype, as a float
    matmul does: bfloat16 activations give every form's result, float32 ones
    the dequantized product to float32 round-off."""
    if form not in INT8_FORMS:
        raise ValueError(f"int8 form must be one of {', '.join(INT8_FORMS)}, got {form!r}")
    in_shape, out_shape = w.in_shape, w.out_shape
    lead = x.shape[:x.ndim - w.n_in]
    if tuple(x.shape[x.ndim - w.n_in:]) != in_shape:
        raise ValueError(f"int8 product: x {x.shape} does not end with the weight's input axes {in_shape}")
    m, i, o = math.prod(lead), math.prod(in_shape), math.prod(out_shape)
    q3 = w.rows()  # [C, O, K]
    c, k = q3.shape[0], q3.shape[2]
    x2 = x.reshape(m, i).astype(jnp.bfloat16)  # the same rounded activations in every form
    if form == "cpu_rows":
        y = _tiled(x2.astype(jnp.float32), q3, per_row=True)
    elif form == "cpu_tiles":
        y = _tiled(x2, q3, per_row=False)
    elif form == "reduce":
        # one fused pass over q per row: each int8 weight read once, converted in registers
        xf = x2.astype(jnp.float32).reshape(m, c, 1, k)
        y = jnp.stack([jnp.sum(xf[r] * q3.astype(jnp.float32), axis=(0, 2)) for r in range(m)])
    else:
        exact = x.dtype if jnp.dtype(x.dtype).itemsize >= 4 else jnp.bfloat16
        y = jnp.einsum("MCK,COK->MO", x.reshape(m, c, k).astype(exact), q3.astype(exact),
                       preferred_element_type=jnp.float32)
    y = y * w.scale.reshape(o).astype(jnp.float32)
    return y.reshape(*lead, *out_shape)


def int8_lookup(w: QuantizedWeight, ids: jax.Array, dtype) -> jax.Array:
    """Rows `ids` of a quantized table (w stands for the table's transpose
    [D, V]: q [V, D], scale [V]) -> [..., D] in `dtype`."""
    if w.blocks != 1:
        raise ValueError(f"int8 lookup: the table must be in the stored layout, got {w.blocks} input blocks")
    rows = jnp.take(w.q, ids, axis=0).astype(jnp.float32)
    return (rows * jnp.take(w.scale, ids, axis=0)[..., None]).astype(dtype)

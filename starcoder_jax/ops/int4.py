"""Weight-only 4-bit quantization: group-wise int4, and QLoRA's NF4.

A `Packed4` stands for a float matrix w [*in, *out] whose I = prod(in)
inputs are cut into groups of `group` consecutive inputs (padded with zero
inputs up to a whole group: see `padded_inputs`), each group of each output
with its own scale. Its 4-bit codes are packed two to a byte, output-major:
`codes` uint8 [*out, Ip / 2] (Ip the padded input count). Within a group
the low nibbles of its G/2 bytes hold the group's first G/2 inputs and the
high nibbles its last G/2, so that unpacking is two elementwise operations
on the bytes as they lie (no interleaving shuffle).

The two formats:

- "int4": symmetric, as llama.cpp's q4_0: a group's step is m / -8 with m
  its weight of largest magnitude (sign kept), codes c = clip(round(w /
  step), -8, 7) + 8, w ~= (c - 8) * step. `scale` [*out, Ip / G] holds the
  steps in bfloat16 (4.25 bits a weight with groups of 64).
- "nf4": QLoRA's 4-bit NormalFloat (Dettmers et al. 2023, arXiv:2305.14314,
  appendix E): codes index NF4_VALUES, each group (a "block" of 64) scaled
  by its absmax, w ~= NF4_VALUES[c] * absmax. Double quantization, as
  QLoRA's: the absmaxes minus their mean (`offset`, one float) are
  quantized to int8 (`scale` [*out, Ip / G]) with a float32 step per block
  of 256 absmaxes (`scale2` [*out, ceil(groups / 256)]). The blocks of 256
  run along each output's row: bitsandbytes blocks the flattened array,
  which shards badly; every StarCoder width has fewer than 256 groups a
  row, so this costs one float a row (0.005 bits a weight instead of
  0.002; 4.13 bits in all) and keeps a row's scales with its codes.

The products (`int4_product`):

- "native": the hand-written XLA:CPU kernel (ops/csrc/int4_rows.cc, built by
  ops.native): each thread takes chunks of output rows whose codes stay in
  cache while blocks of 4 rows of x pass over them. int4 runs as llama.cpp's
  q4_0 x q8_0: each group of 64 inputs of a row of x is rounded to int8 by
  its own absmax (an error of at most half an activation step, 1/254 of the
  group's largest activation) and the codes multiply it in exact integer
  sums, one float scale a group. nf4 unpacks its codes to floats in
  registers and sums in float32. A row gives the same result alone or in a
  batch. Groups of 64 or 128;
- "cpu": a loop over tiles of at most 512 output rows x 2048 inputs; each
  tile's bytes are unpacked and scaled to float32 while in cache, then one
  matrix-vector product per row of x (up to CPU_ROWS_ONE_BY_ONE rows, as
  ops.int8's "cpu_rows") or one float32 product (more rows). A dequantized
  weight has 12 significant bits (a 4-bit code times a bfloat16 step), more
  than bfloat16 holds, so every tile stays float32: a row gives the same
  sums alone or in a batch, up to float32 round-off;
- "dot": the dequantized weight in the activations' dtype (bfloat16 for
  narrower ones) and one einsum: accelerators (XLA fuses the dequantization
  into the product's operand), meshes (each shard of the codes keeps its
  scales) and training (the QLoRA base).

Every form rounds activations to bfloat16 first when the compute dtype is
narrower than float32, as ops.int8's forms do.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from starcoder_jax.ops import native
from starcoder_jax.ops.int8 import CPU_ROWS_ONE_BY_ONE, CPU_TILE_INPUTS, CPU_TILE_ROWS, largest_divisor

FORMATS = ("int4", "nf4")
GROUP = 64  # inputs per scale, both formats (QLoRA's NF4 block size)
NF4_SCALE_BLOCK = 256  # absmaxes per float32 step of the double quantization
INT4_FORMS = ("native", "cpu", "dot")
NATIVE_GROUPS = (64, 128)

# The 16 NF4 values of QLoRA's appendix E (quantiles of N(0, 1), normalized
# to [-1, 1], with an exact zero), as bitsandbytes ships them.
NF4_VALUES = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Packed4:
    """A float matrix w [*in, *out] as packed 4-bit codes and group scales.

    codes: uint8 [*out, Ip / 2]; scale: bfloat16 steps (int4) or int8
    absmax codes (nf4) [*out, Ip / G]; scale2: float32 [*out, blocks] and
    offset: float32 [] (nf4; None for int4).
    in_shape: w's input axes; kind: "int4" or "nf4". `shape` is w's shape,
    so that code reading logical axes ([*in, *out]) treats it like the float
    weight it replaces.
    """

    codes: jax.Array
    scale: jax.Array
    scale2: jax.Array | None
    offset: jax.Array | None
    in_shape: tuple = dataclasses.field(metadata=dict(static=True))
    kind: str = dataclasses.field(metadata=dict(static=True))

    @property
    def n_in(self) -> int:
        return len(self.in_shape)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape[:-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.in_shape, *self.out_shape)

    @property
    def group(self) -> int:
        return 2 * self.codes.shape[-1] // self.scale.shape[-1]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in jax.tree.leaves(self))

    def neutral(self) -> Packed4:
        """The stored layout (the only one: every form reads it as it lies)."""
        return self

    def for_cpu(self) -> Packed4:
        return self

    def leaf_axes(self, axes) -> Packed4:
        """The logical axes of each array, from w's axes [*in, *out]: the
        packed input axis takes the name of w's first input axis."""
        out_axes, first_in = tuple(axes[self.n_in:]), tuple(axes[:1])
        nf4 = self.kind == "nf4"
        return Packed4(out_axes + first_in, out_axes + first_in, out_axes + (None,) if nf4 else None,
                       () if nf4 else None, self.in_shape, self.kind)

    def neutral_shapes(self) -> Packed4:
        return Packed4(*(None if a is None else tuple(a.shape)
                         for a in (self.codes, self.scale, self.scale2, self.offset)), self.in_shape, self.kind)


def padded_inputs(inputs: int, group: int = GROUP) -> int:
    """The input count a weight is stored with: `inputs` up to a whole group."""
    return -(-inputs // group) * group


def check_group(group: int) -> int:
    if group < 2 or group % 2 or group > 1024:
        raise ValueError(f"4-bit group size must be an even number from 2 to 1024, got {group}")
    return group


def pack(codes: jax.Array, group: int) -> jax.Array:
    """4-bit codes uint8 [..., Ip] (values 0..15) -> bytes [..., Ip / 2]: in
    each group of `group`, byte j holds input j (low nibble) and input
    j + group / 2 (high nibble)."""
    *lead, n = codes.shape
    if n % group:
        raise ValueError(f"pack: {n} codes are not whole groups of {group}")
    c = codes.astype(jnp.uint8).reshape(*lead, n // group, 2, group // 2)
    return (c[..., 0, :] | (c[..., 1, :] << 4)).reshape(*lead, n // 2)


def unpack(packed: jax.Array, group: int) -> jax.Array:
    """The inverse of `pack`: bytes [..., Ip / 2] -> codes uint8 [..., Ip]."""
    *lead, n = packed.shape
    b = packed.reshape(*lead, 2 * n // group, group // 2)
    return jnp.stack([b & 0xF, b >> 4], axis=-2).reshape(*lead, 2 * n)


def _rows(w: jax.Array, n_in: int, group: int) -> jax.Array:
    """w [*in, *out] -> float32 [*out, Ip] (inputs last, zero-padded to whole groups)."""
    w = jnp.asarray(w, jnp.float32)
    out_nd = w.ndim - n_in
    rows = jnp.transpose(w, tuple(range(n_in, w.ndim)) + tuple(range(n_in)))
    rows = rows.reshape(*w.shape[n_in:], -1)
    extra = padded_inputs(rows.shape[-1], group) - rows.shape[-1]
    return jnp.pad(rows, [(0, 0)] * out_nd + [(0, extra)]) if extra else rows


def quantize(w: jax.Array, n_in: int, kind: str = "int4", group: int = GROUP) -> Packed4:
    """w [*in, *out] (n_in leading input axes) -> its Packed4 in format `kind`.

    A weight whose input count is not a multiple of `group` is stored with
    zero inputs up to the next multiple (never read: products slice them off).
    """
    if kind not in FORMATS:
        raise ValueError(f"4-bit format must be one of {', '.join(FORMATS)}, got {kind!r}")
    check_group(group)
    in_shape = tuple(int(d) for d in np.shape(w)[:n_in])
    rows = _rows(w, n_in, group)
    *out, ip = rows.shape
    g = rows.reshape(*out, ip // group, group)
    if kind == "int4":
        # the signed value of largest magnitude maps to -8: the full code range
        i = jnp.argmax(jnp.abs(g), axis=-1, keepdims=True)
        m = jnp.take_along_axis(g, i, axis=-1)
        step = (m / -8.0).astype(jnp.bfloat16)
        safe = jnp.where(step == 0, 1.0, step.astype(jnp.float32))
        codes = jnp.clip(jnp.round(g / safe), -8, 7) + 8
        scale, scale2, offset = step[..., 0], None, None
    else:
        absmax = jnp.max(jnp.abs(g), axis=-1)  # [*out, groups]
        safe = jnp.where(absmax == 0, 1.0, absmax)[..., None]
        codes = jnp.argmin(jnp.abs(g[..., None] / safe[..., None] - NF4_VALUES), axis=-1)
        scale, scale2, offset = _double_quantize(absmax)
    packed = pack(codes.reshape(*out, ip).astype(jnp.uint8), group)
    return Packed4(packed, scale, scale2, offset, in_shape, kind)


def _double_quantize(absmax: jax.Array):
    """absmax [*out, groups] -> (int8 codes [*out, groups], float32 steps
    [*out, blocks], float32 offset []): absmax - offset symmetric int8 per
    block of NF4_SCALE_BLOCK along each row."""
    *out, n = absmax.shape
    offset = jnp.mean(absmax)
    blocks = -(-n // NF4_SCALE_BLOCK)
    centred = jnp.pad(absmax - offset, [(0, 0)] * len(out) + [(0, blocks * NF4_SCALE_BLOCK - n)])
    centred = centred.reshape(*out, blocks, NF4_SCALE_BLOCK)
    amax = jnp.max(jnp.abs(centred), axis=-1)
    step = jnp.where(amax > 0, amax / 127.0, 1.0).astype(jnp.float32)
    q = jnp.clip(jnp.round(centred / step[..., None]), -127, 127).astype(jnp.int8)
    return q.reshape(*out, -1)[..., :n], step, offset.astype(jnp.float32)


def group_scales(w: Packed4) -> jax.Array:
    """float32 [*out, groups]: each group's step (int4) or absmax (nf4)."""
    if w.kind == "int4":
        return w.scale.astype(jnp.float32)
    n = w.scale.shape[-1]
    step = jnp.repeat(w.scale2, NF4_SCALE_BLOCK, axis=-1)[..., :n]
    return w.offset + w.scale.astype(jnp.float32) * step


def _values(codes: jax.Array, kind: str) -> jax.Array:
    """4-bit codes (any integer dtype) -> the float32 values they stand for, before the group scale."""
    if kind == "int4":
        return codes.astype(jnp.float32) - 8.0
    return jnp.take(jnp.asarray(NF4_VALUES), codes.astype(jnp.int32), mode="clip")


def _padded_rows(w: Packed4) -> jax.Array:
    """float32 [*out, Ip]: the float weight output-major, its zero padding inputs kept."""
    codes = unpack(w.codes, w.group)
    *out, ip = codes.shape
    v = _values(codes, w.kind).reshape(*out, ip // w.group, w.group) * group_scales(w)[..., None]
    return v.reshape(*out, ip)


def dequantize_rows(w: Packed4, dtype=jnp.float32) -> jax.Array:
    """[*out, I]: the float weight output-major, padding dropped."""
    return _padded_rows(w)[..., :math.prod(w.in_shape)].astype(dtype)


def dequantize(w: Packed4, dtype=jnp.float32) -> jax.Array:
    """The float matrix [*in, *out] that w stands for."""
    rows = dequantize_rows(w).reshape(*w.out_shape, *w.in_shape)
    n_out = len(w.out_shape)
    return jnp.transpose(rows, tuple(range(n_out, rows.ndim)) + tuple(range(n_out))).astype(dtype)


def _tiled(x2: jax.Array, w: Packed4, *, per_row: bool) -> jax.Array:
    """x2 [M, Ip] float32 @ w -> float32 [M, O]: a loop over tiles of rows x
    cols inputs, each unpacked and scaled to float32 while in cache; per_row:
    one matrix-vector product per row of x2."""
    m, ip = x2.shape
    g = w.group
    o = math.prod(w.out_shape)
    codes = w.codes.reshape(o, ip // 2)
    scales = group_scales(w).reshape(o, ip // g)
    rows = largest_divisor(o, CPU_TILE_ROWS)
    cols = g * largest_divisor(ip // g, max(1, CPU_TILE_INPUTS // g))  # whole groups
    if rows == o and cols == ip and o % 2 == 0:
        rows = o // 2  # keep the unpacking inside the loop (see ops.int8._tiled)
    gt = cols // g  # groups per tile

    def row_block(b, y):
        def add_tile(t, acc):
            tile = jax.lax.dynamic_slice(codes, (b * rows, t * cols // 2), (rows, cols // 2))
            tile = tile.reshape(rows, gt, 1, g // 2)
            both = jnp.concatenate([tile & 0xF, tile >> 4], axis=2).reshape(rows, gt, g)
            s = jax.lax.dynamic_slice(scales, (b * rows, t * gt), (rows, gt))[..., None]
            wt = (_values(both, w.kind) * s).reshape(rows, cols)
            xc = jax.lax.dynamic_slice(x2, (0, t * cols), (m, cols))
            if per_row:  # x @ tile.T: XLA:CPU's fast float32 matrix-vector form
                t_w = jnp.transpose(wt)
                return acc + jnp.concatenate(
                    [jnp.dot(xc[r:r + 1], t_w, preferred_element_type=jnp.float32) for r in range(m)])
            return acc + jax.lax.dot_general(xc, wt, (((1,), (1,)), ((), ())),
                                             preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, ip // cols, add_tile, jnp.zeros((m, rows), jnp.float32))
        return jax.lax.dynamic_update_slice(y, acc, (0, b * rows))

    return jax.lax.fori_loop(0, o // rows, row_block, jnp.zeros((m, o), jnp.float32))


def int4_product(x: jax.Array, w: Packed4, form: str) -> jax.Array:
    """x [..., *in] @ dequantize(w) -> float32 [..., *out], computed by `form` (INT4_FORMS)."""
    if form not in INT4_FORMS:
        raise ValueError(f"4-bit form must be one of {', '.join(INT4_FORMS)}, got {form!r}")
    if tuple(x.shape[x.ndim - w.n_in:]) != w.in_shape:
        raise ValueError(f"4-bit product: x {x.shape} does not end with the weight's input axes {w.in_shape}")
    lead = x.shape[:x.ndim - w.n_in]
    m, i = math.prod(lead), math.prod(w.in_shape)
    exact = x.dtype if jnp.dtype(x.dtype).itemsize >= 4 else jnp.bfloat16
    x2 = x.reshape(m, i).astype(exact)
    if form in ("cpu", "native"):
        ip = 2 * w.codes.shape[-1]
        xp = jnp.pad(x2, ((0, 0), (0, ip - i))) if ip > i else x2
        if form == "native":
            y = _native_product(xp.astype(jnp.float32), w)
        else:
            y = _tiled(xp.astype(jnp.float32), w, per_row=m <= CPU_ROWS_ONE_BY_ONE)
    else:
        wd = dequantize_rows(w, exact).reshape(-1, i)  # [O, I]
        y = jax.lax.dot_general(x2, wd, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return y.reshape(*lead, *w.out_shape)


def native_serves(w: Packed4) -> bool:
    """Whether the native form can compute products with w here (its group
    size is one the kernel has; the kernels are built: see ops.native)."""
    return w.group in NATIVE_GROUPS and native.available()


def _native_call(xp: jax.Array, w: Packed4) -> jax.Array:
    o = math.prod(w.out_shape)
    codes, scale = w.codes.reshape(o, -1), w.scale.reshape(o, -1)
    if w.kind == "int4":
        target, operands = "starcoder_jax_int4_rows", (codes, scale)
    else:
        target, operands = "starcoder_jax_nf4_rows", (codes, scale, w.scale2.reshape(o, -1), w.offset.reshape(1))
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((xp.shape[0], o), jnp.float32), vmap_method="sequential")
    return call(xp, *operands)


@jax.custom_vjp
def _native_kernel(xp: jax.Array, w: Packed4) -> jax.Array:
    return _native_call(xp, w)


def _native_fwd(xp, w):
    return _native_call(xp, w), w


def _native_bwd(w, g):  # d/dx of x @ w.T; the frozen codes get no cotangent
    rows = _padded_rows(w).reshape(math.prod(w.out_shape), -1)
    return jnp.dot(g, rows, preferred_element_type=jnp.float32), None


_native_kernel.defvjp(_native_fwd, _native_bwd)


def _native_product(xp: jax.Array, w: Packed4) -> jax.Array:
    """xp [M, Ip] float32 @ w -> [M, O] by the native kernel (the "native" form)."""
    if w.group not in NATIVE_GROUPS:
        raise ValueError(f"the native 4-bit form has groups of {NATIVE_GROUPS}, this weight {w.group}")
    native.require("the native 4-bit form")
    return _native_kernel(xp, w)


def int4_lookup(w: Packed4, ids: jax.Array, dtype) -> jax.Array:
    """Rows `ids` of a 4-bit table (w stands for the table's transpose [D, V]:
    codes [V, D / 2]) -> [..., D] in `dtype`."""
    if w.n_in != 1 or len(w.out_shape) != 1:
        raise ValueError(f"4-bit lookup: a table is one input and one output axis, got {w.shape}")
    def take(a):
        return None if a is None else jnp.take(a, ids.reshape(-1), axis=0)

    rows = Packed4(take(w.codes), take(w.scale), take(w.scale2), w.offset, w.in_shape, w.kind)
    return dequantize_rows(rows, dtype).reshape(*ids.shape, w.in_shape[0])

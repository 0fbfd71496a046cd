"""One entry to the weight-only formats: int8 (ops.int8) and 4-bit int4 / nf4 (ops.int4).

A quantized weight is a frozen pytree that stands for a float matrix
w [*in, *out]: `shape`, `n_in`, `in_shape`, `out_shape`, `nbytes`, its stored
layout (`neutral`) and the logical axes and shapes of each array it holds
(`leaf_axes`, `neutral_shapes`, with the weight's own class). Everything that
places, saves or restores weights goes through these, whatever the format.
"""

from __future__ import annotations

import jax

from starcoder_jax.config import QUANTIZATION_MODES
from starcoder_jax.ops import int4, int8

QUANTIZED = (int8.QuantizedWeight, int4.Packed4)


def is_quantized(x) -> bool:
    return isinstance(x, QUANTIZED)


def quantize(w: jax.Array, n_in: int, mode: str):
    """w [*in, *out] (n_in leading input axes) in weight format `mode` (QUANTIZATION_MODES)."""
    if mode == "int8":
        return int8.quantize(w, n_in)
    if mode in int4.FORMATS:
        return int4.quantize(w, n_in, mode)
    raise ValueError(f"weight format must be one of {', '.join(QUANTIZATION_MODES)}, got {mode!r}")


def mode_of(w) -> str | None:
    """The weight format a quantized weight is in; None for anything else (a float array)."""
    if isinstance(w, int8.QuantizedWeight):
        return "int8"
    return w.kind if isinstance(w, int4.Packed4) else None


def dequantize(w, dtype=jax.numpy.float32) -> jax.Array:
    """The float matrix [*in, *out] a quantized weight stands for."""
    return int8.dequantize(w, dtype) if isinstance(w, int8.QuantizedWeight) else int4.dequantize(w, dtype)


def lookup(w, ids: jax.Array, dtype) -> jax.Array:
    """Rows `ids` of a quantized table (w stands for the table's transpose [D, V]) -> [..., D]."""
    if isinstance(w, int8.QuantizedWeight):
        return int8.int8_lookup(w, ids, dtype)
    return int4.int4_lookup(w, ids, dtype)


def tree_of(fn, axes, shapes):
    """fn(axes, shape) over the arrays of a weight, given its `leaf_axes` and
    `neutral_shapes` (tuples at the leaves), in the weight's structure."""
    return jax.tree.map(fn, axes, shapes, is_leaf=lambda x: isinstance(x, tuple))

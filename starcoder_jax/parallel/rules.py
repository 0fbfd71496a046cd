"""The one table of logical-axis rules, and the activation constraint that reads it.

Every array dimension the project owns has a logical name (`heads`, `mlp`,
`batch`, ...): a parameter declares its names where it is created (the
`out_sharding` metadata of its NNX variable), activations and the KV cache
name theirs where they are constrained. `RULES` maps each name to the mesh
axes that split it, and nothing else in the project names a mesh axis. The
mesh always has three axes, in this order:

  data    replicas of the model, each with its own slice of the batch
  fsdp    also slices the batch, and shards the weights (gathered per use)
  tensor  splits heads, MLP width and vocabulary inside every matmul

This module imports nothing from the rest of the package.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
from jax.sharding import AxisType

P = jax.P
MESH_AXES = ("data", "fsdp", "tensor")
MESH_EXAMPLE = "data=2,fsdp=2,tensor=2"

# logical axis -> mesh axes that split it (None: every device holds the whole dimension)
RULES: dict[str, tuple[str, ...] | None] = {
    # activations [B, T, D] at block boundaries
    "batch": ("data", "fsdp"),
    "sequence": None,
    "act_embed": None,  # the residual stream stays whole on each device
    # parameters: FSDP takes the width D of every weight; `tensor` the other big axis
    "vocab": ("tensor",),  # wte [V, D] and lm_head [D, V]
    "embed": ("fsdp",),
    "positions": None,  # wpe [P, D]: P is small next to V, only D is split
    "heads": ("tensor",),  # query heads N (and the output projection's N)
    "kv_heads": ("tensor",),  # multi-head models: K = N heads, split like the query heads
    # Grouped-query models (StarCoder2: 1 < K < N): split over tensor where it divides K,
    # else whole on every device (each device then computes all K heads' keys and values;
    # parallel.mesh.check_fits accepts it and shard-plan says why).
    "grouped_kv_heads": ("tensor",),
    # Multi-query models have ONE key/value head shared by all query heads. A
    # single head cannot be split, so every `tensor` shard holds all of it.
    "shared_kv_head": None,
    "head_dim": None,
    "mlp": ("tensor",),
    "norm": None,  # [D] LayerNorm scales and biases, [D] output biases: tiny
    # LoRA adapters A [*in, r] and B [r, *out] take their kernel's axes; the rank r is small
    # and every matmul contracts or produces it whole, so it is never split.
    "lora_rank": None,
    # the KV cache [B, S, K, H]
    "cache_batch": ("data", "fsdp"),
    "cache_sequence": None,
}

# How a user would name the size behind a logical axis, for error messages.
SIZE_NAMES = {
    "vocab": "vocab_size", "embed": "n_embd", "positions": "n_positions", "heads": "n_head",
    "kv_heads": "kv heads (= n_head, multi_query=False)", "shared_kv_head": "the shared K/V head",
    "grouped_kv_heads": "kv heads (n_kv_head)",
    "head_dim": "head_dim", "mlp": "mlp width (n_inner)", "norm": "n_embd",
    "lora_rank": "the LoRA rank r",
}

ACTIVATION = ("batch", "sequence", "act_embed")  # the residual stream [B, T, D]
# Logical axes a mesh axis splits only where it divides them, whole on every device otherwise.
SPLIT_WHERE_DIVIDES = ("grouped_kv_heads",)


def kv_head_axis(kv_heads: int, n_head: int) -> str:
    """The logical axis of a model's K key/value heads: one shared head is never
    split, K = N heads split like the query heads, grouped heads where they can be."""
    if kv_heads == 1:
        return "shared_kv_head"
    return "kv_heads" if kv_heads == n_head else "grouped_kv_heads"


class ShardingError(ValueError):
    """A mesh that cannot shard a model; the message lists every reason."""


def mesh_sizes(mesh) -> dict[str, int]:
    """Mesh axis name -> size, for a Mesh, an AbstractMesh or a plain dict."""
    return dict(mesh) if isinstance(mesh, Mapping) else dict(mesh.shape)


def mesh_axes(logical: str | None, sizes: Mapping[str, int]) -> tuple[str, ...]:
    """The mesh axes (present in `sizes`) that split a logical axis."""
    if logical is None or logical is P.UNCONSTRAINED:
        return ()
    if logical not in RULES:
        raise ValueError(f"unknown logical axis {logical!r}; RULES names {', '.join(RULES)}")
    return tuple(a for a in (RULES[logical] or ()) if a in sizes)


def spec_entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def logical_spec(logical_axes, mesh, shape=None) -> jax.sharding.PartitionSpec:
    """The PartitionSpec of an array whose dimensions have these logical names.

    With `shape`, a dimension that the product of its mesh axes does not
    divide keeps only the longest prefix of those axes that does (e.g. a
    batch of 1 on data=8 stays whole); parameters are checked with
    `parallel.mesh.check_fits` first. Without it, every mapped axis is used.
    A logical axis of None is whole on every device; `jax.P.UNCONSTRAINED`
    leaves the choice to the partitioner.
    """
    sizes = mesh_sizes(mesh)
    entries = []
    for i, logical in enumerate(logical_axes):
        axes = mesh_axes(logical, sizes)
        if shape is not None:
            while axes and shape[i] % math.prod(sizes[a] for a in axes):
                axes = axes[:-1]
        entries.append(P.UNCONSTRAINED if logical is P.UNCONSTRAINED else spec_entry(axes))
    return P(*entries)


def constrain(x: jax.Array, logical_axes) -> jax.Array:
    """Pins the sharding of an activation inside a jitted function, by logical axes.

    A no-op unless a mesh with our axis names is set (`jax.set_mesh`), so
    single-device programs trace exactly as before. Mesh axes that do not
    divide a dimension are left out of its split; manual axes (inside
    shard_map) are never used.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    sizes = {a: s for a, s in mesh.shape.items() if a in MESH_AXES and types[a] != AxisType.Manual}
    if not sizes:
        return x
    spec = logical_spec(logical_axes, sizes, x.shape)
    if all(types[a] == AxisType.Explicit for a in sizes):
        return jax.sharding.reshard(x, spec)
    return jax.lax.with_sharding_constraint(x, spec)


def mesh_is_set() -> bool:
    """Whether the program being traced runs under a mesh (`jax.set_mesh`)."""
    return not jax.sharding.get_abstract_mesh().empty

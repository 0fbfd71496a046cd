"""Meshes, and placing parameters and batches on them.

A spec such as `data=2,fsdp=2,tensor=2` builds the (data, fsdp, tensor) mesh
on one device, many local devices or many hosts alike (`mesh_from_spec`).
Each parameter's logical axes come from its own metadata (`out_sharding`,
set where the model creates it; an int8 weight's name those of the float
weight it stands for, from which its values' and scales' follow) and
`parallel.rules` maps them to mesh axes; a mesh that cannot shard a model
fails when the shardings are built, naming the dimension, its size and the
mesh axis (`check_fits`).

Meshes use `AxisType.Auto`: XLA's partitioner propagates shardings from the
parameters and from `rules.constrain` calls at block boundaries.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding

from starcoder_jax.ops.quant import is_quantized, tree_of
from starcoder_jax.parallel.rules import (
    MESH_AXES,
    MESH_EXAMPLE,
    SIZE_NAMES,
    SPLIT_WHERE_DIVIDES,
    ShardingError,
    logical_spec,
    mesh_axes,
    mesh_sizes,
)

P = jax.P


def parse_mesh_spec(spec: str, n_devices: int) -> dict[str, int]:
    """`"data=2,fsdp=-1"` -> {"data": 2, "fsdp": n/2, "tensor": 1} for n devices.

    Axes left out have size 1; one axis may be -1 (the devices left over).
    The product must divide n_devices (a smaller mesh uses the first devices).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"mesh spec is empty; expected AXIS=SIZE pairs such as {MESH_EXAMPLE!r}")
    sizes: dict[str, int] = {}
    for piece in spec.split(","):
        name, sep, value = (s.strip() for s in piece.partition("="))
        if not sep or not name or not value:
            raise ValueError(f"mesh spec {spec!r}: {piece.strip()!r} is not AXIS=SIZE "
                             f"(e.g. {MESH_EXAMPLE!r})")
        if name not in MESH_AXES:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; the axes are "
                             f"{', '.join(MESH_AXES)}")
        if name in sizes:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} is given twice")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"mesh spec {spec!r}: size of {name} must be an integer "
                             f"(or -1 for the rest of the devices), got {value!r}") from None
        if size < 1 and size != -1:
            raise ValueError(f"mesh spec {spec!r}: size of {name} must be >= 1 or -1, got {size}")
        sizes[name] = size
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh spec {spec!r}: only one axis may be -1, got {', '.join(rest)}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if rest:
        if n_devices % fixed:
            raise ValueError(
                f"mesh spec {spec!r}: cannot fill {rest[0]}=-1: the other axes use {fixed} "
                f"devices, which does not divide the {n_devices} devices")
        sizes[rest[0]] = n_devices // fixed
    total = math.prod(sizes.values())
    if total > n_devices:
        raise ValueError(f"mesh spec {spec!r} needs {total} devices but only {n_devices} "
                         "are available")
    if n_devices % total:
        raise ValueError(f"mesh spec {spec!r} uses {total} devices, which does not divide "
                         f"the {n_devices} available")
    return {axis: sizes.get(axis, 1) for axis in MESH_AXES}


def mesh_from_spec(spec: str, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh from a spec such as `data=2,fsdp=2,tensor=2`.

    devices: defaults to every device of every process (`jax.devices()`).
    Across hosts the mesh must use every device, since each process must
    own some of it.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    used = math.prod(sizes.values())
    if jax.process_count() > 1 and used != len(devices):
        raise ValueError(f"mesh spec {spec!r} uses {used} of the {len(devices)} devices; "
                         f"across {jax.process_count()} processes a mesh must use all of them")
    return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices[:used])


def abstract_mesh_from_spec(spec: str, n_devices: int) -> AbstractMesh:
    """The mesh of `spec` over n_devices that need not exist (for planning a pod)."""
    sizes = parse_mesh_spec(spec, n_devices)
    return AbstractMesh(tuple(sizes.values()), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def as_mesh(mesh: Mesh | str) -> Mesh:
    return mesh_from_spec(mesh) if isinstance(mesh, str) else mesh


def param_axes(path, var) -> tuple[str | None, ...]:
    """The logical axes a parameter declared where it was created."""
    axes = var.get_metadata().get("out_sharding")
    if axes is None:
        raise ValueError(f"parameter {'.'.join(map(str, path))} declares no logical axes "
                         "(give its nnx.Param out_sharding=(...) where the model creates it)")
    if len(axes) != len(var.get_value().shape):
        raise ValueError(f"parameter {'.'.join(map(str, path))} has shape {var.get_value().shape} "
                         f"but declares the logical axes {axes}")
    return tuple(axes)


def _arrays(path, var, fn):
    """fn(logical axes, shape) for each array a parameter holds, in the
    structure of its value: an array, or a quantized weight (ops.quant) whose
    arrays are placed in the stored layout (a mesh never holds the CPU's
    input-blocked int8 one)."""
    axes, value = param_axes(path, var), var.get_value()
    if is_quantized(value):
        return tree_of(fn, value.leaf_axes(axes), value.neutral_shapes())
    return fn(axes, tuple(value.shape))


def _leaves(tree) -> list:
    return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, list)) if is_quantized(tree) else [tree]


def check_fits(params: nnx.State, mesh) -> None:
    """Raises ShardingError if a parameter dimension is not divisible by its mesh axes.

    params: the model's state (`nnx.state(model)`, or that of an abstract
    model). One message lists every problem, each with the dimension, its
    size and the mesh axis size.
    """
    sizes = mesh_sizes(mesh)
    problems = {}
    for path, var in nnx.to_flat_state(params):
        dims = [d for leaf in _leaves(_arrays(path, var, lambda a, s: list(zip(a, s)))) for d in leaf]
        for logical, size in dims:
            axes_of = mesh_axes(logical, sizes)
            split = math.prod(sizes[a] for a in axes_of)
            if split == 1 or size % split == 0 or logical in problems or logical in SPLIT_WHERE_DIVIDES:
                continue
            where = " x ".join(f"{a}={sizes[a]}" for a in axes_of)
            hint = {
                "vocab": f"pad the vocabulary to a multiple of {split} (vocab_size="
                         f"{-(-size // split) * split}, extra rows never sampled) or use a "
                         "tensor size that divides it",
                "heads": f"use a tensor size that divides {size}: {_divisors(size)}",
                "kv_heads": f"use a tensor size that divides {size}: {_divisors(size)}",
                "mlp": f"use a tensor size that divides {size}",
                "embed": f"use an fsdp size that divides {size}",
            }.get(logical, "change the mesh")
            problems[logical] = (f"{SIZE_NAMES.get(logical, logical)}={size} is not divisible by the "
                                 f"mesh's {where} ({logical!r} is split over {', '.join(axes_of)}); {hint}")
    if problems:
        mesh_desc = ",".join(f"{a}={s}" for a, s in sizes.items())
        raise ShardingError(f"mesh {mesh_desc} cannot shard this model "
                            f"({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n  "
                            + "\n  ".join(problems.values()))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def param_specs(params: nnx.State, mesh) -> dict:
    """PartitionSpec of every parameter path (for a quantized weight, one per
    array it holds, in its structure), after check_fits."""
    check_fits(params, mesh)
    return {path: _arrays(path, var, lambda axes, shape: logical_spec(axes, mesh, shape))
            for path, var in nnx.to_flat_state(params)}


def param_shardings(params: nnx.State, mesh: Mesh | str) -> dict[tuple, NamedSharding]:
    """NamedSharding of every parameter path: what `load_pretrained(shardings=)` takes."""
    mesh = as_mesh(mesh)
    return {path: jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))
            for path, specs in param_specs(params, mesh).items()}


def state_shardings(params: nnx.State, mesh: Mesh | str) -> nnx.State:
    """An nnx.State of NamedShardings with the structure of `params` (or of their gradients).

    For `jax.jit(..., out_shardings=)`: without it a gradient step under a
    mesh returns fsdp-split gradients whole on every device (an all-reduce
    where a reduce-scatter would do).
    """
    shardings = param_shardings(params, mesh)

    def sharding(path, var):  # a quantized weight: its structure of shardings inside its variable
        s = shardings[path]
        return var.replace(s) if is_quantized(s) else s

    return nnx.map_state(sharding, params)


def map_placed(fn, tree, shardings):
    """fn(leaf, its sharding) over every leaf of `tree`, the shardings given as a prefix
    tree of it (as jax.jit's out_shardings: one sharding for a variable's arrays)."""
    return jax.tree.map(lambda s, sub: jax.tree.map(lambda x: fn(x, s), sub), shardings, tree,
                        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


def abstract_on_mesh(params: nnx.State, mesh: Mesh | str) -> nnx.State:
    """The state with each array a jax.ShapeDtypeStruct carrying its sharding per the rules:
    what a compile on abstract inputs takes for params placed by `shard_state`."""
    shardings = param_shardings(params, mesh)

    def abstract(path, var):
        value = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             var.get_value(), shardings[path])
        return var.replace(value)

    return nnx.map_state(abstract, params)


def put(value, sharding: NamedSharding):
    """device_put that also works when `sharding` spans other processes' devices.

    Every process must then pass the same value (the same checkpoint, seed or batch).
    """
    if isinstance(value, jax.Array) and value.sharding == sharding:
        return value
    if not sharding.is_fully_addressable and isinstance(value, jax.Array) \
            and value.is_fully_addressable:
        value = np.asarray(value)
    return jax.device_put(value, sharding)


def shard_state(params: nnx.State, mesh: Mesh | str) -> nnx.State:
    """Puts every parameter of a split model (`nnx.split(model)[1]`) on its sharding.

    In place: the variables (shared with the model that was split) get the
    resharded arrays, so the old buffers are freed as each one is replaced.
    """
    shardings = param_shardings(params, mesh)
    for path, var in nnx.to_flat_state(params):
        value, sharding = var.get_value(), shardings[path]
        if is_quantized(value):
            var.set_value(jax.tree.map(put, value.neutral(), sharding))
        else:
            var.set_value(put(value, sharding))
    return params


def shard_model(model, mesh: Mesh | str):
    """Reshards every parameter of an NNX model onto `mesh` per the rules, in place; returns it."""
    shard_state(nnx.state(model), mesh)
    return model


def batch_rows_per_device(batch: int, mesh) -> int:
    """Rows of a [B, ...] batch each device holds (ceil: uneven batches are padded)."""
    sizes = mesh_sizes(mesh)
    return -(-batch // math.prod(sizes[a] for a in mesh_axes("batch", sizes)))


def batch_sharding(mesh: Mesh | str, ndim: int, batch_dim: int = 0) -> NamedSharding:
    """Where a batch of `ndim` dimensions lives: its rows (dimension batch_dim) over data and
    fsdp, the rest whole. `place_batch`, `place_rows` and the train step's shardings use it."""
    mesh = as_mesh(mesh)
    logical = [None] * ndim
    logical[batch_dim] = "batch"
    return NamedSharding(mesh, logical_spec(logical, mesh))


def place_batch(x, mesh: Mesh | str, *, batch_dim: int = 0) -> jax.Array:
    """Puts a batch on the mesh with its rows (dimension `batch_dim`) split over data and fsdp.

    Every process passes the same whole batch (the training data is a pure
    function of (seed, step), so each host computes it) and keeps its own rows.
    """
    mesh = as_mesh(mesh)
    x = np.asarray(x)
    sharding = batch_sharding(mesh, x.ndim, batch_dim)
    split = math.prod(mesh.shape[a] for a in jax.tree.leaves(sharding.spec[batch_dim]))
    if x.shape[batch_dim] % split:
        raise ValueError(f"a batch of {x.shape[batch_dim]} rows is not divisible by the {split} row "
                         f"shards of mesh {dict(mesh.shape)} (data x fsdp); pad the batch")
    return put(x, sharding)


def place_rows(fetch, shape: tuple[int, ...], mesh: Mesh | str, *, batch_dim: int = 0) -> tuple[jax.Array, ...]:
    """Global arrays of `shape` whose rows (dimension `batch_dim`, split over data and fsdp
    as in `place_batch`) come from `fetch`, asked only for the rows this process holds.

    A row is a position in the dimensions up to batch_dim, numbered in C order (for
    [A, b, T] and batch_dim=1: a * b + i). fetch(rows) -> a tuple of arrays
    [len(rows), *shape[batch_dim + 1:]], one per output. Every process passes the
    same shape; each computes only its own rows (a pure function of the step).
    """
    mesh = as_mesh(mesh)
    sharding = batch_sharding(mesh, len(shape), batch_dim)
    split = math.prod(mesh.shape[a] for a in jax.tree.leaves(sharding.spec[batch_dim]))
    if shape[batch_dim] % split:
        raise ValueError(f"a batch of {shape[batch_dim]} rows is not divisible by the {split} row "
                         f"shards of mesh {dict(mesh.shape)} (data x fsdp); pad the batch")
    lead = shape[:batch_dim + 1]
    grid = np.arange(math.prod(lead)).reshape(lead)
    index_map = sharding.addressable_devices_indices_map(tuple(shape))
    local = np.unique(np.concatenate([grid[index[:batch_dim + 1]].ravel() for index in index_map.values()]))
    arrays = fetch(local)
    position = {int(r): k for k, r in enumerate(local)}

    def build(values):
        def piece(index):
            rows = grid[index[:batch_dim + 1]]
            got = values[[position[int(r)] for r in rows.ravel()]]
            got = got.reshape(rows.shape + got.shape[1:])
            return got[(slice(None),) * (batch_dim + 1) + tuple(index[batch_dim + 1:])]

        return jax.make_array_from_callback(tuple(shape), sharding, piece)

    return tuple(build(np.asarray(v)) for v in arrays)

"""Meshes and the one table of logical-axis rules.

Every array dimension the model owns has a logical name (`heads`, `mlp`,
`batch`, ...). `RULES` maps each name to the mesh axes that split it, and
nothing else in the project names a mesh axis. The mesh always has three
axes, in this order:

  data    replicas of the model, each with its own slice of the batch
  fsdp    also slices the batch, and shards the weights (gathered per use)
  tensor  splits heads, MLP width and vocabulary inside every matmul

A spec such as `data=2,fsdp=2,tensor=2` builds it on one device, many local
devices or many hosts alike (`mesh_from_spec`). A mesh/config pair that
cannot work fails when the shardings are built, naming the dimension, its
size and the mesh axis (`check_fits`).

Meshes use `AxisType.Auto`: XLA's partitioner propagates shardings from the
parameters and from `constrain` calls at block boundaries. Those calls are
no-ops unless a mesh is set with `jax.set_mesh`, so single-device programs
are unchanged.

Shape letters as in model.py: B batch, T tokens, S cache length, D width,
N query heads, K kv heads, H head dim, F mlp width, V vocab, P positions.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding

from starcoder_jax.config import PRESETS, StarCoderConfig, preset
from starcoder_jax.kv_cache import KVCache

P = jax.P
MESH_AXES = ("data", "fsdp", "tensor")
MESH_EXAMPLE = "data=2,fsdp=2,tensor=2"

# ---------------------------------------------------------------------------
# The rules: logical axis -> mesh axes that split it (None: every device
# holds the whole dimension).
# ---------------------------------------------------------------------------
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
    # Multi-query models have ONE key/value head shared by all query heads. A
    # single head cannot be split, so every `tensor` shard holds all of it.
    "shared_kv_head": None,
    "head_dim": None,
    "mlp": ("tensor",),
    "in_block": None,  # inputs within one block of an input-blocked int8 kernel
    "norm": None,  # [D] LayerNorm scales and biases, [D] output biases: tiny
    # the KV cache [B, S, K, H]
    "cache_batch": ("data", "fsdp"),
    "cache_sequence": None,
}

ACTIVATION = ("batch", "sequence", "act_embed")  # the residual stream [B, T, D]


class ShardingError(ValueError):
    """A mesh that cannot shard a model; the message lists every reason."""


def kv_axis(config: StarCoderConfig) -> str:
    """The logical name of the K axis: split for multi-head, shared for multi-query."""
    return "shared_kv_head" if config.multi_query else "kv_heads"


def param_axes_table(config: StarCoderConfig) -> dict[tuple[str, ...], tuple[str, ...]]:
    """Logical axes of every parameter, keyed by its path without block indices."""
    kv = kv_axis(config)
    block = {
        ("ln_1", "scale"): ("norm",), ("ln_1", "bias"): ("norm",),
        ("ln_2", "scale"): ("norm",), ("ln_2", "bias"): ("norm",),
        ("attn", "query", "kernel"): ("embed", "heads", "head_dim"),  # [D, N, H]
        ("attn", "query", "bias"): ("heads", "head_dim"),  # [N, H]
        ("attn", "key", "kernel"): ("embed", kv, "head_dim"),  # [D, K, H]
        ("attn", "key", "bias"): (kv, "head_dim"),
        ("attn", "value", "kernel"): ("embed", kv, "head_dim"),
        ("attn", "value", "bias"): (kv, "head_dim"),
        ("attn", "out", "kernel"): ("heads", "head_dim", "embed"),  # [N, H, D]
        ("attn", "out", "bias"): ("norm",),
        ("mlp", "fc", "kernel"): ("embed", "mlp"),  # [D, F]
        ("mlp", "fc", "bias"): ("mlp",),
        ("mlp", "proj", "kernel"): ("mlp", "embed"),  # [F, D]
        ("mlp", "proj", "bias"): ("norm",),
    }
    # int8 models (starcoder_jax.quant): kernels are stored output-major, and
    # each scale is split like its kernel's output axes. An input-blocked
    # kernel [C, *out, in0 / C, *in_rest] splits its blocks C like in0 (so a
    # shard holds a contiguous range of inputs, like its activations) when
    # the mesh axes divide C, and otherwise the inputs within each block
    # ("in_block", see param_specs).
    from starcoder_jax.quant import input_blocks

    sizes = _dimensions(config)
    for (*module, name), axes in list(block.items()):
        if name == "kernel":
            n_in = 2 if module == ["attn", "out"] else 1
            out_axes, in_axes = axes[n_in:], axes[:n_in]
            if input_blocks(tuple(sizes[a][0] for a in in_axes)) > 1:
                block[(*module, "qkernel")] = (in_axes[0],) + out_axes + ("in_block",) + in_axes[1:]
            else:
                block[(*module, "qkernel")] = out_axes + in_axes
            block[(*module, "kernel_scale")] = out_axes
    table = {("blocks", *k): v for k, v in block.items()}
    table.update({
        ("wte", "embedding"): ("vocab", "embed"),
        ("wpe", "embedding"): ("positions", "embed"),
        ("lm_head",): ("embed", "vocab"),
        ("ln_f", "scale"): ("norm",), ("ln_f", "bias"): ("norm",),
        ("wte", "qembedding"): ("vocab", "embed"),  # int8 models
        ("wte", "embedding_scale"): ("vocab",),
        ("lm_head_q",): ("vocab", "embed"),
        ("lm_head_scale",): ("vocab",),
    })
    return table


def cache_axes(config: StarCoderConfig) -> tuple[str, ...]:
    """Logical axes of each cache slab [B, S, K, H]."""
    return ("cache_batch", "cache_sequence", kv_axis(config), "head_dim")


def _dimensions(config: StarCoderConfig) -> dict[str, tuple[int, str]]:
    """Logical axis -> (size, how a user would name it) for the parameters."""
    return {
        "vocab": (config.vocab_size, "vocab_size"),
        "embed": (config.n_embd, "n_embd"),
        "positions": (config.n_positions, "n_positions"),
        "heads": (config.n_head, "n_head"),
        "kv_heads": (config.kv_heads, "kv heads (= n_head, multi_query=False)"),
        "shared_kv_head": (1, "the shared K/V head"),
        "head_dim": (config.head_dim, "head_dim"),
        "mlp": (config.mlp_dim, "mlp width (n_inner)"),
        "norm": (config.n_embd, "n_embd"),
    }


# ---------------------------------------------------------------------------
# Meshes
# ---------------------------------------------------------------------------

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


def _sizes(mesh) -> dict[str, int]:
    """Mesh axis name -> size, for a Mesh, an AbstractMesh or a plain dict."""
    return dict(mesh) if isinstance(mesh, Mapping) else dict(mesh.shape)


# ---------------------------------------------------------------------------
# Logical axes -> PartitionSpec
# ---------------------------------------------------------------------------

def _mesh_axes(logical: str | None, sizes: Mapping[str, int]) -> tuple[str, ...]:
    if logical is None or logical is P.UNCONSTRAINED:
        return ()
    if logical not in RULES:
        raise ValueError(f"unknown logical axis {logical!r}; RULES names {', '.join(RULES)}")
    return tuple(a for a in (RULES[logical] or ()) if a in sizes)


def _entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def logical_spec(logical_axes, mesh, shape=None) -> jax.sharding.PartitionSpec:
    """The PartitionSpec of an array whose dimensions have these logical names.

    With `shape`, a dimension that the product of its mesh axes does not
    divide keeps only the longest prefix of those axes that does (for
    activations and caches, e.g. a batch of 1 on data=8 stays whole; for
    parameters, which check_fits has checked, only the input blocks of an
    int8 kernel can be cut short, and param_specs then splits the inputs
    within the blocks). Without it, every mapped axis is used.
    A logical axis of None is whole on every device; `jax.P.UNCONSTRAINED`
    leaves the choice to the partitioner.
    """
    sizes = _sizes(mesh)
    entries = []
    for i, logical in enumerate(logical_axes):
        axes = _mesh_axes(logical, sizes)
        if shape is not None:
            while axes and shape[i] % math.prod(sizes[a] for a in axes):
                axes = axes[:-1]
        entries.append(P.UNCONSTRAINED if logical is P.UNCONSTRAINED else _entry(axes))
    return P(*entries)


def check_fits(config: StarCoderConfig, mesh) -> None:
    """Raises ShardingError if a parameter dimension is not divisible by its mesh axes.

    One message lists every problem, each with the dimension, its size and
    the mesh axis size.
    """
    sizes = _sizes(mesh)
    dims = _dimensions(config)
    used = {name for axes in param_axes_table(config).values() for name in axes}
    problems = []
    for logical in [name for name in RULES if name in used]:
        axes = _mesh_axes(logical, sizes)
        split = math.prod(sizes[a] for a in axes)
        if split == 1:
            continue
        size, what = dims[logical]
        if size % split == 0:
            continue
        where = " x ".join(f"{a}={sizes[a]}" for a in axes)
        hint = {
            "vocab": f"pad the vocabulary to a multiple of {split} (vocab_size="
                     f"{-(-size // split) * split}, extra rows never sampled) or use a "
                     "tensor size that divides it",
            "heads": f"use a tensor size that divides {size}: {_divisors(size)}",
            "kv_heads": f"use a tensor size that divides {size}: {_divisors(size)}",
            "mlp": f"use a tensor size that divides {size}",
            "embed": f"use an fsdp size that divides {size}",
        }.get(logical, "change the mesh")
        problems.append(f"{what}={size} is not divisible by the mesh's {where} "
                        f"({logical!r} is split over {', '.join(axes)}); {hint}")
    if problems:
        mesh_desc = ",".join(f"{a}={s}" for a, s in sizes.items())
        raise ShardingError(f"mesh {mesh_desc} cannot shard this model "
                            f"({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n  "
                            + "\n  ".join(problems))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def param_logical_axes(config: StarCoderConfig, path: tuple, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of the parameter at `path` (e.g. ("blocks", 3, "mlp", "fc", "kernel"))."""
    key = tuple(p for p in path if not isinstance(p, int))
    table = param_axes_table(config)
    if key not in table:
        raise KeyError(f"no logical axes for parameter {'.'.join(map(str, path))}; "
                       "add it to sharding.param_axes_table")
    axes = table[key]
    if ndim == len(axes) + 1:  # parameters stacked over layers (a scanned model)
        axes = (None, *axes)
    if ndim != len(axes):
        raise ValueError(f"parameter {'.'.join(map(str, path))} has {ndim} dims but its "
                         f"logical axes are {axes}")
    return axes


def _flat_params(config: StarCoderConfig):
    """(path, ShapeDtypeStruct) of every parameter of the abstract model."""
    from starcoder_jax.model import abstract_model

    _, state = nnx.split(abstract_model(config))
    return [(path, var.get_value()) for path, var in nnx.to_flat_state(state)]


def param_specs(config: StarCoderConfig, mesh) -> dict[tuple, jax.sharding.PartitionSpec]:
    """PartitionSpec of every parameter path, after check_fits."""
    check_fits(config, mesh)
    specs = {}
    for path, sds in _flat_params(config):
        axes = param_logical_axes(config, path, len(sds.shape))
        spec = logical_spec(axes, mesh, sds.shape)
        if "in_block" in axes:
            spec = _input_blocked_spec(axes, sds.shape, spec, mesh)
        specs[path] = spec
    return specs


def _input_blocked_spec(axes, shape, spec, mesh) -> jax.sharding.PartitionSpec:
    """The spec of an input-blocked int8 kernel [(L,) C, *out, in0 / C, *in_rest].

    Its blocks C are split like the input axis in0 when the mesh axes of in0
    divide C. When they do not (tensor=8 on starcoderbase-1b's MLP output
    projection, C = 4; fsdp on a 15B-width model, C = 3 on every projection
    from the residual stream), the inputs within each block are split
    instead, so that no device holds the whole kernel; the activations are
    then resharded for the product, which XLA's partitioner does.
    """
    sizes = _sizes(mesh)
    c_dim = 1 if axes[0] is None else 0  # parameters stacked over layers lead with L
    b_dim = axes.index("in_block")
    want = _mesh_axes(axes[c_dim], sizes)
    entries = list(spec)
    if not want or entries[c_dim] == _entry(want) or shape[b_dim] % math.prod(sizes[a] for a in want):
        return spec
    entries[c_dim], entries[b_dim] = None, _entry(want)
    return P(*entries)


def param_shardings(config: StarCoderConfig, mesh: Mesh | str) -> dict[tuple, NamedSharding]:
    """NamedSharding of every parameter path: what `load_pretrained(shardings=)` takes."""
    mesh = as_mesh(mesh)
    return {path: NamedSharding(mesh, spec) for path, spec in param_specs(config, mesh).items()}


def state_shardings(config: StarCoderConfig, state: nnx.State, mesh: Mesh | str) -> nnx.State:
    """An nnx.State of NamedShardings with the structure of `state` (params or their gradients).

    For `jax.jit(..., out_shardings=)`: without it a gradient step under a
    mesh returns fsdp-split gradients whole on every device (an all-reduce
    where a reduce-scatter would do).
    """
    shardings = param_shardings(config, mesh)
    return nnx.map_state(lambda path, _: shardings[path], state)


def cache_sharding(config: StarCoderConfig, mesh: Mesh | str, batch: int | None = None
                   ) -> NamedSharding:
    """The sharding of every k / v slab [B, S, K, H] of a KVCache.

    Rows over data and fsdp; kv heads over tensor for multi-head models and
    whole on every device for multi-query ones. With `batch`, mesh axes that
    do not divide it are dropped from the row split.
    """
    mesh = as_mesh(mesh)
    check_fits(config, mesh)
    shape = None if batch is None else (batch, 1, config.kv_heads, config.head_dim)
    return NamedSharding(mesh, logical_spec(cache_axes(config), mesh, shape))


def batch_sharding(mesh: Mesh | str, shape) -> NamedSharding:
    """Sharding of an input batch [B, ...]: rows over data and fsdp."""
    mesh = as_mesh(mesh)
    logical = ("batch",) + (None,) * (len(shape) - 1)
    return NamedSharding(mesh, logical_spec(logical, mesh, shape))


# ---------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------

def on_cpu_without_mesh() -> bool:
    """Whether the program being traced runs on XLA:CPU with no mesh set: where
    the CPU-specific product forms (int8 tiles, bfloat16_matmul) apply."""
    return jax.default_backend() == "cpu" and jax.sharding.get_abstract_mesh().empty


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


# ---------------------------------------------------------------------------
# Placing a model
# ---------------------------------------------------------------------------

def _put(value, sharding: NamedSharding):
    """device_put that also works when `sharding` spans other processes' devices.

    Every process must then pass the same value (the same checkpoint or seed).
    """
    if isinstance(value, jax.Array) and value.sharding == sharding:
        return value
    if not sharding.is_fully_addressable and isinstance(value, jax.Array) \
            and value.is_fully_addressable:
        value = np.asarray(value)
    return jax.device_put(value, sharding)


def shard_state(config: StarCoderConfig, state: nnx.State, mesh: Mesh | str) -> nnx.State:
    """Puts every parameter of a split model (`nnx.split(model)[1]`) on its sharding.

    In place: the variables (shared with the model that was split) get the
    resharded arrays, so the old buffers are freed as each one is replaced.
    """
    shardings = param_shardings(config, mesh)
    for path, var in nnx.to_flat_state(state):
        var.set_value(_put(var.get_value(), shardings[path]))
    return state


def shard_model(model, mesh: Mesh | str):
    """Reshards every parameter of `model` onto `mesh` per the rules, in place; returns it."""
    shard_state(model.config, nnx.split(model)[1], mesh)
    return model


# ---------------------------------------------------------------------------
# Running the generator's jitted calls under a mesh
# ---------------------------------------------------------------------------

class MeshRunner:
    """Places inputs and runs jitted generation calls (prefill, decode loop) on a mesh.

    The KV cache inside their state is sharded per `cache_sharding`; every
    other output (tokens, flags, the [B, V] seen-mask) is replicated, so each
    process can read it with np.asarray, also across hosts. Each jitted
    function is re-jitted once with those out_shardings and its donation.
    """

    def __init__(self, config: StarCoderConfig, mesh: Mesh | str):
        self.mesh = as_mesh(mesh)
        self.config = config
        check_fits(config, self.mesh)
        sizes = _sizes(self.mesh)
        self.batch_shards = math.prod(sizes[a] for a in _mesh_axes("cache_batch", sizes))
        self.cache = cache_sharding(config, self.mesh)
        self.replicated = NamedSharding(self.mesh, P())
        self._jitted: dict = {}

    def round_batch(self, batch: int) -> int:
        """The batch rounded up to a multiple of the row split (data x fsdp)."""
        return -(-batch // self.batch_shards) * self.batch_shards

    def place_params(self, params: nnx.State) -> nnx.State:
        return shard_state(self.config, params, self.mesh)

    def _place(self, x):
        if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) \
                and x.sharding.mesh == self.mesh:
            return x
        if isinstance(x, (jax.Array, np.ndarray, np.generic)):
            return _put(np.asarray(x), self.replicated)
        return x  # static arguments (the graphdef) and Python values pass through

    def _out_shardings(self, out):
        def per_node(node):
            if isinstance(node, KVCache):
                return node.shardings(self.cache)
            return self.replicated

        return jax.tree.map(per_node, out, is_leaf=lambda n: isinstance(n, KVCache))

    def call(self, fn: Callable, donate: tuple[str, ...], *args, **kwargs):
        """fn(*args, **kwargs) on the mesh; fn is a jax.jit function with a static `graphdef`."""
        args, kwargs = jax.tree.map(self._place, (args, kwargs))
        with jax.set_mesh(self.mesh):
            if fn not in self._jitted:
                shapes = getattr(fn, "eval_shape", None) or functools.partial(jax.eval_shape, fn)
                out = shapes(*args, **kwargs)
                self._jitted[fn] = jax.jit(
                    getattr(fn, "__wrapped__", fn), static_argnames=("graphdef",),
                    donate_argnames=donate, out_shardings=self._out_shardings(out))
            return self._jitted[fn](*args, **kwargs)


# ---------------------------------------------------------------------------
# shard-plan: bytes per device, from shapes only
# ---------------------------------------------------------------------------

ACTIVATION_FORMULA = {
    "inference": ("b*T*(dt*(4*D + 2*F/t) + 4*(N/t)*T) + 4*b*V/t: one block's live set "
                  "(residual, LayerNorm out, MLP hidden) and its float32 attention scores, "
                  "plus the last position's float32 logits"),
    "train": ("L*b*T*(dt*(4*D + 2*D/t + 2*K*H/tk + 2*F/t) + 8*(N/t)*T) + 8*b*T*V/t: every "
              "layer keeps its inputs for the backward pass (residuals, LayerNorm outs, "
              "q/k/v, attention out, MLP hidden pre/post GELU, float32 scores and probs), "
              "plus float32 logits and their gradient; no rematerialisation"),
}
KV_FORMULA = "L*2*b*S*(K/tk)*H*dt (k and v per layer)"
SYMBOLS = ("b = batch rows per device = B/(data*fsdp); t = tensor; tk = t for multi-head, "
           "1 for multi-query (the shared head is whole on every device); dt = bytes of "
           "the compute dtype")


def _model_config(model: str | StarCoderConfig) -> tuple[str, StarCoderConfig]:
    if isinstance(model, StarCoderConfig):
        return "config", model
    if os.path.isdir(model):
        return model, StarCoderConfig.from_hf(model)
    if model.removeprefix("bigcode/") in PRESETS:
        return model, preset(model)
    raise ValueError(f"model {model!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                     "nor a directory with a config.json")


def shard_plan(config: StarCoderConfig | str, mesh_spec: str, *, batch: int = 1,
               seq: int | None = None, dtype: str | None = None, optimizer: str | None = None,
               devices: int | None = None, device_memory_gb: float | None = None) -> dict:
    """Bytes per device of a model on a mesh, from shapes only (nothing is allocated).

    config: a StarCoderConfig, a preset name or a model directory.
    mesh_spec: e.g. "data=-1,fsdp=8"; `devices` (default: this machine's
      device count) lets a 64-device pod be planned from a laptop.
    batch, seq: the global batch B and sequence / cache length S (default:
      n_positions).
    dtype: parameter and compute dtype (default: the config's).
    optimizer: None (inference: params + activations + KV cache) or "adamw"
      (training: params + gradients + AdamW state + activations).
    device_memory_gb: when given, `fits` says whether the total fits (GiB).

    Returns a dict: per_device and whole_model byte counts, the formulas
    used, and the mesh.
    """
    name, config = _model_config(config)
    if dtype is not None:
        config = config.replace(param_dtype=dtype, dtype=dtype)
    if optimizer not in (None, "none", "adamw"):
        raise ValueError(f"optimizer must be None or 'adamw', got {optimizer!r}")
    training = optimizer == "adamw"
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    seq = config.n_positions if seq is None else seq
    if not isinstance(seq, int) or not 1 <= seq <= config.n_positions:
        raise ValueError(f"seq must be in [1, {config.n_positions}] (n_positions), got {seq!r}")
    n_devices = jax.device_count() if devices is None else devices
    mesh = abstract_mesh_from_spec(mesh_spec, n_devices)
    sizes = _sizes(mesh)
    check_fits(config, mesh)

    pdt, cdt = jnp.dtype(config.param_dtype).itemsize, jnp.dtype(config.dtype).itemsize
    param_elems = whole_elems = 0
    for path, sds in _flat_params(config):
        spec = logical_spec(param_logical_axes(config, path, len(sds.shape)), mesh, sds.shape)
        param_elems += math.prod(NamedSharding(mesh, spec).shard_shape(sds.shape))
        whole_elems += math.prod(sds.shape)

    t = sizes["tensor"]
    tk = 1 if config.multi_query else t
    rows = batch_rows_per_device(batch, sizes)
    d, f, n, h = config.n_embd, config.mlp_dim, config.n_head, config.head_dim
    k, v, layers = config.kv_heads, config.vocab_size, config.n_layer
    if training:
        acts = layers * rows * seq * (cdt * (4 * d + 2 * d // t + 2 * k * h // tk + 2 * f // t)
                                      + 8 * (n // t) * seq) + 8 * rows * seq * v // t
    else:
        acts = rows * seq * (cdt * (4 * d + 2 * f // t) + 4 * (n // t) * seq) + 4 * rows * v // t
    # AdamW: two float32 moments, plus a float32 master copy of low-precision params.
    opt_per_elem = (8 + (4 if pdt < 4 else 0)) if training else 0
    per_device = {
        "params": param_elems * pdt,
        "gradients": param_elems * pdt if training else 0,
        "optimizer": param_elems * opt_per_elem,
        "activations": acts,
        "kv_cache": 0 if training else layers * 2 * rows * seq * (k // tk) * h * cdt,
    }
    per_device["total"] = sum(per_device.values())
    limit = None if device_memory_gb is None else int(device_memory_gb * 2**30)
    return {
        "model": name,
        "mesh": sizes,
        "devices": n_devices,
        "mode": "train" if training else "inference",
        "batch": batch,
        "seq": seq,
        "param_dtype": config.param_dtype,
        "dtype": config.dtype,
        "param_count": whole_elems,
        "per_device": per_device,
        "whole_model": {"params": whole_elems * pdt},
        "device_memory": limit,
        "fits": None if limit is None else per_device["total"] <= limit,
        "formulas": {
            "activations": ACTIVATION_FORMULA["train" if training else "inference"],
            "kv_cache": KV_FORMULA if not training else "no cache in training",
            "optimizer": ("AdamW: mu and nu in float32 (8 bytes per parameter) + a float32 "
                          "master copy when params are 16-bit (4 bytes)") if training else "none",
            "symbols": SYMBOLS,
        },
    }


def batch_rows_per_device(batch: int, mesh) -> int:
    """Rows of a [B, ...] batch each device holds (ceil: uneven batches are padded)."""
    sizes = _sizes(mesh)
    return -(-batch // math.prod(sizes[a] for a in _mesh_axes("batch", sizes)))


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB"


def format_shard_plan(plan: dict) -> str:
    """The plan as a table of per-device bytes, then the formulas behind it."""
    mesh = ",".join(f"{a}={s}" for a, s in plan["mesh"].items())
    lines = [
        f"model {plan['model']}: {plan['param_count']:,} parameters "
        f"({plan['param_dtype']}, whole model {_gib(plan['whole_model']['params'])})",
        f"mesh {mesh} over {plan['devices']} devices; {plan['mode']}, batch {plan['batch']} "
        f"x seq {plan['seq']}",
        "",
        f"{'per device':<14}{'bytes':>18}{'GiB':>12}",
    ]
    for key, value in plan["per_device"].items():
        if key == "total":
            lines.append("-" * 44)
        lines.append(f"{key:<14}{value:>18,}{value / 2**30:>12.3f}")
    if plan["fits"] is not None:
        verdict = "fits in" if plan["fits"] else "does NOT fit in"
        lines.append(f"\n{verdict} {_gib(plan['device_memory'])} per device")
    lines.append("")
    for key, text in plan["formulas"].items():
        lines.append(f"{key}: {text}")
    return "\n".join(lines)


def cmd_shard_plan(args) -> int:
    plan = shard_plan(args.model, args.mesh, batch=args.batch, seq=args.seq, dtype=args.dtype,
                      optimizer=None if args.optimizer == "none" else args.optimizer,
                      devices=args.devices, device_memory_gb=args.device_memory)
    print(json.dumps(plan, indent=2) if args.json else format_shard_plan(plan))
    return 0 if plan["fits"] in (None, True) else 1


def add_shard_plan_parser(subparsers) -> argparse.ArgumentParser:
    """Adds `starcoder-jax shard-plan` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "shard-plan", help="bytes per device of a model on a mesh (shapes only, no compute)",
        description="Bytes per device of params, gradients, optimizer state, activations and "
                    "KV cache for a model on a (data, fsdp, tensor) mesh. Exit status 1 when "
                    "--device-memory is given and the total does not fit.")
    p.add_argument("--model", required=True, help="preset name (e.g. starcoderbase-1b) or a "
                                                   "model directory with config.json")
    p.add_argument("--mesh", required=True, help=f"mesh spec, e.g. {MESH_EXAMPLE} "
                                                 "(one axis may be -1: the rest)")
    p.add_argument("--batch", type=int, default=1, help="global batch size")
    p.add_argument("--seq", type=int, default=None,
                   help="sequence / cache length (default: the model's n_positions)")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"),
                   help="parameter and compute dtype (default bfloat16)")
    p.add_argument("--optimizer", default="none", choices=("none", "adamw"),
                   help="adamw plans training (gradients + AdamW state)")
    p.add_argument("--devices", type=int, default=None,
                   help="plan for this many devices (default: this machine's)")
    p.add_argument("--device-memory", type=float, default=None, metavar="GB",
                   help="memory per device in GiB: report whether the plan fits")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_shard_plan)
    return p

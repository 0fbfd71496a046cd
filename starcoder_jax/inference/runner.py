"""Running the generator's jitted calls (prefill, decode loop) on a device mesh."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from starcoder_jax.config import StarCoderConfig
from starcoder_jax.model.kv_cache import KVCache, cache_sharding
from starcoder_jax.parallel.mesh import as_mesh, check_fits, put, shard_state
from starcoder_jax.parallel.rules import mesh_axes, mesh_sizes

P = jax.P


class MeshRunner:
    """Places inputs and runs jitted generation calls (prefill, decode loop) on a mesh.

    The KV cache inside their state is sharded per `model.kv_cache.cache_sharding`; every
    other output (tokens, flags, the [B, V] seen-mask) is replicated, so each
    process can read it with np.asarray, also across hosts. Each jitted
    function is re-jitted once with those out_shardings and its donation.
    """

    def __init__(self, config: StarCoderConfig, params: nnx.State, mesh: Mesh | str):
        self.mesh = as_mesh(mesh)
        self.config = config
        check_fits(params, self.mesh)
        sizes = mesh_sizes(self.mesh)
        self.batch_shards = math.prod(sizes[a] for a in mesh_axes("cache_batch", sizes))
        self.cache = cache_sharding(config, self.mesh)
        self.replicated = NamedSharding(self.mesh, P())
        self._jitted: dict = {}

    def round_batch(self, batch: int) -> int:
        """The batch rounded up to a multiple of the row split (data x fsdp)."""
        return -(-batch // self.batch_shards) * self.batch_shards

    def place_params(self, params: nnx.State) -> nnx.State:
        return shard_state(params, self.mesh)

    def _sharding(self, x):
        """The sharding `call` gives an argument: its own where it is already on this mesh, else
        replicated; None for what passes through (static arguments, Python values, shapes)."""
        if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == self.mesh:
            return x.sharding
        return self.replicated if isinstance(x, (jax.Array, np.ndarray, np.generic)) else None

    def _place(self, x):
        sharding = self._sharding(x)
        if sharding is None or sharding is getattr(x, "sharding", None):
            return x
        return put(np.asarray(x), sharding)

    def out_shardings(self, out):
        """The shardings of a jitted call's outputs `out` (a pytree like them): the cache split, the rest whole."""
        def per_node(node):
            if isinstance(node, KVCache):
                return node.shardings(self.cache)
            return self.replicated

        return jax.tree.map(per_node, out, is_leaf=lambda n: isinstance(n, KVCache))

    def _jit(self, fn: Callable, donate: tuple[str, ...], args, kwargs, static=("graphdef",)):
        """fn re-jitted once with the mesh's out_shardings and `donate` (inside set_mesh)."""
        if fn not in self._jitted:
            shapes = getattr(fn, "eval_shape", None) or functools.partial(jax.eval_shape, fn)
            out = shapes(*args, **kwargs)
            self._jitted[fn] = jax.jit(
                getattr(fn, "__wrapped__", fn), static_argnames=static,
                donate_argnames=donate, out_shardings=self.out_shardings(out))
        return self._jitted[fn]

    def call(self, fn: Callable, donate: tuple[str, ...], *args, static=("graphdef",), **kwargs):
        """fn(*args, **kwargs) on the mesh; fn is a jax.jit function whose arguments named in
        `static` are static (a graphdef and such, given as positional or keyword arguments)."""
        args, kwargs = jax.tree.map(self._place, (args, kwargs))
        with jax.set_mesh(self.mesh):
            return self._jit(fn, donate, args, kwargs, static)(*args, **kwargs)

    def _abstract(self, x):
        sharding = self._sharding(x)
        return x if sharding is None else jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    def lower(self, fn: Callable, donate: tuple[str, ...], *args, **kwargs) -> jax.stages.Lowered:
        """The program `call` runs, lowered on abstract shapes: a concrete argument stands as
        its shape with the sharding `call` would give it, so nothing is copied to a device
        (the mesh's devices may be compile-only: parallel.chips)."""
        args, kwargs = jax.tree.map(self._abstract, (args, kwargs))
        with jax.set_mesh(self.mesh):
            return self._jit(fn, donate, args, kwargs).lower(*args, **kwargs)

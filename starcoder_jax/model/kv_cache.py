"""A static-shaped key/value cache: a pytree passed into jitted steps and returned.

Each layer holds keys and values [B, S, K, H] where S is the cache length fixed
at allocation and K the number of kv heads: 1 for multi-query models (so the
cache of starcoderbase-1b in bfloat16 costs 2 * 24 layers * 128 * 2 bytes =
12 KiB per token), n_head for multi-head ones. Slot s of a row holds the token
at absolute position s, so the causal mask "key position <= query position"
is also the validity mask: slots beyond a row's current position are never
read, whatever they hold (for example the padding of a shorter prompt).

An int8 cache (`KVCache.init(..., quantize="int8")`) stores k and v as int8
with one float32 scale per token and kv head ([B, S, K]): max |k| / 127 over
the head dim. starcoderbase-1b then needs 2 * 24 * (128 + 4) bytes = 6.2 KiB
per token instead of 24 KiB in float32, which is what lets a batch of long
contexts fit: at 8192 positions the float32 cache of one row (192 MiB) is a
twentieth of the model, at batch 32 it outweighs it. Every read dequantizes
the slots, so on a CPU the int8 cache saves memory rather than time.

A model with a sliding attention window (StarCoder2: config.window) gets a
ring buffer instead: S = min(length, window) slots, slot s holding the
newest token whose position p has p % S == s, and `pos` [B, S] recording
which position each slot holds (-1: none yet). A query at position p sees
positions p - window + 1 .. p, all of which the ring still holds, so a
16k-token generation keeps 4096 slots per layer for starcoder2's window of
4096. New tokens attend over the slots as they were before the write plus
themselves (`Attention`), so a chunk of several tokens never reads a slot it
has just overwritten.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from starcoder_jax.config import KV_CACHE_MODES, StarCoderConfig, check_quantization
from starcoder_jax.parallel.mesh import as_mesh
from starcoder_jax.parallel.rules import kv_head_axis, logical_spec


def _quantize_tokens(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [B, T, K, H] -> (int8 [B, T, K, H], float32 scales [B, T, K]), per token and head."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(x / scale[..., None]), -127, 127).astype(jnp.int8)
    return q, scale


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    k: jax.Array  # [B, S, K, H]
    v: jax.Array  # [B, S, K, H]
    k_scale: jax.Array | None = None  # [B, S, K] float32, int8 caches only
    v_scale: jax.Array | None = None
    pos: jax.Array | None = None  # [B, S] int32, ring buffers (windowed models) only: -1 empty

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def ring(self) -> bool:
        return self.pos is not None

    def write(self, k: jax.Array, v: jax.Array, positions: jax.Array) -> LayerCache:
        """Stores k, v [B, T, K, H] at positions [B, T] (contiguous per row).

        A ring buffer stores each row's newest S tokens at slots position % S;
        negative positions (padding) and tokens S or more behind the row's
        newest are not written.
        """
        if self.ring:
            return self._write_ring(k, v, positions)
        start = positions[:, 0]

        def put(slab, update, s):
            zeros = (0,) * (slab.ndim - 1)  # one row: [S, ...]
            return jax.lax.dynamic_update_slice(slab, update.astype(slab.dtype), (s, *zeros))

        def put_all(slab, update):
            return jax.vmap(put)(slab, update, start)

        if not self.quantized:
            return LayerCache(put_all(self.k, k), put_all(self.v, v))
        (kq, ks), (vq, vs) = _quantize_tokens(k), _quantize_tokens(v)
        return LayerCache(put_all(self.k, kq), put_all(self.v, vq),
                          put_all(self.k_scale, ks), put_all(self.v_scale, vs))

    def _write_ring(self, k, v, positions) -> LayerCache:
        s = self.k.shape[1]
        newest = jnp.max(positions, axis=1, keepdims=True)
        kept = (positions >= 0) & (positions > newest - s)
        slots = jnp.where(kept, positions % s, s)  # [B, T]; s: out of range, dropped

        def put(slab, update):
            return jax.vmap(lambda a, u, i: a.at[i].set(u.astype(a.dtype), mode="drop"))(slab, update, slots)

        pos = put(self.pos, positions.astype(jnp.int32))
        if not self.quantized:
            return LayerCache(put(self.k, k), put(self.v, v), pos=pos)
        (kq, ks), (vq, vs) = _quantize_tokens(k), _quantize_tokens(v)
        return LayerCache(put(self.k, kq), put(self.v, vq), put(self.k_scale, ks), put(self.v_scale, vs), pos)

    def keys(self, dtype=None) -> jax.Array:
        """All S slots of keys [B, S, K, H] (dequantized to `dtype` for an int8 cache)."""
        if not self.quantized:
            return self.k
        return (self.k.astype(jnp.float32) * self.k_scale[..., None]).astype(dtype or jnp.float32)

    def values(self, dtype=None) -> jax.Array:
        if not self.quantized:
            return self.v
        return (self.v.astype(jnp.float32) * self.v_scale[..., None]).astype(dtype or jnp.float32)

    def positions(self) -> jax.Array:
        """Absolute position of every slot, [B, S] (-1: a ring slot not written yet)."""
        if self.ring:
            return self.pos
        b, s = self.k.shape[:2]
        return jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    layers: tuple[LayerCache, ...]
    # Positions the cache serves, 0 .. span - 1: the length asked for (a ring buffer
    # has fewer slots, a cache with lookahead more). Static.
    span: int = dataclasses.field(default=0, metadata=dict(static=True))

    @classmethod
    def init(cls, config: StarCoderConfig, batch: int, length: int, dtype=None,
             sharding: jax.sharding.Sharding | None = None, quantize: str | None = None,
             lookahead: int = 0) -> KVCache:
        """Zeroed cache for `batch` rows of `length` positions (<= n_positions).

        A model with an attention window shorter than `length` gets a ring
        buffer of window slots (see the module).
        sharding: where every k / v slab [B, S, K, H] lives (see
        kv_cache.cache_sharding); each device allocates only its own shard,
        and int8 scales [B, S, K] are split like the slabs' first three axes.
        quantize: None (slabs in `dtype`, default the compute dtype) or "int8".
        lookahead: tokens a step may write past the newest position a later step
          reads (speculative decoding verifies k drafted tokens and keeps some):
          that many extra slots, so a write never lands on a slot still in use.
        """
        check_quantization(quantize, "cache quantize", " (the compute dtype)", KV_CACHE_MODES)
        if length > config.n_positions:
            raise ValueError(
                f"cache length {length} exceeds the model's {config.n_positions} positions"
            )
        if dtype is None:
            dtype = jnp.dtype(config.dtype)
        if isinstance(lookahead, bool) or int(lookahead) != lookahead or lookahead < 0:
            raise ValueError(f"cache lookahead must be an integer >= 0, got {lookahead!r}")
        ring = config.window is not None and config.window < length
        slots = (config.window if ring else length) + lookahead
        shape = (batch, slots, config.kv_heads, config.head_dim)
        pos_sharding = None if sharding is None else scale_sharding_of(sharding, 2)

        def pos():
            return jnp.full(shape[:2], -1, jnp.int32, device=pos_sharding) if ring else None

        if quantize is None:
            return cls(tuple(
                LayerCache(jnp.zeros(shape, dtype, device=sharding),
                           jnp.zeros(shape, dtype, device=sharding), pos=pos())
                for _ in range(config.n_layer)
            ), length)
        scale_sharding = None if sharding is None else scale_sharding_of(sharding)
        return cls(tuple(
            LayerCache(jnp.zeros(shape, jnp.int8, device=sharding),
                       jnp.zeros(shape, jnp.int8, device=sharding),
                       jnp.ones(shape[:3], jnp.float32, device=scale_sharding),
                       jnp.ones(shape[:3], jnp.float32, device=scale_sharding), pos())
            for _ in range(config.n_layer)
        ), length)

    @staticmethod
    def logical_axes(config: StarCoderConfig) -> tuple[str, ...]:
        """Logical axes of each k / v slab [B, S, K, H] (parallel.rules): rows over
        data and fsdp; kv heads as the model's key projection splits them
        (parallel.rules.kv_head_axis: whole for one shared head)."""
        return ("cache_batch", "cache_sequence", kv_head_axis(config.kv_heads, config.n_head), "head_dim")

    @property
    def quantized(self) -> bool:
        return self.layers[0].quantized

    @property
    def batch(self) -> int:
        return self.layers[0].k.shape[0]

    @property
    def length(self) -> int:
        """Slots per row (S): fewer than `capacity` for a ring buffer, more with lookahead."""
        return self.layers[0].k.shape[1]

    @property
    def capacity(self) -> int:
        """Positions the cache serves: 0 .. capacity - 1."""
        return self.span or self.length

    @property
    def ring(self) -> bool:
        return self.layers[0].ring

    def layer(self, i: int) -> LayerCache:
        return self.layers[i]

    def replace_layers(self, layers) -> KVCache:
        return KVCache(tuple(layers), self.span)

    def shardings(self, slab_sharding: jax.sharding.Sharding):
        """A pytree like this cache: `slab_sharding` for k / v, its first axes for
        scales [B, S, K] and ring positions [B, S]."""
        return jax.tree.map(lambda x: slab_sharding if x.ndim == 4 else scale_sharding_of(slab_sharding, x.ndim),
                            self)

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))


def scale_sharding_of(slab_sharding: jax.sharding.Sharding, ndim: int = 3) -> jax.sharding.Sharding:
    """The sharding of [B, S, K] scales (ndim 2: [B, S] ring positions) beside [B, S, K, H] slabs sharded so."""
    if isinstance(slab_sharding, jax.sharding.NamedSharding):
        spec = tuple(slab_sharding.spec) + (None,) * (4 - len(slab_sharding.spec))
        return jax.sharding.NamedSharding(slab_sharding.mesh, jax.P(*spec[:ndim]))
    return slab_sharding


def cache_sharding(config: StarCoderConfig, mesh, batch: int | None = None) -> jax.sharding.NamedSharding:
    """The sharding of every k / v slab [B, S, K, H] of a KVCache on `mesh` (a Mesh or a spec).

    With `batch`, mesh axes that do not divide it are dropped from the row split;
    kv heads that `tensor` does not divide (grouped heads) stay whole.
    """
    mesh = as_mesh(mesh)
    rows = batch if batch is not None else math.prod(mesh.shape.values())  # None: every row axis
    shape = (rows, 1, config.kv_heads, config.head_dim)
    return jax.sharding.NamedSharding(mesh, logical_spec(KVCache.logical_axes(config), mesh, shape))

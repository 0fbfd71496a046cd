"""A static-shaped key/value cache: a pytree passed into jitted steps and returned.

Each layer holds keys and values [B, S, K, H] where S is the cache length fixed
at allocation and K the number of kv heads: 1 for multi-query models (so the
cache of starcoderbase-1b in bfloat16 costs 2 * 24 layers * 128 * 2 bytes =
12 KiB per token), n_head for multi-head ones. Slot s of a row holds the token
at absolute position s, so the causal mask "key position <= query position"
is also the validity mask: slots beyond a row's current position are never
read, whatever they hold (for example the padding of a shorter prompt).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from starcoder_jax.config import StarCoderConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    k: jax.Array  # [B, S, K, H]
    v: jax.Array  # [B, S, K, H]

    def write(self, k: jax.Array, v: jax.Array, positions: jax.Array) -> LayerCache:
        """Stores k, v [B, T, K, H] at positions [B, T] (contiguous per row)."""
        start = positions[:, 0]

        def put(slab, update, s):
            return jax.lax.dynamic_update_slice(slab, update.astype(slab.dtype), (s, 0, 0))

        return LayerCache(jax.vmap(put)(self.k, k, start), jax.vmap(put)(self.v, v, start))

    def keys(self) -> jax.Array:
        return self.k

    def values(self) -> jax.Array:
        return self.v

    def positions(self) -> jax.Array:
        """Absolute position of every slot, [B, S]."""
        b, s = self.k.shape[:2]
        return jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    layers: tuple[LayerCache, ...]

    @classmethod
    def init(cls, config: StarCoderConfig, batch: int, length: int, dtype=None,
             sharding: jax.sharding.Sharding | None = None) -> KVCache:
        """Zeroed cache for `batch` rows of `length` positions (<= n_positions).

        sharding: where every k / v slab [B, S, K, H] lives (see
        sharding.cache_sharding); each device allocates only its own shard.
        """
        if length > config.n_positions:
            raise ValueError(
                f"cache length {length} exceeds the model's {config.n_positions} positions"
            )
        if dtype is None:
            dtype = jnp.dtype(config.dtype)
        shape = (batch, length, config.kv_heads, config.head_dim)
        return cls(tuple(
            LayerCache(jnp.zeros(shape, dtype, device=sharding),
                       jnp.zeros(shape, dtype, device=sharding))
            for _ in range(config.n_layer)
        ))

    @property
    def batch(self) -> int:
        return self.layers[0].k.shape[0]

    @property
    def length(self) -> int:
        return self.layers[0].k.shape[1]

    def layer(self, i: int) -> LayerCache:
        return self.layers[i]

    def replace_layers(self, layers) -> KVCache:
        return KVCache(tuple(layers))

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))

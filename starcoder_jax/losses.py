"""Training losses, shared by fine-tuning and the sharding tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from starcoder_jax.model import StarCoder


def next_token_loss(model: StarCoder, ids: jax.Array, mask: jax.Array | None = None, *,
                    rngs: nnx.Rngs | None = None) -> jax.Array:
    """Mean cross-entropy (nats per token, float32 scalar) of predicting ids[:, t+1] from ids[:, :t+1].

    ids [B, T] int32, right-padded; mask [B, T] (1 / True: a real token; None:
    all real). A prediction counts when both the token it reads and its
    target are real, so padding never enters the mean; 0 when none counts.
    rngs turns dropout on.
    """
    logits = model(ids, rngs=rngs)[:, :-1]  # [B, T-1, V] float32
    targets = ids[:, 1:]
    if mask is None:
        weight = jnp.ones(targets.shape, jnp.float32)
    else:
        mask = mask.astype(jnp.float32)
        weight = mask[:, :-1] * mask[:, 1:]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, T-1]
    return (ce * weight).sum() / jnp.maximum(weight.sum(), 1.0)


def params_loss(params: nnx.State, graphdef: nnx.GraphDef, ids: jax.Array,
                mask: jax.Array | None = None) -> jax.Array:
    """next_token_loss as a function of the params of `nnx.split(model)`, for jax.grad."""
    return next_token_loss(nnx.merge(graphdef, params), ids, mask)

"""Next-token losses: one per-target negative log-likelihood behind fine-tuning,
the held-out evaluation and the sharding tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from starcoder_jax.model.modules import StarCoder


def target_nll(model: StarCoder, ids: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    """-log p(ids[:, t+1] | ids[:, :t+1]) for every t: [B, T-1] float32, for ids [B, T]."""
    logits = model(ids[:, :-1], rngs=rngs)  # [B, T-1, V] float32
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]


def token_nll_sum(model: StarCoder, ids: jax.Array, mask: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Sum of next-token negative log-likelihoods over the targets where mask[:, 1:]
    (float32 scalar): the training and held-out loss. ids, mask [B, T + 1]."""
    return jnp.sum(target_nll(model, ids, rngs) * mask[:, 1:])


def next_token_loss(model: StarCoder, ids: jax.Array, mask: jax.Array | None = None, *,
                    rngs: nnx.Rngs | None = None) -> jax.Array:
    """Mean cross-entropy (nats per token, float32 scalar) of predicting ids[:, t+1] from ids[:, :t+1].

    ids [B, T] int32, right-padded; mask [B, T] (1 / True: a real token; None:
    all real). A prediction counts when both the token it reads and its
    target are real, so padding never enters the mean; 0 when none counts.
    rngs turns dropout on.
    """
    nll = target_nll(model, ids, rngs)
    if mask is None:
        weight = jnp.ones(nll.shape, jnp.float32)
    else:
        mask = mask.astype(jnp.float32)
        weight = mask[:, :-1] * mask[:, 1:]
    return (nll * weight).sum() / jnp.maximum(weight.sum(), 1.0)


def params_loss(params: nnx.State, graphdef: nnx.GraphDef, ids: jax.Array,
                mask: jax.Array | None = None) -> jax.Array:
    """next_token_loss as a function of the params of `nnx.split(model)`, for jax.grad."""
    return next_token_loss(nnx.merge(graphdef, params), ids, mask)

"""Next-token losses: one per-target negative log-likelihood behind fine-tuning
and the held-out evaluation."""

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

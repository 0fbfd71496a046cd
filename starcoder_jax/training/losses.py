"""Next-token losses: one per-target negative log-likelihood behind fine-tuning
and the held-out evaluation.

The LM head's float32 logits are the largest activation of a long sequence:
[B, T, V] is 1.5 GiB at T = 8192 and V = 49152, and the backward pass holds
them, the softmax and its gradient at once. With `chunk` tokens (LOSS_CHUNK by
default) the head and the cross-entropy run over the sequence in pieces of
`chunk` positions (a `lax.scan`), each under `jax.checkpoint`: the forward pass
keeps only the hidden states [B, T, D] and the backward pass recomputes one
piece's logits [B, chunk, V] at a time. Each piece goes through the model's own
`StarCoder.logits`, so tied or untied, float or int8 heads give the same
function as `model(ids)` (to float32 rounding: a dot over fewer rows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from starcoder_jax.model.modules import StarCoder, check_input_ids

# Tokens per piece of the chunked head: [B, 1024, V] float32 logits are 192 MiB
# per row at V = 49152, while the dot over 1024 rows still fills a GPU.
LOSS_CHUNK = 1024


def check_loss_chunk(chunk: int | None, argument: str = "loss_chunk") -> int | None:
    """`chunk` as the tokens per piece, or None to materialize the logits (0 or None)."""
    if chunk is None or chunk == 0:
        return None
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise ValueError(f"{argument} must be a number of tokens >= 1 (0 or null: whole logits), got {chunk!r}")
    return chunk


def _nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits [B, T, V] float32, targets [B, T] -> -log softmax(logits)[targets] [B, T]."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def chunked_nll(model: StarCoder, x: jax.Array, targets: jax.Array, chunk: int | None = LOSS_CHUNK) -> jax.Array:
    """-log p(targets) under `model.logits(x)`, without [B, T, V] logits at once: [B, T] float32.

    x [B, T, D]: final hidden states (`StarCoder.hidden`); targets [B, T] ids.
    chunk: positions per piece (None or 0: the whole logits, one piece). T is
    padded up to a multiple of chunk; the padded positions are dropped.
    """
    chunk = check_loss_chunk(chunk)
    b, t, d = x.shape
    if chunk is None or t <= chunk:
        return _nll(model.logits(x), targets)
    pieces = -(-t // chunk)
    pad = pieces * chunk - t
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    xs = jnp.moveaxis(x.reshape(b, pieces, chunk, d), 1, 0)  # [P, B, chunk, D]
    ts = jnp.moveaxis(targets.reshape(b, pieces, chunk), 1, 0)  # [P, B, chunk]

    # Checkpointed: the backward pass recomputes one piece's logits instead of
    # the scan saving every piece's [B, chunk, V] softmax.
    @jax.checkpoint
    def piece(x_i, t_i):
        return _nll(model.logits(x_i), t_i)

    _, nll = jax.lax.scan(lambda carry, xt: (carry, piece(*xt)), None, (xs, ts))  # [P, B, chunk]
    return jnp.moveaxis(nll, 0, 1).reshape(b, pieces * chunk)[:, :t]


def document_segments(ids: jax.Array, separator: int) -> tuple[jax.Array, jax.Array]:
    """Documents of packed rows ids [B, T] joined by `separator` (each document is
    followed by one): (segment ids [B, T], positions [B, T] counted from each
    document's first token). A separator belongs to the document it ends."""
    t = ids.shape[1]
    ends = ids == separator
    segments = jnp.cumsum(ends, axis=1) - ends
    index = jnp.arange(t)
    starts_here = jnp.concatenate([jnp.zeros_like(ends[:, :1]), ends[:, :-1]], axis=1)  # the token after a separator
    start = jax.lax.cummax(jnp.where(starts_here, index, 0), axis=1)
    return segments.astype(jnp.int32), (index - start).astype(jnp.int32)


def target_nll(model: StarCoder, ids: jax.Array, rngs: nnx.Rngs | None = None, *,
               chunk: int | None = LOSS_CHUNK, separator: int | None = None) -> jax.Array:
    """-log p(ids[:, t+1] | ids[:, :t+1]) for every t: [B, T-1] float32, for ids [B, T].

    chunk: tokens per piece of the LM head and softmax (`chunked_nll`); None
    or 0 computes `model(ids)`'s whole [B, T-1, V] logits at once.
    separator: with a token id, the row is packed documents each ended by it
    (`document_segments`): a token attends only within its document, whose
    positions start at 0 (data.separate_documents). None: the row is one
    sequence, as StarCoder was trained.
    """
    inputs = jnp.asarray(ids)[:, :-1]
    check_input_ids(inputs, model.config)
    if separator is None:
        segments, positions = None, jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    else:
        segments, positions = document_segments(inputs, separator)
    if check_loss_chunk(chunk) is None:
        return _nll(model(inputs, positions, rngs=rngs, segment_ids=segments), ids[:, 1:])
    x, _ = model.hidden(inputs, positions, rngs=rngs, segment_ids=segments)  # [B, T-1, D]
    return chunked_nll(model, x, ids[:, 1:], chunk)


def token_nll_sum(model: StarCoder, ids: jax.Array, mask: jax.Array, rngs: nnx.Rngs | None = None, *,
                  chunk: int | None = LOSS_CHUNK, separator: int | None = None) -> jax.Array:
    """Sum of next-token negative log-likelihoods over the targets where mask[:, 1:]
    (float32 scalar): the training and held-out loss. ids, mask [B, T + 1];
    chunk, separator: as `target_nll`."""
    return jnp.sum(target_nll(model, ids, rngs, chunk=chunk, separator=separator) * mask[:, 1:])

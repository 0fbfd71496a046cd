"""Next-token losses: one per-target negative log-likelihood behind fine-tuning
and the held-out evaluation.

The LM head's float32 logits are the largest activation of a long sequence:
[B, T, V] is 1.5 GiB at T = 8192 and V = 49152, and the backward pass holds
them, the softmax and its gradient at once. With `chunk` tokens (LOSS_CHUNK by
default) the head and the cross-entropy run over the sequence in pieces of
`chunk` positions (a `lax.scan`), so that one piece's logits [B, chunk, V]
exist at a time. Each piece goes through the model's own `StarCoder.logits`,
so tied or untied, float or int8 heads give the same function as `model(ids)`
(to float32 rounding: a dot over fewer rows).

The training loss, a weighted sum (`token_nll_sum`), has a written gradient
(`head_nll_sum`): a sum's gradient is known up to the one scalar cotangent, so
each piece's gradients with respect to the hidden states and the head's
weights are computed while its logits exist, in the forward pass, and the
backward pass only scales them. Three products of the head per piece, as with
whole logits, where recomputing each piece's logits in the backward pass
(`jax.checkpoint`) would take four.
"""

from __future__ import annotations

from functools import partial

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


def _pieces(x: jax.Array, chunk: int) -> jax.Array:
    """x [B, T, ...] -> [P, B, chunk, ...], T padded with zeros to P * chunk."""
    b, t = x.shape[:2]
    pieces = -(-t // chunk)
    x = jnp.pad(x, [(0, 0), (0, pieces * chunk - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, pieces, chunk, *x.shape[2:]), 1, 0)


def chunked_nll(model: StarCoder, x: jax.Array, targets: jax.Array, chunk: int | None = LOSS_CHUNK) -> jax.Array:
    """-log p(targets) under `model.logits(x)`, without [B, T, V] logits at once: [B, T] float32.

    x [B, T, D]: final hidden states (`StarCoder.hidden`); targets [B, T] ids.
    chunk: positions per piece (None or 0: the whole logits, one piece). T is
    padded up to a multiple of chunk; the padded positions are dropped.
    """
    chunk = check_loss_chunk(chunk)
    b, t, _ = x.shape
    if chunk is None or t <= chunk:
        return _nll(model.logits(x), targets)
    xs, ts = _pieces(x, chunk), _pieces(targets, chunk)  # [P, B, chunk, D], [P, B, chunk]

    # Checkpointed: the backward pass recomputes one piece's logits instead of
    # the scan saving every piece's [B, chunk, V] softmax.
    @jax.checkpoint
    def piece(x_i, t_i):
        return _nll(model.logits(x_i), t_i)

    _, nll = jax.lax.scan(lambda carry, xt: (carry, piece(*xt)), None, (xs, ts))  # [P, B, chunk]
    return jnp.moveaxis(nll, 0, 1).reshape(b, -1)[:, :t]


def _is_head(path, variable) -> bool:
    """The LM head's trainable weights: the token table (tied) or lm_head (untied)."""
    return isinstance(variable, nnx.Param) and path[0] in ("wte", "lm_head")


def head_nll_sum(model: StarCoder, x: jax.Array, targets: jax.Array, weights: jax.Array,
                 chunk: int = LOSS_CHUNK) -> jax.Array:
    """sum(weights * -log p(targets)) under `model.logits(x)`, in pieces of `chunk`
    positions, with the gradient written out (module docstring): float32 scalar.

    x [B, T, D]: final hidden states (`StarCoder.hidden`); targets [B, T] ids;
    weights [B, T] (the loss mask, as floats). The gradient reaches x and the
    head's float weights (the token table or lm_head) when they are
    differentiated; nothing else of the model takes part in the head.
    """
    graphdef, head, rest = nnx.split(model, _is_head, ...)
    head_leaves, head_def = jax.tree.flatten(head)
    rest_leaves, rest_def = jax.tree.flatten(rest)

    def piece_loss(head_leaves, rest_leaves, x_i, t_i, w_i):
        m = nnx.merge(graphdef, jax.tree.unflatten(head_def, head_leaves), jax.tree.unflatten(rest_def, rest_leaves))
        return jnp.sum(_nll(m.logits(x_i), t_i) * w_i)

    pieces = (_pieces(x, chunk), _pieces(targets, chunk), _pieces(weights.astype(jnp.float32), chunk))
    return _head_nll_sum(piece_loss, head_leaves, rest_leaves, pieces)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _head_nll_sum(piece_loss, head_leaves, rest_leaves, pieces):
    def body(total, piece):
        return total + piece_loss(head_leaves, rest_leaves, *piece), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), pieces)
    return total


def _head_nll_sum_fwd(piece_loss, head_leaves, rest_leaves, pieces):
    head = [leaf.value for leaf in head_leaves]
    rest = [leaf.value for leaf in rest_leaves]
    xs, ts, ws = (leaf.value for leaf in pieces)
    head_grads = any(leaf.perturbed for leaf in head_leaves)  # False when the head is frozen (LoRA)

    def body(carry, piece):
        total, acc = carry
        x_i, t_i, w_i = piece
        if head_grads:
            loss, vjp = jax.vjp(lambda h, x: piece_loss(h, rest, x, t_i, w_i), head, x_i)
            d_head, dx = vjp(jnp.ones((), loss.dtype))
            acc = [a + d.astype(a.dtype) for a, d in zip(acc, d_head)]
        else:
            loss, vjp = jax.vjp(lambda x: piece_loss(head, rest, x, t_i, w_i), x_i)
            (dx,) = vjp(jnp.ones((), loss.dtype))
        return (total + loss, acc), dx

    acc = [jnp.zeros(h.shape, h.dtype) for h in head] if head_grads else []
    (total, acc), dxs = jax.lax.scan(body, (jnp.zeros((), jnp.float32), acc), (xs, ts, ws))
    return total, (acc, dxs, head_grads, len(head), len(rest))


def _head_nll_sum_bwd(piece_loss, residuals, g):
    acc, dxs, head_grads, n_head, n_rest = residuals
    d_head = [(g * a).astype(a.dtype) for a in acc] if head_grads else [None] * n_head
    return d_head, [None] * n_rest, ((g * dxs).astype(dxs.dtype), None, None)


_head_nll_sum.defvjp(_head_nll_sum_fwd, _head_nll_sum_bwd, symbolic_zeros=True)


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
    if check_loss_chunk(chunk) is None:
        return _nll(model.logits(_hidden(model, ids, rngs, separator)), ids[:, 1:])
    return chunked_nll(model, _hidden(model, ids, rngs, separator), ids[:, 1:], chunk)


def _hidden(model: StarCoder, ids: jax.Array, rngs: nnx.Rngs | None, separator: int | None) -> jax.Array:
    """The final hidden states [B, T-1, D] of ids[:, :-1] (rows packed with `separator`: see target_nll)."""
    inputs = jnp.asarray(ids)[:, :-1]
    check_input_ids(inputs, model.config)
    if separator is None:
        segments, positions = None, jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    else:
        segments, positions = document_segments(inputs, separator)
    x, _ = model.hidden(inputs, positions, rngs=rngs, segment_ids=segments)
    return x


def token_nll_sum(model: StarCoder, ids: jax.Array, mask: jax.Array, rngs: nnx.Rngs | None = None, *,
                  chunk: int | None = LOSS_CHUNK, separator: int | None = None) -> jax.Array:
    """Sum of next-token negative log-likelihoods over the targets where mask[:, 1:]
    (float32 scalar): the training and held-out loss. ids, mask [B, T + 1];
    chunk, separator: as `target_nll`; a chunked sum takes `head_nll_sum`'s
    written gradient."""
    chunk = check_loss_chunk(chunk)
    if chunk is None or ids.shape[1] - 1 <= chunk:
        return jnp.sum(target_nll(model, ids, rngs, chunk=None, separator=separator) * mask[:, 1:])
    x, targets = _hidden(model, ids, rngs, separator), ids[:, 1:]
    return head_nll_sum(model, x, targets, mask[:, 1:], chunk)

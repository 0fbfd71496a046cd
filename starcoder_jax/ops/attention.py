"""Causal attention by token position, behind one entry point: `attention`.

Queries q [B, T, N, H] attend over keys and values [B, S, K, H] (N query
heads share K kv heads, G = N / K each; K = 1 is multi-query). Visibility
comes from absolute positions, q_positions [B, T] and k_positions [B, S]:
key s is visible to query t iff 0 <= k_positions[s] <= q_positions[t]. A
negative position marks padding (a padded key is never visible); a query that
sees no key at all gets zeros.

The forms compute the same function and differ in layout (`impl`, the names
of config.ATTENTION_IMPLS):
  "xla"            the reference: scores [B, K, G, T, S], softmax, value product.
  "cpu_key_major"  scores [B, K, S, T, G]: the key product reads a cache
                   [B, S, K, H] as it lies (XLA:CPU decode, any cache read).
  "cpu_blocked"    own keys only (see `attention`): blocks of queries, each
                   reading the keys up to its last query (XLA:CPU prefill and
                   training). Forced where the keys are not the queries' own,
                   the reference runs instead (`resolve`).
  "auto"           on XLA:CPU with no mesh set, cpu_blocked for T > 1 own
                   keys and cpu_key_major otherwise; the reference elsewhere.
Each form runs under the name scope `attention_<form>` (profiles, HLO).
Measurements: BENCHMARKS.md ("Attention forms").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from starcoder_jax.config import ATTENTION_IMPLS
from starcoder_jax.ops.backend import cpu_without_mesh

FORMS = tuple(name for name in ATTENTION_IMPLS if name != "auto")
QUERY_BLOCK = 64  # queries per block of the cpu_blocked form...
MAX_QUERY_BLOCKS = 16  # ...and at most this many blocks (each is its own code: compile time)
_HIDDEN = jnp.finfo(jnp.float32).min  # a finite score for hidden keys: no inf - inf


def resolve(impl: str, own_keys: bool, t: int) -> str:
    """The form `attention(..., impl=impl)` runs for t queries (one of FORMS).

    A forced form runs wherever it can serve; cpu_blocked cannot serve a
    cache read (keys that are not the queries' own), which then runs the
    reference "xla", the same on every machine: a forced name never depends
    on the platform.
    """
    if impl == "auto":
        if not cpu_without_mesh():
            return "xla"
        return "cpu_blocked" if own_keys and t > 1 else "cpu_key_major"
    if impl not in FORMS:
        raise ValueError(f"attention impl must be one of {', '.join(ATTENTION_IMPLS)}, got {impl!r}")
    if impl == "cpu_blocked" and not own_keys:
        return "xla"
    return impl


def query_block(t: int, block: int = QUERY_BLOCK, max_blocks: int = MAX_QUERY_BLOCKS) -> int:
    """Queries per block of the cpu_blocked form for t queries: `block`, or
    more where t would need more than `max_blocks` blocks."""
    return max(block, -(-t // max_blocks))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, k_positions: jax.Array,
              *, impl: str, own_keys: bool, scale: float, dropout_rate: float = 0.0,
              dropout_key: jax.Array | None = None, block: int = QUERY_BLOCK,
              max_blocks: int = MAX_QUERY_BLOCKS) -> jax.Array:
    """q [B, T, N, H] over k, v [B, S, K, H] -> [B, T, N, H] in q's dtype.

    q_positions [B, T], k_positions [B, S]: int positions (see the module).
    impl: a name of config.ATTENTION_IMPLS, resolved by `resolve`.
    own_keys: k and v are the T queries' own tokens in order (S = T: training,
      a prefill from position 0), so a key after its query in the row is never
      visible to it (its position is larger, or negative); otherwise (decode,
      a prefill continuing a cache) nothing is assumed.
    scale: multiplies the scores q.k (1 / sqrt(H) in GPT-2).
    dropout_rate, dropout_key: attention dropout on the probabilities, before
      the value product; off without a key.
    block, max_blocks: queries per block of cpu_blocked (`query_block`).
    """
    b, t, n, h = _check_shapes(q, k, v, q_positions, k_positions, own_keys)
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
    form = resolve(impl, own_keys, t)
    kv = k.shape[2]
    q = q.reshape(b, t, kv, n // kv, h)  # [B, T, K, G, H]
    drop = dropout_rate if dropout_key is not None else 0.0
    with jax.named_scope(f"attention_{form}"):
        if form == "cpu_blocked":
            out = _query_blocks(q, k, v, q_positions, k_positions, scale, drop, dropout_key,
                                query_block(t, block, max_blocks))
        else:
            attend = _query_major if form == "xla" else _key_major
            out = attend(q, k, v, _visible(q_positions, k_positions), scale, drop, dropout_key)
    return out.reshape(b, t, n, h)


def _check_shapes(q, k, v, q_positions, k_positions, own_keys) -> tuple[int, int, int, int]:
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, N, H], got shape {q.shape}")
    b, t, n, h = q.shape
    if k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"k and v must both be [B, S, K, H], got shapes {k.shape} and {v.shape}")
    if k.shape[0] != b or k.shape[3] != h or n % k.shape[2]:
        raise ValueError(f"k/v {k.shape} must have q's B={b} and H={h} and K heads dividing N={n}")
    if q_positions.shape != (b, t) or k_positions.shape != k.shape[:2]:
        raise ValueError(f"q_positions must be [B, T] = {(b, t)} and k_positions [B, S] = {k.shape[:2]}, "
                         f"got {q_positions.shape} and {k_positions.shape}")
    if own_keys and k.shape[1] != t:
        raise ValueError(f"own_keys needs one key per query (S = T = {t}), got S = {k.shape[1]}")
    return b, t, n, h


def _visible(q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
    """[B, T, S] bool: key s visible to query t."""
    k_pos = k_positions[:, None, :]
    return (k_pos >= 0) & (k_pos <= q_positions[:, :, None])


def _exps(scores: jax.Array, visible: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """exp(scores - max) on visible keys (0 on hidden ones) and their sums along `axis`.

    The max is a constant of the gradient (the softmax does not depend on it).
    """
    scores = jnp.where(visible, scores, _HIDDEN)
    top = jax.lax.stop_gradient(jnp.max(scores, axis=axis, keepdims=True))
    e = jnp.where(visible, jnp.exp(scores - top), 0.0)
    return e, jnp.sum(e, axis=axis, keepdims=True)


def _nonzero(total: jax.Array) -> jax.Array:
    """Softmax sums with a query that sees no key (sum 0) dividing by 1: its output is 0."""
    return jnp.where(total > 0, total, 1.0)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """x with each entry zeroed with probability `rate`, the rest scaled by 1 / (1 - rate)."""
    if rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def _query_major(q, k, v, visible, scale, rate, key):
    """The reference: q [B, T, K, G, H], k/v [B, S, K, H], visible [B, T, S]
    -> [B, T, K, G, H], the scores laid out [B, K, G, T, S]."""
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
    e, total = _exps(scores, visible[:, None, None], axis=-1)
    probs = _dropout(e / _nonzero(total), rate, key)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def _key_major(q, k, v, visible, scale, rate, key):
    """The reference's function with the scores laid out [B, K, S, T, G].

    The key product reads a cache [B, S, K, H] as it lies, where the
    query-major einsum makes XLA:CPU copy the keys transposed at every decode
    step, and the value product gets its probabilities [T*G, S] as a standard
    matrix.
    """
    b, t, kv, g, h = q.shape
    s = k.shape[1]
    rows = jnp.transpose(q, (0, 2, 1, 3, 4)).reshape(b, kv, t * g, h)  # [B, K, T*G, H]
    scores = jax.lax.dot_general(jnp.swapaxes(k, 1, 2), rows, (((3,), (3,)), ((0, 1), (0, 1))),
                                 preferred_element_type=jnp.float32)  # [B, K, S, T*G]
    scores = scores.reshape(b, kv, s, t, g) * scale
    e, total = _exps(scores, jnp.swapaxes(visible, 1, 2)[:, None, :, :, None], axis=2)  # [B, 1, S, T, 1]
    probs = _dropout(e / _nonzero(total), rate, key)
    probs = jnp.swapaxes(probs.reshape(b, kv, s, t * g), 2, 3)  # [B, K, T*G, S]
    out = jax.lax.dot_general(probs.astype(v.dtype), jnp.swapaxes(v, 1, 2), (((3,), (2,)), ((0, 1), (0, 1))),
                              preferred_element_type=jnp.float32)  # [B, K, T*G, H]
    return jnp.transpose(out.reshape(b, kv, t, g, h), (0, 2, 1, 3, 4)).astype(q.dtype)


def _query_blocks(q, k, v, q_positions, k_positions, scale, rate, key, size):
    """Attention of q [B, T, K, G, H] over its own keys k/v [B, T, K, H] in
    blocks of `size` queries -> [B, T, K, G, H].

    Block i reads only the keys up to its last query (own keys: no later key
    is visible), which skips almost half of the scores' work and bounds the
    scores held at once to [B, K, size * G, T] (at T = 8192 one layer's full
    scores would take 4 GiB). Each block lays its scores out [B, K, size * G,
    keys]: both products get standard matrices and the softmax runs along the
    minor axis. The output is divided by the sums of the exponentials
    ([size * G, H]) rather than the exponentials ([size * G, keys]); dropping
    exponentials before that division drops probabilities.
    """
    b, t, kv, g, h = q.shape
    rows = jnp.transpose(q, (0, 2, 1, 3, 4))  # [B, K, T, G, H]
    keys, values = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, K, T, H]
    outs = []
    for i, lo in enumerate(range(0, t, size)):
        hi = min(t, lo + size)
        rq = rows[:, :, lo:hi].reshape(b, kv, (hi - lo) * g, h)
        scores = jax.lax.dot_general(rq, keys[:, :, :hi], (((3,), (3,)), ((0, 1), (0, 1))),
                                     preferred_element_type=jnp.float32)  # [B, K, rows, keys]
        scores = scores.reshape(b, kv, hi - lo, g, hi) * scale
        visible = _visible(q_positions[:, lo:hi], k_positions[:, :hi])[:, None, :, None, :]
        e, total = _exps(scores, visible, axis=-1)  # total [B, K, block, G, 1]
        e = _dropout(e, rate, None if key is None else jax.random.fold_in(key, i))
        out = jax.lax.dot_general(e.reshape(b, kv, (hi - lo) * g, hi).astype(v.dtype), values[:, :, :hi],
                                  (((3,), (2,)), ((0, 1), (0, 1))),
                                  preferred_element_type=jnp.float32)  # [B, K, rows, H]
        outs.append(out.reshape(b, kv, hi - lo, g, h) / _nonzero(total))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
    return jnp.transpose(out, (0, 2, 1, 3, 4)).astype(q.dtype)

"""Causal attention by token position, behind one entry point: `attention`.

Queries q [B, T, N, H] attend over keys and values [B, S, K, H] (N query
heads share K kv heads, G = N / K each; K = 1 is multi-query). Visibility
comes from absolute positions, q_positions [B, T] and k_positions [B, S]:
key s is visible to query t iff 0 <= k_positions[s] <= q_positions[t]. A
negative position marks padding (a padded key is never visible); a query that
sees no key at all gets zeros (and passes no gradient). Optional segment ids,
q_segments [B, T] and k_segments [B, S], also hide every key of another
segment: documents packed into one training row stay apart. A sliding
window of W (StarCoder2) also hides every key W or more positions before its
query: key s is then visible iff q_positions[t] - W < k_positions[s] <=
q_positions[t]. With own keys, positions increase along a row wherever a key
is visible to a query (one document, or packed documents with segment ids),
so such a key is also fewer than W tokens back: the blocked forms skip the
key blocks before the window as they skip those after the query.

The forms compute the same function and differ in layout and memory (`impl`,
the names of config.ATTENTION_IMPLS):
  "xla"            the reference: scores [B, K, G, T, S], softmax, value product.
  "cpu_key_major"  scores [B, K, S, T, G]: the key product reads a cache
                   [B, S, K, H] as it lies (XLA:CPU decode, any cache read).
  "cpu_blocked"    own keys only (see `attention`): blocks of queries, each
                   reading the keys up to its last query (XLA:CPU prefill and
                   training). Forced where the keys are not the queries' own,
                   the reference runs instead (`resolve`). Its backward keeps
                   every block's exponentials: memory T^2 when training.
  "chunked"        plain JAX on every backend, flash-attention style: an online
                   softmax over key blocks for each query block, and a written
                   backward that recomputes the scores block by block from q, k,
                   v, the output and each row's log-sum-exp. Memory linear in T;
                   with own keys the key blocks after a query block are skipped.
  "cudnn"          jax.nn.dot_product_attention's cuDNN kernel (GPU, bfloat16 /
                   float16, own keys, causal + right padding as lengths); anything
                   it cannot express runs "chunked" (`_cudnn`).
  "splash"         the Pallas splash kernel (TPU, own keys, no mesh); anything
                   else runs "chunked" (`_splash`).
  "auto"           per backend and phase (`resolve`): never a form whose memory
                   grows as T^2 for T >= LONG queries.
Each form runs under the name scope `attention_<form>` (profiles, HLO), the
form that actually ran where one fell back to "chunked".
Measurements: BENCHMARKS.md ("Attention forms").
"""

from __future__ import annotations

import functools
import math
import typing
import warnings

import jax
import jax.numpy as jnp

from starcoder_jax.config import ATTENTION_IMPLS
from starcoder_jax.ops.backend import cpu_without_mesh, cudnn_available, on_gpu, on_tpu, platform
from starcoder_jax.parallel.rules import mesh_axes, mesh_is_set, mesh_sizes, spec_entry

FORMS = tuple(name for name in ATTENTION_IMPLS if name != "auto")
QUADRATIC = ("xla", "cpu_key_major", "cpu_blocked")  # forms whose training memory grows as T * S
LONG = 2048  # from this many queries "auto" never picks a QUADRATIC form
QUERY_BLOCK = 64  # queries per block of the cpu_blocked form...
MAX_QUERY_BLOCKS = 16  # ...and at most this many blocks (each is its own code: compile time)
CHUNK_Q, CHUNK_K = 128, 256  # queries, keys per block of the chunked form (XLA:CPU: blocks that stay in cache)
SPLASH_BLOCK = 512  # largest splash tile; the sequence is padded to a multiple of 128
_HIDDEN = jnp.finfo(jnp.float32).min  # a finite score for hidden keys: no inf - inf
_WARNED: set[str] = set()  # fallback reasons already warned about in this process


def resolve(impl: str, own_keys: bool, t: int) -> str:
    """The form `attention(..., impl=impl)` runs for t queries (one of FORMS).

    A forced form runs wherever it can serve; cpu_blocked cannot serve a
    cache read (keys that are not the queries' own), which then runs the
    reference "xla", the same on every machine. "cudnn" and "splash" resolve
    to themselves: `attention` falls back from them to "chunked" where the
    kernel cannot run (with a warning).

    "auto", per platform compiled for (ops.backend) and phase: on XLA:CPU
    without a mesh cpu_blocked for own keys 1 < t < LONG, cpu_key_major for
    decode and shorter cache reads; on a GPU cudnn for own keys (t > 1) where
    the cuDNN library is installed; on a TPU splash for own keys (t > 1),
    mesh or not; the reference for decode elsewhere; from t >= LONG
    queries "chunked" wherever the choice above would be QUADRATIC (training,
    a long prefill, a long prefill continuing a cache).
    """
    if impl == "auto":
        return _auto(own_keys, t)
    if impl not in FORMS:
        raise ValueError(f"attention impl must be one of {', '.join(ATTENTION_IMPLS)}, got {impl!r}")
    if impl == "cpu_blocked" and not own_keys:
        return "xla"
    return impl


def _auto(own_keys: bool, t: int) -> str:
    if own_keys and t > 1 and on_gpu() and cudnn_available():
        return "cudnn"
    if own_keys and t > 1 and on_tpu():
        return "splash"
    if cpu_without_mesh():
        form = "cpu_blocked" if own_keys and t > 1 else "cpu_key_major"
    else:
        form = "xla"
    return "chunked" if t >= LONG else form


def query_block(t: int, block: int = QUERY_BLOCK, max_blocks: int = MAX_QUERY_BLOCKS) -> int:
    """Queries per block of the cpu_blocked form for t queries: `block`, or
    more where t would need more than `max_blocks` blocks."""
    return max(block, -(-t // max_blocks))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, k_positions: jax.Array,
              *, impl: str, own_keys: bool, scale: float, dropout_rate: float = 0.0,
              dropout_key: jax.Array | None = None, q_segments: jax.Array | None = None,
              k_segments: jax.Array | None = None, window: int | None = None, block: int = QUERY_BLOCK,
              max_blocks: int = MAX_QUERY_BLOCKS, chunk: tuple[int, int] = (CHUNK_Q, CHUNK_K),
              interpret: bool = False) -> jax.Array:
    """q [B, T, N, H] over k, v [B, S, K, H] -> [B, T, N, H] in q's dtype.

    q_positions [B, T], k_positions [B, S]: int positions (see the module).
    impl: a name of config.ATTENTION_IMPLS, resolved by `resolve`.
    own_keys: k and v are the T queries' own tokens in order (S = T: training,
      a prefill from position 0), so a key after its query in the row is never
      visible to it (its position is larger, or negative, or in another
      segment); otherwise (decode, a prefill continuing a cache) nothing is assumed.
    scale: multiplies the scores q.k (1 / sqrt(H) in GPT-2).
    dropout_rate, dropout_key: attention dropout on the probabilities, before
      the value product; off without a key. cudnn and splash have none: with
      dropout on they run "chunked", whose masks are drawn per block from the
      key (the same in the backward).
    q_segments [B, T], k_segments [B, S]: int segment ids, both or neither; a
      key is visible only to queries of its own segment.
    window: a query sees only keys fewer than `window` positions back (itself
      included: `window` keys at most); None: no window.
    block, max_blocks: queries per block of cpu_blocked (`query_block`).
    chunk: (queries, keys) per block of the chunked form.
    interpret: run the splash kernel in Pallas interpret mode (off a TPU: tests).
    """
    b, t, n, h = _check_shapes(q, k, v, q_positions, k_positions, own_keys)
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
    if (q_segments is None) != (k_segments is None):
        raise ValueError("q_segments and k_segments go together: give both or neither")
    if q_segments is not None and (q_segments.shape != (b, t) or k_segments.shape != k.shape[:2]):
        raise ValueError(f"q_segments must be [B, T] = {(b, t)} and k_segments [B, S] = {k.shape[:2]}, "
                         f"got {q_segments.shape} and {k_segments.shape}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive integer or None, got {window!r}")
    form = resolve(impl, own_keys, t)
    kv = k.shape[2]
    drop = dropout_rate if dropout_key is not None else 0.0
    segments = None if q_segments is None else (q_segments, k_segments)
    if form in ("cudnn", "splash"):
        why = _kernel_refusal(form, q, k, own_keys, drop, segments, interpret)
        if why is not None:
            if impl == form and why.hard:
                raise ValueError(f"attention impl {form!r} cannot serve this call on {platform()}: {why}")
            form = _fall_back(form, why, warn=impl != "auto")
    with jax.named_scope(f"attention_{form}"):
        q = q.reshape(b, t, kv, n // kv, h)  # [B, T, K, G, H]
        if form == "cudnn":
            out = _sharded_kernel(functools.partial(_cudnn, scale=scale, window=window, chunk=chunk,
                                                    hard=impl == "cudnn"), q, k, v, q_positions, segments)
        elif form == "splash":
            out = _sharded_kernel(functools.partial(_splash, scale=scale, window=window, interpret=interpret),
                                  q, k, v, q_positions, segments)
        elif form == "chunked":
            out = _chunked(q, k, v, q_positions, k_positions, segments, scale, drop, dropout_key,
                           own_keys, chunk, window)
        elif form == "cpu_blocked":
            out = _query_blocks(q, k, v, q_positions, k_positions, segments, scale, drop, dropout_key,
                                query_block(t, block, max_blocks), window)
        else:
            attend = _query_major if form == "xla" else _key_major
            out = attend(q, k, v, _visible(q_positions, k_positions, segments, window), scale, drop,
                         dropout_key)
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


def _visible(q_positions: jax.Array, k_positions: jax.Array,
             segments: tuple[jax.Array, jax.Array] | None = None, window: int | None = None) -> jax.Array:
    """[B, T, S] bool: key s visible to query t (positions, the window and segments if given)."""
    k_pos, q_pos = k_positions[:, None, :], q_positions[:, :, None]
    visible = (k_pos >= 0) & (k_pos <= q_pos)
    if window is not None:
        visible &= k_pos > q_pos - window
    if segments is not None:
        visible &= segments[0][:, :, None] == segments[1][:, None, :]
    return visible


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


def _query_blocks(q, k, v, q_positions, k_positions, segments, scale, rate, key, size, window=None):
    """Attention of q [B, T, K, G, H] over its own keys k/v [B, T, K, H] in
    blocks of `size` queries -> [B, T, K, G, H].

    Block i reads only the keys up to its last query (own keys: no later key
    is visible), which skips almost half of the scores' work and bounds the
    scores held at once to [B, K, size * G, T] (at T = 8192 one layer's full
    scores would take 4 GiB). Each block lays its scores out [B, K, size * G,
    keys]: both products get standard matrices and the softmax runs along the
    minor axis. The output is divided by the sums of the exponentials
    ([size * G, H]) rather than the exponentials ([size * G, keys]); dropping
    exponentials before that division drops probabilities. With a window,
    block i also starts at the first key its first query can see.
    """
    b, t, kv, g, h = q.shape
    rows = jnp.transpose(q, (0, 2, 1, 3, 4))  # [B, K, T, G, H]
    keys, values = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, K, T, H]
    outs = []
    for i, lo in enumerate(range(0, t, size)):
        hi = min(t, lo + size)
        first = 0 if window is None else max(0, lo - window + 1)
        rq = rows[:, :, lo:hi].reshape(b, kv, (hi - lo) * g, h)
        scores = jax.lax.dot_general(rq, keys[:, :, first:hi], (((3,), (3,)), ((0, 1), (0, 1))),
                                     preferred_element_type=jnp.float32)  # [B, K, rows, keys]
        scores = scores.reshape(b, kv, hi - lo, g, hi - first) * scale
        seg = None if segments is None else (segments[0][:, lo:hi], segments[1][:, first:hi])
        visible = _visible(q_positions[:, lo:hi], k_positions[:, first:hi], seg, window)[:, None, :, None, :]
        e, total = _exps(scores, visible, axis=-1)  # total [B, K, block, G, 1]
        e = _dropout(e, rate, None if key is None else jax.random.fold_in(key, i))
        out = jax.lax.dot_general(e.reshape(b, kv, (hi - lo) * g, hi - first).astype(v.dtype),
                                  values[:, :, first:hi],
                                  (((3,), (2,)), ((0, 1), (0, 1))),
                                  preferred_element_type=jnp.float32)  # [B, K, rows, H]
        outs.append(out.reshape(b, kv, hi - lo, g, h) / _nonzero(total))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
    return jnp.transpose(out, (0, 2, 1, 3, 4)).astype(q.dtype)


# --- chunked: flash-attention in plain JAX ---

class _Blocks(typing.NamedTuple):
    """The static layout of one chunked call (a custom_vjp's non-differentiable argument)."""
    scale: float
    rate: float  # dropout on the probabilities (0: none)
    own_keys: bool  # key blocks after a query block's last query are skipped
    g: int  # query heads per kv head
    bq: int  # queries per block
    bk: int  # keys per block
    window: int = 0  # keys a query sees at most (0: no window)


def _chunked(q, k, v, q_positions, k_positions, segments, scale, rate, key, own_keys, chunk, window=None):
    """q [B, T, K, G, H] over k/v [B, S, K, H] -> [B, T, K, G, H], one block
    of queries against one block of keys at a time.

    T and S are padded to whole blocks with hidden positions (-1) and laid
    out block-major, [blocks, B, K, rows, H] with rows = queries * G, so each
    block is a leading index and both products see standard matrices. The
    residuals of the backward are q, k, v, the output and one log-sum-exp per
    query row: memory linear in T, where the reference holds [T, S] scores.
    """
    b, t, kv, g, h = q.shape
    s = k.shape[1]
    spec = _Blocks(float(scale), float(rate), bool(own_keys), g, min(chunk[0], t), min(chunk[1], s), window or 0)
    nq, nk = -(-t // spec.bq), -(-s // spec.bk)
    qb = _pad(q, nq * spec.bq).reshape(b, nq, spec.bq, kv, g, h)
    qb = jnp.transpose(qb, (1, 0, 3, 2, 4, 5)).reshape(nq, b, kv, spec.bq * g, h)  # [nq, B, K, bq*G, H]
    kb, vb = (jnp.transpose(_pad(x, nk * spec.bk).reshape(b, nk, spec.bk, kv, h), (1, 0, 3, 2, 4))
              for x in (k, v))  # [nk, B, K, bk, H]
    qp = _pad(q_positions, nq * spec.bq, -1).reshape(b, nq, spec.bq).swapaxes(0, 1)  # [nq, B, bq]
    kp = _pad(k_positions, nk * spec.bk, -1).reshape(b, nk, spec.bk).swapaxes(0, 1)  # [nk, B, bk]
    qs = ks = None
    if segments is not None:
        qs = _pad(segments[0], nq * spec.bq).reshape(b, nq, spec.bq).swapaxes(0, 1)
        ks = _pad(segments[1], nk * spec.bk).reshape(b, nk, spec.bk).swapaxes(0, 1)
    out = _flash(spec, qb, kb, vb, qp, kp, qs, ks, key if rate else None)  # [nq, B, K, bq*G, H]
    out = jnp.transpose(out.reshape(nq, b, kv, spec.bq, g, h), (1, 0, 3, 2, 4, 5))
    return out.reshape(b, nq * spec.bq, kv, g, h)[:, :t]


def _pad(x: jax.Array, size: int, value: int = 0) -> jax.Array:
    """x padded along axis 1 to `size` entries with `value`."""
    if x.shape[1] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, size - x.shape[1])
    return jnp.pad(x, widths, constant_values=value)


def _key_span(spec: _Blocks, qi, nk: int):
    """The key blocks query block qi reads: [start, end); with own keys none after its
    last query, and with a window none wholly before its first query's window."""
    if not spec.own_keys:
        return 0, nk
    start = 0 if not spec.window else jnp.maximum(0, qi * spec.bq - spec.window + 1) // spec.bk
    return start, jnp.minimum(nk, ((qi + 1) * spec.bq + spec.bk - 1) // spec.bk)


def _query_span(spec: _Blocks, ki, nq: int):
    """The query blocks that read key block ki: [start, end) (own keys: from the block
    holding its first key; with a window, up to the one holding its last key's last query)."""
    if not spec.own_keys:
        return 0, nq
    end = nq if not spec.window else jnp.minimum(nq, ((ki + 1) * spec.bk + spec.window - 2) // spec.bq + 1)
    return (ki * spec.bk) // spec.bq, end


def _block_scores(spec: _Blocks, qblk, kblk, q_pos, k_pos, q_seg, k_seg):
    """Scores [B, K, bq, G, bk] (float32, scaled) of a query block [B, K, bq*G, H]
    against a key block [B, K, bk, H], and which are visible [B, 1, bq, 1, bk]."""
    b, kv = qblk.shape[:2]
    scores = jax.lax.dot_general(qblk, kblk, (((3,), (3,)), ((0, 1), (0, 1))),
                                 preferred_element_type=jnp.float32)
    scores = scores.reshape(b, kv, spec.bq, spec.g, spec.bk) * spec.scale
    visible = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])
    if spec.window:
        visible &= k_pos[:, None, :] > q_pos[:, :, None] - spec.window
    if q_seg is not None:
        visible &= q_seg[:, :, None] == k_seg[:, None, :]
    return scores, visible[:, None, :, None, :]


def _keep(spec: _Blocks, key, qi, ki, nk: int, shape):
    """Dropout's scale per probability of block (qi, ki): 1 / (1 - rate) kept, 0 dropped;
    drawn from the key and the block (the backward draws the same)."""
    keep = jax.random.bernoulli(jax.random.fold_in(key, qi * nk + ki), 1.0 - spec.rate, shape)
    return jnp.where(keep, 1.0 / (1.0 - spec.rate), 0.0)


def _mm(a, b, contract_a: int, contract_b: int, dtype):
    """a @ b batched over the two leading axes [B, K], operands in `dtype`, float32 sums."""
    return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), (((contract_a,), (contract_b,)), ((0, 1), (0, 1))),
                               preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(spec, qb, kb, vb, qp, kp, qs, ks, key):
    return _flash_forward(spec, qb, kb, vb, qp, kp, qs, ks, key)[0]


def _flash_forward(spec, qb, kb, vb, qp, kp, qs, ks, key):
    """Blocked q [nq, B, K, bq*G, H] over k/v [nk, B, K, bk, H] -> the output
    (q's dtype, same layout) and each query row's log-sum-exp [nq, B, K, bq*G]
    (0 for a row that sees no key)."""
    nq, b, kv, rows, h = qb.shape
    nk = kb.shape[0]

    def query_block(_, xs):
        qi, qblk, q_pos, q_seg = xs

        def key_block(ki, carry):
            top, total, acc = carry  # [B, K, bq, G] twice, [B, K, bq*G, H]
            scores, visible = _block_scores(spec, qblk, kb[ki], q_pos, kp[ki], q_seg,
                                            None if ks is None else ks[ki])
            scores = jnp.where(visible, scores, _HIDDEN)
            new_top = jnp.maximum(top, jnp.max(scores, axis=-1))
            e = jnp.where(visible, jnp.exp(scores - new_top[..., None]), 0.0)  # [B, K, bq, G, bk]
            shrink = jnp.exp(top - new_top)  # rescales the sums made under the old maximum
            total = total * shrink + jnp.sum(e, axis=-1)
            if spec.rate:
                e = e * _keep(spec, key, qi, ki, nk, e.shape)
            acc = acc * shrink.reshape(b, kv, rows, 1) + _mm(e.reshape(b, kv, rows, spec.bk), vb[ki], 3, 2, vb.dtype)
            return new_top, total, acc

        init = (jnp.full((b, kv, spec.bq, spec.g), _HIDDEN), jnp.zeros((b, kv, spec.bq, spec.g)),
                jnp.zeros((b, kv, rows, h)))
        top, total, acc = jax.lax.fori_loop(*_key_span(spec, qi, nk), key_block, init)
        seen = total > 0
        out = acc / jnp.where(seen, total, 1.0).reshape(b, kv, rows, 1)
        lse = jnp.where(seen, top + jnp.log(jnp.where(seen, total, 1.0)), 0.0)
        return None, (out.astype(qb.dtype), lse.reshape(b, kv, rows))

    _, (out, lse) = jax.lax.scan(query_block, None, (jnp.arange(nq), qb, qp, qs))
    return out, lse


def _flash_fwd(spec, qb, kb, vb, qp, kp, qs, ks, key):
    out, lse = _flash_forward(spec, qb, kb, vb, qp, kp, qs, ks, key)
    return out, (qb, kb, vb, qp, kp, qs, ks, key, out, lse)


def _flash_bwd(spec, residuals, d_out):
    """The gradients for q, k, v, each key block's scores and probabilities
    recomputed from the log-sum-exp: dS = P * (dP - rowsum(dO * O)), with
    dropout dP taken through the kept probabilities."""
    qb, kb, vb, qp, kp, qs, ks, key, out, lse = residuals
    nq, b, kv, rows, h = qb.shape
    nk = kb.shape[0]
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [nq, B, K, bq*G]

    def key_block(dq, xs):
        ki, kblk, vblk, k_pos, k_seg = xs

        def query_block(qi, carry):
            dq, dk, dv = carry
            scores, visible = _block_scores(spec, qb[qi], kblk, qp[qi], k_pos,
                                            None if qs is None else qs[qi], k_seg)
            lse_i = lse[qi].reshape(b, kv, spec.bq, spec.g, 1)
            p = jnp.where(visible, jnp.exp(scores - lse_i), 0.0).reshape(b, kv, rows, spec.bk)
            dp = _mm(d_out[qi], vblk, 3, 3, vb.dtype)  # [B, K, bq*G, bk]
            kept = p
            if spec.rate:
                scale = _keep(spec, key, qi, ki, nk, (b, kv, spec.bq, spec.g, spec.bk)).reshape(p.shape)
                kept, dp = p * scale, dp * scale
            dv = dv + _mm(kept, d_out[qi], 2, 2, vb.dtype)  # [B, K, bk, H]
            ds = p * (dp - delta[qi][..., None]) * spec.scale
            dq = dq.at[qi].add(_mm(ds, kblk, 3, 2, qb.dtype))
            dk = dk + _mm(ds, qb[qi], 2, 2, qb.dtype)
            return dq, dk, dv

        zeros = jnp.zeros((b, kv, spec.bk, h))
        dq, dk, dv = jax.lax.fori_loop(*_query_span(spec, ki, nq), query_block, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(qb.shape), (jnp.arange(nk), kb, vb, kp, ks))
    return dq.astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype), None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# --- the kernels: cuDNN (GPU) and splash (TPU), each falling back to chunked ---

class Refusal(str):
    """Why a kernel cannot serve a call. hard: the program is compiled for the kernel's own
    platform and the call is of a kind it serves, so a forced form is an error, not a fallback."""

    hard: bool = False

    @classmethod
    def of(cls, why: str, hard: bool) -> Refusal:
        out = cls(why)
        out.hard = hard
        return out


def _kernel_refusal(form, q, k, own_keys, rate, segments, interpret) -> Refusal | None:
    """Why `form` ("cudnn" or "splash") cannot serve this call, or None; known before tracing it."""
    if rate:
        return Refusal.of("it has no attention dropout", False)
    if not own_keys:
        return Refusal.of("it serves own keys only (training, a prefill from position 0), not a cache read", False)
    if form == "cudnn":
        if not on_gpu():
            return Refusal.of(f"it runs on a GPU only (the program is compiled for {platform()})", False)
        if not cudnn_available():
            return Refusal.of("the cuDNN library is not installed (pip install 'starcoder-jax[cuda]')", True)
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            return Refusal.of(f"it takes bfloat16 or float16, got {q.dtype}", True)
        if segments is not None:
            return Refusal.of("causal + lengths cannot express segment ids", True)
    elif not (on_tpu() or interpret):
        return Refusal.of(f"it runs on a TPU only (the program is compiled for {platform()})", False)
    split = _kernel_split(q.shape[0], k.shape[2], q.shape[2] // k.shape[2])
    return Refusal.of(split, True) if isinstance(split, str) else None


def _kernel_split(b: int, kv: int, g: int):
    """How a kernel runs under the mesh set now: (batch mesh axes, the head axis it splits
    over the heads' mesh axes: "K", "G" or None, those axes), or why it cannot run. The
    batch goes over the rules' batch axes (data, fsdp) and the heads over theirs (tensor):
    the kv heads K where the axes divide them, else each kv head's G query heads (keys and
    values whole on every device, as for multi-query models); no mesh: ((), None, ())."""
    if not mesh_is_set():
        return (), None, ()
    sizes = mesh_sizes(jax.sharding.get_abstract_mesh())
    batch = tuple(a for a in mesh_axes("batch", sizes) if sizes[a] > 1)
    heads = tuple(a for a in mesh_axes("heads", sizes) if sizes[a] > 1)
    rows, split = math.prod(sizes[a] for a in batch), math.prod(sizes[a] for a in heads)
    if b % rows:
        return f"its batch of {b} rows does not divide over the mesh's {' x '.join(batch)} = {rows} devices"
    if split == 1:
        return batch, None, ()
    if kv % split == 0:
        return batch, "K", heads
    if g % split == 0:
        return batch, "G", heads
    return (f"neither its {kv} kv heads nor their {g} query heads each divide over the mesh's "
            f"{' x '.join(heads)} = {split} devices")


def _sharded_kernel(kernel, q, k, v, positions, segments):
    """kernel(q [B, T, K, G, H], k, v [B, T, K, H], positions [B, T], segments) -> [B, T, K, G, H],
    run by `jax.shard_map` over the mesh set now (`_kernel_split`): each device calls the
    kernel on its rows and heads, as it would on one device; no mesh: called as it is."""
    if not mesh_is_set():
        return kernel(q, k, v, positions, segments)
    batch, head_axis, heads = _kernel_split(q.shape[0], k.shape[2], q.shape[3])
    rows, on_heads = spec_entry(batch), spec_entry(heads)
    q_spec = jax.P(rows, None, on_heads if head_axis == "K" else None, on_heads if head_axis == "G" else None)
    kv_spec = jax.P(rows, None, on_heads if head_axis == "K" else None)
    row_spec = jax.P(rows)
    seg_spec = None if segments is None else (row_spec, row_spec)
    return jax.shard_map(kernel, in_specs=(q_spec, kv_spec, kv_spec, row_spec, seg_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v, positions, segments)


def _fall_back(form: str, why: str, warn: bool) -> str:
    """"chunked", warning once per process and reason where `form` was asked for by name."""
    reason = f"attention impl {form!r} cannot serve this call: {why}; running 'chunked'"
    if warn and reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(reason, stacklevel=3)
    return "chunked"


def _cudnn(q, k, v, positions, segments, *, scale, window, chunk, hard):
    """Own-key attention q [B, T, K, G, H] over k/v [B, T, K, H] by cuDNN's fused
    kernel -> [B, T, K, G, H]: causal by index, each row's padding (negative
    positions) as its length. Lengths express right padding only; a batch with
    padding before a token (left padding) runs chunked, chosen on device
    (`lax.cond`: both are compiled). Where cuDNN refuses the call while it is
    traced (shape, head dim, cuDNN version) the chunked form runs instead, with
    a warning when cudnn was asked for by name, or an error where it was
    forced (`hard`) on a GPU. A window is cuDNN's local window of window - 1
    keys before each query (`fused`)."""
    del segments  # refused before (`_kernel_refusal`)
    b, t, kv, g, h = q.shape
    valid = positions >= 0  # [B, T]

    def kernel(q, k, v):
        return fused(q.reshape(b, t, kv * g, h), k, v, valid, scale, window, "cudnn").reshape(q.shape)

    def chunked(q, k, v):
        with jax.named_scope("attention_chunked"):
            return _chunked(q, k, v, positions, positions, None, scale, 0.0, None, True, chunk, window)

    try:
        jax.eval_shape(kernel, q, k, v)
    except Exception as error:  # noqa: BLE001 -- any refusal of cuDNN's checks means: not this kernel
        why = f"cuDNN refused it ({str(error).splitlines()[0][:200]})"
        if hard:
            raise ValueError(f"attention impl 'cudnn' cannot serve this call on gpu: {why}") from error
        _fall_back("cudnn", why, True)
        return chunked(q, k, v)
    right_padded = jnp.all(valid[:, 1:] <= valid[:, :-1])  # no token after padding in any row
    return jax.lax.cond(right_padded, kernel, chunked, q, k, v)


def fused(q, k, v, valid, scale, window, implementation):
    """jax.nn.dot_product_attention as the cudnn form calls it: own keys q [B, T, N, H]
    over k/v [B, T, K, H], causal by index, valid [B, T] (right padding) as lengths,
    a window as (window - 1, 0) local keys. implementation "xla" runs the same call
    on any backend (tests)."""
    lengths = jnp.sum(valid, axis=1, dtype=jnp.int32)
    local = None if window is None else (window - 1, 0)
    # a fully padded row keeps one key: no empty softmax inside the kernel; its output is zeroed
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, query_seq_lengths=lengths,
                                       key_value_seq_lengths=jnp.maximum(lengths, 1),
                                       local_window_size=local, implementation=implementation)
    return jnp.where(valid[:, :, None, None], out, 0).astype(q.dtype)


@functools.lru_cache(maxsize=32)
def _splash_kernel(length: int, tile: int, heads: int, multi_head: bool, interpret: bool, window: int | None):
    """The splash kernel for `heads` causal heads of `length` tokens, each query
    seeing its `window` newest keys (None: all), built once per shape."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    if window is None:
        one = sm.CausalMask((length, length))
    else:
        one = sm.LocalMask((length, length), window_size=(window - 1, 0), offset=0)
    mask = sm.MultiHeadMask([one] * heads)
    tiles = sk.BlockSizes(block_q=tile, block_kv=tile, block_kv_compute=tile, block_q_dkv=tile,
                          block_kv_dkv=tile, block_kv_dkv_compute=tile, use_fused_bwd_kernel=True)
    make = sk.make_splash_mha_single_device if multi_head else sk.make_splash_mqa_single_device
    return make(mask, block_sizes=tiles, interpret=interpret), sk.SegmentIds


def _splash(q, k, v, positions, segments, *, scale, window, interpret):
    """Own-key attention q [B, T, K, G, H] over k/v [B, T, K, H] by the splash
    kernel -> [B, T, K, G, H]: causal by index, T padded to whole 128-token
    tiles; padding (negative positions) takes a segment id below every real
    one, so no real query sees it, and padded queries are zeroed. G > 1: the
    multi-query kernel for each kv head's G query heads; G = 1: the
    multi-head kernel over the K heads. A window is a local mask of window - 1
    keys before each query. Off a TPU only in interpret mode (tests).
    """
    b, t, kv, g, h = q.shape
    length = -(-t // 128) * 128
    tile = next(size for size in (SPLASH_BLOCK, 256, 128) if length % size == 0)
    valid = _pad(positions >= 0, length, False)  # [B, T'] (T' = length)
    seg = jnp.zeros((b, t), jnp.int32) if segments is None else segments[0].astype(jnp.int32)
    seg = jnp.where(valid, _pad(seg, length), jnp.min(seg) - 1)
    q = jnp.transpose(_pad(q * jnp.asarray(scale, q.dtype), length), (0, 2, 3, 1, 4))  # [B, K, G, T', H]
    k, v = (jnp.swapaxes(_pad(x, length), 1, 2) for x in (k, v))  # [B, K, T', H]
    kernel, segment_ids = _splash_kernel(length, tile, kv if g == 1 else g, g == 1, interpret, window)

    def row(q, k, v, seg):  # one row: q [K, G, T', H], k/v [K, T', H]
        ids = segment_ids(q=seg, kv=seg)
        if g == 1:
            return kernel(q[:, 0], k, v, segment_ids=ids)[:, None]
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q, k, v)

    out = jax.vmap(row)(q, k, v, seg)  # [B, K, G, T', H]
    out = jnp.transpose(out, (0, 3, 1, 2, 4))[:, :t]
    return jnp.where(valid[:, :t, None, None, None], out, 0).astype(q.dtype)

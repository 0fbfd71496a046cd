"""Continuous batching on a static KV cache: a fixed number of slots, one jitted decode step for all.

The engine owns one KVCache of `slots` rows x `max_seq_len` positions and
a thread that loops:

1. admit: while a slot is free and a request waits, prefill the request
   into that slot (one jitted call: the slot's row of the cache is cut out,
   the prompt runs through the model at its positions, the row is written
   back, the first token is sampled);
2. step: one jitted decode step feeds every slot's last token and samples
   the next one, each row with its own sampling settings, seed and count;
3. the host appends each live slot's token, checks its stop ids, stop
   strings and token budget, streams the new text to the request, and
   frees the slot of a finished or cancelled request at once.

Shapes never change after warm-up: the cache and the per-slot arrays are
allocated once, prompts are padded to power-of-two buckets (as `generate`
does), and every setting is an array, so a server compiles one decode step
and one prefill per prompt bucket (and per "fresh" / "extend" kind).

Prefix reuse: a free slot keeps the token ids whose keys and values its
row holds. A new request whose prompt shares a prefix with them (the editor
typing case: the same file with a few more characters) is placed in that
slot and only its new tokens are prefilled, attending to the cached ones.
A sliding-window model (a ring-buffer cache) reuses only when the cached
ids are a prefix of the prompt.

Sampling streams: a request's token i is drawn with the key
fold_in(key(seed), i), whatever slot it runs in and whoever runs beside it,
so a seeded request gives the same text alone or under load. Greedy
requests give `generate`'s tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import queue
import threading
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from starcoder_jax.config import KV_CACHE_MODES, check_quantization
from starcoder_jax.inference.generate import MIN_PROMPT_BUCKET, TextTracker, bucket
from starcoder_jax.inference.runner import MeshRunner
from starcoder_jax.inference.sampling import SamplingParams, sample
from starcoder_jax.model.kv_cache import KVCache
from starcoder_jax.model.modules import StarCoder
from starcoder_jax.tokenizer import Tokenizer

TOP_LOGPROBS = 5  # alternatives returned per token at most (OpenAI's limit for completions)
STOP_ID_SLOTS = 24  # stop ids a request may carry (eos and the FIM tokens included)


class QueueFull(Exception):
    """The engine's queue holds `max_queue` requests already."""


class Closed(Exception):
    """The engine is draining or stopped and takes no new requests."""


@dataclasses.dataclass
class Request:
    """One generation: what the client asked, and the queue its events go to.

    prompt: token ids; max_tokens: new tokens at most; stop: strings that end
    the text (not part of it); stop_ids: ids that end it (eos, FIM tokens);
    logprobs: None, or how many alternatives to return per token (0-5).
    """

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    index: int = 0  # the caller's tag (a choice's index); events carry it
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    # filled in by the engine
    enqueued: float = 0.0
    cached_tokens: int = 0  # prompt tokens whose cache was reused

    def cancel(self) -> None:
        self.cancelled.set()


@dataclasses.dataclass
class Event:
    """New output of a request since its previous event. The last one has finished=True
    and finish_reason "stop" (eos, a stop id or stop string) or "length"."""

    text: str
    ids: list[int]
    logprobs: list[float]
    top: list[list[tuple[int, float]]]  # per token, its (id, logprob) alternatives
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    stop_string: str = ""  # the stop string that ended the text, if one did
    index: int = 0  # the request's tag


class Histogram:
    """A Prometheus histogram: cumulative counts per upper bound, a sum and a count."""

    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.bounds):
            if value <= b:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for b, c in zip((*self.bounds, float("inf")), self.counts):
            total += c
            le = "+Inf" if b == float("inf") else repr(b)
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        return [*out, f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


class Metrics:
    """What /metrics reports; updated by the engine thread, read by the server's."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = collections.Counter()  # finish reason -> count
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.generated_tokens = 0
        self.ttft = Histogram((0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.per_token = Histogram((0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))


def _insert(graphdef, params, cache: KVCache, slot, ids, start, length, knobs, seed, seen, vocab_limit, *,
            fresh: bool, draft=None):
    """Prefills one request into row `slot` of the cache and samples its first token.

    ids [1, T]: the new tokens, right-padded; start: the position of ids[0, 0]
    (the cached tokens the request reuses); length: real tokens in ids.
    fresh: nothing is reused (start is 0), so attention reads only the new
    keys, as `generate`'s prefill does; a ring row's old positions are cleared.
    knobs: SamplingParams arrays of one row; seen [1, V]: the prompt's tokens.
    draft: (graphdef, params, cache) of a draft model, whose cache row gets the same tokens.
    Returns (cache, token [1], logprob [1], top ids [1, K], top logprobs [1, K]), and the
    draft's cache after them with a draft.
    """
    model: StarCoder = nnx.merge(graphdef, params)
    hidden, cache = _prefill_row(model, cache, slot, ids, start, length, fresh)
    last = jax.lax.dynamic_slice_in_dim(hidden, length - 1, 1, axis=1)  # [1, 1, D]
    logits = model.logits(last)[:, 0]
    token, logprob, top_ids, top_lp = _choose(logits, knobs, seed[None], jnp.zeros((1,), jnp.int32), seen,
                                              vocab_limit)
    if draft is None:
        return cache, token, logprob, top_ids, top_lp
    draft_graphdef, draft_params, draft_cache = draft
    _, draft_cache = _prefill_row(nnx.merge(draft_graphdef, draft_params), draft_cache, slot, ids, start, length,
                                  fresh)
    return cache, token, logprob, top_ids, top_lp, draft_cache


def _prefill_row(model: StarCoder, cache: KVCache, slot, ids, start, length, fresh: bool):
    """Runs ids [1, T] (length real) at positions start.. through row `slot` of the cache: (hidden, cache)."""
    row = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, slot, 1, axis=0), cache)
    if fresh and row.ring:
        row = row.replace_layers(tuple(dataclasses.replace(layer, pos=jnp.full_like(layer.pos, -1))
                                       for layer in row.layers))
    t = ids.shape[1]
    offsets = jnp.arange(t, dtype=jnp.int32)[None, :]
    positions = start + offsets
    if row.ring:  # a ring keeps the newest tokens: the padding must not count as any
        positions = jnp.where(offsets < length, positions, -1)
    hidden, row = model.hidden(ids, positions, row, read_cache=not fresh)
    cache = jax.tree.map(lambda a, r: jax.lax.dynamic_update_slice_in_dim(a, r, slot, axis=0), cache, row)
    return hidden, cache


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def insert_fresh(graphdef, params, cache, slot, ids, start, length, knobs, seed, seen, vocab_limit):
    """`_insert` of a request that reuses nothing (start is 0)."""
    return _insert(graphdef, params, cache, slot, ids, start, length, knobs, seed, seen, vocab_limit, fresh=True)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def insert_extend(graphdef, params, cache, slot, ids, start, length, knobs, seed, seen, vocab_limit):
    """`_insert` of a request that extends the `start` tokens its slot holds."""
    return _insert(graphdef, params, cache, slot, ids, start, length, knobs, seed, seen, vocab_limit, fresh=False)


def _step(graphdef, params, cache: KVCache, ints, knobs, seen, vocab_limit, rows: int | None = None):
    """One decode step for the first `rows` slots (None: all). ints [4, N]: each row's token
    to feed, its position (-1 on a ring: an idle row that writes nothing), its seed and its
    count of sampled tokens; the next token is drawn with key fold_in(key(seed), count).
    Returns (cache, (tokens, logprobs, top ids [., K], top logprobs [., K]) of those rows, seen).

    The rows past `rows` are idle: the step reads and writes only the first ones (a cut of
    the cache, written back in place), so a server with few live requests computes few rows.
    """
    n = seen.shape[0]
    rows = n if rows is None else rows
    part = _first_rows(cache, rows, n)
    tokens, positions, seeds, counts = ints[:, :rows]
    model: StarCoder = nnx.merge(graphdef, params)
    hidden, part = model.hidden(tokens[:, None], positions[:, None], part)
    logits = model.logits(hidden)[:, 0]
    knobs = {k: v[:rows] for k, v in knobs.items()}
    token, logprob, top_ids, top_lp = _choose(logits, knobs, seeds, counts, seen[:rows], vocab_limit)
    seen = seen.at[jnp.arange(rows), token].set(True)
    return _with_first_rows(cache, part, rows, n), (token, logprob, top_ids, top_lp), seen


def _first_rows(cache: KVCache, rows: int, n: int) -> KVCache:
    """The first `rows` of a cache of n rows (the cache itself when that is all of them)."""
    return cache if rows == n else jax.tree.map(lambda a: a[:rows], cache)


def _with_first_rows(cache: KVCache, part: KVCache, rows: int, n: int) -> KVCache:
    """The cache with its first `rows` rows replaced by `part` (written in place)."""
    if rows == n:
        return part
    return jax.tree.map(lambda a, p: jax.lax.dynamic_update_slice_in_dim(a, p, 0, axis=0), cache, part)


# the same programs with a static graphdef, for MeshRunner.call (a mesh)
step = functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache", "seen"))(_step)


def _spec_step(graphdef, k: int, params, cache: KVCache, ints, history, knobs, seen, vocab_limit, draft=None,
               rows: int | None = None):
    """One speculative round for the first `rows` slots: k drafts each (prompt lookup over
    history [N, P], or the draft model: (graphdef, params, cache)), one verify pass.

    ints [5, N]: each row's token to feed, its position (-1 on a ring: idle), seed, count of
    sampled tokens (the round draws with key fold_in(key(seed), count)) and the token before it.
    Returns (cache, (tokens [., k + 1], counts [.], logprobs [., k + 1], top ids [., k + 1, K],
    top logprobs), seen, draft cache or None); a row's first counts[i] tokens are its new ones.
    """
    from starcoder_jax.inference import speculative as spec

    n = seen.shape[0]
    rows = n if rows is None else rows
    tokens, positions, seeds, counts, prev = ints[:, :rows]
    knobs = {name: v[:rows] for name, v in knobs.items()}
    keys = _request_keys(seeds, counts)
    model: StarCoder = nnx.merge(graphdef, params)
    if draft is None:
        drafts, q = spec.lookup(history[:rows], positions, k, spec.MAX_NGRAM), None
        draft_cache = None
    else:
        draft_graphdef, draft_params, draft_cache = draft
        drafts, q, part = spec.draft_tokens(nnx.merge(draft_graphdef, draft_params),
                                            _first_rows(draft_cache, rows, n), prev, tokens, positions,
                                            seen[:rows], knobs, vocab_limit, k, keys)
        draft_cache = _with_first_rows(draft_cache, part, rows, n)
    out, raw, count, part = spec.verify(model, _first_rows(cache, rows, n), tokens, positions, seen[:rows], drafts,
                                        q, knobs, vocab_limit, keys)
    logprob = jnp.take_along_axis(raw, out[..., None], axis=-1)[..., 0]
    top_lp, top_ids = jax.lax.top_k(raw, TOP_LOGPROBS)
    taken = jnp.where(jnp.arange(k + 1) < count[:, None], out, seen.shape[1])
    seen = seen.at[jnp.arange(rows)[:, None], taken].set(True, mode="drop")
    return _with_first_rows(cache, part, rows, n), (out, count, logprob, top_ids.astype(jnp.int32), top_lp), seen, \
        draft_cache


def _request_keys(seeds, counts) -> jax.Array:
    """Each row's key for its next draw: fold_in(key(seed), tokens sampled so far), [rows]."""
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counts)


def _choose(logits, knobs, seeds, counts, seen, vocab_limit):
    v = logits.shape[-1]
    logits = jnp.where(jnp.arange(v) < vocab_limit, logits, -jnp.inf)
    token = sample(logits, knobs, _request_keys(seeds, counts), seen)
    logp = jax.nn.log_softmax(logits, -1)
    logprob = jnp.take_along_axis(logp, token[:, None], -1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logp, TOP_LOGPROBS)
    return token, logprob, top_ids.astype(jnp.int32), top_lp


@dataclasses.dataclass
class _Slot:
    """The host's record of one slot."""

    cached: list[int] = dataclasses.field(default_factory=list)  # ids whose k/v the row holds
    request: Request | None = None
    generated: list[int] = dataclasses.field(default_factory=list)
    tracker: TextTracker | None = None
    last_token_at: float = 0.0


class Engine:
    """Serves generation requests from many threads on `slots` rows of one static cache.

    submit(request) queues a request (QueueFull past max_queue, Closed while
    draining) and returns at once; its Events arrive on request.events.
    """

    def __init__(self, model: StarCoder, tokenizer: Tokenizer | None = None, *, slots: int = 8,
                 max_seq_len: int | None = None, kv_cache: str | None = None, max_queue: int = 64,
                 mesh=None, prefix_reuse: bool = True, draft=None, num_draft_tokens: int | None = None):
        config = model.config
        if isinstance(slots, bool) or int(slots) != slots or slots < 1:
            raise ValueError(f"slots must be an integer >= 1, got {slots!r}")
        self.max_seq_len = config.n_positions if max_seq_len is None else int(max_seq_len)
        if not 2 <= self.max_seq_len <= config.n_positions:
            raise ValueError(f"max_seq_len must be in [2, {config.n_positions}] (the model's positions), "
                             f"got {max_seq_len}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.config, self.tokenizer = config, tokenizer
        self.kv_cache = check_quantization(kv_cache, "kv_cache", " (the compute dtype)", KV_CACHE_MODES)
        self.graphdef, self.params = nnx.split(model.adapt_to_backend_(sharded=mesh is not None, decode=True))
        self._runner = None if mesh is None else MeshRunner(config, self.params, mesh)
        if self._runner is not None:
            self.params = self._runner.place_params(self.params)
            slots = self._runner.round_batch(slots)
        self.slots = slots
        self._k, self._draft = self._drafting(model, draft, num_draft_tokens, mesh)
        self._programs = self._make_programs()
        self.max_queue = max_queue
        self.prefix_reuse = prefix_reuse
        self.vocab_limit = jnp.int32(tokenizer.vocab_size if tokenizer is not None else config.vocab_size)
        sharding = None if self._runner is None else self._runner.cache
        self._cache = KVCache.init(config, slots, self.max_seq_len, sharding=sharding, quantize=self.kv_cache,
                                   lookahead=self._k)
        self._ring = self._cache.ring
        self._draft_cache = None if self._draft is None else KVCache.init(
            self._draft[2], slots, self.max_seq_len, quantize=self.kv_cache, lookahead=self._k)
        self._history = np.zeros((slots, self.max_seq_len + 1), np.int32)  # prompt lookup: ids by position
        self.drafted_tokens = self.accepted_tokens = 0
        v = config.vocab_size
        self._seen = jnp.zeros((slots, v), bool)
        self._tokens = np.zeros((slots,), np.int32)
        self._positions = np.zeros((slots,), np.int32)
        self._seeds = np.zeros((slots,), np.int32)
        self._counts = np.zeros((slots,), np.int32)
        self._knobs = {k: np.array(a) for k, a in SamplingParams().arrays(slots).items()}
        self._knobs_on_device = None
        self._slots = [_Slot() for _ in range(slots)]
        self._queue: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._stopped = False
        self.metrics = Metrics()
        self._thread = threading.Thread(target=self._loop, name="starcoder-jax-engine", daemon=True)
        self._thread.start()

    def _drafting(self, model, draft, num_draft_tokens, mesh):
        """(k, None or (draft graphdef, params, config)): 0 without speculative decoding."""
        from starcoder_jax.inference import speculative as spec

        drafting = spec.drafting(draft, num_draft_tokens, model.config)
        if drafting is None:
            return 0, None
        if mesh is not None:
            raise ValueError("the server runs speculative decoding on one device; leave out mesh or draft")
        if not drafting.model:
            return drafting.k, None
        if draft.config.n_positions < self.max_seq_len:
            raise ValueError(f"the draft model holds {draft.config.n_positions} positions, fewer than "
                             f"max_seq_len={self.max_seq_len}")
        graphdef, params = nnx.split(draft.adapt_to_backend_(decode=True))
        return drafting.k, (graphdef, params, draft.config)

    @property
    def speculative(self) -> bool:
        return self._k > 0

    # ------------------------------------------------------------------ clients' side

    def submit(self, request: Request) -> Request:
        """Queues a request; raises ValueError for what cannot run, QueueFull, or Closed."""
        self.check(request)
        with self._cv:
            if self._closed:
                raise Closed("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests wait already")
            request.enqueued = time.perf_counter()
            self._queue.append(request)
            self._cv.notify_all()
        return request

    def check(self, request: Request) -> None:
        n = len(request.prompt)
        if n == 0:
            raise ValueError("the prompt is empty; give at least one token")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if n + request.max_tokens > self.max_seq_len:
            raise ValueError(f"the prompt has {n} tokens; with max_tokens={request.max_tokens} that is "
                             f"{n + request.max_tokens} positions, but this server holds {self.max_seq_len}")
        bad = [t for t in request.prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        if len(request.stop_ids) > STOP_ID_SLOTS:
            raise ValueError(f"at most {STOP_ID_SLOTS} stop ids, got {len(request.stop_ids)}")
        if request.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        if request.logprobs is not None and not 0 <= request.logprobs <= TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {TOP_LOGPROBS}], got {request.logprobs}")

    def warmup(self) -> None:
        """Compiles what requests will run: a fresh prefill (the smallest prompt bucket), a
        prefill that extends a slot's cached prompt, and the decode step for every row bucket
        (1, 2, 4, ... live rows); longer prompts compile their bucket when first seen."""
        def finish(request: Request) -> list[int]:
            ids = []
            while True:
                event = request.events.get()
                ids += event.ids
                if event.finished:
                    return ids

        for rows in self._row_buckets():
            with self._cv:  # all admitted together: the first `rows` slots run at once
                batch = [self.submit(Request([0], max_tokens=2)) for _ in range(rows)]
            out = [finish(r) for r in batch][0]
        finish(self.submit(Request([0, *out], max_tokens=2)))  # extends what a request left in its slot

    def queue_depth(self) -> int:
        with self._cv:
            return len(self._queue)

    def busy_slots(self) -> int:
        with self._cv:
            return sum(s.request is not None for s in self._slots)

    def idle(self) -> bool:
        with self._cv:
            return not self._queue and all(s.request is None for s in self._slots)

    def drain(self, timeout: float | None = None) -> bool:
        """Takes no new requests, waits for the queued and live ones; True once all finished."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            while self._queue or any(s.request is not None for s in self._slots):
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(0.05 if left is None else min(left, 0.05))
        return True

    def close(self) -> None:
        """Stops the engine thread; queued and live requests end with an error event."""
        with self._cv:
            self._closed = self._stopped = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ the engine thread

    def _make_programs(self) -> dict:
        """name -> fn(*arguments after graphdef and params): the jitted prefill and step. On
        one device the graphdef is bound into each program once (hashing it as a static
        argument on every call costs milliseconds a step); on a mesh MeshRunner runs them."""
        g = self.graphdef
        if self._runner is None and self.speculative:
            return self._speculative_programs()
        if self._runner is None:
            programs = {"fresh": jax.jit(functools.partial(_insert, g, fresh=True), donate_argnums=(1,)),
                        "extend": jax.jit(functools.partial(_insert, g, fresh=False), donate_argnums=(1,))}
            for rows in self._row_buckets():
                programs[f"step{rows}"] = jax.jit(functools.partial(_step, g, rows=rows), donate_argnums=(1, 4))
            return programs
        runner = self._runner
        return {"fresh": lambda p, *a: runner.call(insert_fresh, ("cache",), g, p, *a),
                "extend": lambda p, *a: runner.call(insert_extend, ("cache",), g, p, *a),
                f"step{self.slots}": lambda p, *a: runner.call(step, ("cache", "seen"), g, p, *a)}

    def _speculative_programs(self) -> dict:
        """The programs of a speculative engine: the inserts also fill the draft's cache row, the
        step is a round (`_spec_step`). Each takes the draft's cache (None: prompt lookup) last."""
        g, k = self.graphdef, self._k
        d = None if self._draft is None else self._draft[:2]

        def insert(fresh):
            def run(params, cache, *args, draft_cache):
                return _insert(g, params, cache, *args, fresh=fresh, draft=None if d is None else (*d, draft_cache))
            return jax.jit(run, donate_argnums=(1,), donate_argnames=("draft_cache",))

        def step(rows):
            def run(params, cache, ints, history, knobs, seen, vocab_limit, draft_cache):
                return _spec_step(g, k, params, cache, ints, history, knobs, seen, vocab_limit,
                                  draft=None if d is None else (*d, draft_cache), rows=rows)
            return jax.jit(run, donate_argnums=(1, 5, 7))

        return {"fresh": insert(True), "extend": insert(False),
                **{f"step{rows}": step(rows) for rows in self._row_buckets()}}

    def _row_buckets(self) -> list[int]:
        """The row counts a step program exists for: powers of two below the slots, and the slots."""
        return sorted({*(1 << i for i in range(self.slots.bit_length()) if 1 << i < self.slots), self.slots})

    def _rows_for(self, live: np.ndarray) -> int:
        """The smallest step program that covers every live slot; on a mesh, all slots."""
        if self._runner is not None:
            return self.slots
        top = int(np.flatnonzero(live)[-1]) + 1
        return next(r for r in self._row_buckets() if r >= top)

    def compilations(self) -> dict[str, int]:
        """Programs compiled so far by each of the engine's jitted functions (one device)."""
        return {name: fn._cache_size() for name, fn in self._programs.items() if hasattr(fn, "_cache_size")}

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stopped and not self._queue and all(s.request is None for s in self._slots):
                        self._cv.wait()
                    if self._stopped:
                        break
                self._admit()
                if any(s.request is not None for s in self._slots):
                    self._step()
                with self._cv:
                    self._cv.notify_all()
        except Exception as err:  # a failed program: every waiting client hears of it
            self._fail_all(f"{type(err).__name__}: {err}")
            raise
        self._fail_all("the server stopped")

    def _fail_all(self, message: str) -> None:
        with self._cv:
            self._closed = self._stopped = True
            waiting = list(self._queue) + [s.request for s in self._slots if s.request is not None]
            self._queue.clear()
            for s in self._slots:
                s.request = None
            self._cv.notify_all()
        for r in waiting:
            r.events.put(Event("", [], [], [], finished=True, finish_reason="error", error=message, index=r.index))

    def _next_request(self) -> Request | None:
        with self._cv:
            while self._queue:
                r = self._queue.popleft()
                if not r.cancelled.is_set():
                    return r
                self._count(r, "cancelled")
                r.events.put(Event("", [], [], [], finished=True, finish_reason="cancelled",
                                   prompt_tokens=len(r.prompt), index=r.index))
            return None

    def _admit(self) -> None:
        while any(s.request is None for s in self._slots):
            request = self._next_request()
            if request is None:
                return
            index, reuse = self._pick_slot(request.prompt)
            self._prefill(index, request, reuse)

    def _pick_slot(self, prompt: list[int]) -> tuple[int, int]:
        """(free slot, prompt tokens whose cache it can reuse): the longest reusable prefix,
        else the first free slot (live requests stay in the first rows, which the step computes)."""
        best, best_reuse = None, -1
        for i, s in enumerate(self._slots):
            if s.request is not None:
                continue
            reuse = _common_prefix(s.cached, prompt) if self.prefix_reuse else 0
            if self._ring and reuse < len(s.cached):
                reuse = 0  # a ring row past `reuse` holds newer positions the prompt would collide with
            reuse = min(reuse, len(prompt) - 1)  # at least one token runs, for the logits
            if reuse > best_reuse:
                best, best_reuse = i, reuse
        return best, max(best_reuse, 0)

    def _prefill(self, index: int, request: Request, reuse: int) -> None:
        slot = self._slots[index]
        new = request.prompt[reuse:]
        room = self.max_seq_len - reuse
        t = min(bucket(len(new), MIN_PROMPT_BUCKET), room)
        ids = np.zeros((1, t), np.int32)
        ids[0, :len(new)] = new
        seen = np.zeros((1, self.config.vocab_size), bool)
        seen[0, request.prompt] = True
        knobs = request.sampling.arrays(1)
        for k, a in knobs.items():
            self._knobs[k][index] = np.asarray(a)[0]
        self._knobs_on_device = None
        args = (self.params, self._cache, jnp.int32(index), jnp.asarray(ids), jnp.int32(reuse), jnp.int32(len(new)),
                knobs, jnp.int32(request.seed), jnp.asarray(seen), self.vocab_limit)
        program = self._programs["extend" if reuse else "fresh"]
        if self.speculative:
            out = program(*args, draft_cache=self._draft_cache)
            if self._draft is not None:
                self._draft_cache = out[-1]
            self._cache, token, logprob, top_ids, top_lp = out[:5]
            self._history[index, :len(request.prompt)] = request.prompt
        else:
            self._cache, token, logprob, top_ids, top_lp = program(*args)
        self._seen = self._seen.at[index].set(jnp.asarray(seen[0]))
        request.cached_tokens = reuse
        slot.request, slot.generated = request, []
        slot.cached = list(request.prompt)
        slot.tracker = TextTracker(self.tokenizer, request.stop)
        self._seeds[index] = request.seed
        self._counts[index] = 1
        self._positions[index] = len(request.prompt)
        now = time.perf_counter()
        with self.metrics.lock:
            self.metrics.ttft.observe(now - request.enqueued)
            self.metrics.prompt_tokens += len(request.prompt)
            self.metrics.cached_tokens += reuse
        slot.last_token_at = now
        token, logprob, top_ids, top_lp = jax.device_get((token, logprob, top_ids, top_lp))
        self._take(index, int(token[0]), float(logprob[0]), top_ids[0], top_lp[0])

    def _spec_step(self, live: np.ndarray, positions: np.ndarray) -> None:
        """One speculative round: each live slot takes 1 to k + 1 tokens."""
        rows = self._rows_for(live)
        prev = np.array([s.cached[-1] if s.cached else 0 for s in self._slots], np.int32)
        ints = jnp.asarray(np.stack([self._tokens, positions, self._seeds, self._counts, prev]))
        history = self._history
        for i in np.flatnonzero(live):  # the token not fed yet sits at its position
            history[i, self._positions[i]] = self._tokens[i]
        self._cache, out, self._seen, draft_cache = self._programs[f"step{rows}"](
            self.params, self._cache, ints, jnp.asarray(history[:rows]), self._knobs_on_device, self._seen,
            self.vocab_limit, self._draft_cache)
        if self._draft is not None:
            self._draft_cache = draft_cache
        tokens, counts, logprobs, top_ids, top_lp = jax.device_get(out)
        now = time.perf_counter()
        for i in np.flatnonzero(live):
            slot, n = self._slots[i], int(counts[i])
            fed = [int(self._tokens[i]), *(int(t) for t in tokens[i, :n - 1])]  # their k/v are in the cache now
            slot.cached += fed
            history[i, self._positions[i]:self._positions[i] + n] = fed
            self._positions[i] += n
            self._counts[i] += n
            self.drafted_tokens += self._k
            self.accepted_tokens += n - 1
            with self.metrics.lock:
                for _ in range(n):
                    self.metrics.per_token.observe((now - slot.last_token_at) / n)
            slot.last_token_at = now
            for j in range(n):
                self._take(i, int(tokens[i, j]), float(logprobs[i, j]), top_ids[i, j], top_lp[i, j])
                if slot.request is None:
                    break

    def _step(self) -> None:
        live = np.array([s.request is not None for s in self._slots])
        positions = self._positions.copy()
        if self._ring:
            positions[~live] = -1  # writes nothing
        else:  # an idle row writes past what it holds; a full row gives up its last cached token
            for i in np.flatnonzero(~live & (positions >= self.max_seq_len)):
                del self._slots[i].cached[self.max_seq_len - 1:]
            positions = np.minimum(positions, self.max_seq_len - 1)
        if self._knobs_on_device is None:  # changes only when a request is admitted
            self._knobs_on_device = {k: jnp.asarray(a) for k, a in self._knobs.items()}
        if self.speculative:
            return self._spec_step(live, positions)
        ints = jnp.asarray(np.stack([self._tokens, positions, self._seeds, self._counts]))
        rows = self._rows_for(live)
        self._cache, out, self._seen = self._programs[f"step{rows}"](
            self.params, self._cache, ints, self._knobs_on_device, self._seen, self.vocab_limit)
        token, logprob, top_ids, top_lp = jax.device_get(out)
        now = time.perf_counter()
        for i in np.flatnonzero(live):
            slot = self._slots[i]
            slot.cached.append(int(self._tokens[i]))  # the token fed now is in the cache
            self._positions[i] += 1
            self._counts[i] += 1
            with self.metrics.lock:
                self.metrics.per_token.observe(now - slot.last_token_at)
            slot.last_token_at = now
            self._take(i, int(token[i]), float(logprob[i]), top_ids[i], top_lp[i])

    def _take(self, index: int, token: int, logprob: float, top_ids, top_lp) -> None:
        """Appends a sampled token to the slot's request; ends it on a stop, its budget, or a cancel."""
        slot = self._slots[index]
        request = slot.request
        self._tokens[index] = token
        if request.cancelled.is_set():
            self._finish(index, "cancelled")
            return
        top = ([(int(a), float(b)) for a, b in zip(top_ids[:request.logprobs], top_lp[:request.logprobs])]
               if request.logprobs else [])
        if token in request.stop_ids:  # ends the text, is not part of it
            self._emit(index, [], [], [], final=True, reason="stop")
            return
        slot.generated.append(token)
        full = len(request.prompt) + len(slot.generated) >= self.max_seq_len
        if request.stop:
            text = slot.tracker.text(slot.generated)
            cut = slot.tracker.find_stop(text)
            if cut is not None:
                word = next(s for s in request.stop if text.startswith(s, cut))
                self._emit(index, [token], [logprob], [top], final=True, reason="stop", cut=cut, word=word)
                return
        if len(slot.generated) >= request.max_tokens or full:
            self._emit(index, [token], [logprob], [top], final=True, reason="length")
            return
        self._emit(index, [token], [logprob], [top], final=False)

    def _emit(self, index, ids, logprobs, top, *, final: bool, reason: str | None = None,
              cut: int | None = None, word: str = "") -> None:
        slot = self._slots[index]
        request = slot.request
        text = ""
        if self.tokenizer is not None:
            full = slot.tracker.text(slot.generated)
            if cut is not None:
                full = full[:cut]
            text = slot.tracker.delta(full, final)
        event = Event(text, ids, logprobs, top, finished=final, finish_reason=reason,
                      prompt_tokens=len(request.prompt), completion_tokens=len(slot.generated),
                      cached_tokens=request.cached_tokens, stop_string=word, index=request.index)
        request.events.put(event)
        with self.metrics.lock:
            self.metrics.generated_tokens += len(ids)
        if final:
            self._finish(index, reason)

    def _finish(self, index: int, reason: str) -> None:
        slot = self._slots[index]
        request = slot.request
        if reason == "cancelled":
            request.events.put(Event("", [], [], [], finished=True, finish_reason="cancelled",
                                     prompt_tokens=len(request.prompt), completion_tokens=len(slot.generated),
                                     index=request.index))
        self._count(request, reason)
        with self._cv:
            slot.request = None
            self._cv.notify_all()

    def _count(self, request: Request, reason: str) -> None:
        with self.metrics.lock:
            self.metrics.requests[reason] += 1


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i

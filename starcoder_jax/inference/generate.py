"""Jitted generation: prefill, a decode step, and a decode loop that runs on device.

Shapes are static on the hot path so that a session compiles a handful of
programs and then only runs them:
- prompts are right-padded to a length bucket (a power of two) and batches
  to a batch bucket; each row carries its own length, so padding never leaks
  into attention (learned absolute positions would make such a bug silent,
  and the pad id of StarCoder is also its eos id, so padding is never
  detected by token value);
- the cache length and the output buffer are buckets as well;
- sampling settings, step counts and stop ids are device arrays, never
  Python constants baked into a program.

The decode loop (`jax.lax.while_loop`) leaves as soon as every row has hit
eos, a stop id, or its token budget. Stop strings are checked on the host
between chunks of decode steps (the same mechanism streams text out).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from starcoder_jax.config import check_quantization
from starcoder_jax.inference.runner import MeshRunner
from starcoder_jax.inference.sampling import SamplingParams, sample
from starcoder_jax.model.kv_cache import KVCache
from starcoder_jax.model.modules import StarCoder
from starcoder_jax.tokenizer import Tokenizer

MIN_PROMPT_BUCKET = 16
MIN_NEW_BUCKET = 16
STOP_ID_SLOTS = 16


def bucket(n: int, minimum: int, maximum: int | None = None) -> int:
    """Smallest power of two >= max(n, minimum), capped at `maximum`."""
    size = max(minimum, 1 << max(0, int(n) - 1).bit_length())
    return min(size, maximum) if maximum is not None else size


@dataclasses.dataclass
class Generation:
    """One prompt's result.

    ids: generated ids only, ending with the eos / stop id when one was hit.
    text: the generated text (with a tokenizer), without that final eos / stop
      token and cut before the first stop string.
    finish_reason: "eos", "stop" (stop id or stop string) or "length".
    logprobs: per generated token, its log-probability under the model's raw
      (unfiltered, temperature 1) distribution, when asked for.
    """

    prompt_ids: list[int]
    ids: list[int]
    text: str | None = None
    finish_reason: str = "length"
    logprobs: list[float] | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """The loop carry: everything a decode step reads and writes."""

    cache: KVCache
    token: jax.Array  # [B] int32, the last sampled token (not yet fed to the model)
    position: jax.Array  # [B] int32, where `token` goes in the cache
    out: jax.Array  # [B, M] int32, generated tokens
    logprobs: jax.Array  # [B, M] float32
    n_out: jax.Array  # [B] int32, tokens generated so far
    done: jax.Array  # [B] bool
    hit_stop: jax.Array  # [B] bool, ended on eos or a stop id
    seen: jax.Array  # [B, V] bool, tokens in prompt or output (repetition penalty)
    step: jax.Array  # [] int32, decode steps taken (PRNG stream position)


def _row_keys(seed: jax.Array, step: jax.Array, batch: int) -> jax.Array:
    """Independent PRNG keys per row and step, [B]. seed [2]: (seed, first row's index)."""
    base = jax.random.fold_in(jax.random.key(seed[0]), step)
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(seed[1] + jnp.arange(batch))


def _choose(logits, seen, knobs, seed, step, vocab_limit):
    """Masks padded vocab rows, samples, and returns (token [B], raw logprob [B])."""
    b, v = logits.shape
    logits = jnp.where(jnp.arange(v) < vocab_limit, logits, -jnp.inf)
    token = sample(logits, knobs, _row_keys(seed, step, b), seen)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), token[:, None], -1)[:, 0]
    return token, logprob


def _record(state: DecodeState, token, logprob, stop_ids, max_new) -> DecodeState:
    """Appends token to the rows still running and updates done flags."""
    active = ~state.done
    b = token.shape[0]
    rows = jnp.arange(b)
    slot = jnp.minimum(state.n_out, state.out.shape[1] - 1)
    out = state.out.at[rows, slot].set(jnp.where(active, token, state.out[rows, slot]))
    logprobs = state.logprobs.at[rows, slot].set(
        jnp.where(active, logprob, state.logprobs[rows, slot]))
    n_out = state.n_out + active.astype(jnp.int32)
    is_stop = jnp.any(token[:, None] == stop_ids[None, :], axis=-1) & active
    done = state.done | is_stop | (n_out >= max_new)
    seen = state.seen.at[rows, token].set(True)
    return dataclasses.replace(
        state, token=jnp.where(active, token, state.token), out=out, logprobs=logprobs,
        n_out=n_out, done=done, hit_stop=state.hit_stop | is_stop, seen=seen)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def prefill(graphdef, params, ids, lengths, cache, knobs, seed, stop_ids, max_new,
            vocab_limit, out_len_like, active) -> DecodeState:
    """Runs the whole padded prompt batch in one call and samples each row's first token.

    ids [B, T] right-padded; lengths [B]; cache of S >= T slots (donated);
    `out_len_like` [M] only carries the output-buffer length M as a shape;
    active [B] is False for rows that only pad the batch.
    """
    model: StarCoder = nnx.merge(graphdef, params)
    b, t = ids.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    hidden, cache = model.hidden(ids, positions, cache, read_cache=False)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
    logits = model.logits(last)[:, 0]  # [B, V]
    v = logits.shape[-1]
    in_prompt = jnp.arange(t)[None, :] < lengths[:, None]
    seen = jnp.zeros((b, v), bool).at[jnp.arange(b)[:, None], ids].max(in_prompt)
    m = out_len_like.shape[0]
    state = DecodeState(
        cache=cache, token=jnp.zeros((b,), jnp.int32), position=lengths.astype(jnp.int32),
        out=jnp.zeros((b, m), jnp.int32), logprobs=jnp.zeros((b, m), jnp.float32),
        n_out=jnp.zeros((b,), jnp.int32), done=~active, hit_stop=jnp.zeros((b,), bool),
        seen=seen, step=jnp.zeros((), jnp.int32))
    token, logprob = _choose(logits, seen, knobs, seed, state.step, vocab_limit)
    state = _record(state, token, logprob, stop_ids, max_new)
    return dataclasses.replace(state, step=state.step + 1)


def decode_step(model: StarCoder, state: DecodeState, knobs, seed, stop_ids, max_new,
                vocab_limit) -> DecodeState:
    """Feeds each row's last token, samples the next one. Finished rows idle."""
    s = state.cache.length
    position = jnp.minimum(state.position, s - 1)
    hidden, cache = model.hidden(state.token[:, None], position[:, None], state.cache)
    logits = model.logits(hidden)[:, 0]
    state = dataclasses.replace(state, cache=cache, position=state.position + (~state.done))
    token, logprob = _choose(logits, state.seen, knobs, seed, state.step, vocab_limit)
    state = _record(state, token, logprob, stop_ids, max_new)
    return dataclasses.replace(state, step=state.step + 1)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("state",))
def decode_loop(graphdef, params, state: DecodeState, n_steps, knobs, seed, stop_ids, max_new,
                vocab_limit) -> DecodeState:
    """Up to n_steps decode steps on device; leaves early once every row is done."""
    model: StarCoder = nnx.merge(graphdef, params)
    limit = state.step + n_steps

    def cond(st):
        return (st.step < limit) & ~jnp.all(st.done)

    def body(st):
        return decode_step(model, st, knobs, seed, stop_ids, max_new, vocab_limit)

    return jax.lax.while_loop(cond, body, state)


# ---------------------------------------------------------------------------
# Host side: validation, batching, stop strings, streaming
# ---------------------------------------------------------------------------

def _encode_prompts(prompts, tokenizer: Tokenizer | None) -> list[list[int]]:
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, np.integer))):
        raise ValueError("prompts must be a list of prompts (strings or lists of token ids)")
    encoded = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("string prompts need a tokenizer (tokenizer=load_tokenizer(...))")
            ids = tokenizer.encode(p)
        else:
            ids = [int(x) for x in p]
        if not ids:
            raise ValueError(f"prompt {i} is empty; give at least one token")
        encoded.append(ids)
    if not encoded:
        raise ValueError("prompts is empty")
    return encoded


def _check_fits(model: StarCoder, encoded, max_new_tokens: int, tokenizer: Tokenizer | None):
    config = model.config
    if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary holds "
            f"{config.vocab_size}: they do not belong together")
    for i, ids in enumerate(encoded):
        if len(ids) + max_new_tokens > config.n_positions:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that is "
                f"{len(ids) + max_new_tokens} positions but the model holds {config.n_positions}")
        bad = [t for t in ids if not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(
                f"prompt {i} contains token id {bad[0]}, outside the vocabulary [0, {config.vocab_size})")


class _TextTracker:
    """Decodes a row's ids incrementally and finds stop strings."""

    def __init__(self, tokenizer: Tokenizer | None, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.emitted = 0

    def text(self, ids) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def find_stop(self, text: str) -> int | None:
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(cuts) if cuts else None

    def delta(self, text: str, final: bool) -> str:
        """The text not yet emitted. Until the row is final, hold back a trailing
        replacement char (the next token may complete its UTF-8 sequence) and
        any tail that could be the start of a stop string."""
        end = len(text)
        if not final:
            end = len(text.rstrip("\ufffd"))
            hold = 0
            for s in self.stop:
                for k in range(min(len(s) - 1, end), 0, -1):
                    if text[end - k:end] == s[:k]:
                        hold = max(hold, k)
                        break
            end -= hold
        piece = text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return piece


@dataclasses.dataclass
class StreamEvent:
    """Text (and ids) produced by one row since the previous event."""

    index: int  # which prompt
    ids: list[int]
    text: str
    finished: bool


class Generator:
    """Generation for one model: prepares prompts, runs prefill and the decode loop.

    Holds the split model (graphdef + params) so repeated calls reuse the
    compiled programs. `generate()` / `stream()` below are the functional API.
    """

    def __init__(self, model: StarCoder, tokenizer: Tokenizer | None = None, *, mesh=None,
                 kv_cache: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.kv_cache = check_quantization(kv_cache, "kv_cache", " (the compute dtype)")  # an error before any run
        # laid out for the projection form it will run (a stale derived copy is remade)
        self.graphdef, self.params = nnx.split(model.adapt_to_backend_(sharded=mesh is not None, decode=True))
        # mesh (a jax Mesh or a spec like "data=2,tensor=4"): params resharded per the
        # rules, a sharded cache, jitted calls with out_shardings. None: one device, as is.
        self._runner = None if mesh is None else MeshRunner(model.config, self.params, mesh)
        if self._runner is not None:
            self.params = self._runner.place_params(self.params)

    def _call(self, fn, donate, *args, **kwargs):
        if self._runner is None:
            return fn(*args, **kwargs)
        return self._runner.call(fn, donate, *args, **kwargs)

    def run(self, prompts, *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
            top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
            stop: Sequence[str] = (), stop_ids: Sequence[int] = (), seed: int = 0,
            first_row: int = 0, logprobs: bool = False, ignore_eos: bool = False,
            chunk: int | None = None,
            on_event: Callable[[StreamEvent], None] | None = None) -> list[Generation]:
        knobs_host = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
        if isinstance(stop, str):
            stop = (stop,)
        encoded = _encode_prompts(prompts, self.tokenizer)
        _check_fits(self.model, encoded, max_new_tokens, self.tokenizer)
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; use stop_ids for token ids")
        config = self.model.config

        n = len(encoded)
        b = bucket(n, 1) if self._runner is None else self._runner.round_batch(bucket(n, 1))
        longest = max(len(ids) for ids in encoded)
        t = bucket(longest, MIN_PROMPT_BUCKET, config.n_positions)
        m = bucket(max_new_tokens, MIN_NEW_BUCKET)
        s = min(config.n_positions, bucket(t + max_new_tokens, MIN_PROMPT_BUCKET))
        ids = np.zeros((b, t), np.int32)
        lengths = np.ones((b,), np.int32)
        for i, row in enumerate(encoded):
            ids[i, :len(row)] = row
            lengths[i] = len(row)
        active = np.arange(b) < n

        eos = self.tokenizer.eos_id if self.tokenizer is not None else config.eos_token_id
        stops = [x for x in ((None if ignore_eos else eos), *stop_ids) if x is not None]
        if len(stops) > STOP_ID_SLOTS:
            raise ValueError(f"at most {STOP_ID_SLOTS - 1} stop_ids are supported, got {len(stop_ids)}")
        stop_arr = np.full((STOP_ID_SLOTS,), -1, np.int32)
        stop_arr[:len(stops)] = stops
        vocab_limit = self.tokenizer.vocab_size if self.tokenizer is not None else config.vocab_size

        knobs = knobs_host.arrays(b)
        self._stops = stops
        consts = dict(knobs=knobs, seed=jnp.asarray([seed, first_row], jnp.int32),
                      stop_ids=jnp.asarray(stop_arr),
                      max_new=jnp.int32(max_new_tokens), vocab_limit=jnp.int32(vocab_limit))
        cache_sharding = None if self._runner is None else self._runner.cache
        cache = KVCache.init(config, b, s, sharding=cache_sharding, quantize=self.kv_cache)
        state = self._call(prefill, ("cache",), self.graphdef, self.params, jnp.asarray(ids),
                           jnp.asarray(lengths), cache,
                        out_len_like=jnp.zeros((m,), jnp.int8), active=jnp.asarray(active), **consts)

        trackers = [_TextTracker(self.tokenizer, stop) for _ in range(n)]
        stopped_by_string = [False] * n
        reported_done = [False] * n
        streaming = on_event is not None
        if chunk is None:
            chunk = 1 if streaming else (16 if stop else max_new_tokens)
        while True:
            done = np.asarray(state.done)
            if streaming or stop:
                state, done = self._host_checks(state, done, n, trackers, stopped_by_string,
                                                reported_done, on_event)
            if done[:n].all():
                break
            state = self._call(decode_loop, ("state",), self.graphdef, self.params, state,
                               jnp.int32(chunk), **consts)

        return self._collect(state, encoded, trackers, stopped_by_string, eos, stops, logprobs)

    def _row_ids(self, state_out, n_out, i) -> list[int]:
        return [int(x) for x in state_out[i, :n_out[i]]]

    def _host_checks(self, state, done, n, trackers, stopped_by_string, reported_done, on_event):
        out, n_out = np.asarray(state.out), np.asarray(state.n_out)
        new_done = done.copy()
        for i in range(n):
            if reported_done[i]:
                continue
            row = self._row_ids(out, n_out, i)
            text = trackers[i].text(row)
            if trackers[i].stop and trackers[i].find_stop(text) is not None:
                stopped_by_string[i] = True
                new_done[i] = True
            if on_event is not None:
                if new_done[i] and self.tokenizer is not None:
                    text = _final_text(self.tokenizer, row, trackers[i], stop_ids=self._stops)
                on_event(StreamEvent(i, row, trackers[i].delta(text, bool(new_done[i])),
                                     bool(new_done[i])))
            reported_done[i] = bool(new_done[i])
        if (new_done != done).any():
            state = dataclasses.replace(state, done=jnp.asarray(new_done))
        return state, new_done

    def _collect(self, state, encoded, trackers, stopped_by_string, eos, stops, want_logprobs):
        out, n_out = np.asarray(state.out), np.asarray(state.n_out)
        hit_stop, lps = np.asarray(state.hit_stop), np.asarray(state.logprobs)
        results = []
        for i, prompt in enumerate(encoded):
            row = self._row_ids(out, n_out, i)
            reason = "length"
            if hit_stop[i]:
                reason = "eos" if row and row[-1] == eos else "stop"
            text = None
            if self.tokenizer is not None:
                text = _final_text(self.tokenizer, row, trackers[i], stop_ids=stops)
                if stopped_by_string[i]:
                    reason = "stop"
                    row = _ids_through_stop(self.tokenizer, row, trackers[i])
            results.append(Generation(
                prompt_ids=list(prompt), ids=row, text=text, finish_reason=reason,
                logprobs=[float(x) for x in lps[i, :len(row)]] if want_logprobs else None))
        return results


def _final_text(tokenizer: Tokenizer, row: list[int], tracker: _TextTracker, stop_ids) -> str:
    body = row[:-1] if row and row[-1] in stop_ids else row
    text = tokenizer.decode(body)
    cut = tracker.find_stop(text)
    return text if cut is None else text[:cut]


def _ids_through_stop(tokenizer: Tokenizer, row: list[int], tracker: _TextTracker) -> list[int]:
    """The shortest prefix of row whose text contains a stop string."""
    for k in range(1, len(row) + 1):
        if tracker.find_stop(tokenizer.decode(row[:k])) is not None:
            return row[:k]
    return row


def generate(model: StarCoder, prompts, *, tokenizer: Tokenizer | None = None,
             max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             min_p: float = 0.0, repetition_penalty: float = 1.0, stop: Sequence[str] = (),
             stop_ids: Sequence[int] = (), seed: int = 0, logprobs: bool = False,
             ignore_eos: bool = False, batch_size: int | None = None,
             on_event: Callable[[StreamEvent], None] | None = None,
             mesh=None, kv_cache: str | None = None) -> list[Generation]:
    """Generates a continuation for each prompt.

    prompts: strings (with `tokenizer`) or lists of token ids; nothing is
      prepended (StarCoder uses no BOS).
    temperature 0 is greedy; top_k 0, top_p 1, min_p 0 and
      repetition_penalty 1 switch those filters off. Rows draw from
      independent random streams derived from (seed, row, step), so the same
      seed gives the same samples.
    stop: strings that end a row (checked between short chunks of decode
      steps); stop_ids: token ids that end a row like eos does.
    ignore_eos: keep going past eos (benchmarks, fixed-length samples).
    batch_size: prompts per device batch (default: all at once).
    on_event: called with a StreamEvent as text is produced (streaming).
    mesh: run on a device mesh (a jax Mesh or a spec such as "data=2,tensor=4");
      see starcoder_jax.parallel.sharding.
    kv_cache: "int8" keeps keys and values as int8 with a scale per token
      (a quarter of float32's memory; see starcoder_jax.model.kv_cache).
    """
    gen = Generator(model, tokenizer, mesh=mesh, kv_cache=kv_cache)
    prompts = list(prompts) if not isinstance(prompts, str) else prompts
    size = batch_size or max(1, len(prompts))
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    results = []
    for start in range(0, len(prompts), size):
        part = prompts[start:start + size]

        def shifted(event, offset=start):
            on_event(dataclasses.replace(event, index=event.index + offset))

        results += gen.run(part, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p, min_p=min_p,
                           repetition_penalty=repetition_penalty, stop=stop, stop_ids=stop_ids,
                           seed=seed, first_row=start, logprobs=logprobs, ignore_eos=ignore_eos,
                           on_event=shifted if on_event is not None else None)
    return results


def stream(model: StarCoder, prompt, *, tokenizer: Tokenizer | None = None,
           **kwargs) -> Iterator[str]:
    """Yields the text of one prompt's continuation as it is produced.

    Runs generation in a background thread, one decode step per chunk, and
    hands each new piece of text over a queue (notebooks and the CLI print
    them as they arrive). kwargs are those of `generate`.
    """
    import queue
    import threading

    pieces: queue.Queue = queue.Queue()
    done = object()
    failure: list[BaseException] = []

    def work():
        try:
            generate(model, [prompt], tokenizer=tokenizer,
                     on_event=lambda e: e.text and pieces.put(e.text), **kwargs)
        except BaseException as err:  # re-raised in the consumer
            failure.append(err)
        finally:
            pieces.put(done)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    while (item := pieces.get()) is not done:
        yield item
    thread.join()
    if failure:
        raise failure[0]

"""Jitted generation: prefill, a decode step, and a decode loop that runs on device.

Shapes are static on the hot path so that a session compiles a handful of
programs and then only runs them:
- prompts are right-padded to a length bucket (a power of two) and batches
  to a batch bucket; each row carries its own length, so padding never leaks
  into attention (learned absolute positions would make such a bug silent,
  and the pad id of StarCoder is also its eos id, so padding is never
  detected by token value);
- the cache length and the output buffer are buckets as well;
- sampling settings, step counts and stop ids are device arrays (one
  `DecodeConsts` pytree), never Python constants baked into a program;
- `generate` / `stream` keep one prepared `Generator` per model, tokenizer,
  mesh and kv_cache (`generator_for`), so repeated calls neither re-split
  nor re-place the weights.

The decode loop (`jax.lax.while_loop`) leaves as soon as every row has hit
eos, a stop id, or its token budget. Stop strings are checked on the host
between chunks of decode steps (the same mechanism streams text out).
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from starcoder_jax.config import KV_CACHE_MODES, StarCoderConfig, check_quantization
from starcoder_jax.inference.forward import same_arrays
from starcoder_jax.inference.runner import MeshRunner
from starcoder_jax.inference.sampling import SamplingParams, row_keys, sample
from starcoder_jax.model.kv_cache import KVCache
from starcoder_jax.model.modules import Derived, StarCoder
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
    draft_tokens, accepted_tokens: with speculative decoding, the drafted tokens
      the model checked for this row and how many of them it kept (None without).
    """

    prompt_ids: list[int]
    ids: list[int]
    text: str | None = None
    finish_reason: str = "length"
    logprobs: list[float] | None = None
    draft_tokens: int | None = None  # speculative decoding: drafted tokens checked
    accepted_tokens: int | None = None  # ... and kept


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeConsts:
    """What prefill and every decode step read and never change during one generation.

    All fields are device arrays, so new settings reuse the compiled programs.
    """

    knobs: dict[str, jax.Array]  # SamplingParams.arrays(B): one value per row
    seed: jax.Array  # [2] int32: (seed, index of the batch's first row)
    stop_ids: jax.Array  # [STOP_ID_SLOTS] int32, -1 in unused slots
    max_new: jax.Array  # [] int32, new tokens per row at most
    vocab_limit: jax.Array  # [] int32, ids >= it are never sampled (padded vocab rows)

    @classmethod
    def make(cls, batch: int, max_new: int, vocab_limit: int, *, sampling: SamplingParams | None = None,
             stop_ids: Sequence[int] = (), seed: int = 0, first_row: int = 0) -> DecodeConsts:
        """batch: rows B; sampling: None is greedy; stop_ids: at most STOP_ID_SLOTS ids (eos
        included) that end a row."""
        sampling = SamplingParams() if sampling is None else sampling
        if len(stop_ids) > STOP_ID_SLOTS:
            raise ValueError(f"stop_ids holds at most {STOP_ID_SLOTS} ids, got {len(stop_ids)}")
        slots = np.full((STOP_ID_SLOTS,), -1, np.int32)
        slots[:len(stop_ids)] = stop_ids
        return cls(knobs=sampling.arrays(batch), seed=jnp.asarray([seed, first_row], jnp.int32),
                   stop_ids=jnp.asarray(slots), max_new=jnp.int32(max_new),
                   vocab_limit=jnp.int32(vocab_limit))


def _choose(logits, seen, consts: DecodeConsts, step):
    """Masks padded vocab rows, samples, and returns (token [B], raw logprob [B])."""
    b, v = logits.shape
    logits = jnp.where(jnp.arange(v) < consts.vocab_limit, logits, -jnp.inf)
    token = sample(logits, consts.knobs, row_keys(consts.seed, step, b), seen)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), token[:, None], -1)[:, 0]
    return token, logprob


def _record(state: DecodeState, token, logprob, consts: DecodeConsts) -> DecodeState:
    """Appends token to the rows still running, updates done flags and advances the step."""
    active = ~state.done
    b = token.shape[0]
    rows = jnp.arange(b)
    slot = jnp.minimum(state.n_out, state.out.shape[1] - 1)
    out = state.out.at[rows, slot].set(jnp.where(active, token, state.out[rows, slot]))
    logprobs = state.logprobs.at[rows, slot].set(
        jnp.where(active, logprob, state.logprobs[rows, slot]))
    n_out = state.n_out + active.astype(jnp.int32)
    is_stop = jnp.any(token[:, None] == consts.stop_ids[None, :], axis=-1) & active
    done = state.done | is_stop | (n_out >= consts.max_new)
    seen = state.seen.at[rows, token].set(True)
    return dataclasses.replace(
        state, token=jnp.where(active, token, state.token), out=out, logprobs=logprobs,
        n_out=n_out, done=done, hit_stop=state.hit_stop | is_stop, seen=seen, step=state.step + 1)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def prefill(graphdef, params, ids, lengths, cache, consts: DecodeConsts, out_len_like,
            active) -> DecodeState:
    """Runs the whole padded prompt batch in one call and samples each row's first token.

    ids [B, T] right-padded; lengths [B]; cache of S >= T slots (donated);
    `out_len_like` [M] only carries the output-buffer length M as a shape;
    active [B] is False for rows that only pad the batch.
    """
    model: StarCoder = nnx.merge(graphdef, params)
    b, t = ids.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if cache.ring:  # a ring keeps each row's newest real tokens: mark the padding as no position
        positions = jnp.where(positions < lengths[:, None], positions, -1)
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
    token, logprob = _choose(logits, seen, consts, state.step)
    return _record(state, token, logprob, consts)


def decode_step(model: StarCoder, state: DecodeState, consts: DecodeConsts) -> DecodeState:
    """Feeds each row's last token, samples the next one. Finished rows idle."""
    s = state.cache.capacity
    position = jnp.minimum(state.position, s - 1)
    hidden, cache = model.hidden(state.token[:, None], position[:, None], state.cache)
    logits = model.logits(hidden)[:, 0]
    state = dataclasses.replace(state, cache=cache, position=state.position + (~state.done))
    token, logprob = _choose(logits, state.seen, consts, state.step)
    return _record(state, token, logprob, consts)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("state",))
def decode_loop(graphdef, params, state: DecodeState, n_steps, consts: DecodeConsts) -> DecodeState:
    """Up to n_steps decode steps on device; leaves early once every row is done."""
    model: StarCoder = nnx.merge(graphdef, params)
    limit = state.step + n_steps

    def cond(st):
        return (st.step < limit) & ~jnp.all(st.done)

    return jax.lax.while_loop(cond, lambda st: decode_step(model, st, consts), state)


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


def _check_fits(config: StarCoderConfig, encoded, max_new_tokens: int, tokenizer: Tokenizer | None):
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


@dataclasses.dataclass(frozen=True)
class _Packed:
    """Prompts right-padded into one (batch bucket, length bucket) array for prefill."""

    ids: np.ndarray  # [B, T] int32
    lengths: np.ndarray  # [B] int32, 1 for rows that only pad the batch
    active: np.ndarray  # [B] bool, False for those padding rows
    cache_len: int  # S: the prompt bucket plus the new tokens, as a bucket
    out_len: int  # M: the output buffer's bucket


def _pack(encoded: list[list[int]], max_new_tokens: int, n_positions: int,
          round_batch: Callable[[int], int]) -> _Packed:
    """round_batch: the batch bucket rounded up to what the device layout splits evenly."""
    b = round_batch(bucket(len(encoded), 1))
    t = bucket(max(len(ids) for ids in encoded), MIN_PROMPT_BUCKET, n_positions)
    ids = np.zeros((b, t), np.int32)
    lengths = np.ones((b,), np.int32)
    for i, row in enumerate(encoded):
        ids[i, :len(row)] = row
        lengths[i] = len(row)
    return _Packed(ids, lengths, np.arange(b) < len(encoded),
                   cache_len=min(n_positions, bucket(t + max_new_tokens, MIN_PROMPT_BUCKET)),
                   out_len=bucket(max_new_tokens, MIN_NEW_BUCKET))


class TextTracker:
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


class _Rows:
    """The host's side of a batch's real rows: stop strings, streamed text, the results."""

    def __init__(self, n: int, tokenizer: Tokenizer | None, stop: tuple[str, ...], stop_ids: list[int],
                 on_event: Callable[[StreamEvent], None] | None):
        self.tokenizer, self.stop_ids, self.on_event = tokenizer, stop_ids, on_event
        self.trackers = [TextTracker(tokenizer, stop) for _ in range(n)]
        self.by_string = [False] * n  # ended on a stop string
        self.reported = [False] * n  # done, and its last event sent

    def check(self, state: DecodeState) -> tuple[DecodeState, bool]:
        """Ends the rows whose text holds a stop string and streams new text.

        Returns the state (its done flags updated) and whether every real row is done.
        """
        done = np.asarray(state.done)
        if self.on_event is not None or self.trackers[0].stop:
            new_done = self._scan(state, done)
            if (new_done != done).any():
                state = dataclasses.replace(state, done=jnp.asarray(new_done))
            done = new_done
        return state, bool(done[:len(self.trackers)].all())

    def _scan(self, state: DecodeState, done: np.ndarray) -> np.ndarray:
        out, n_out = np.asarray(state.out), np.asarray(state.n_out)
        done = done.copy()
        for i, tracker in enumerate(self.trackers):
            if self.reported[i]:
                continue
            row = _row_ids(out, n_out, i)
            text = tracker.text(row)
            if tracker.stop and tracker.find_stop(text) is not None:
                self.by_string[i] = done[i] = True
            if self.on_event is not None:
                if done[i] and self.tokenizer is not None:
                    text = _final_text(self.tokenizer, row, tracker, self.stop_ids)
                self.on_event(StreamEvent(i, row, tracker.delta(text, bool(done[i])), bool(done[i])))
            self.reported[i] = bool(done[i])
        return done

    def collect(self, state: DecodeState, encoded: list[list[int]], eos: int | None,
                want_logprobs: bool) -> list[Generation]:
        out, n_out = np.asarray(state.out), np.asarray(state.n_out)
        hit_stop, lps = np.asarray(state.hit_stop), np.asarray(state.logprobs)
        results = []
        for i, prompt in enumerate(encoded):
            row = _row_ids(out, n_out, i)
            reason = ("eos" if row and row[-1] == eos else "stop") if hit_stop[i] else "length"
            text = None
            if self.tokenizer is not None:
                text = _final_text(self.tokenizer, row, self.trackers[i], self.stop_ids)
                if self.by_string[i]:
                    reason = "stop"
                    row = _ids_through_stop(self.tokenizer, row, self.trackers[i])
            results.append(Generation(
                prompt_ids=list(prompt), ids=row, text=text, finish_reason=reason,
                logprobs=[float(x) for x in lps[i, :len(row)]] if want_logprobs else None))
        return results


def _row_ids(out: np.ndarray, n_out: np.ndarray, i: int) -> list[int]:
    return [int(x) for x in out[i, :n_out[i]]]


def _final_text(tokenizer: Tokenizer, row: list[int], tracker: TextTracker, stop_ids) -> str:
    body = row[:-1] if row and row[-1] in stop_ids else row
    text = tokenizer.decode(body)
    cut = tracker.find_stop(text)
    return text if cut is None else text[:cut]


def _ids_through_stop(tokenizer: Tokenizer, row: list[int], tracker: TextTracker) -> list[int]:
    """The shortest prefix of row whose text contains a stop string."""
    for k in range(1, len(row) + 1):
        if tracker.find_stop(tokenizer.decode(row[:k])) is not None:
            return row[:k]
    return row


def _weights(model: StarCoder) -> tuple[jax.Array, ...]:
    """The model's arrays a Generator runs. A derived copy (model.modules.Derived) is
    remade from them and serves one form only, so it does not count."""
    return tuple(jax.tree.leaves(nnx.state(model, nnx.Not(Derived))))


class _PreparedDraft(NamedTuple):
    """A draft model as a Generator runs it (split once, laid out for decoding)."""

    model: weakref.ref  # the draft itself, not kept alive
    graphdef: nnx.GraphDef
    params: nnx.State
    source: tuple[jax.Array, ...]  # its arrays when prepared (`_weights`): a change prepares it again
    config: StarCoderConfig


class Generator:
    """Generation for one model: prepares prompts, runs prefill and the decode loop.

    Holds the split model (graphdef + params, placed on the mesh when one is
    given) so repeated calls reuse the placed weights and compiled programs;
    it keeps no reference to the model object itself. `generate()` /
    `stream()` below are the functional API and reuse one Generator per
    (model, tokenizer, mesh, kv_cache) through `generator_for`.
    """

    def __init__(self, model: StarCoder, tokenizer: Tokenizer | None = None, *, mesh=None,
                 kv_cache: str | None = None):
        self.config = config = model.config
        self.tokenizer = tokenizer
        # an error before any run
        self.kv_cache = check_quantization(kv_cache, "kv_cache", " (the compute dtype)", KV_CACHE_MODES)
        # laid out for the projection form it runs (a stale derived copy is remade)
        self.graphdef, self.params = nnx.split(model.adapt_to_backend_(sharded=mesh is not None, decode=True))
        # mesh (a jax Mesh or a spec like "data=2,tensor=4"): params resharded per the
        # rules (in place: the model's variables get the placed arrays), a sharded cache,
        # jitted calls with out_shardings. None: one device, as is.
        self._runner = None if mesh is None else MeshRunner(config, self.params, mesh)
        if self._runner is not None:
            self.params = self._runner.place_params(self.params)
        self._source = _weights(model)  # after placement: the mesh runner placed the model's own variables
        self._eos = tokenizer.eos_id if tokenizer is not None else config.eos_token_id
        self._vocab_limit = tokenizer.vocab_size if tokenizer is not None else config.vocab_size
        self._mesh = mesh
        self._draft: _PreparedDraft | None = None  # the draft model last run

    def prepared_for(self, model: StarCoder, tokenizer: Tokenizer | None) -> bool:
        """Whether this Generator still runs `model` as it is now (same config, the very same
        parameter arrays) with this tokenizer."""
        return (tokenizer is self.tokenizer and model.config == self.config
                and same_arrays(_weights(model), self._source))

    def _call(self, fn, donate, *args, static=("graphdef",), **kwargs):
        if self._runner is None:
            return fn(*args, **kwargs)
        return self._runner.call(fn, donate, *args, static=static, **kwargs)

    def run(self, prompts, *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
            top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
            stop: Sequence[str] = (), stop_ids: Sequence[int] = (), seed: int = 0,
            first_row: int = 0, logprobs: bool = False, ignore_eos: bool = False,
            chunk: int | None = None, on_event: Callable[[StreamEvent], None] | None = None,
            draft=None, num_draft_tokens: int | None = None) -> list[Generation]:
        """Generates for one device batch of prompts; the arguments are those of `generate`.

        first_row: the index of prompts[0] among all of a request's prompts (its random stream).
        chunk: decode steps per device call between host checks (default: 1 when streaming,
          16 with stop strings, else all of max_new_tokens in one call).
        """
        sampling = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        drafting = self._drafting(draft, num_draft_tokens)
        encoded = self._encode(prompts, max_new_tokens, stop)
        batch = _pack(encoded, max_new_tokens, self.config.n_positions, self._round_batch)
        ends = self._stop_ids(stop_ids, ignore_eos)
        consts = DecodeConsts.make(len(batch.lengths), max_new_tokens, self._vocab_limit, sampling=sampling,
                                   stop_ids=ends, seed=seed, first_row=first_row)
        rows = _Rows(len(encoded), self.tokenizer, stop, ends, on_event)
        if chunk is None:
            chunk = 1 if on_event is not None else (16 if stop else max_new_tokens)
        if drafting is None:
            state = self._decode(self._prefill(batch, consts), consts, rows, chunk)
            return rows.collect(state, encoded, self._eos, logprobs)
        self._check_draft_fits(encoded, max_new_tokens, drafting)
        state = self._speculate(self._spec_prefill(batch, consts, drafting), consts, rows, chunk, drafting)
        results = rows.collect(state.base, encoded, self._eos, logprobs)
        for result, drafted, accepted in zip(results, np.asarray(state.drafted), np.asarray(state.accepted)):
            result.draft_tokens, result.accepted_tokens = int(drafted), int(accepted)
        return results

    def _encode(self, prompts, max_new_tokens: int, stop: tuple[str, ...]) -> list[list[int]]:
        encoded = _encode_prompts(prompts, self.tokenizer)
        _check_fits(self.config, encoded, max_new_tokens, self.tokenizer)
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; use stop_ids for token ids")
        return encoded

    def _round_batch(self, batch: int) -> int:
        return batch if self._runner is None else self._runner.round_batch(batch)

    def _stop_ids(self, stop_ids: Sequence[int], ignore_eos: bool) -> list[int]:
        """The ids that end a row: eos (unless ignored) and stop_ids."""
        eos = [] if ignore_eos or self._eos is None else [self._eos]
        if len(stop_ids) > STOP_ID_SLOTS - len(eos):
            raise ValueError(f"at most {STOP_ID_SLOTS - len(eos)} stop_ids are supported"
                             f"{' beside eos' if eos else ''}, got {len(stop_ids)}")
        return eos + [int(x) for x in stop_ids]

    def _prefill(self, batch: _Packed, consts: DecodeConsts) -> DecodeState:
        sharding = None if self._runner is None else self._runner.cache
        cache = KVCache.init(self.config, len(batch.lengths), batch.cache_len, sharding=sharding,
                             quantize=self.kv_cache)
        return self._call(prefill, ("cache",), self.graphdef, self.params, jnp.asarray(batch.ids),
                          jnp.asarray(batch.lengths), cache, consts,
                          out_len_like=jnp.zeros((batch.out_len,), jnp.int8), active=jnp.asarray(batch.active))

    # ---- speculative decoding (starcoder_jax.inference.speculative) ----

    def _drafting(self, draft, num_draft_tokens):
        """The static drafting settings for `draft` (None: plain decoding); prepares a draft model once."""
        from starcoder_jax.inference import speculative as spec

        drafting = spec.drafting(draft, num_draft_tokens, self.config)
        if drafting is None or not drafting.model:
            return drafting
        if self._mesh is not None:
            raise ValueError("a draft model runs on one device; with mesh=, draft='prompt-lookup' is supported")
        prepared = self._draft
        if (prepared is None or prepared.model() is not draft or draft.config != prepared.config
                or not same_arrays(_weights(draft), prepared.source)):
            graphdef, params = nnx.split(draft.adapt_to_backend_(decode=True))
            self._draft = _PreparedDraft(weakref.ref(draft), graphdef, params, _weights(draft), draft.config)
        return drafting

    def _check_draft_fits(self, encoded, max_new_tokens: int, drafting) -> None:
        if not drafting.model:
            return
        limit = self._draft.config.n_positions
        longest = max(len(ids) for ids in encoded)
        if longest + max_new_tokens > limit:
            raise ValueError(f"prompt of {longest} tokens with max_new_tokens={max_new_tokens} needs "
                             f"{longest + max_new_tokens} positions but the draft model holds {limit}")

    def _draft_split(self, drafting):
        return (self._draft.graphdef, self._draft.params) if drafting.model else (None, None)

    def _spec_prefill(self, batch: _Packed, consts: DecodeConsts, drafting):
        from starcoder_jax.inference.speculative import spec_start

        sharding = None if self._runner is None else self._runner.cache
        n = len(batch.lengths)
        cache = KVCache.init(self.config, n, batch.cache_len, sharding=sharding, quantize=self.kv_cache,
                             lookahead=drafting.k)
        draft_graphdef, draft_params = self._draft_split(drafting)
        draft_cache = None
        if drafting.model:
            draft_config = self._draft.config
            draft_cache = KVCache.init(draft_config, n, min(batch.cache_len, draft_config.n_positions),
                                       quantize=self.kv_cache, lookahead=drafting.k)
        ids, lengths, active = jnp.asarray(batch.ids), jnp.asarray(batch.lengths), jnp.asarray(batch.active)
        base = self._call(prefill, ("cache",), self.graphdef, self.params, ids, lengths, cache, consts,
                          out_len_like=jnp.zeros((batch.out_len,), jnp.int8), active=active)
        return self._call(spec_start, ("draft_cache",), draft_graphdef, draft_params, base, ids, lengths,
                          draft_cache, active, static=("draft_graphdef",))

    def _speculate(self, state, consts: DecodeConsts, rows: _Rows, chunk: int, drafting):
        """`_decode` for speculative rounds (chunk: rounds per device call)."""
        from starcoder_jax.inference.speculative import spec_loop

        draft_graphdef, draft_params = self._draft_split(drafting)
        while True:
            base, finished = rows.check(state.base)
            state = dataclasses.replace(state, base=base)
            if finished:
                return state
            state = self._call(spec_loop, ("state",), self.graphdef, self.params, draft_graphdef, draft_params,
                               state, jnp.int32(chunk), consts, drafting=drafting,
                               static=("graphdef", "draft_graphdef", "drafting"))

    def _decode(self, state: DecodeState, consts: DecodeConsts, rows: _Rows, chunk: int) -> DecodeState:
        """Decode loops of `chunk` steps until every real row is done; between them the host
        checks stop strings and streams text."""
        while True:
            state, finished = rows.check(state)
            if finished:
                return state
            state = self._call(decode_loop, ("state",), self.graphdef, self.params, state,
                               jnp.int32(chunk), consts)


# model -> {(id(tokenizer), mesh, kv_cache): Generator}. Weak keys: the entries go with the model
# (a Generator holds the model's arrays, never the model).
_GENERATORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_GENERATORS_PER_MODEL = 8  # the oldest goes first beyond this (each may hold a mesh-placed copy)


def generator_for(model: StarCoder, tokenizer: Tokenizer | None = None, *, mesh=None,
                  kv_cache: str | None = None) -> Generator:
    """The Generator that `generate` and `stream` use for these arguments, made once and reused.

    A second call with the same model, tokenizer (the same object), mesh (a
    spec string or jax Mesh, compared by value) and kv_cache returns the same
    Generator, so it neither re-splits nor re-places the weights nor compiles
    again. Once the model's config or any of its parameter arrays changed
    (`quantize_`, weights assigned into it, or placed on another mesh by a
    Generator with `mesh`), the Generators made before are dropped and a new
    one made.
    """
    entries = _GENERATORS.setdefault(model, {})
    key = (id(tokenizer), mesh, kv_cache)
    gen = entries.get(key)
    if gen is not None and gen.prepared_for(model, tokenizer):
        return gen
    while len(entries) >= _GENERATORS_PER_MODEL:
        entries.pop(next(iter(entries)))
    gen = entries[key] = Generator(model, tokenizer, mesh=mesh, kv_cache=kv_cache)
    # Drop what no longer matches the model (changed weights, or arrays this Generator
    # just placed on its mesh), so no stale entry keeps old buffers alive.
    for other_key, other in list(entries.items()):
        if not other.prepared_for(model, other.tokenizer):
            del entries[other_key]
    return gen


def generate(model: StarCoder, prompts, *, tokenizer: Tokenizer | None = None,
             max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             min_p: float = 0.0, repetition_penalty: float = 1.0, stop: Sequence[str] = (),
             stop_ids: Sequence[int] = (), seed: int = 0, logprobs: bool = False,
             ignore_eos: bool = False, batch_size: int | None = None,
             on_event: Callable[[StreamEvent], None] | None = None,
             mesh=None, kv_cache: str | None = None, draft=None,
             num_draft_tokens: int | None = None) -> list[Generation]:
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
      see docs/sharding.md.
    kv_cache: "int8" keeps keys and values as int8 with a scale per token
      (a quarter of float32's memory; see starcoder_jax.model.kv_cache).
    draft: speculative decoding (starcoder_jax.inference.speculative): a draft
      StarCoder model sharing the tokenizer (for example
      `speculative.first_layers(model, 4)`) or "prompt-lookup" (drafts copied
      from earlier in the prompt and output); num_draft_tokens (default 4)
      tokens are drafted and checked a round. Greedy output is plain greedy
      decoding's; sampled output has plain sampling's distribution.

    Calls with the same model, tokenizer, mesh and kv_cache share one prepared
    Generator (`generator_for`): after the first, a call whose prompts and
    token budget fall in the same buckets compiles nothing.
    """
    gen = generator_for(model, tokenizer, mesh=mesh, kv_cache=kv_cache)
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
                           on_event=shifted if on_event is not None else None, draft=draft,
                           num_draft_tokens=num_draft_tokens)
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

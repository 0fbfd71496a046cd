"""Speculative decoding: k tokens drafted cheaply, checked by one forward pass of the model.

A decode step at batch 1 reads every weight for one token. A round here
drafts k tokens, feeds the last token and the k drafts to the model in one
call (T = k + 1, the weights read once), and keeps the drafts the model
agrees with plus one token of its own: 1 to k + 1 tokens a round.

Drafts come from
- a draft model sharing the vocabulary (a small StarCoder, or the model's own
  first layers: `first_layers`), run k steps on a cache of its own;
- prompt lookup: the tokens that followed the latest earlier occurrence of
  the sequence's last n-gram (n = 3, else 2, else 1), in the prompt or the
  output so far. Code edits and fill-in-the-middle repeat spans of their
  prompt, so this needs no second model.

Exactness. A row takes the model's distribution p at each drafted position
(`sampling.distribution`: the repetition penalty over the tokens before it,
the temperature, top-k / top-p / min-p) and the draft's distribution q (the
draft model's under the same settings; a point mass for prompt lookup). Draft
j is kept with probability min(1, p(d_j) / q(d_j)); at the first rejection the
row's token is drawn from max(p - q, 0), normalized; if every draft is kept, a
last token is drawn from p at position k. That is the rejection rule of
Leviathan et al. (2023) and Chen et al. (2023): each token is distributed as
plain sampling's. A greedy row's p is a point mass on its argmax, so it keeps
exactly the drafts equal to the model's argmax and then takes the argmax: the
tokens of plain greedy decoding, up to floating-point near-ties between the
verify pass (k + 1 tokens in one product) and one-token steps.

Caches. The model's cache is written at the k + 1 fed positions, and the
draft's at the k it fed; the slots of rejected drafts lie past the row's
position, where a plain cache overwrites them before reading and a ring
buffer (a window) hides them (model.modules.Attention). Both caches get k
lookahead slots, so a write never lands on a slot still read. The draft
feeds the token before the row's last one again at the start of each round
(a [B, 2] step): when every draft was kept, the last of them never went
through the draft, and otherwise rewriting that slot changes nothing.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from starcoder_jax.inference.sampling import apply_repetition_penalty, argmax, distribution, draw, row_keys
from starcoder_jax.model.kv_cache import KVCache
from starcoder_jax.model.modules import StarCoder, abstract_model

PROMPT_LOOKUP = "prompt-lookup"
MAX_DRAFT_TOKENS = 32
DEFAULT_DRAFT_TOKENS = 4
MAX_NGRAM = 3  # prompt lookup matches the longest suffix n-gram up to this n
# Sub-streams of a row's PRNG key in one round (draft j uses _DRAFT + j).
_ACCEPT, _FINAL, _DRAFT = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Drafting:
    """How a round drafts; static in the compiled programs.

    k: drafted tokens a round; model: a draft model (else prompt lookup);
    max_ngram: the longest suffix n-gram prompt lookup matches.
    """

    k: int
    model: bool
    max_ngram: int = MAX_NGRAM


def drafting(draft, num_draft_tokens, config) -> Drafting | None:
    """The drafting settings `generate(draft=..., num_draft_tokens=...)` asks for with a model of
    `config` (None: plain decoding), or ValueError naming what is wrong: a draft model must
    share the model's vocabulary (`check_draft_model`)."""
    if draft is None:
        if num_draft_tokens is not None:
            raise ValueError("num_draft_tokens needs a draft (a draft model or 'prompt-lookup')")
        return None
    k = check_draft_tokens(DEFAULT_DRAFT_TOKENS if num_draft_tokens is None else num_draft_tokens)
    if isinstance(draft, str):
        if draft != PROMPT_LOOKUP:
            raise ValueError(f"draft must be a StarCoder model or {PROMPT_LOOKUP!r}, got {draft!r}")
        return Drafting(k, model=False)
    check_draft_model(draft, config)
    return Drafting(k, model=True)


def check_draft_tokens(k) -> int:
    if isinstance(k, bool) or int(k) != k or not 1 <= k <= MAX_DRAFT_TOKENS:
        raise ValueError(f"num_draft_tokens must be an integer in [1, {MAX_DRAFT_TOKENS}], got {k!r}")
    return int(k)


def check_draft_model(draft, config) -> None:
    """Raises ValueError unless `draft` (a StarCoder) can draft for a model of `config`."""
    if not isinstance(draft, StarCoder):
        raise ValueError(f"draft must be a StarCoder model or {PROMPT_LOOKUP!r}, got {type(draft).__name__}")
    dc = draft.config
    if dc.vocab_size != config.vocab_size:
        raise ValueError(
            f"the draft model's vocabulary holds {dc.vocab_size} tokens and the model's {config.vocab_size}: "
            f"a draft must share the model's tokenizer")
    for name in ("eos_token_id", "bos_token_id"):
        if getattr(dc, name) != getattr(config, name):
            raise ValueError(f"the draft model's {name} is {getattr(dc, name)} and the model's "
                             f"{getattr(config, name)}: a draft must share the model's tokenizer")


def first_layers(model: StarCoder, n_layer: int) -> StarCoder:
    """A draft made of `model`'s embeddings, first n_layer blocks, final norm and head
    (self-speculation). It shares model's arrays: nothing is copied."""
    if isinstance(n_layer, bool) or int(n_layer) != n_layer or not 1 <= n_layer < model.config.n_layer:
        raise ValueError(f"a self-draft takes 1 to {model.config.n_layer - 1} of the model's "
                         f"{model.config.n_layer} layers, got {n_layer!r}")
    from starcoder_jax.model.modules import Derived

    config = dataclasses.replace(model.config, n_layer=int(n_layer))
    graphdef, target = nnx.split(abstract_model(config))
    source = nnx.to_pure_dict(nnx.state(model, nnx.Not(Derived)))
    source["blocks"] = {i: source["blocks"][i] for i in range(n_layer)}
    try:
        nnx.replace_by_pure_dict(target, source)
    except (KeyError, ValueError) as err:
        raise ValueError(f"first_layers: the model's parameters do not match a plain {config.model_type} "
                         f"of its config (merge LoRA adapters first): {err}") from err
    return nnx.merge(graphdef, target)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpecState:
    """The loop carry of speculative decoding."""

    base: Any  # generate.DecodeState: what plain decoding carries (the model's cache, tokens, flags)
    draft_cache: KVCache | None  # the draft model's cache (None: prompt lookup)
    history: jax.Array  # [B, P] int32, the token at each position (prompt, then output)
    drafted: jax.Array  # [B] int32, draft tokens checked
    accepted: jax.Array  # [B] int32, draft tokens kept


@functools.partial(jax.jit, static_argnames=("draft_graphdef",), donate_argnames=("draft_cache",))
def spec_start(draft_graphdef, draft_params, base, ids, lengths, draft_cache, active) -> SpecState:
    """The carry after `generate.prefill` gave `base`: the prompt ids [B, T] (right-padded,
    lengths [B]) run through the draft model into its cache, and the history of positions."""
    b, t = ids.shape
    if draft_graphdef is not None:
        draft: StarCoder = nnx.merge(draft_graphdef, draft_params)
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if draft_cache.ring:
            positions = jnp.where(positions < lengths[:, None], positions, -1)
        _, draft_cache = draft.hidden(ids, positions, draft_cache, read_cache=False)
    history = jnp.zeros((b, base.cache.capacity), jnp.int32).at[:, :t].set(ids)
    history = _write_history(history, lengths - 1, base.token[:, None], active.astype(jnp.int32))
    zero = jnp.zeros((b,), jnp.int32)
    return SpecState(base, draft_cache, history, zero, zero)


@functools.partial(jax.jit, static_argnames=("graphdef", "draft_graphdef", "drafting"),
                   donate_argnames=("state",))
def spec_loop(graphdef, params, draft_graphdef, draft_params, state: SpecState, n_rounds,
              consts, drafting: Drafting) -> SpecState:
    """Up to n_rounds rounds on device; leaves early once every row is done."""
    model: StarCoder = nnx.merge(graphdef, params)
    draft = None if draft_graphdef is None else nnx.merge(draft_graphdef, draft_params)
    limit = state.base.step + n_rounds

    def cond(st):
        return (st.base.step < limit) & ~jnp.all(st.base.done)

    return jax.lax.while_loop(cond, lambda st: spec_round(model, draft, st, consts, drafting), state)


def spec_round(model: StarCoder, draft: StarCoder | None, state: SpecState, consts,
               drafting: Drafting) -> SpecState:
    """Drafts k tokens, verifies them in one pass of the model, records what is kept."""
    base = state.base
    keys = row_keys(consts.seed, base.step, base.token.shape[0])
    knobs, limit = consts.knobs, consts.vocab_limit
    if draft is None:
        drafts, q, draft_cache = lookup(state.history, base.position, drafting.k, drafting.max_ngram), None, None
    else:
        prev = jnp.take_along_axis(state.history, jnp.maximum(base.position - 1, 0)[:, None], axis=1)[:, 0]
        drafts, q, draft_cache = draft_tokens(draft, state.draft_cache, prev, base.token, base.position,
                                              base.seen, knobs, limit, drafting.k, keys)
    tokens, raw, count, cache = verify(model, base.cache, base.token, base.position, base.seen, drafts, q,
                                       knobs, limit, keys)
    logprobs = jnp.take_along_axis(raw, tokens[..., None], axis=-1)[..., 0]
    live = ~base.done
    new_base, emitted = _record(dataclasses.replace(base, cache=cache), tokens, logprobs, count, consts)
    k = drafting.k
    return SpecState(
        new_base, draft_cache, _write_history(state.history, base.position, tokens, emitted),
        state.drafted + jnp.where(live, k, 0), state.accepted + jnp.where(live, count - 1, 0))


def fed_positions(position: jax.Array, n: int, first: int = 0) -> jax.Array:
    """[B, n] positions position + first .. position + first + n - 1; -1 throughout for a row at
    position -1 (an idle row of a ring cache, which writes nothing)."""
    positions = position[:, None] + first + jnp.arange(n, dtype=jnp.int32)
    return jnp.where(position[:, None] < 0, -1, positions)


def lookup(history: jax.Array, position: jax.Array, k: int, max_ngram: int) -> jax.Array:
    """Prompt-lookup drafts [B, k]: the tokens after the latest earlier occurrence of the
    longest n-gram (n <= max_ngram) ending at each row's `position` in history [B, P].

    A continuation reaching the row's last token repeats it; a row with no match
    drafts its last token k times (drafts that cost nothing but their verify slots).
    """
    b, p = history.shape
    index = jnp.arange(p, dtype=jnp.int32)
    end = position[:, None]  # [B, 1]
    match = jnp.ones((b, p), bool)  # match[j]: the n tokens ending at j equal those ending at `end`
    best = jnp.full((b,), -1, jnp.int32)
    for n in range(1, max_ngram + 1):
        tail = jnp.take_along_axis(history, jnp.maximum(end - (n - 1), 0), axis=1)  # [B, 1]
        back = jnp.pad(history, ((0, 0), (n - 1, 0)))[:, :p]  # back[j] = history[j - n + 1]
        match &= (back == tail) & (index >= n - 1)
        found = jnp.max(jnp.where(match & (index < end) & (end >= n - 1), index, -1), axis=1)
        best = jnp.where(found >= 0, found, best)  # a longer n-gram's match wins
    ahead = jnp.minimum(best[:, None] + 1 + jnp.arange(k, dtype=jnp.int32), end)
    source = jnp.where(best[:, None] >= 0, ahead, end)
    return jnp.take_along_axis(history, source, axis=1)


def _masked(logits: jax.Array, vocab_limit) -> jax.Array:
    return jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)


def _subkeys(keys: jax.Array, tag) -> jax.Array:
    return jax.vmap(lambda key: jax.random.fold_in(key, tag))(keys)


def draft_tokens(draft: StarCoder, cache: KVCache, prev, token, position, seen, knobs, vocab_limit, k: int, keys):
    """k tokens from the draft model for rows whose last token `token` [B] goes at `position` [B]
    (prev: the token before it, fed again). Returns drafts [B, k], their distributions q
    [B, k, V] (log-probabilities) and the draft's cache."""
    b = token.shape[0]
    rows = jnp.arange(b)
    sampled = jnp.any(knobs["temperature"] > 0)
    ids = jnp.stack([prev, token], axis=1)
    hidden, cache = draft.hidden(ids, fed_positions(position, 2, first=-1), cache)
    logits = draft.logits(hidden[:, 1:])[:, 0]

    def choose(logits, seen, j):
        q = distribution(_masked(logits, vocab_limit), knobs, seen)
        token = jax.lax.cond(sampled, lambda: draw(_subkeys(keys, _DRAFT + j), q), lambda: argmax(q))
        return q, token, seen.at[rows, token].set(True)

    def step(carry, j):
        logits, cache, seen = carry
        q, token, seen = choose(logits, seen, j)
        hidden, cache = draft.hidden(token[:, None], fed_positions(position, 1, first=1 + j), cache)
        return (draft.logits(hidden)[:, 0], cache, seen), (token, q)

    (logits, cache, seen), (tokens, qs) = jax.lax.scan(
        step, (logits, cache, seen), jnp.arange(k - 1, dtype=jnp.int32))
    q_last, last, _ = choose(logits, seen, k - 1)
    drafts = jnp.concatenate([tokens.T, last[:, None]], axis=1)
    q = jnp.concatenate([jnp.swapaxes(qs, 0, 1), q_last[:, None]], axis=1)
    return drafts, q, cache


def verify(model: StarCoder, cache: KVCache, token, position, seen, drafts, q, knobs, vocab_limit, keys):
    """Feeds each row's last token [B] (at `position` [B]) and its k drafts [B, k]; returns the
    round's tokens [B, k + 1] (the kept drafts, then the model's own token), the raw (unfiltered,
    temperature 1) log-probabilities [B, k + 1, V] at the fed positions, how many tokens count
    [B] (kept drafts + 1) and the model's cache. q: the drafts' distributions [B, k, V]
    (log-probabilities), None for point masses (prompt lookup)."""
    b, k = drafts.shape
    ids = jnp.concatenate([token[:, None], drafts], axis=1)  # [B, k + 1]
    hidden, cache = model.hidden(ids, fed_positions(position, k + 1), cache)
    logits = _masked(model.logits(hidden), vocab_limit)  # [B, k + 1, V]
    v = logits.shape[-1]
    vocab = jnp.arange(v, dtype=jnp.int32)
    drafted = drafts[..., None] == vocab  # [B, k, V]
    # The tokens seen before each position: the row's, then the drafts before it.
    before = jnp.concatenate([jnp.zeros((b, 1, v), bool), jnp.cumsum(drafted, axis=1) > 0], axis=1)
    seen = (seen[:, None] | before).reshape(b * (k + 1), v)
    flat = logits.reshape(b * (k + 1), v)
    knobs = {name: jnp.repeat(x, k + 1) for name, x in knobs.items()}

    def greedy(_):
        top = argmax(apply_repetition_penalty(flat, seen, knobs["repetition_penalty"])).reshape(b, k + 1)
        kept = jnp.sum(jnp.cumprod((drafts == top[:, :k]).astype(jnp.int32), axis=1), axis=1)
        return kept, jnp.take_along_axis(top, kept[:, None], axis=1)[:, 0]

    def sampled(_):
        p = distribution(flat, knobs, seen).reshape(b, k + 1, v)
        q_ = jnp.where(drafted, 0.0, -jnp.inf) if q is None else q  # prompt lookup: a point mass
        p_d = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
        q_d = jnp.take_along_axis(q_, drafts[..., None], axis=-1)[..., 0]
        u = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(_subkeys(keys, _ACCEPT))
        accept = jnp.log(u) + q_d < p_d  # u < p(d) / q(d)
        kept = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1)
        p_n = jnp.take_along_axis(p, kept[:, None, None], axis=1)[:, 0]  # [B, V]
        q_n = jnp.take_along_axis(jnp.concatenate([q_, jnp.full((b, 1, v), -jnp.inf)], axis=1),
                                  kept[:, None, None], axis=1)[:, 0]  # -inf everywhere past the drafts
        residual = jnp.maximum(jnp.exp(p_n) - jnp.exp(q_n), 0.0)
        logits_r = jnp.where(residual > 0, jnp.log(residual), -jnp.inf)
        logits_r = jnp.where(jnp.any(residual > 0, axis=-1, keepdims=True), logits_r, p_n)
        return kept, draw(_subkeys(keys, _FINAL), logits_r)

    kept, final = jax.lax.cond(jnp.any(knobs["temperature"] > 0), sampled, greedy, None)
    slot = jnp.arange(k + 1)
    tokens = jnp.where(slot == kept[:, None], final[:, None], jnp.pad(drafts, ((0, 0), (0, 1))))
    return tokens, jax.nn.log_softmax(logits, axis=-1), kept + 1, cache


def _record(state, tokens, logprobs, count, consts) -> tuple:
    """Appends each live row's first `count` tokens [B, W], cut after a stop id and at the token
    budget; returns the state and how many tokens each row took [B]."""
    b, w = tokens.shape
    rows = jnp.arange(b)[:, None]
    slot = jnp.arange(w)
    live = ~state.done
    is_stop = jnp.any(tokens[..., None] == consts.stop_ids, axis=-1) & (slot < count[:, None])
    first_stop = jnp.min(jnp.where(is_stop, slot, w), axis=1)
    budget = consts.max_new - state.n_out
    taken = jnp.where(live, jnp.clip(jnp.minimum(count, first_stop + 1), 0, budget), 0)
    write = slot < taken[:, None]
    m = state.out.shape[1]
    at = jnp.where(write, state.n_out[:, None] + slot, m)  # m: dropped
    n_out = state.n_out + taken
    hit = live & (first_stop < taken)
    last = jnp.take_along_axis(tokens, jnp.maximum(taken - 1, 0)[:, None], axis=1)[:, 0]
    return dataclasses.replace(
        state,
        token=jnp.where(taken > 0, last, state.token), position=state.position + taken,
        out=state.out.at[rows, at].set(tokens, mode="drop"),
        logprobs=state.logprobs.at[rows, at].set(logprobs, mode="drop"), n_out=n_out,
        done=state.done | hit | (n_out >= consts.max_new), hit_stop=state.hit_stop | hit,
        seen=state.seen.at[rows, jnp.where(write, tokens, state.seen.shape[1])].set(True, mode="drop"),
        step=state.step + 1), taken


def _write_history(history, position, tokens, taken):
    """Writes tokens [B, W] at positions position + 1 + j for j < taken [B]."""
    b, w = tokens.shape
    slot = jnp.arange(w)
    at = jnp.where(slot < taken[:, None], position[:, None] + 1 + slot, history.shape[1])
    return history.at[jnp.arange(b)[:, None], at].set(tokens, mode="drop")

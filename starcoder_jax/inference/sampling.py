"""Token sampling on device: greedy, temperature, top-k, top-p, min-p, repetition penalty.

Every knob is an array with one value per batch row, so changing a setting
never recompiles the generation loop. Logits are float32 [B, V].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-call sampling settings (validated); `arrays(batch)` gives the device form."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if not (np.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1) (0 = off), got {self.min_p}")
        if not (np.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(
                f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")

    def arrays(self, batch: int) -> dict[str, jax.Array]:
        def full(value, dtype):
            return jnp.full((batch,), value, dtype)

        return {
            "temperature": full(self.temperature, jnp.float32),
            "top_k": full(self.top_k, jnp.int32),
            "top_p": full(self.top_p, jnp.float32),
            "min_p": full(self.min_p, jnp.float32),
            "repetition_penalty": full(self.repetition_penalty, jnp.float32),
        }


def row_keys(seed: jax.Array, step: jax.Array, batch: int) -> jax.Array:
    """Independent PRNG keys per row and step, [B]. seed [2]: (seed, first row's index)."""
    base = jax.random.fold_in(jax.random.key(seed[0]), step)
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(seed[1] + jnp.arange(batch))


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """CTRL-style penalty (as in transformers): seen tokens' positive logits are
    divided by the penalty and negative ones multiplied. seen: bool [B, V]."""
    p = penalty[:, None]
    penalised = jnp.where(logits > 0, logits / p, logits * p)
    return jnp.where(seen, penalised, logits)


def filter_logits(logits: jax.Array, knobs: dict[str, jax.Array]) -> jax.Array:
    """Sets to -inf every token outside the top-k / top-p / min-p sets of its row.

    Logits are expected already divided by the temperature. The most likely
    token always survives, so a row never ends up with nothing to sample.
    """
    top_k, top_p, min_p = knobs["top_k"], knobs["top_p"], knobs["min_p"]
    vocab = logits.shape[-1]
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # descending, [B, V]
    # top-k: threshold at the k-th largest logit (k = 0 keeps all).
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_logits, (k - 1)[:, None], axis=-1)
    keep = logits >= kth
    # top-p: keep the smallest prefix of the sorted tokens whose mass reaches p.
    probs_sorted = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs_sorted, axis=-1) - probs_sorted
    in_nucleus = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    n_keep = jnp.maximum(in_nucleus.sum(-1), 1)
    pth = jnp.take_along_axis(sorted_logits, (n_keep - 1)[:, None], axis=-1)
    keep &= logits >= pth
    # min-p: keep tokens with prob >= min_p * max prob, i.e. logit >= max + log(min_p).
    floor = sorted_logits[:, :1] + jnp.log(jnp.maximum(min_p, 1e-38))[:, None]
    keep &= jnp.where(min_p[:, None] > 0, logits >= floor, True)
    return jnp.where(keep, logits, NEG_INF)


def argmax(x: jax.Array) -> jax.Array:
    """Index of the largest value along the last axis, int32: the first one on
    ties, the first NaN if there is one (what jnp.argmax returns).

    A max, then the smallest index holding it: two plain reductions, which
    XLA:CPU runs about twice as fast as jnp.argmax's (value, index) reduction
    (BENCHMARKS.md, "Greedy argmax on XLA:CPU").
    """
    top = jnp.max(x, axis=-1, keepdims=True)
    hit = (x == top) | jnp.isnan(x)
    index = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(hit, index, x.shape[-1]), axis=-1)


def draw(keys: jax.Array, logits: jax.Array) -> jax.Array:
    """One categorical draw per row of logits [B, V] (unnormalized log-probabilities; -inf is
    never drawn): the Gumbel-max form of jax.random.categorical. keys: one PRNG key per row."""
    v = logits.shape[-1]
    noise = jax.vmap(lambda key: jax.random.gumbel(key, (v,), logits.dtype))(keys)
    return argmax(logits + noise)


def sample(logits: jax.Array, knobs: dict[str, jax.Array], keys: jax.Array,
           seen: jax.Array | None = None) -> jax.Array:
    """Chooses one token per row: int32 [B]. keys: one PRNG key per row [B].

    A batch whose rows are all greedy (temperature 0) skips the random draw.
    """
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, knobs["repetition_penalty"])
    greedy = argmax(logits)
    temperature = knobs["temperature"]

    def drawn(logits):
        return jnp.where(temperature > 0, draw(keys, _tempered(logits, knobs)), greedy)

    return jax.lax.cond(jnp.any(temperature > 0), drawn, lambda _: greedy, logits)


def _tempered(logits: jax.Array, knobs: dict[str, jax.Array]) -> jax.Array:
    """Logits divided by each row's temperature, then cut to its top-k / top-p / min-p sets
    (the filters skipped when no row sets one)."""
    scaled = logits / jnp.maximum(knobs["temperature"], 1e-6)[:, None]
    needs_filter = jnp.any((knobs["top_k"] > 0) | (knobs["top_p"] < 1.0) | (knobs["min_p"] > 0))
    return jax.lax.cond(needs_filter, lambda x: filter_logits(x, knobs), lambda x: x, scaled)


def distribution(logits: jax.Array, knobs: dict[str, jax.Array], seen: jax.Array | None = None) -> jax.Array:
    """What `sample` draws from, as log-probabilities [B, V] (float32).

    A row with temperature > 0: the softmax of its penalised, tempered and
    filtered logits. A greedy row (temperature 0): a point mass on its
    argmax (log-probability 0 there, -inf elsewhere). Speculative decoding's
    acceptance rule reads these, so a greedy row accepts exactly its argmax.
    """
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, knobs["repetition_penalty"])
    temperature = knobs["temperature"]
    vocab = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    point = jnp.where(vocab == argmax(logits)[:, None], 0.0, NEG_INF)

    def tempered(logits):
        return jnp.where(temperature[:, None] > 0, jax.nn.log_softmax(_tempered(logits, knobs), axis=-1), point)

    return jax.lax.cond(jnp.any(temperature > 0), tempered, lambda _: point, logits)

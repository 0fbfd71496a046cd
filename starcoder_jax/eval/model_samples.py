"""Samples completions from a StarCoder model for the benchmarks (the path taken without --samples).

Protocol (BigCode's harness): `max_length` bounds prompt + generated tokens, so
each prompt gets `max_length - len(prompt tokens)` new tokens; a prompt that
alone fills max_length is skipped with a warning (and scored as failed).
Completions are cut at the first stop sequence. JAX and the model are
imported only here, lazily, so that scoring files of samples needs neither.

Rows (n per task) are generated in batches that may mix tasks; a batch runs
to the largest budget among its rows and each row is then cut back to its own
budget, which keeps max_length exact per row while batches stay full.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from collections.abc import Callable, Mapping, Sequence

from starcoder_jax.eval.common import truncate_at_stops

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """n: samples per task; max_length: prompt + new tokens (tokens);
    batch_size: rows per generate call (None: max(n, 16))."""

    n: int = 50
    temperature: float = 0.2
    top_p: float = 0.95
    max_length: int = 512
    batch_size: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n (samples per task) must be >= 1, got {self.n}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 tokens, got {self.max_length}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def rows_per_call(self) -> int:
        return self.batch_size or max(self.n, 16)


@dataclasses.dataclass(frozen=True)
class _Row:
    task_id: str
    prompt: object   # what the batch call takes for this row: token ids, or a (prefix, suffix) pair
    budget: int      # new tokens this row may keep


def sample_completions(model, tokenizer, prompts: Mapping[str, str], settings: SamplingSettings,
                       stops: Sequence[str]) -> tuple[dict[str, list[str]], list[str]]:
    """(task_id -> n completions cut at `stops`, task ids skipped for a too-long prompt)."""
    from starcoder_jax.inference.generate import generate

    def call(batch: list[_Row], max_new: int, seed: int):
        return generate(model, [row.prompt for row in batch], tokenizer=tokenizer, max_new_tokens=max_new,
                        temperature=settings.temperature, top_p=settings.top_p, top_k=0,
                        stop=tuple(stops), seed=seed)

    rows, skipped = _rows({task_id: tokenizer.encode(text) for task_id, text in prompts.items()},
                          lambda ids: (ids, len(ids)), settings)
    texts = _run_batches(rows, call, tokenizer, settings, "generating")
    return {task_id: [truncate_at_stops(t, stops) for t in ts] for task_id, ts in texts.items()}, skipped


def infill_middles(model, tokenizer, tasks: Mapping[str, tuple[str, str]], settings: SamplingSettings,
                   *, mode: str = "psm") -> tuple[dict[str, list[str]], list[str]]:
    """(task_id -> n middles for its (prefix, suffix), skipped task ids), via starcoder_jax.inference.fim.

    The budget counts the whole FIM prompt (prefix, suffix, three FIM tokens) against max_length.
    """
    from starcoder_jax.inference.fim import build_prompt, infill_generations

    def call(batch: list[_Row], max_new: int, seed: int):
        return infill_generations(model, tokenizer, [row.prompt for row in batch], mode=mode,
                                  max_new_tokens=max_new, temperature=settings.temperature,
                                  top_p=settings.top_p, seed=seed)

    rows, skipped = _rows(tasks, lambda pair: (pair, len(build_prompt(tokenizer, *pair, mode))), settings)
    return _run_batches(rows, call, tokenizer, settings, "infilling"), skipped


def _rows(tasks: Mapping[str, object], measure: Callable, settings: SamplingSettings):
    """n rows per task whose prompt leaves room for at least one new token; the others' ids.

    measure(task value) -> (what the call takes, prompt length in tokens).
    """
    rows, skipped = [], []
    for task_id, value in tasks.items():
        prompt, used = measure(value)
        budget = settings.max_length - used
        if budget < 1:
            log.warning("%s: prompt has %d tokens, max_length is %d; skipped (scored as failed)",
                        task_id, used, settings.max_length)
            skipped.append(task_id)
            continue
        rows.extend([_Row(task_id, prompt, budget)] * settings.n)
    return rows, skipped


def _run_batches(rows: list[_Row], call: Callable, tokenizer, settings: SamplingSettings,
                 desc: str) -> dict[str, list[str]]:
    from tqdm import tqdm

    texts: dict[str, list[str]] = {}
    size = settings.rows_per_call
    for start in tqdm(range(0, len(rows), size), desc=desc, unit="batch"):
        batch = rows[start:start + size]
        # generate() derives each row's random stream from (seed, row); distinct calls need
        # distinct seeds, and generate takes an int32.
        seed = zlib.crc32(f"{settings.seed}/{start}".encode()) & 0x7FFFFFFF
        generations = call(batch, max(row.budget for row in batch), seed)
        for row, generation in zip(batch, generations, strict=True):
            texts.setdefault(row.task_id, []).append(_text_within(generation, row.budget, tokenizer))
    return texts


def _text_within(generation, budget: int, tokenizer) -> str:
    """The generated text, limited to the row's own token budget.

    Past the budget no stop id was hit (generation would have ended), so the
    first `budget` ids decode to plain text.
    """
    if len(generation.ids) <= budget:
        return generation.text
    return tokenizer.decode(generation.ids[:budget])

"""Samples completions from a StarCoder model for the benchmarks (the path taken without --samples).

Protocol (BigCode's harness): `max_length` bounds prompt + generated tokens, so
each prompt gets `max_length - len(prompt tokens)` new tokens; a prompt that
alone fills max_length is skipped with a warning. Completions are cut at the
first stop sequence. JAX and the model are imported only here, lazily, so that
scoring files of samples needs neither.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from collections.abc import Mapping, Sequence

from starcoder_jax.eval.common import truncate_at_stops

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """n: samples per task; max_length: prompt + new tokens; batch_size: rows per generate call (None = n)."""

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
        return self.batch_size or self.n


def load_model(name: str, dtype: str | None = None):
    """(model, tokenizer) for a local directory or hub id."""
    from starcoder_jax import load_pretrained, load_tokenizer

    model = load_pretrained(name) if dtype is None else load_pretrained(name, dtype=dtype)
    return model, load_tokenizer(name)


def sample_completions(model, tokenizer, prompts: Mapping[str, str], settings: SamplingSettings,
                       stops: Sequence[str]) -> tuple[dict[str, list[str]], list[str]]:
    """(task_id -> n completions cut at `stops`, task ids skipped for a too-long prompt).

    All rows (n per task) are generated in batches of settings.rows_per_call; a
    batch may mix tasks, so it runs to the largest budget of its rows and each
    row is then cut back to its own budget, which keeps max_length exact per row.
    """
    from tqdm.auto import tqdm

    from starcoder_jax.generate import generate

    rows, skipped = _rows(tokenizer, prompts, settings)
    completions: dict[str, list[str]] = {task_id: [] for task_id in prompts if task_id not in skipped}
    size = settings.rows_per_call
    for call in tqdm(range(0, len(rows), size), desc="generating", unit="batch"):
        batch = rows[call:call + size]
        generations = generate(
            model, [ids for _, ids, _ in batch], tokenizer=tokenizer,
            max_new_tokens=max(budget for _, _, budget in batch), temperature=settings.temperature,
            top_p=settings.top_p, top_k=0, stop=tuple(stops), seed=_seed(settings.seed, call),
        )
        for (task_id, _, budget), generation in zip(batch, generations, strict=True):
            completions[task_id].append(truncate_at_stops(_text_within(generation, budget, tokenizer), stops))
    return completions, skipped


def _rows(tokenizer, prompts: Mapping[str, str], settings: SamplingSettings):
    """[(task_id, prompt ids, new-token budget)] * n per task, and the skipped task ids."""
    rows, skipped = [], []
    for task_id, prompt in prompts.items():
        ids = tokenizer.encode(prompt)
        budget = settings.max_length - len(ids)
        if budget < 1:
            log.warning("%s: prompt has %d tokens, max_length is %d; skipped (scored as failed)",
                        task_id, len(ids), settings.max_length)
            skipped.append(task_id)
            continue
        rows.extend([(task_id, ids, budget)] * settings.n)
    return rows, skipped


def _text_within(generation, budget: int, tokenizer) -> str:
    """The generated text, limited to the row's own token budget."""
    if len(generation.ids) <= budget:
        return generation.text
    return tokenizer.decode(generation.ids[:budget])


def _seed(base: int, call: int) -> int:
    # generate() derives per-row streams from (seed, row); distinct calls need distinct seeds.
    return zlib.crc32(f"{base}/{call}".encode())


def infill_middles(model, tokenizer, tasks: Mapping[str, tuple[str, str]], settings: SamplingSettings,
                   *, mode: str = "psm") -> tuple[dict[str, list[str]], list[str]]:
    """(task_id -> n middles for its (prefix, suffix), skipped task ids), via starcoder_jax.fim.infill.

    The budget counts prefix, suffix and the three FIM tokens against max_length.
    """
    from tqdm.auto import tqdm

    from starcoder_jax.fim import infill

    middles: dict[str, list[str]] = {}
    skipped = []
    for task_id, (prefix, suffix) in tqdm(tasks.items(), desc="infilling", unit="task"):
        used = len(tokenizer.encode(prefix)) + len(tokenizer.encode(suffix)) + 3
        budget = settings.max_length - used
        if budget < 1:
            log.warning("%s: prefix + suffix take %d tokens, max_length is %d; skipped (scored as failed)",
                        task_id, used, settings.max_length)
            skipped.append(task_id)
            continue
        middles[task_id] = [
            infill(model, tokenizer, prefix, suffix, mode=mode, max_new_tokens=budget,
                   temperature=settings.temperature, top_p=settings.top_p,
                   seed=zlib.crc32(f"{settings.seed}/{task_id}/{index}".encode()))
            for index in range(settings.n)
        ]
    return middles, skipped

"""HumanEval-infilling (Bavarian et al. 2022): fill a removed span of a HumanEval solution.

A problem holds task_id, entry_point, prompt (the prefix), suffix,
canonical_solution (the removed middle) and test. Two scores per sample:
- exact match: the middle equals the canonical one after .strip() (BigCode's
  FIM score for StarCoder);
- functional: prefix + middle + suffix + "\\n" + test + "\\n" + check(entry_point)
  runs in the sandbox and passes; pass@k over the samples of a task.
Middles are taken as they are (no stop-sequence cut): the model's own
end-of-middle token ends them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

from starcoder_jax.eval import common, sandbox

DEFAULT_TIMEOUT_S = 10.0
_FIELDS = ("task_id", "entry_point", "prompt", "suffix", "canonical_solution", "test")


@dataclasses.dataclass(frozen=True)
class Problem:
    task_id: str
    entry_point: str
    prefix: str
    suffix: str
    middle: str       # the canonical solution of the span
    test: str
    source: str = ""  # the file it came from, to report several sets (SingleLine, MultiLine, ...) apart


def load_problems(paths: str | os.PathLike | Sequence[str | os.PathLike], *,
                  limit: int | None = None) -> list[Problem]:
    """Problems of one or more JSONL(.gz) files; `limit` applies to each file."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    problems = []
    for path in map(os.fspath, paths):
        rows = common.read_jsonl(path)
        for number, row in enumerate(rows[:limit] if limit is not None else rows, 1):
            common.require_fields(row, _FIELDS, f"{path} record {number}")
            problems.append(Problem(*(row[name] for name in _FIELDS), source=_set_name(path)))
    ids = [p.task_id for p in problems]
    if len(set(ids)) != len(ids):
        raise ValueError(f"task ids repeat across {', '.join(paths)}; expected each problem once")
    return problems


def _set_name(path: str) -> str:
    name = os.path.basename(path)
    for ext in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(ext)
    return name


def exact_match(middle: str, reference: str) -> bool:
    return middle.strip() == reference.strip()


def program_source(problem: Problem, middle: str) -> str:
    return f"{problem.prefix}{middle}{problem.suffix}\n{problem.test}\ncheck({problem.entry_point})\n"


def make_jobs(problems: Sequence[Problem], samples: Mapping[str, Sequence[Mapping]], *,
              timeout_s: float = DEFAULT_TIMEOUT_S, python: str | None = None,
              limits: sandbox.Limits | None = None) -> list[common.Job]:
    """One sandboxed job per sample; samples: task_id -> records whose "completion" is the middle."""
    limits = limits or sandbox.Limits(timeout_s=timeout_s)
    jobs = []
    for problem in problems:
        for record in samples.get(problem.task_id, ()):
            middle = record["completion"]
            program = sandbox.python_program(program_source(problem, middle), python=python, limits=limits)
            extra = {"exact_match": exact_match(middle, problem.middle), "set": problem.source}
            jobs.append(common.Job(problem.task_id, middle, program, extra))
    return jobs


def exact_match_rate(sample_rows: Sequence[Mapping]) -> float:
    """Mean over tasks of the share of a task's samples that match exactly (skipped ones do not)."""
    per_task: dict[str, list[bool]] = {}
    for row in sample_rows:
        per_task.setdefault(row["task_id"], []).append(bool(row.get("exact_match", False)))
    return sum(sum(v) / len(v) for v in per_task.values()) / len(per_task) if per_task else 0.0


def extra_metrics(sample_rows: Sequence[Mapping], set_of: Mapping[str, str]) -> dict:
    """exact_match, and when the problems come from several files, every metric per file.

    set_of: task_id -> the name of the set (file) it came from.
    """
    metrics: dict = {"exact_match": exact_match_rate(sample_rows)}
    names = sorted(set(set_of.values()))
    if len(names) > 1:
        metrics["by_set"] = {}
        for name in names:
            rows = [row for row in sample_rows if set_of[row["task_id"]] == name]
            metrics["by_set"][name] = {**common.score(rows)[1], "exact_match": exact_match_rate(rows)}
    return metrics

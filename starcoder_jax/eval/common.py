"""What the three benchmarks share: JSONL files, stop sequences, running and scoring samples, the output dir.

A run is a list of `Job`s (one program per sample), executed in the sandbox,
then counted per task into pass@k. The output directory holds
- samples.jsonl: one line per sample (task_id, completion, status, ...); it can
  be fed back through `--samples` to re-score without a model;
- results.jsonl: one line per task (n, passed, pass@k, status counts);
- summary.json: the metrics, the settings and the timings of the run.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import os
from collections.abc import Iterable, Mapping, Sequence

from starcoder_jax.eval import passk, sandbox


@dataclasses.dataclass(frozen=True)
class Job:
    """One sample to execute: the program built from it, and what to record beside the result."""

    task_id: str
    completion: str
    program: sandbox.Program
    extra: Mapping[str, object] = dataclasses.field(default_factory=dict)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a .jsonl or .jsonl.gz file (blank lines skipped)."""
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON object ({error.msg})") from None
    return rows


def write_jsonl(path: str, rows: Iterable[Mapping]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def require_fields(row: Mapping, fields: Sequence[str], where: str) -> None:
    missing = [name for name in fields if name not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}; expected {', '.join(fields)}, "
                         f"got {', '.join(sorted(row)) or 'none'}")


def truncate_at_stops(text: str, stops: Iterable[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop sequence."""
    cut = len(text)
    for stop in stops:
        if stop:
            found = text.find(stop)
            if found != -1:
                cut = min(cut, found)
    return text[:cut]


def load_samples(path: str | os.PathLike, known_ids: Iterable[str]) -> dict[str, list[dict]]:
    """Samples made elsewhere: task_id -> its sample records, in file order.

    Each line needs task_id and completion; several lines with one task_id are
    several samples of it. Unknown task ids are an error (usually the wrong --data).
    """
    known = set(known_ids)
    grouped: dict[str, list[dict]] = collections.defaultdict(list)
    for number, row in enumerate(read_jsonl(path), 1):
        where = f"{os.fspath(path)} record {number}"
        require_fields(row, ("task_id", "completion"), where)
        if not isinstance(row["completion"], str):  # bad file content: a ValueError, like a bad field
            kind = type(row["completion"]).__name__
            raise ValueError(f"{where}: completion must be a string, got {kind}")  # noqa: TRY004
        grouped[row["task_id"]].append(row)
    unknown = sorted(set(grouped) - known)
    if unknown:
        raise ValueError(f"{os.fspath(path)}: {len(unknown)} task_id(s) not in the problem set, e.g. "
                         f"{', '.join(unknown[:3])}; expected ids such as {', '.join(sorted(known)[:3])}")
    return dict(grouped)


def execute(jobs: Sequence[Job], *, workers: int | None, user: str | None, desc: str) -> list[dict]:
    """Runs every job in the sandbox; one sample record per job (input order)."""
    from tqdm import tqdm

    with tqdm(total=len(jobs), desc=desc, unit="sample") as bar:
        results = sandbox.run_programs([job.program for job in jobs], workers=workers, user=user,
                                       progress=lambda: bar.update(1))
    return [
        {"task_id": job.task_id, "completion": job.completion, **job.extra, **result.to_json()}
        for job, result in zip(jobs, results)
    ]


def score(sample_rows: Sequence[Mapping], ks: Sequence[int] = passk.DEFAULT_KS) -> tuple[list[dict], dict]:
    """(per-task records, metrics) from sample records that carry task_id and passed."""
    by_task: dict[str, list[Mapping]] = collections.defaultdict(list)
    for row in sample_rows:
        by_task[row["task_id"]].append(row)
    task_rows, counts = [], {}
    for task_id, rows in by_task.items():
        n, c = len(rows), sum(bool(row["passed"]) for row in rows)
        counts[task_id] = (n, c)
        task_rows.append({
            "task_id": task_id, "n": n, "passed": c,
            **{f"pass@{k}": passk.pass_at_k(n, c, k) for k in ks if k <= n},
            "statuses": dict(collections.Counter(row["status"] for row in rows)),
        })
    statuses = collections.Counter(row["status"] for row in sample_rows)
    metrics = {**passk.mean_pass_at_k(counts, ks), "tasks": len(counts), "samples": len(sample_rows),
               "statuses": dict(statuses)}
    return task_rows, metrics


def write_run(out_dir: str, sample_rows: Sequence[Mapping], task_rows: Sequence[Mapping],
              summary: Mapping) -> None:
    os.makedirs(out_dir, exist_ok=True)
    write_jsonl(os.path.join(out_dir, "samples.jsonl"), sample_rows)
    write_jsonl(os.path.join(out_dir, "results.jsonl"), task_rows)
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
        f.write("\n")


def format_summary(summary: Mapping) -> str:
    """A few aligned lines: the benchmark, the metrics, the status counts, the output dir."""
    metrics = summary["metrics"]
    lines = [f"{summary['benchmark']}: {metrics['tasks']} tasks, {metrics['samples']} samples"]
    for name, value in metrics.items():
        if isinstance(value, float):
            lines.append(f"  {name:<12} {100 * value:6.2f} %")
    statuses = ", ".join(f"{name} {count}" for name, count in sorted(metrics["statuses"].items()))
    lines.append(f"  {'status':<12} {statuses}")
    if summary.get("skipped"):
        count = len(summary["skipped"])
        lines.append(f"  {'skipped':<12} {count} task(s): prompt over max_length, scored as failed")
    lines.append(f"  {'seconds':<12} {summary['seconds']}")
    if summary.get("out_dir"):
        lines.append(f"  {'written to':<12} {summary['out_dir']}")
    return "\n".join(lines)


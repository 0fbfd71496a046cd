"""The unbiased pass@k estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code").

With n samples of a task of which c pass, pass@k = 1 - C(n-c, k) / C(n, k): one
minus the chance that k samples drawn without replacement all fail. The ratio
of binomials is a product of k terms (1 - k/i), i = n-c+1..n, which stays in
[0, 1] where the binomials themselves overflow floats for n in the hundreds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

DEFAULT_KS = (1, 10, 100)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Estimated probability that at least one of k samples passes, from n samples with c passing."""
    if n < 1:
        raise ValueError(f"n (samples) must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c (passing samples) must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if n - c < k:  # every draw of k samples includes a passing one
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(counts: Mapping[str, tuple[int, int]], ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """{"pass@k": mean over tasks} for each k that every task has enough samples for.

    counts: task_id -> (n samples, c passing). A k larger than some task's n is
    left out (as BigCode's harness does) rather than estimated from too few samples.
    """
    if not counts:
        return {}
    smallest_n = min(n for n, _ in counts.values())
    return {
        f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts.values()) / len(counts)
        for k in ks if k <= smallest_n
    }

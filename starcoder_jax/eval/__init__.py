"""Code benchmarks: HumanEval, MultiPL-E and HumanEval-infilling, run in a sandbox and scored with pass@k.

Scoring needs no JAX: a file of samples (`--samples`) is enough. Sampling
from a model goes through `starcoder_jax.inference.generate` / `starcoder_jax.inference.fim`,
imported only when used. See docs/eval.md for the protocol and commands.
"""

from starcoder_jax.eval.passk import mean_pass_at_k, pass_at_k
from starcoder_jax.eval.sandbox import (
    Limits,
    Program,
    RunResult,
    Step,
    python_program,
    run_program,
    run_programs,
)

__all__ = [
    "Limits",
    "Program",
    "RunResult",
    "Step",
    "mean_pass_at_k",
    "pass_at_k",
    "python_program",
    "run_program",
    "run_programs",
]

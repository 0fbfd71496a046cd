"""Where the program being traced runs: the probes behind the `auto` forms of ops/."""

from __future__ import annotations

import jax


def cpu_without_mesh(sharded: bool | None = None) -> bool:
    """Whether the program runs on XLA:CPU with no mesh, where the CPU forms serve.

    sharded: whether it runs under a mesh; None asks the mesh set now
    (`jax.set_mesh`), which is what a traced function sees.
    """
    if sharded is None:
        sharded = not jax.sharding.get_abstract_mesh().empty
    return jax.default_backend() == "cpu" and not sharded


def on_gpu() -> bool:
    """Whether the program runs on XLA:GPU (the one-row int8 product has a GPU form)."""
    return jax.default_backend() == "gpu"


def on_tpu() -> bool:
    """Whether the program runs on a TPU (the splash attention kernel)."""
    return jax.default_backend() == "tpu"


def on_cpu() -> bool:
    """Whether the program runs on XLA:CPU, mesh or not (recomputation's "cond" form)."""
    return jax.default_backend() == "cpu"

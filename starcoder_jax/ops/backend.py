"""Where the program being traced runs: the probes behind the `auto` forms of ops/.

The platform is the one the program is compiled for, not the host's: the
devices of the mesh set now (`jax.set_mesh`, which every sharded path of the
library sets around tracing), else JAX's default backend. A program
compiled on this CPU host for TPU or GPU devices (parallel.chips) thus picks
the TPU's or the GPU's forms.
"""

from __future__ import annotations

import functools
import importlib.metadata

import jax


def platform() -> str:
    """"cpu", "gpu" or "tpu": the platform of the mesh set now, else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    if device is not None:
        return device.platform
    return jax.default_backend()


def cpu_without_mesh(sharded: bool | None = None) -> bool:
    """Whether the program runs on XLA:CPU with no mesh, where the CPU forms serve.

    sharded: whether it runs under a mesh; None asks the mesh set now
    (`jax.set_mesh`), which is what a traced function sees.
    """
    if sharded is None:
        sharded = not jax.sharding.get_abstract_mesh().empty
    return platform() == "cpu" and not sharded


@functools.cache
def cpu_flags() -> str:
    """This host's CPU feature flags as /proc/cpuinfo lists them ("flags" on x86,
    "Features" on ARM); the processor's name where there is no /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def cpu_has_bfloat16() -> bool:
    """Whether this host's CPU multiplies bfloat16 natively (AVX512-BF16 or AMX): XLA:CPU
    programs compiled here run bfloat16 products fast only then."""
    flags = cpu_flags().split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def on_gpu() -> bool:
    """Whether the program is compiled for XLA:GPU (cuDNN attention, the GPU int8 product)."""
    return platform() == "gpu"


def on_tpu() -> bool:
    """Whether the program is compiled for a TPU (the splash attention kernel)."""
    return platform() == "tpu"


def on_cpu() -> bool:
    """Whether the program is compiled for XLA:CPU, mesh or not (recomputation's "cond" form)."""
    return platform() == "cpu"


@functools.cache
def cudnn_version() -> tuple[int, int, int] | None:
    """The cuDNN library XLA:GPU would link (the nvidia-cudnn wheel JAX's CUDA plugin loads),
    or None where none is installed: a GPU program then cannot call cuDNN's kernels."""
    for wheel in ("nvidia-cudnn-cu13", "nvidia-cudnn-cu12"):
        try:
            parts = importlib.metadata.version(wheel).split(".")
        except importlib.metadata.PackageNotFoundError:
            continue
        return tuple(int(p) for p in (parts + ["0", "0"])[:3])
    return None


def cudnn_available() -> bool:
    """Whether a GPU program can call cuDNN: the wheel is installed, or a GPU is attached
    (whose JAX install brought its own cuDNN)."""
    if cudnn_version() is not None:
        return True
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False

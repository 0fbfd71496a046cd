"""Compile-only devices of real accelerators, on any host: a program lowered for them is
compiled by the chip's own compiler (libtpu for TPUs, XLA:GPU for NVIDIA GPUs) and can
be measured, never run.

- TPUs: `jax.experimental.topologies.get_topology_desc(platform="tpu", ...)` over a
  libtpu topology ("v5p:4x4x4"); needs the `tpu` extra (libtpu).
- NVIDIA GPUs: the same call with platform "cuda", a "slices x hosts x GPUs" topology
  and the chip described as a GpuTargetConfigProto (parallel.targets.GpuChip); needs
  the `cuda` extra (JAX's CUDA plugin, which compiles PTX itself: no CUDA toolkit
  needed; and the cuDNN library for cuDNN's kernels).

A target is named as in parallel.targets ("tpu-v5e", "h100-sxm") or, for a TPU, as a
Cloud TPU slice ("v5e-8": 8 chips; "v5p-128": 128 TensorCores, 64 chips, since v4
and v5p slices count cores).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import math
import os
import re

import jax

from starcoder_jax.parallel.targets import TARGETS, Target, target

EXTRA = {"tpu": "tpu", "gpu": "cuda"}
_CORES_PER_CHIP = {"v4": 2, "v5p": 2}  # slice names count TensorCores on these
_DIMS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}


class MissingExtra(RuntimeError):
    """A chip's compiler is not installed: the message names the extra that installs it."""


@dataclasses.dataclass(frozen=True)
class Chips:
    """Compile-only devices of one target: a TPU slice or `nodes` x `per_node` GPUs."""

    target: Target
    devices: tuple
    topology: str  # libtpu's "v5e:2x2", or "nodes x GPUs" for GPUs

    @property
    def platform(self) -> str:
        return self.target.platform

    def compiler(self) -> dict:
        """Which compiler builds programs for these chips: platform, device kind, version."""
        d = self.devices[0]
        out = {"platform": self.platform, "device_kind": d.device_kind, "topology": self.topology,
               "jax": jax.__version__}
        if self.platform == "tpu":
            out["compiler"] = f"libtpu {_version('libtpu')}"
        else:
            from starcoder_jax.ops.backend import cudnn_version

            cudnn = cudnn_version()
            out["compiler"] = f"XLA:GPU (jax-cuda13-plugin {_version('jax-cuda13-plugin')})"
            out["cudnn"] = None if cudnn is None else ".".join(map(str, cudnn))
        return out


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def parse(name: str, topology: str | None = None) -> tuple[Target, str | None]:
    """(target, topology or None) of a target name ("tpu-v5p", "h100-sxm") or a TPU slice
    name ("v5p-128"); `topology` ("4x4x4") overrides the slice's."""
    if name in TARGETS:
        return target(name), topology
    m = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", name)
    if m is None:
        raise ValueError(f"unknown target {name!r}; known: {', '.join(TARGETS)}, or a TPU slice such as "
                         "v5e-8 or v5p-128")
    version, count = m.group(1), int(m.group(2))
    per_chip = _CORES_PER_CHIP.get(version, 1)
    if count % per_chip:
        raise ValueError(f"{name}: a {version} slice counts {per_chip} TensorCores a chip; {count} is not a "
                         "whole number of chips")
    return target(f"tpu-{version}"), topology or tpu_topology(version, count // per_chip)


def tpu_topology(version: str, chips: int) -> str:
    """The usual shape of a slice of `chips` chips: 2-D for v5e/v6e (2x2, 2x4, 4x4, ...),
    3-D for v4/v5p (2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...): the smallest side doubled."""
    dims = _DIMS[version]
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"a {version} slice of {chips} chips: give a power of two, or a topology")
    if chips < 4:  # one host's worth or less
        return "x".join(map(str, ([1, chips] + [1] * (dims - 2))))
    shape = [2, 2] + [1] * (dims - 2)
    while math.prod(shape) < chips:
        smallest = min(shape)
        shape[max(j for j in range(dims) if shape[j] == smallest)] *= 2
    return "x".join(map(str, shape))


_MODULES = {"tpu": ("libtpu",), "gpu": ("jax_plugins", "jax_plugins.xla_cuda13")}  # parents first


def compiler_installed(platform: str) -> bool:
    """Whether the compiler for "tpu" (libtpu) or "gpu" (JAX's CUDA plugin) is installed."""
    return all(importlib.util.find_spec(module) is not None for module in _MODULES[platform])


def _require(platform: str) -> None:
    if not compiler_installed(platform):
        what = "libtpu (the TPU compiler)" if platform == "tpu" else "JAX's CUDA plugin (XLA:GPU)"
        raise MissingExtra(f"compiling for a {platform.upper()} needs {what}: "
                           f"pip install 'starcoder-jax[{EXTRA[platform]}]'")


def chips(name: str, devices: int | None = None, *, topology: str | None = None,
          per_node: int | None = None) -> Chips:
    """Compile-only devices for target `name` (see `parse`).

    TPU: the slice's topology (`topology`, the slice name's, or the usual shape of
    `devices` chips). GPU: `devices` GPUs (default one node), `per_node` a node (default
    the target's node size, or fewer when `devices` is smaller)."""
    t, topology = parse(name, topology)
    _require(t.platform)
    if t.platform == "tpu":
        if topology is None:
            topology = tpu_topology(t.tpu, devices or 1)
        found = _tpu_devices(t.tpu, topology)
        if len(found) > len({tuple(getattr(d, "coords", (d.id,))) for d in found}):
            raise ValueError(f"libtpu's compile-only {t.tpu} topology gives one device per TensorCore "
                             f"({len(found)} for {t.tpu}:{topology}), and JAX builds meshes over one device "
                             "per chip (megacore) only: this host cannot compile for it")
        if devices is not None and devices != len(found):
            raise ValueError(f"{t.tpu}:{topology} has {len(found)} chips, the mesh {devices}; give a topology "
                             "or slice of as many chips as the mesh has devices")
        return Chips(t, found, f"{t.tpu}:{topology}")
    if topology is not None:
        raise ValueError(f"{name} is a GPU: give its count by the mesh and --gpus-per-node, not a topology")
    n = devices or t.node_size
    per_node = per_node or min(n, t.node_size)
    if n % per_node:
        raise ValueError(f"{n} GPUs do not fill whole nodes of {per_node}")
    return Chips(t, _gpu_devices(t.name, n // per_node, per_node), f"{n // per_node} x {per_node} GPUs")


@functools.cache
def _tpu_devices(version: str, topology: str) -> tuple:
    from jax.experimental import topologies

    shape = tuple(int(x) for x in topology.split("x"))
    if jax.default_backend() != "tpu":
        # libtpu takes a lockfile for the one process that drives the host's chips; with
        # none to drive, several processes may compile at once (compiled_plans' jobs).
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs = {}
    if math.prod(shape) < 4:  # a host holds 2x2 chips; smaller slices are one host of their own
        kwargs["chips_per_host_bounds"] = shape + (1,) * (3 - len(shape))
    try:
        return tuple(topologies.get_topology_desc(platform="tpu", topology_name=f"{version}:{topology}",
                                                  **kwargs).devices)
    except Exception as error:  # noqa: BLE001 -- libtpu's own message says what it refused
        raise ValueError(f"libtpu refused the topology {version}:{topology}: {str(error).splitlines()[0]}") from error


@functools.cache
def _gpu_devices(name: str, nodes: int, per_node: int) -> tuple:
    from jax.experimental import topologies

    from starcoder_jax.ops.backend import cudnn_version

    t = target(name)
    config = t.gpu.target_config(t.hbm_bandwidth, cudnn_version() or (9, 0, 0))
    return tuple(topologies.get_topology_desc(platform="cuda", topology_name="cuda",
                                              topology=f"1x{nodes}x{per_node}", target_config=config).devices)

"""Accelerators to plan for, from their datasheets, and a roofline estimate of a step on them.

Each `Target` holds a chip's dense bf16 peak, its HBM size and bandwidth,
and two link bandwidths per chip and direction: the fast one inside a node
or TPU slice (NVLink, ICI) and the slow one between nodes (InfiniBand,
DCN). `estimate(...)` turns a compiled step's FLOPs, bytes accessed and
collectives (parallel.hlo) into times:

  compute = FLOPs / peak            hbm = bytes accessed / HBM bandwidth
  comm    = sum over collectives of link bytes / link bandwidth, where a
            ring over n devices puts 2(n-1)/n of an all-reduce's buffer on
            each device's links and (n-1)/n of an all-gather's,
            reduce-scatter's or all-to-all's (a collective-permute: all of it)
  roofline (perfect overlap) = max(compute, hbm, comm)
  no overlap                 = max(compute, hbm) + comm

Mesh axes map to links by position: the mesh is (data, fsdp, tensor) with
`tensor` varying fastest over the device list, so a collective stays on the
fast links when its outermost axis and every axis inside it fit in one node.
These are estimates from a CPU compile: XLA:CPU fuses, schedules and plans
memory differently from the GPU and TPU compilers (docs/sharding.md).

This module imports nothing from the rest of the package.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    bf16_flops: float  # dense peak per chip, FLOP/s
    hbm_bytes: float  # per chip
    hbm_bandwidth: float  # bytes/s per chip
    fast_link: str
    fast_link_bandwidth: float  # bytes/s per chip and direction inside a node / slice
    slow_link: str
    slow_link_bandwidth: float  # bytes/s per chip and direction between nodes / slices
    node_size: int  # chips on the fast links
    source: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Datasheet figures. NVLink and ICI are quoted bidirectional; a ring uses one direction of
# each link pair, so half is used here. InfiniBand per GPU: one NIC per GPU.
TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("h100-sxm", 989e12, 80 * GB, 3.35e12, "NVLink 4", 450 * GB, "InfiniBand NDR", 50 * GB, 8,
           "NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16 1,979 TFLOPS with sparsity (989 dense), "
           "80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s; ConnectX-7 400 Gb/s per GPU"),
    Target("h200", 989e12, 141 * GB, 4.8e12, "NVLink 4", 450 * GB, "InfiniBand NDR", 50 * GB, 8,
           "NVIDIA H200 Tensor Core GPU datasheet (SXM): BF16 1,979 TFLOPS with sparsity (989 dense), "
           "141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s; ConnectX-7 400 Gb/s per GPU"),
    Target("a100-80gb", 312e12, 80 * GB, 2.039e12, "NVLink 3", 300 * GB, "InfiniBand HDR", 25 * GB, 8,
           "NVIDIA A100 Tensor Core GPU datasheet (80GB SXM): BF16 312 TFLOPS dense, 80 GB HBM2e at "
           "2,039 GB/s, NVLink 600 GB/s; HDR 200 Gb/s per GPU"),
    Target("a100-40gb", 312e12, 40 * GB, 1.555e12, "NVLink 3", 300 * GB, "InfiniBand HDR", 25 * GB, 8,
           "NVIDIA A100 Tensor Core GPU datasheet (40GB SXM): BF16 312 TFLOPS dense, 40 GB HBM2 at "
           "1,555 GB/s, NVLink 600 GB/s; HDR 200 Gb/s per GPU"),
    Target("tpu-v4", 275e12, 32 * 2**30, 1200 * GB, "ICI", 1.1e15 / 4096, "DCN", 0.0, 4096,
           "Cloud TPU v4 documentation: 275 TFLOPS bf16 per chip, 32 GiB HBM2 at 1200 GBps, "
           "all-reduce bandwidth 1.1 PB/s per 4096-chip pod (used per chip); a pod is one slice"),
    Target("tpu-v5e", 197e12, 16 * GB, 800 * 2**30, "ICI", 200 * GB, "DCN", 25e9 / 8, 256,
           "Cloud TPU v5e documentation: 197 TFLOPS bf16, 16 GB HBM at 800 GiBps, bidirectional ICI "
           "400 GBps per chip, 2 x 100 Gbps NICs per 8-chip host, 256-chip pod"),
    Target("tpu-v5p", 459e12, 95 * 2**30, 2765 * GB, "ICI", 600 * GB, "DCN", 50e9 / 8, 8960,
           "Cloud TPU v5p documentation: 459 TFLOPS bf16, 95 GiB HBM2e at 2765 GBps, bidirectional "
           "ICI 1200 GBps per chip, DCN 50 Gbps per chip, 8960-chip slices"),
)}


def target(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    return TARGETS[name]


RING_FACTOR = {"all-reduce": lambda n: 2 * (n - 1) / n, "all-gather": lambda n: (n - 1) / n,
               "reduce-scatter": lambda n: (n - 1) / n, "all-to-all": lambda n: (n - 1) / n,
               "collective-permute": lambda n: 1.0}


def link_of(axes, mesh: Mapping[str, int], t: Target) -> tuple[str, float]:
    """(link name, bytes/s) a collective over these mesh axes runs on."""
    names = list(mesh)
    if not axes:
        return t.fast_link, t.fast_link_bandwidth
    outer = min(names.index(a) for a in axes)
    span = math.prod(mesh[a] for a in names[outer:])
    if span <= t.node_size:
        return t.fast_link, t.fast_link_bandwidth
    return t.slow_link, t.slow_link_bandwidth


def estimate(*, flops: float, bytes_accessed: float, collectives, mesh: Mapping[str, int], t: Target,
             peak_bytes: int | None = None) -> dict:
    """Roofline times of one step per device (module docstring); collectives: dicts with
    kind, bytes, mesh_axes and group_size (parallel.hlo.Collective.to_dict())."""
    devices = math.prod(mesh.values())
    comm, by_link = 0.0, {}
    for c in collectives:
        name, bandwidth = link_of(c["mesh_axes"], mesh, t)
        if bandwidth <= 0:
            raise ValueError(f"{t.name}: a collective over {c['mesh_axes']} leaves the {t.node_size}-chip "
                             f"slice, and no {t.slow_link} bandwidth is known for it")
        seconds = c["bytes"] * RING_FACTOR[c["kind"]](c["group_size"]) / bandwidth
        comm += seconds
        by_link[name] = by_link.get(name, 0.0) + seconds
    compute, hbm = flops / t.bf16_flops, bytes_accessed / t.hbm_bandwidth
    out = {"target": t.name, "devices": devices, "compute_s": compute, "hbm_s": hbm, "comm_s": comm,
           "comm_s_by_link": by_link, "estimated_step_s": max(compute, hbm, comm),
           "no_overlap_step_s": max(compute, hbm) + comm}
    if devices > t.node_size and t.slow_link_bandwidth <= 0:
        raise ValueError(f"{t.name}: {devices} chips exceed one {t.node_size}-chip slice")
    if peak_bytes is not None:
        out["fits"] = peak_bytes <= t.hbm_bytes
        out["hbm_bytes"] = t.hbm_bytes
    return out

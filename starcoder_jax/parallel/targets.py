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
A target is also a chip to compile for (parallel.chips): each row names
its platform, and a TPU its topology prefix in libtpu's names ("v5e:2x2"),
a GPU the device description XLA:GPU compiles against (`GpuChip`: the
figures of CUDA's device query, as XLA's public GPU specs record them).

This module imports nothing from the rest of the package.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

GB = 1e9


@dataclasses.dataclass(frozen=True)
class GpuChip:
    """What XLA:GPU's compiler needs to know of an NVIDIA chip (its GpuDeviceInfoProto)."""

    description: str  # CUDA's device name, as the driver reports it
    compute_capability: tuple[int, int]
    sm_count: int
    fp32_units_per_sm: int
    clock_ghz: float
    memory_bytes: int  # as the driver reports it (below the datasheet's GB)
    l2_bytes: int
    shared_memory_per_sm: int
    shared_memory_per_block_optin: int

    def target_config(self, memory_bandwidth: float, cudnn: tuple[int, int, int]) -> str:
        """The chip as a text-format GpuTargetConfigProto, with the cuDNN version it links."""
        fields = [
            ("threads_per_block_limit", 1024), ("threads_per_warp", 32), ("shared_memory_per_block", 49152),
            ("shared_memory_per_core", self.shared_memory_per_sm), ("threads_per_core_limit", 2048),
            ("core_count", self.sm_count), ("fpus_per_core", self.fp32_units_per_sm),
            ("block_dim_limit_x", 2**31 - 1), ("block_dim_limit_y", 65535), ("block_dim_limit_z", 65535),
            ("memory_bandwidth", int(memory_bandwidth)), ("l2_cache_size", self.l2_bytes),
            ("clock_rate_ghz", self.clock_ghz), ("device_memory_size", self.memory_bytes),
            ("shared_memory_per_block_optin", self.shared_memory_per_block_optin),
            ("registers_per_core_limit", 65536), ("registers_per_block_limit", 65536)]
        major, minor = self.compute_capability
        info = "\n".join(f"  {k}: {v}" for k, v in fields)
        return (f"gpu_device_info {{\n{info}\n  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n"
                f'platform_name: "CUDA"\n'
                f"dnn_version_info {{ major: {cudnn[0]} minor: {cudnn[1]} patch: {cudnn[2]} }}\n"
                f'device_description_str: "{self.description}"\n')


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
    tpu: str | None = None  # a TPU: libtpu's topology prefix ("v5e")
    gpu: GpuChip | None = None  # a GPU: what XLA:GPU compiles for

    @property
    def platform(self) -> str:
        """"tpu" or "gpu": the compiler that builds its programs."""
        return "tpu" if self.tpu else "gpu"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Datasheet figures. NVLink and ICI are quoted bidirectional; a ring uses one direction of
# each link pair, so half is used here. InfiniBand per GPU: one NIC per GPU. A GPU's
# GpuChip: its SM count, clock, L2 and shared memory from NVIDIA's architecture
# whitepapers (Hopper, Ampere, Blackwell), its memory as the driver reports it.
_HOPPER = dict(compute_capability=(9, 0), sm_count=132, fp32_units_per_sm=128, clock_ghz=1.98,
               l2_bytes=50 * 2**20, shared_memory_per_sm=228 * 1024, shared_memory_per_block_optin=227 * 1024)
_AMPERE = dict(compute_capability=(8, 0), sm_count=108, fp32_units_per_sm=64, clock_ghz=1.41,
               l2_bytes=40 * 2**20, shared_memory_per_sm=164 * 1024, shared_memory_per_block_optin=163 * 1024)
TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("h100-sxm", 989e12, 80 * GB, 3.35e12, "NVLink 4", 450 * GB, "InfiniBand NDR", 50 * GB, 8,
           "NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16 1,979 TFLOPS with sparsity (989 dense), "
           "80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s; ConnectX-7 400 Gb/s per GPU",
           gpu=GpuChip("NVIDIA H100 80GB HBM3", memory_bytes=81_042 * 2**20, **_HOPPER)),
    Target("h200", 989e12, 141 * GB, 4.8e12, "NVLink 4", 450 * GB, "InfiniBand NDR", 50 * GB, 8,
           "NVIDIA H200 Tensor Core GPU datasheet (SXM): BF16 1,979 TFLOPS with sparsity (989 dense), "
           "141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s; ConnectX-7 400 Gb/s per GPU",
           gpu=GpuChip("NVIDIA H200", memory_bytes=143_771 * 2**20, **_HOPPER)),
    Target("a100-80gb", 312e12, 80 * GB, 2.039e12, "NVLink 3", 300 * GB, "InfiniBand HDR", 25 * GB, 8,
           "NVIDIA A100 Tensor Core GPU datasheet (80GB SXM): BF16 312 TFLOPS dense, 80 GB HBM2e at "
           "2,039 GB/s, NVLink 600 GB/s; HDR 200 Gb/s per GPU",
           gpu=GpuChip("NVIDIA A100-SXM4-80GB", memory_bytes=81_156 * 2**20, **_AMPERE)),
    Target("a100-40gb", 312e12, 40 * GB, 1.555e12, "NVLink 3", 300 * GB, "InfiniBand HDR", 25 * GB, 8,
           "NVIDIA A100 Tensor Core GPU datasheet (40GB SXM): BF16 312 TFLOPS dense, 40 GB HBM2 at "
           "1,555 GB/s, NVLink 600 GB/s; HDR 200 Gb/s per GPU",
           gpu=GpuChip("NVIDIA A100-SXM4-40GB", memory_bytes=40_370 * 2**20, **_AMPERE)),
    Target("l4", 121e12, 24 * GB, 300 * GB, "PCIe 4.0 x16", 32 * GB, "Ethernet 100 Gb/s", 12.5 * GB, 8,
           "NVIDIA L4 Tensor Core GPU datasheet: BF16 242 TFLOPS with sparsity (121 dense), 24 GB GDDR6 "
           "at 300 GB/s, PCIe Gen4 x16 64 GB/s, no NVLink; AD104 (Ada) with 58 SMs at 2.04 GHz boost",
           gpu=GpuChip("NVIDIA L4", compute_capability=(8, 9), sm_count=58, fp32_units_per_sm=128,
                       clock_ghz=2.04, memory_bytes=23_034 * 2**20, l2_bytes=48 * 2**20,
                       shared_memory_per_sm=100 * 1024, shared_memory_per_block_optin=99 * 1024)),
    Target("b200", 2250e12, 180 * GB, 7.7e12, "NVLink 5", 900 * GB, "InfiniBand NDR", 50 * GB, 8,
           "NVIDIA HGX B200 datasheet: 8 GPUs with 18 PFLOPS dense FP16/BF16 (2.25 each), 1,440 GB HBM3e "
           "(180 each) at 62 TB/s (7.7 each), NVLink 5 1.8 TB/s per GPU; ConnectX-7 400 Gb/s per GPU",
           gpu=GpuChip("NVIDIA B200", compute_capability=(10, 0), sm_count=148, fp32_units_per_sm=128,
                       clock_ghz=1.965, memory_bytes=182_642 * 2**20,
                       l2_bytes=126 * 2**20, shared_memory_per_sm=228 * 1024,
                       shared_memory_per_block_optin=227 * 1024)),
    Target("tpu-v4", 275e12, 32 * 2**30, 1200 * GB, "ICI", 1.1e15 / 4096, "DCN", 0.0, 4096,
           "Cloud TPU v4 documentation: 275 TFLOPS bf16 per chip, 32 GiB HBM2 at 1200 GBps, "
           "all-reduce bandwidth 1.1 PB/s per 4096-chip pod (used per chip); a pod is one slice",
           tpu="v4"),
    Target("tpu-v5e", 197e12, 16 * GB, 800 * 2**30, "ICI", 200 * GB, "DCN", 25e9 / 8, 256,
           "Cloud TPU v5e documentation: 197 TFLOPS bf16, 16 GB HBM at 800 GiBps, bidirectional ICI "
           "400 GBps per chip, 2 x 100 Gbps NICs per 8-chip host, 256-chip pod",
           tpu="v5e"),
    Target("tpu-v5p", 459e12, 95 * 2**30, 2765 * GB, "ICI", 600 * GB, "DCN", 50e9 / 8, 8960,
           "Cloud TPU v5p documentation: 459 TFLOPS bf16, 95 GiB HBM2e at 2765 GBps, bidirectional "
           "ICI 1200 GBps per chip, DCN 50 Gbps per chip, 8960-chip slices",
           tpu="v5p"),
    Target("tpu-v6e", 918e12, 32 * GB, 1640 * GB, "ICI", 400 * GB, "DCN", 0.0, 256,
           "Cloud TPU v6e (Trillium) documentation: 918 TFLOPS bf16, 32 GB HBM at 1640 GBps, "
           "bidirectional ICI 800 GBps per chip, 256-chip pod (no DCN figure per chip published)",
           tpu="v6e"),
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
    out = {"target": t.name, "devices": devices, "hbm_bandwidth": t.hbm_bandwidth, "compute_s": compute,
           "hbm_s": hbm, "comm_s": comm,
           "comm_s_by_link": by_link, "estimated_step_s": max(compute, hbm, comm),
           "no_overlap_step_s": max(compute, hbm) + comm}
    if devices > t.node_size and t.slow_link_bandwidth <= 0:
        raise ValueError(f"{t.name}: {devices} chips exceed one {t.node_size}-chip slice")
    if peak_bytes is not None:
        out["fits"] = peak_bytes <= t.hbm_bytes
        out["hbm_bytes"] = t.hbm_bytes
    return out

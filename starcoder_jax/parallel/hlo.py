"""The collectives of a compiled, partitioned program, read from its HLO text.

`collectives(hlo_text, mesh_shape)` finds every all-gather, reduce-scatter,
all-reduce, all-to-all and collective-permute of a compiled SPMD program
(`compiled.as_text()`), counts each as often as it runs (a loop body's by
the loop's known trip count), and names the mesh axes it runs over: the
axes along which the devices of one of its groups differ. Partition ids
are positions in the mesh's device array (the order of `mesh.devices.flat`),
so a partition id's mesh coordinates are `numpy.unravel_index(id, shape)`.

Bytes are those of the whole buffer each device takes part in, per device
and per run: an all-reduce's operands, an all-gather's gathered output, a
reduce-scatter's unscattered input, an all-to-all's and a
collective-permute's buffer. The bytes a device puts on its links follow
from them and the group size (parallel.targets: ring algorithms).

This module imports nothing from the rest of the package.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
               "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
               "s4": 1, "u4": 1, "token": 0}

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\dm\d(?:fn)?)?)\[([\d,]*)\]")
_CALLEES = re.compile(r"\b(?:body|calls|to_apply|true_computation|false_computation|condition)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass(frozen=True)
class Collective:
    """Collectives of one kind over one set of mesh axes, summed over the program."""

    kind: str  # one of KINDS
    mesh_axes: tuple[str, ...]  # the mesh axes its groups span, in mesh order
    count: int  # times they run in one call of the program
    bytes: int  # per device, summed over those runs (see the module docstring)
    group_size: int  # devices per group

    def to_dict(self) -> dict:
        return {"kind": self.kind, "count": self.count, "bytes": self.bytes,
                "mesh_axes": list(self.mesh_axes), "group_size": self.group_size}


def shape_bytes(shape_text: str) -> int:
    """Bytes of an HLO shape such as `f32[8,64]{1,0}` or a tuple of them."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape_text):
        if dtype not in DTYPE_BYTES:
            continue
        total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _iota(spec: str) -> np.ndarray:
    """`[4,2]<=[2,2,2]T(2,1,0)` (or `[2,4]T(1,0)`, `[8]`): iota over the source shape,
    transposed, reshaped to the leading shape when one is given."""
    m = re.fullmatch(r"\s*(?:\[([\d,]+)\]<=)?\[([\d,]+)\](?:T\(([\d,]+)\))?\s*", spec)
    if m is None:
        raise ValueError(f"unreadable device list {spec!r}")
    out_shape, src, perm = m.groups()
    src = [int(d) for d in src.split(",")]
    ids = np.arange(math.prod(src)).reshape(src)
    if perm:
        ids = ids.transpose([int(p) for p in perm.split(",")])
    return ids.reshape([int(d) for d in out_shape.split(",")]) if out_shape else ids


def replica_groups(line: str, n_devices: int) -> list[list[int]]:
    """The device groups of a collective instruction (every HLO spelling of them)."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\((\[[\d,]+\](?:T\([\d,]+\))?)\))?\s*\{([^}]*)\}",
                  line)
    if m is not None:  # mesh['axis_0'=2,'axis_1'=4] {'axis_1'}: groups vary along the named axes
        axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
        names, shape = [a for a, _ in axes], [int(s) for _, s in axes]
        ids = (_iota(m.group(2)) if m.group(2) else np.arange(math.prod(shape))).reshape(shape)
        grouped = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(3))]
        kept = [i for i in range(len(shape)) if i not in grouped]
        ids = ids.transpose(kept + grouped)
        return ids.reshape(-1, math.prod(shape[i] for i in grouped) if grouped else 1).tolist()
    m = re.search(r"replica_groups=(\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)", line)
    if m is not None:
        ids = _iota(m.group(1))
        return ids.reshape(ids.shape[0], -1).tolist()
    m = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", line)
    if m is not None:
        groups = [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
        groups = [g for g in groups if g]
        return groups or [list(range(n_devices))]
    m = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", line)
    if m is not None:
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))]
    return [list(range(n_devices))]


def group_axes(groups: Sequence[Sequence[int]], mesh_shape: dict[str, int]) -> tuple[str, ...]:
    """The mesh axes along which the members of some group differ."""
    names, shape = list(mesh_shape), list(mesh_shape.values())
    varying = set()
    for group in groups:
        coords = np.array(np.unravel_index(np.asarray(group), shape)).T  # [members, axes]
        varying |= {names[i] for i in range(len(names)) if len(set(coords[:, i])) > 1}
    return tuple(a for a in names if a in varying)


def _multipliers(computations: dict[str, list[str]], entry: str) -> dict[str, int]:
    """How many times each computation runs per call of `entry` (loop bodies by trip count)."""
    calls: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for name, lines in computations.items():
        for line in lines:
            trip = _TRIP.search(line)
            is_loop = " while(" in line or line.lstrip().startswith("while(")
            for callee in _CALLEES.findall(line):
                calls[name].append((callee, int(trip.group(1)) if (trip and is_loop) else 1))
            for block in _BRANCHES.findall(line):
                calls[name] += [(b.strip().lstrip("%"), 1) for b in block.split(",") if b.strip()]
    times: dict[str, int] = defaultdict(int)

    def visit(name: str, n: int, depth: int = 0) -> None:
        if depth > 64:
            raise ValueError("HLO call graph deeper than 64: not a compiled program?")
        times[name] += n
        for callee, k in calls.get(name, ()):
            visit(callee, n * k, depth + 1)

    visit(entry, 1)
    return times


def collectives(hlo_text: str, mesh_shape: dict[str, int]) -> list[Collective]:
    """Every collective of a compiled SPMD program, summed by (kind, mesh axes).

    hlo_text: `compiled.as_text()`; mesh_shape: the mesh's axis sizes in
    order (`dict(mesh.shape)`), whose product is the partition count.
    XLA:CPU does not fuse an all-reduce and the dynamic-slice that keeps each
    device's part of its result into a reduce-scatter, as the GPU and TPU
    compilers do; such an all-reduce (each tuple element on its own) is
    counted as the reduce-scatter it becomes there.
    """
    computations, entry = _computations(hlo_text)
    times = _multipliers(computations, entry)
    parsed = {name: [i for i in map(_parse, lines) if i is not None] for name, lines in computations.items()}
    shapes = {i.name: i.shape for instrs in parsed.values() for i in instrs}
    n_devices = math.prod(mesh_shape.values())
    found: dict[tuple[str, tuple[str, ...]], list[int]] = {}

    def add(kind, axes, runs, nbytes, size):
        entry_ = found.setdefault((kind, axes), [0, 0, size])
        entry_[0] += runs
        entry_[1] += runs * nbytes

    for name, instrs in parsed.items():
        runs = times.get(name, 0)
        if not runs:
            continue
        users = defaultdict(list)
        for i in instrs:
            for o in i.operands:
                users[o].append(i)
        for i in instrs:
            kind = i.op.removesuffix("-start")
            if kind not in KINDS or i.op.endswith("-done"):
                continue
            groups = replica_groups(i.line, n_devices)
            size, axes = max(len(g) for g in groups), group_axes(groups, mesh_shape)
            if kind == "all-reduce" and not i.op.endswith("-start"):
                parts = _ARRAY.findall(i.shape) if i.shape.startswith("(") else [None]
                by_kind = defaultdict(int)
                for index, part in enumerate(parts):
                    nbytes = shape_bytes(i.shape) if part is None else shape_bytes(f"{part[0]}[{part[1]}]")
                    sliced = _only_sliced(i.name, None if part is None else index, users, computations)
                    by_kind["reduce-scatter" if sliced else "all-reduce"] += nbytes
                for kind, nbytes in by_kind.items():  # one run per kind it holds
                    add(kind, axes, runs, nbytes, size)
                continue
            add(kind, axes, runs, _buffer_bytes(kind, i, shapes, size), size)
    order = {k: n for n, k in enumerate(KINDS)}
    return [Collective(kind, axes, count, nbytes, size)
            for (kind, axes), (count, nbytes, size) in sorted(found.items(), key=lambda kv: order[kv[0][0]])]


@dataclasses.dataclass(frozen=True)
class _Instruction:
    name: str
    shape: str
    op: str
    operands: tuple[str, ...]
    line: str

    @property
    def index(self) -> int | None:
        m = re.search(r"\bindex=(\d+)", self.line)
        return int(m.group(1)) if m else None


def _parse(line: str) -> _Instruction | None:
    m = _INSTRUCTION.match(line)
    if m is None:
        return None
    operands = tuple(re.findall(r"%([\w.\-]+)", _operand_text(m.group(4))))
    return _Instruction(m.group(1), m.group(2), m.group(3), operands, line)


def _operand_text(rest: str) -> str:
    """The operand list of an instruction: `rest` up to its closing parenthesis."""
    depth = 1
    for n, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return rest[:n]
    return rest


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m is not None and "=" not in line.split("(")[0]:
            current = m.group(2)
            computations[current] = []
            if m.group(1):
                entry = current
            continue
        if current is not None:
            computations[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text: pass compiled.as_text()")
    return computations, entry


_PASS_THROUGH = ("bitcast", "copy", "reshape")


def _only_sliced(name: str, index: int | None, users, computations, depth: int = 0) -> bool:
    """Whether a value (element `index` of a tuple) is read only by dynamic slices, directly
    or inside fusions: each device keeps its part, so the all-reduce is a reduce-scatter."""
    readers = users.get(name, [])
    if not readers or depth > 8:
        return False
    for user in readers:
        if user.op == "get-tuple-element":
            if index is not None and user.index != index:
                continue
            if not _only_sliced(user.name, None, users, computations, depth + 1):
                return False
        elif index is not None:
            return False  # the whole tuple goes somewhere else
        elif user.op in _PASS_THROUGH:
            if not _only_sliced(user.name, None, users, computations, depth + 1):
                return False
        elif user.op == "dynamic-slice":
            continue
        elif user.op == "fusion":
            called = re.search(r"calls=%([\w.\-]+)", user.line)
            body = computations.get(called.group(1), []) if called else []
            if not any(" dynamic-slice(" in line for line in body):
                return False
        else:
            return False
    return True


def _buffer_bytes(kind: str, instr: _Instruction, shapes: dict[str, str], group: int) -> int:
    """The per-device buffer of one collective (module docstring)."""
    in_bytes = sum(shape_bytes(shapes.get(o, "")) for o in instr.operands)
    out_bytes = shape_bytes(instr.shape)
    if instr.op.endswith("-start"):  # async: the output tuple holds (operands..., results...)
        out_bytes = max(out_bytes - in_bytes, 0) if kind != "all-reduce" else in_bytes
    if kind == "reduce-scatter":
        return in_bytes or out_bytes * group
    return in_bytes if kind == "all-reduce" else out_bytes


# --- the kernels of a compiled program ---------------------------------------------------

# Ops that launch no kernel of their own: bookkeeping, control flow, aliasing.
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
         "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain",
         "copy-done", "all-gather-done", "all-reduce-done", "collective-permute-done", "send-done",
         "recv-done", "async-done", "async-update"}
_EXECUTED = re.compile(r"\b(?:body|condition|true_computation|false_computation)=%([\w.\-]+)")


def _executed(computations: dict[str, list[str]], entry: str, times: dict[str, int]) -> dict[str, int]:
    """The computations whose instructions run as kernels (the entry, loop bodies and
    conditions, branches, called computations), with their run counts: not fusion
    bodies nor reducers."""
    out, todo = {}, [entry]
    while todo:
        name = todo.pop()
        if name in out or name not in computations:
            continue
        out[name] = times.get(name, 0)
        for line in computations[name]:
            todo += _EXECUTED.findall(line)
            for block in _BRANCHES.findall(line):
                todo += [b.strip().lstrip("%") for b in block.split(",") if b.strip()]
            if " call(" in line:
                todo += re.findall(r"\bto_apply=%([\w.\-]+)", line)
    return out


@dataclasses.dataclass(frozen=True)
class Kernels:
    """What a compiled program launches per call: kernels (fusions, custom calls and every
    other op that is not bookkeeping, each loop body's as often as it runs); the custom
    calls by target (cuDNN, cuBLAS, Mosaic...) and the fusions by emitter."""

    launches: int
    fusions: int
    fusion_kinds: dict[str, int]  # XLA:GPU's emitters ("__triton_nested_gemm_fusion"...), else kLoop...
    custom_calls: dict[str, int]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def kernels(hlo_text: str) -> Kernels:
    """The kernels a compiled program launches (`compiled.as_text()`)."""
    computations, entry = _computations(hlo_text)
    times = _multipliers(computations, entry)
    launches = fusions = 0
    custom: dict[str, int] = defaultdict(int)
    kinds: dict[str, int] = defaultdict(int)
    for name, runs in _executed(computations, entry, times).items():
        for i in filter(None, map(_parse, computations[name])):
            if i.op in _FREE:
                continue
            launches += runs
            if i.op == "fusion":
                fusions += runs
                kind = re.search(r'"kind":"([^"]+)"', i.line) or re.search(r"\bkind=(k\w+)", i.line)
                kinds[kind.group(1) if kind else "?"] += runs
            elif i.op == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', i.line)
                custom[target.group(1) if target else "?"] += runs
    return Kernels(launches, fusions, dict(sorted(kinds.items())), dict(sorted(custom.items())))

"""Compiled shard plans (`starcoder-jax shard-plan --compile`): one step of the library,
compiled for a mesh and never run: for a chip (`target_name`) by that chip's own
compiler on its compile-only devices (parallel.chips: libtpu for TPU slices,
XLA:GPU for NVIDIA GPUs), else by XLA:CPU on fake CPU devices.

`compiled_plan(model, mesh, step=...)` lowers the very function a run
executes (training: `step.make_train_step` as `finetune` builds it, through
training.memory.lower_train_step; prefill / decode: the Generator's jitted
`prefill` and `decode_loop`, re-jitted for the mesh by
inference.runner.MeshRunner), on `jax.ShapeDtypeStruct`s that carry the
shardings a run gives its arrays, and reads per device:
- XLA's memory analysis: arguments, outputs, aliased (donated inputs
  written over), temporaries, and peak = arguments + outputs - aliased +
  temporaries; beside them the bytes a device holds of the params, of the
  trained params' gradients and of their AdamW moments, from the shards'
  shapes;
- XLA's cost analysis: FLOPs and bytes accessed (XLA:GPU has none: the
  model's FLOPs per chip, and the arguments read and outputs written once);
- every collective of the partitioned program (parallel.hlo), with its
  mesh axes; the kernels it launches (fusions, custom calls: Mosaic,
  cuDNN, Triton) and the attention forms it runs;
- with a target (parallel.targets), a roofline estimate of the step time
  and whether the peak fits in HBM.

`layers=N` compiles N and N + 1 layers and extends each figure linearly to
the preset's depth: f(L) = f(N) + (L - N) (f(N + 1) - f(N)). The first
layer's figures differ from the others' (buffers it shares with the
embedding and the loss), so N >= 2. A training step's peak is a phase
whose size does not grow with depth (the LM head and the loss) until the
layers' gradients and kept inputs outgrow it; when one more layer adds
less to the temporaries than its gradients and kept input, both depths are
still below that point and N doubles; when the next pair of depths would
cost more than half as much to compile as the whole model, the whole model
is compiled instead (the figures say which depths were compiled). Checked
against whole compiles in docs/sharding.md.

A mesh needs that many devices. On a CPU host `compiled_plans` runs the
compiles in subprocesses with `--xla_force_host_platform_device_count` set
when this process has too few, one per CPU core (a compile keeps about one
core busy). On a chip the attention and matmul forms are what `auto` picks
for it (splash on a TPU, cuDNN on a GPU: ops.backend follows the mesh's
devices); on fake CPU devices they are "chunked" and "xla": what an
accelerator runs, in forms XLA:CPU compiles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from starcoder_jax.config import StarCoderConfig
from starcoder_jax.model.lora import LoRAConfig
from starcoder_jax.model.modules import Quantized
from starcoder_jax.model.plan import model_config
from starcoder_jax.parallel.hlo import collectives as hlo_collectives
from starcoder_jax.parallel.hlo import kernels as hlo_kernels
from starcoder_jax.parallel.mesh import abstract_on_mesh, mesh_from_spec, parse_mesh_spec
from starcoder_jax.parallel.rules import mesh_sizes
from starcoder_jax.parallel.targets import estimate, target
from starcoder_jax.training.losses import LOSS_CHUNK
from starcoder_jax.training.memory import abstract_training_model, device_bytes, lower_train_step, with_shardings

STEPS = ("train", "prefill", "decode")
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")
WEIGHTS = nnx.Any(nnx.Param, Quantized)  # float and quantized weights, adapters included (not derived copies)
_SCALED = ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "flops", "bytes_accessed")


@dataclasses.dataclass
class CompiledPlan:
    """One step on one mesh, per device, for the model's full depth (see the module docstring)."""

    model: str
    mesh: dict[str, int]
    devices: int
    step: str
    batch: int
    seq_len: int
    layers: int  # the depth the figures are for
    compiled_layers: list[int]  # the depths compiled: [L] or [N, N + 1] when scaled
    remat: str
    lora_rank: int | None
    quantize: str | None
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    flops: float
    bytes_accessed: float
    params_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    kv_cache_bytes: int
    collectives: list[dict]
    hlo_fingerprint: str  # sha256 of the compiled program (the deepest one compiled)
    output_shardings: list[str]  # of the deepest program compiled, one PartitionSpec per output leaf
    compiler: dict  # platform, device_kind, compiler (and version), topology
    kernels: dict  # parallel.hlo.Kernels of the deepest program compiled
    attention_forms: list[str]  # the attention forms the program runs (ops.attention's scopes)
    flops_source: str  # "cost analysis" (XLA:CPU's), or "model" on a chip: model_flops per chip
    compiler_flops: float | None = None  # a chip compiler's own cost analysis (libtpu; XLA:GPU has none)
    estimate: dict | None = None

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def mesh_spec(self) -> str:
        return ",".join(f"{a}={s}" for a, s in self.mesh.items())

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(mesh=self.mesh_spec, mesh_sizes=self.mesh, peak_bytes=self.peak_bytes)
        if self.estimate is not None:
            out["estimated_step_s"] = self.estimate["estimated_step_s"]
        return out


def lora_config(rank: int | None) -> LoRAConfig | None:
    return None if rank is None else LoRAConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS)


def _compile_config(config: StarCoderConfig, attention_impl: str | None, on_chip: bool) -> StarCoderConfig:
    """On a chip the attention form `auto` picks for it (ops.backend follows the mesh's
    devices); on fake CPU devices what an accelerator runs, in a form XLA:CPU compiles.
    The matmul form is "xla", what `auto` picks under any mesh, named here because the
    abstract model is built, and its quantized weights laid out, before the mesh is set."""
    return config.replace(attention_impl=attention_impl or ("auto" if on_chip else "chunked"), matmul_impl="xla")


def compile_step(config: StarCoderConfig, mesh, *, step: str = "train", batch: int = 1, seq_len: int | None = None,
                 remat: str = "full", lora_rank: int | None = None, quantize: str | None = None,
                 loss_chunk: int | None = LOSS_CHUNK, max_new_tokens: int = 1):
    """(jax.stages.Compiled, analytic bytes per device) of one step of `config` on `mesh` (a Mesh,
    a spec, or None for one device), exactly as fine-tuning or generation would run it."""
    if step not in STEPS:
        raise ValueError(f"step must be one of {', '.join(STEPS)}, got {step!r}")
    if quantize is not None and step == "train" and lora_rank is None:
        raise ValueError(f"a {quantize} base trains only LoRA adapters: give a LoRA rank with quantize")
    mesh = mesh_from_spec(mesh) if isinstance(mesh, str) else mesh
    seq_len = config.n_positions if seq_len is None else seq_len
    if step == "train":
        lowered = lower_train_step(config, batch=batch, seq_len=seq_len, remat=remat, loss_chunk=loss_chunk,
                                   mesh=mesh, lora=lora_config(lora_rank), quantize=quantize)
        frozen = nnx.filter_state(lowered.rest, WEIGHTS)
        trained = device_bytes(lowered.params)
        analytic = {"params_bytes": trained + device_bytes(frozen), "gradients_bytes": trained,
                    "optimizer_bytes": device_bytes(lowered.opt_state), "kv_cache_bytes": 0}
        return lowered.lowered.compile(), analytic
    return _compile_generation(config, mesh, step=step, batch=batch, seq_len=seq_len, lora_rank=lora_rank,
                               quantize=quantize, max_new_tokens=max_new_tokens)


def _compile_generation(config, mesh, *, step, batch, seq_len, lora_rank, quantize, max_new_tokens):
    from starcoder_jax.inference.generate import DecodeConsts, decode_loop, prefill
    from starcoder_jax.inference.runner import MeshRunner
    from starcoder_jax.model.kv_cache import KVCache

    model = abstract_training_model(config, remat="none", lora=lora_config(lora_rank), quantize=quantize)
    graphdef, params = nnx.split(model)
    runner = None if mesh is None else MeshRunner(config, params, mesh)
    cache_len = seq_len + (max_new_tokens if step == "decode" else 0)
    if cache_len > config.n_positions:
        raise ValueError(f"seq_len {seq_len} + {max_new_tokens} new tokens exceed the model's "
                         f"{config.n_positions} positions")
    if runner is not None:
        batch = runner.round_batch(batch)
        params = abstract_on_mesh(params, runner.mesh)
    cache = jax.eval_shape(lambda: KVCache.init(config, batch, cache_len))
    if runner is not None:
        cache = with_shardings(cache, cache.shardings(runner.cache))
    consts = DecodeConsts.make(batch, max_new_tokens, config.vocab_size)
    args = dict(ids=_sds((batch, seq_len), jnp.int32, runner), lengths=_sds((batch,), jnp.int32, runner),
                cache=cache, consts=consts, out_len_like=_sds((max_new_tokens,), jnp.int8, runner),
                active=_sds((batch,), jnp.bool_, runner))

    def lower(fn, donate, *a, **k):
        if runner is None:
            return fn.lower(graphdef, *a, **k)
        return runner.lower(fn, donate, graphdef, *a, **k)

    if step == "prefill":
        lowered = lower(prefill, ("cache",), params, **args)
    else:
        state = jax.eval_shape(lambda p, kw: prefill(graphdef, p, **kw), params, args)
        if runner is not None:
            state = with_shardings(state, runner.out_shardings(state))
        lowered = lower(decode_loop, ("state",), params, state, jnp.int32(1), consts)
    analytic = {"params_bytes": device_bytes(params), "gradients_bytes": 0, "optimizer_bytes": 0,
                "kv_cache_bytes": device_bytes(cache)}
    return lowered.compile(), analytic


def _sds(shape, dtype, runner) -> jax.ShapeDtypeStruct:
    sharding = None if runner is None else NamedSharding(runner.mesh, PartitionSpec())
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def fingerprint(compiled) -> str:
    """sha256 of a compiled program's HLO text without its source metadata (the Python stack
    that traced each op): equal for equal programs, wherever they were built from."""
    lines = compiled.as_text().splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(r"^(ENTRY\s+)?%\S+ .*\{\s*$", line)), 1)
    program = re.sub(r",?\s*metadata=\{[^{}]*\}", "", "\n".join(lines[:1] + lines[start:]))
    return hashlib.sha256(program.encode()).hexdigest()


def program_fingerprint(lowered) -> str:
    """sha256 of a lowered, not yet compiled, program (its StableHLO) without source
    locations: equal where two platforms' compilers are handed the same program."""
    text = re.sub(r"\s*loc\((?:[^()]|\([^()]*\))*\)", "", lowered.as_text())
    text = "\n".join(line for line in text.splitlines() if not line.startswith("#loc"))
    return hashlib.sha256(text.encode()).hexdigest()


def output_specs(compiled) -> list[str]:
    """The PartitionSpec of every output leaf of a compiled program, as text."""
    return [str(getattr(s, "spec", s)) for s in jax.tree.leaves(compiled.output_shardings)]


def _figures(compiled, mesh_shape: dict[str, int]) -> dict:
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    text = compiled.as_text()
    kernels = hlo_kernels(text)
    out = {"argument_bytes": memory.argument_size_in_bytes, "output_bytes": memory.output_size_in_bytes,
           "alias_bytes": memory.alias_size_in_bytes, "temp_bytes": memory.temp_size_in_bytes,
           "collectives": [c.to_dict() for c in hlo_collectives(text, mesh_shape)],
           "kernels": kernels.to_dict(), "attention_forms": attention_forms(text)}
    if cost:
        out.update(flops=float(cost.get("flops", 0.0)), bytes_accessed=float(cost.get("bytes accessed", 0.0)))
    else:  # XLA:GPU: no cost analysis; HBM traffic at least the arguments read and outputs written once
        out.update(flops=0.0, bytes_accessed=float(memory.argument_size_in_bytes + memory.output_size_in_bytes))
    return out


def model_flops(config: StarCoderConfig, step: str, batch: int, seq_len: int, *, frozen_base: bool = False) -> float:
    """Model FLOPs of one step (bench.train_flops_per_token's count: matmuls with the LM
    head, attention over the whole row, no recomputation): training 6 N + 12 L D T a
    token (4 N with a frozen base, LoRA: no weight gradients; the adapters' few FLOPs
    are left out), prefill 2 N + 4 L D T a prompt token, decode 2 N + 4 L D S for each
    row's one new token over a cache of S = seq_len positions."""
    from starcoder_jax.bench import train_flops_per_token

    attention = 12 * config.n_layer * config.n_embd * seq_len
    matmuls = train_flops_per_token(config, seq_len) - attention  # 6 N
    if step == "train":
        return float(batch * seq_len * (matmuls * (2 / 3 if frozen_base else 1) + attention))
    tokens = batch * (seq_len if step == "prefill" else 1)
    return float(tokens * (matmuls + attention) / 3)


def attention_forms(hlo_text: str) -> list[str]:
    """The attention forms a compiled program runs: ops.attention's `attention_<form>` scopes."""
    from starcoder_jax.ops.attention import FORMS

    found = set(re.findall(r"attention_([a-z_]+?)(?=[/\"\s])", hlo_text))
    return sorted(found & set(FORMS))


def _extend(a: dict, b: dict, steps: int) -> dict:
    """Figures of depth N (a) and N + 1 (b) extended by `steps` more layers."""
    out = {k: a[k] + steps * (b[k] - a[k]) for k in _SCALED}
    for k in _SCALED:
        out[k] = int(round(out[k])) if k.endswith("_bytes") else out[k]
    keyed = {}
    for which, figures in ((0, a), (1, b)):
        for c in figures["collectives"]:
            key = (c["kind"], tuple(c["mesh_axes"]))
            keyed.setdefault(key, [None, None])[which] = c
    merged = []
    for (kind, axes), (ca, cb) in keyed.items():
        zero = {"count": 0, "bytes": 0}
        ca, cb = ca or {**(cb), **zero}, cb or {**(ca), **zero}
        count = ca["count"] + steps * (cb["count"] - ca["count"])
        nbytes = ca["bytes"] + steps * (cb["bytes"] - ca["bytes"])
        if count > 0:
            merged.append({"kind": kind, "count": int(count), "bytes": int(nbytes), "mesh_axes": list(axes),
                           "group_size": cb["group_size"]})
    out["collectives"] = merged
    out["kernels"] = _extend_counts(a["kernels"], b["kernels"], steps)
    return out


def _extend_counts(a, b, steps: int):
    """Kernel counts (numbers and dicts of numbers) of depth N and N + 1 extended by `steps` layers."""
    if isinstance(a, dict) or isinstance(b, dict):
        a, b = a or {}, b or {}
        return {k: _extend_counts(a.get(k, 0), b.get(k, 0), steps) for k in sorted({*a, *b})}
    value = a + steps * (b - a)
    return int(round(value)) if isinstance(a, int) and isinstance(b, int) else value


def compiled_plan(model: str | StarCoderConfig, mesh: str | None, *, step: str = "train", batch: int = 1,
                  seq_len: int | None = None, layers: int | None = None, remat: str = "full",
                  lora_rank: int | None = None, quantize: str | None = None, dtype: str = "bfloat16",
                  attention_impl: str | None = None, loss_chunk: int | None = LOSS_CHUNK,
                  target_name: str | None = None, compiler: str = "chip", topology: str | None = None,
                  gpus_per_node: int | None = None, dump_hlo: str | None = None,
                  progress: bool = False) -> CompiledPlan:
    """The compiled plan of one step on one mesh in this process (it must have the devices).

    model: a preset name, a model directory or a StarCoderConfig; mesh: a spec
    ("fsdp=8") or None for one device; step: train, prefill or decode;
    seq_len: tokens per sequence (train), prompt length (prefill), cache
    length (decode); layers: compile N and N + 1 layers and extend to the
    model's depth (None: compile it whole); dtype: the compute dtype (params
    stay float32 in training, as fine-tuning keeps them; generation holds
    them in this dtype); lora_rank / quantize: LoRA adapters on c_attn,
    c_proj and c_fc over a quantized (config.QUANTIZATION_MODES) or float base; target_name: a chip
    (parallel.targets, or a TPU slice name: parallel.chips): a roofline
    estimate and whether the peak fits its HBM; compiler: "chip" compiles
    for the target's own compile-only devices with its own compiler
    (topology: a TPU slice's; gpus_per_node: GPUs a node), "cpu" on this
    process's CPU devices (the fake-device plan); dump_hlo: a folder to write
    the optimized HLO of the (deepest) program compiled into; progress: a
    line on stderr as each compile ends.
    """
    if compiler not in ("chip", "cpu"):
        raise ValueError(f"compiler must be 'chip' or 'cpu', got {compiler!r}")
    on_chip = compiler == "chip" and target_name is not None
    if target_name is not None:
        from starcoder_jax.parallel.chips import parse

        chip, topology = parse(target_name, topology)  # a slice name ("v5p-64") names its chip and shape
        target_name = chip.name
    name, config = model_config(model)
    config = _compile_config(config, attention_impl, on_chip)
    config = config.replace(dtype=dtype, param_dtype="float32" if step == "train" else dtype)
    seq_len = config.n_positions if seq_len is None else seq_len
    devices = 1 if mesh is None else _mesh_devices(mesh)
    if on_chip:
        from starcoder_jax.parallel.chips import chips

        found = chips(target_name, devices, topology=topology, per_node=gpus_per_node)
        mesh_obj = mesh_from_spec(mesh or "data=1", found.devices)
        about = found.compiler()
    else:
        mesh_obj = None if mesh is None else mesh_from_spec(mesh, jax.devices()[:devices])
        here = jax.devices()[0]
        about = {"platform": here.platform, "device_kind": here.device_kind, "jax": jax.__version__,
                 "compiler": f"XLA:{here.platform.upper()} (jaxlib {importlib.metadata.version('jaxlib')})",
                 "topology": f"{devices} {'fake ' if here.platform == 'cpu' else ''}devices"}
    shape = {"data": 1, "fsdp": 1, "tensor": 1} if mesh_obj is None else mesh_sizes(mesh_obj)
    kw = dict(step=step, batch=batch, seq_len=seq_len, remat=remat, lora_rank=lora_rank, quantize=quantize,
              loss_chunk=loss_chunk)
    depth = config.n_layer
    if layers is not None and not 2 <= layers:
        raise ValueError(f"layers must be >= 2 (the first layer's figures differ from the others'), got {layers}")
    label = f"{name} {'one device' if mesh is None else mesh}"
    whole = layers is None or layers >= depth
    n = layers
    while not whole:
        low, _ = compile_step(config.replace(n_layer=n), mesh_obj, **kw)
        compiled, _ = compile_step(config.replace(n_layer=n + 1), mesh_obj, **kw)
        if progress:
            _progress(f"{label}: compiled {n} and {n + 1} layers")
        a, b = _figures(low, shape), _figures(compiled, shape)
        # Below some depth the peak is a phase whose size does not depend on it (the
        # LM head and loss); past it every layer adds at least its gradients and its
        # saved input. A smaller step means both depths are still below: go deeper, or
        # compile the whole model once the next pair would cost over half as much.
        if b["temp_bytes"] - a["temp_bytes"] >= 0.9 * _layer_floor(config, mesh_obj, n, **kw):
            break
        n *= 2
        whole = 2 * (2 * n + 1) > depth
    if whole:
        compiled, analytic = compile_step(config, mesh_obj, **kw)
        if progress:
            _progress(f"{label}: compiled all {depth} layers")
        figures, compiled_layers = _figures(compiled, shape), [depth]
    else:
        figures = {**b, **_extend(a, b, depth - n)}
        compiled_layers = [n, n + 1]
        analytic = _analytic(config, mesh_obj, **kw)
    plan = CompiledPlan(
        model=name, mesh=shape, devices=devices, step=step, batch=batch, seq_len=seq_len, layers=depth,
        compiled_layers=compiled_layers, remat=remat if step == "train" else "none", lora_rank=lora_rank,
        quantize=quantize, **{k: figures[k] for k in _SCALED}, **analytic, collectives=figures["collectives"],
        hlo_fingerprint=fingerprint(compiled), output_shardings=output_specs(compiled), compiler=about,
        kernels=figures["kernels"], attention_forms=figures["attention_forms"],
        flops_source="model" if on_chip else "cost analysis")
    if on_chip:
        # The roofline takes model FLOPs on a chip: XLA:GPU has no cost analysis, and
        # libtpu's counted 41 and 61 TFLOP a chip for the same work per chip on a v5e-8
        # and a v5p-8 (docs/sharding.md), kept as compiler_flops.
        plan.compiler_flops = plan.flops or None
        plan.flops = model_flops(config, step, batch, seq_len, frozen_base=lora_rank is not None) / devices
    if dump_hlo is not None:
        os.makedirs(dump_hlo, exist_ok=True)
        where = about["device_kind"].replace(" ", "_") if on_chip else "cpu"
        path = os.path.join(dump_hlo, f"{name.replace('/', '_')}-{step}-{plan.mesh_spec.replace(',', '_')}-"
                                      f"{where}-{compiled_layers[-1]}layers.hlo.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(compiled.as_text())
    if target_name is not None:
        plan.estimate = estimate(flops=plan.flops, bytes_accessed=plan.bytes_accessed,
                                 collectives=plan.collectives, mesh=shape, t=target(target_name),
                                 peak_bytes=plan.peak_bytes)
    return plan


def _layer_floor(config: StarCoderConfig, mesh, n: int, *, step, batch, seq_len, remat, **kw) -> int:
    """Bytes per device one more layer adds to a training step's peak at least: its
    gradients and, under full remat, the block input it keeps ([b, T, D] in the compute
    dtype). 0 for generation, whose temporaries do not grow with depth."""
    if step != "train":
        return 0
    grads = [_analytic(config.replace(n_layer=k), mesh, step=step, batch=batch, seq_len=seq_len, **kw)
             ["gradients_bytes"] for k in (n, n + 1)]
    rows = batch if mesh is None else -(-batch // (mesh.shape["data"] * mesh.shape["fsdp"]))
    kept = rows * seq_len * config.n_embd * jnp.dtype(config.dtype).itemsize if remat == "full" else 0
    return grads[1] - grads[0] + kept


def _analytic(config: StarCoderConfig, mesh, *, step, batch, seq_len, lora_rank, quantize, max_new_tokens=1,
              **_) -> dict:
    """The analytic bytes per device at full depth, from the abstract model (no compile)."""
    from starcoder_jax.model.kv_cache import KVCache, cache_sharding
    from starcoder_jax.training.step import trainable_filter

    model = abstract_training_model(config, remat="none", lora=lora_config(lora_rank), quantize=quantize)
    state = nnx.state(model)
    if mesh is not None:
        state = abstract_on_mesh(state, mesh)
    if step != "train":
        cache_len = seq_len + (max_new_tokens if step == "decode" else 0)
        cache = jax.eval_shape(lambda: KVCache.init(config, batch, cache_len))
        if mesh is not None:
            cache = with_shardings(cache, cache.shardings(cache_sharding(config, mesh)))
        return {"params_bytes": device_bytes(state), "gradients_bytes": 0, "optimizer_bytes": 0,
                "kv_cache_bytes": device_bytes(cache)}
    trained = nnx.filter_state(state, trainable_filter(lora=lora_rank is not None))
    # AdamW: mu and nu in the trained params' dtype (float32); its step count is negligible
    return {"params_bytes": device_bytes(nnx.filter_state(state, WEIGHTS)), "gradients_bytes": device_bytes(trained),
            "optimizer_bytes": 2 * device_bytes(trained), "kv_cache_bytes": 0}


def _mesh_devices(spec: str) -> int:
    """Devices a spec names (no -1 axis: a compiled plan has no machine to fill)."""
    sizes = parse_mesh_spec(spec, 1 << 20)
    if any(part.split("=")[1].strip() == "-1" for part in spec.split(",")):
        raise ValueError(f"mesh spec {spec!r}: give every axis a size (-1 needs a device count)")
    n = 1
    for s in sizes.values():
        n *= s
    return n


def compiled_plans(model: str, meshes: list[str | None], *, jobs: int | None = None, progress: bool = False,
                   **kwargs) -> list[dict]:
    """`compiled_plan(model, mesh, **kwargs).to_dict()` for each mesh, sorted by estimated
    time when a target is given.

    The compiles run in subprocesses with enough fake CPU devices when this process has
    too few (or has a non-CPU backend), or when jobs > 1: `jobs` processes (default:
    one per CPU core, at most one per mesh) each compile a share of the meshes, since an
    XLA:CPU compile keeps about one core busy. progress: print a line to stderr as each
    compile ends."""
    need = max(1 if m is None else _mesh_devices(m) for m in meshes)
    if jobs is not None and jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    jobs = min(len(meshes), (os.cpu_count() or 1) if jobs is None else jobs)
    kwargs["progress"] = progress
    if kwargs.get("target_name") and kwargs.get("compiler", "chip") == "chip":
        from starcoder_jax.parallel.chips import chips

        chips(kwargs["target_name"], need, topology=kwargs.get("topology"),
              per_node=kwargs.get("gpus_per_node"))  # a missing extra or a bad target: said here, once
        need = 0  # the chip's own compile-only devices: no fake CPU devices in any process
    here = jax.devices()
    if jobs == 1 and len(here) >= need and here[0].platform == "cpu":
        plans = [compiled_plan(model, m, **kwargs).to_dict() for m in meshes]
    else:
        plans = _in_subprocesses(model, meshes, need, kwargs, jobs)
    if kwargs.get("target_name"):
        plans.sort(key=lambda p: p["estimated_step_s"])
    return plans


def _progress(line: str) -> None:
    print(f"shard-plan: {line}", file=sys.stderr, flush=True)


def _in_subprocesses(model, meshes, devices: int, kwargs, jobs: int) -> list[dict]:
    """compiled_plan for each mesh, in `jobs` processes with `devices` fake CPU devices each
    (mesh i in process i % jobs); the plans in the order of `meshes`."""
    import threading

    if isinstance(model, StarCoderConfig):
        model = {"config": model.to_hf(), "runtime": {k: getattr(model, k) for k in ("dtype", "param_dtype")}}
    # The programs are compiled, never run: LLVM's optimizations (about a fifth of the
    # compile time) change neither the HLO nor its memory analysis. devices 0: a chip's
    # compile-only devices (parallel.chips), with no fake CPU devices.
    flags = f" --xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + (flags if devices else ""))
    shares = [list(range(j, len(meshes), jobs)) for j in range(jobs)]
    procs, logs = [], []
    for share in shares:
        request = json.dumps({"model": model, "meshes": [meshes[i] for i in share], "kwargs": kwargs})
        proc = subprocess.Popen([sys.executable, "-m", "starcoder_jax.compiled"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        proc.stdin.write(request)
        proc.stdin.close()
        log: list[str] = []

        def relay(stream=proc.stderr, log=log):  # progress lines through, the rest kept for errors
            for line in stream:
                if line.startswith("shard-plan: "):
                    print(line, end="", file=sys.stderr, flush=True)
                else:
                    log.append(line)

        thread = threading.Thread(target=relay, daemon=True)
        thread.start()
        procs.append((proc, thread))
        logs.append(log)
    plans: list[dict | None] = [None] * len(meshes)
    failed = None
    for (proc, thread), share, log in zip(procs, shares, logs):
        out = proc.stdout.read()
        proc.wait()
        thread.join()
        if proc.returncode != 0:
            last = "".join(log).strip().splitlines()[-1:] or ["(no output)"]
            where = f"{devices} fake devices" if devices else kwargs["target_name"]
            failed = failed or (f"the compile on {where} failed: {last[0]}\n"
                                f"{''.join(log)[-4000:]}")
            continue
        for i, plan in zip(share, json.loads(out.strip().splitlines()[-1])):
            plans[i] = plan
    if failed:
        raise RuntimeError(failed)
    return plans


def _main() -> None:
    request = json.loads(sys.stdin.read())
    model = request["model"]
    if isinstance(model, dict):
        model = StarCoderConfig.from_hf(model["config"]).replace(**model["runtime"])
    plans = [compiled_plan(model, m, **request["kwargs"]).to_dict() for m in request["meshes"]]
    print(json.dumps(plans))


if __name__ == "__main__":
    _main()

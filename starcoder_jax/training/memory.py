"""Device memory of the real train step, from XLA's compiler: compiled on
abstract shapes, never run, no full-size weights allocated.

`train_step_memory(config, batch=, seq_len=, remat=, loss_chunk=, mesh=, lora=,
quantize=)` builds the abstract model (`nnx.eval_shape`; a quantized base and
LoRA adapters when asked), its AdamW state (`jax.eval_shape`) and the batch
as `jax.ShapeDtypeStruct`s, lowers and compiles `step.make_train_step` (the
step fine-tuning runs: forward, backward, clipping, AdamW, donated params
and optimizer state; `lower_train_step`) and reads
`compiled.memory_analysis()`, per device:

  peak = arguments + outputs - aliased (donated inputs reused as outputs) + temporaries

next to the bytes each device holds of the params, of the gradients of the
trained ones and of their AdamW moments (from the shards' shapes). Under a mesh the compile needs that
many devices; on a CPU host, fake ones do
(XLA_FLAGS=--xla_force_host_platform_device_count=8, set before JAX starts),
and the CPU compiler's analysis then stands in for the accelerator's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from starcoder_jax.config import StarCoderConfig
from starcoder_jax.model.lora import LoRAConfig, add_lora
from starcoder_jax.model.modules import Quantized, StarCoder, check_remat
from starcoder_jax.parallel.mesh import map_placed, mesh_from_spec, parse_mesh_spec
from starcoder_jax.parallel.rules import mesh_sizes
from starcoder_jax.training.config import OptimConfig
from starcoder_jax.training.losses import LOSS_CHUNK, check_loss_chunk
from starcoder_jax.training.state import step_shardings
from starcoder_jax.training.step import make_optimizer, make_train_step, trainable_filter

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class TrainStepMemory:
    """Bytes per device of one compiled train step (XLA's memory analysis), and the
    analytic bytes of its params, gradients and AdamW state (parallel.plan)."""

    argument_bytes: int  # params, optimizer state, batch
    output_bytes: int  # new params, new optimizer state, metrics
    alias_bytes: int  # outputs written over donated arguments
    temp_bytes: int  # everything else live at some point: activations, gradients, logits
    generated_code_bytes: int
    params_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    batch: int
    seq_len: int
    grad_accum: int
    remat: str
    loss_chunk: int | None
    mesh: dict[str, int] | None  # axis sizes, None: one device
    param_count: int

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "peak_bytes": self.peak_bytes}

    def table(self) -> str:
        rows = [("arguments", self.argument_bytes), ("outputs", self.output_bytes),
                ("aliased", -self.alias_bytes), ("temporaries", self.temp_bytes),
                ("peak", self.peak_bytes), (None, None),
                ("params", self.params_bytes), ("gradients", self.gradients_bytes),
                ("AdamW moments", self.optimizer_bytes),
                ("sum of those", self.params_bytes + self.gradients_bytes + self.optimizer_bytes)]
        lines = [f"{'per device':<22}{'bytes':>18}{'GiB':>10}", "-- XLA memory analysis " + "-" * 27]
        for label, value in rows:
            if label is None:
                lines.append("-- analytic " + "-" * 38)
                continue
            lines.append(f"{label:<22}{value:>18,}{value / GIB:>10.3f}")
        return "\n".join(lines)


def abstract_training_model(config: StarCoderConfig, *, remat: str | bool = "full", lora: LoRAConfig | None = None,
                            quantize: str | None = None) -> StarCoder:
    """The model a run trains, with ShapeDtypeStructs for arrays: `quantize` (int8, int4,
    nf4) quantizes its base (model.quantize_), `lora` adds adapters (model.lora.add_lora), as
    training.state.with_lora does."""
    def build():
        model = StarCoder(config, rngs=nnx.Rngs(params=0))
        if quantize is not None:
            model.quantize_(quantize)
        return model if lora is None else add_lora(model, lora)

    model = nnx.eval_shape(build)
    model.remat = check_remat(remat)
    return model


@dataclasses.dataclass
class LoweredTrainStep:
    """The train step of fine-tuning lowered on abstract inputs (nothing allocated)."""

    lowered: jax.stages.Lowered
    params: nnx.State  # the trained variables (ShapeDtypeStructs, with shardings under a mesh)
    rest: nnx.State  # everything else: the frozen base, derived arrays
    opt_state: object
    mesh: jax.sharding.Mesh | None


def lower_train_step(config: StarCoderConfig, *, batch: int = 1, seq_len: int | None = None,
                     remat: str | bool = "full", loss_chunk: int | None = LOSS_CHUNK, grad_accum: int = 1,
                     mesh: str | jax.sharding.Mesh | None = None, optim: OptimConfig | None = None,
                     lora: LoRAConfig | None = None, quantize: str | None = None, steps: int = 1000,
                     seed: int = 0, skip_nonfinite: bool = False) -> LoweredTrainStep:
    """`step.make_train_step` as fine-tuning builds it (training.state.prepare), lowered for
    abstract params, AdamW state and batch; arguments as train_step_memory's, and those of a
    run's that its program depends on: steps (train.steps: the learning-rate schedule),
    seed (train.seed) and skip_nonfinite (train.nan_policy == "skip")."""
    seq_len = config.n_positions if seq_len is None else seq_len
    if not 1 <= seq_len <= config.n_positions:
        raise ValueError(f"seq_len is {seq_len} but the model holds {config.n_positions} positions")
    if batch < 1 or grad_accum < 1 or batch % grad_accum:
        raise ValueError(f"batch {batch} must be a positive multiple of grad_accum {grad_accum}")
    loss_chunk = check_loss_chunk(loss_chunk)
    mesh = _mesh(mesh)
    model = abstract_training_model(config, remat=remat, lora=lora, quantize=quantize)
    graphdef, params, rest = nnx.split(model, trainable_filter(lora=lora is not None), ...)
    tx, _ = make_optimizer(optim or OptimConfig(), steps)
    opt_state = jax.eval_shape(tx.init, params)
    out_shardings, ids, mask = None, None, None
    shape = (grad_accum, batch // grad_accum, seq_len + 1)
    ids, mask = jax.ShapeDtypeStruct(shape, jnp.int32), jax.ShapeDtypeStruct(shape, jnp.bool_)
    if mesh is not None:  # exactly where a run puts them (training.state.Placement)
        shardings = step_shardings(tx, params, rest, opt_state, mesh)
        out_shardings = shardings.out
        params, rest = with_shardings(params, shardings.params), with_shardings(rest, shardings.rest)
        opt_state = with_shardings(opt_state, shardings.opt_state)
        ids, mask = (with_shardings(x, shardings.batch()) for x in (ids, mask))
    dropout = max(config.resid_pdrop, config.embd_pdrop, config.attn_pdrop, lora.lora_dropout if lora else 0) > 0
    step_fn = make_train_step(graphdef, tx, seed=seed, dropout=dropout, skip_nonfinite=skip_nonfinite,
                              out_shardings=out_shardings, loss_chunk=loss_chunk)
    args = (params, opt_state, rest, ids, mask, jax.ShapeDtypeStruct((), jnp.int32))
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        lowered = step_fn.lower(*args)
    return LoweredTrainStep(lowered, params, rest, opt_state, mesh)


def train_step_memory(config: StarCoderConfig, *, batch: int = 1, seq_len: int | None = None,
                      remat: str | bool = "full", loss_chunk: int | None = LOSS_CHUNK, grad_accum: int = 1,
                      mesh: str | jax.sharding.Mesh | None = None, optim: OptimConfig | None = None,
                      lora: LoRAConfig | None = None, quantize: str | None = None) -> TrainStepMemory:
    """XLA's memory analysis of `make_train_step` for `config` (compiled, never run).

    batch: sequences per optimizer step (B), in grad_accum micro-batches;
    seq_len: tokens per sequence (T, default n_positions); remat: a name of
    model.modules.REMAT_POLICIES; loss_chunk: as train.loss_chunk (None: whole
    logits); mesh: a spec such as "fsdp=8" or a Mesh (None: one device);
    optim: the optimizer settings (AdamW's state is the same size whatever they are);
    lora: train these adapters only (a frozen base); quantize: a weight format
    for a quantized base (with lora). Without lora every parameter is trained.
    """
    if quantize is not None and lora is None:
        raise ValueError(f"a {quantize} base trains only LoRA adapters: give lora with quantize")
    step = lower_train_step(config, batch=batch, seq_len=seq_len, remat=remat, loss_chunk=loss_chunk,
                            grad_accum=grad_accum, mesh=mesh, optim=optim, lora=lora, quantize=quantize)
    analysis = step.lowered.compile().memory_analysis()
    frozen = nnx.filter_state(step.rest, nnx.Any(nnx.Param, Quantized))  # float or quantized weights
    trained = device_bytes(step.params)
    return TrainStepMemory(
        argument_bytes=analysis.argument_size_in_bytes, output_bytes=analysis.output_size_in_bytes,
        alias_bytes=analysis.alias_size_in_bytes, temp_bytes=analysis.temp_size_in_bytes,
        generated_code_bytes=analysis.generated_code_size_in_bytes,
        params_bytes=trained + device_bytes(frozen), gradients_bytes=trained,
        optimizer_bytes=device_bytes(step.opt_state),
        batch=batch, seq_len=config.n_positions if seq_len is None else seq_len, grad_accum=grad_accum,
        remat=check_remat(remat), loss_chunk=check_loss_chunk(loss_chunk),
        mesh=None if step.mesh is None else mesh_sizes(step.mesh), param_count=config.param_count())


def device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of arrays or ShapeDtypeStructs (its shard of each)."""
    total = 0
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def _mesh(mesh):
    """A Mesh from a spec, with an error that says how to get the devices it needs."""
    if mesh is None or isinstance(mesh, jax.sharding.Mesh):
        return mesh
    n = jax.device_count()
    try:
        parse_mesh_spec(mesh, n)
    except ValueError as err:
        if "devices but only" not in str(err):
            raise
        raise ValueError(
            f"{err}: XLA compiles a sharded step for real devices. On a CPU host, fake ones do: "
            f"set XLA_FLAGS=--xla_force_host_platform_device_count=N (N >= the mesh's devices) "
            "before JAX starts") from None
    return mesh_from_spec(mesh)


def with_shardings(tree, shardings):
    """The ShapeDtypeStructs of `tree`, each carrying its sharding from `shardings` (a prefix
    tree of it, as jit's out_shardings; one sharding: every leaf)."""
    return map_placed(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

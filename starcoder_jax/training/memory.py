"""Device memory of the real train step, from XLA's compiler: compiled on
abstract shapes, never run, no full-size weights allocated.

`train_step_memory(config, batch=, seq_len=, remat=, loss_chunk=, mesh=)`
builds the abstract model (`nnx.eval_shape`), its AdamW state
(`jax.eval_shape`) and the batch as `jax.ShapeDtypeStruct`s, lowers and
compiles `step.make_train_step` (the step fine-tuning runs: forward, backward,
clipping, AdamW, donated params and optimizer state) and reads
`compiled.memory_analysis()`, per device:

  peak = arguments + outputs - aliased (donated inputs reused as outputs) + temporaries

next to the analytic bytes of the params, their gradients and the AdamW
moments (parallel.plan.plan_bytes). Under a mesh the compile needs that
many devices; on a CPU host, fake ones do
(XLA_FLAGS=--xla_force_host_platform_device_count=8, set before JAX starts),
and the CPU compiler's analysis then stands in for the accelerator's.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from starcoder_jax.config import StarCoderConfig
from starcoder_jax.model.modules import abstract_model, check_remat
from starcoder_jax.parallel.mesh import mesh_from_spec, parse_mesh_spec, state_shardings
from starcoder_jax.parallel.mesh import param_shardings as param_shardings_by_path
from starcoder_jax.parallel.plan import plan_bytes
from starcoder_jax.parallel.rules import logical_spec, mesh_sizes
from starcoder_jax.training.config import OptimConfig
from starcoder_jax.training.losses import LOSS_CHUNK, check_loss_chunk
from starcoder_jax.training.step import make_optimizer, make_train_step

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


def _abstract_batch(shape, dtype, mesh) -> jax.ShapeDtypeStruct:
    """ids or mask [A, b, T + 1]: rows over data and fsdp under a mesh (as Placement.batch)."""
    sharding = None if mesh is None else NamedSharding(mesh, logical_spec((None, "batch", None), mesh))
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def train_step_memory(config: StarCoderConfig, *, batch: int = 1, seq_len: int | None = None,
                      remat: str | bool = "full", loss_chunk: int | None = LOSS_CHUNK, grad_accum: int = 1,
                      mesh: str | jax.sharding.Mesh | None = None,
                      optim: OptimConfig | None = None) -> TrainStepMemory:
    """XLA's memory analysis of `make_train_step` for `config` (compiled, never run).

    batch: sequences per optimizer step (B), in grad_accum micro-batches;
    seq_len: tokens per sequence (T, default n_positions); remat: a name of
    model.modules.REMAT_POLICIES; loss_chunk: as train.loss_chunk (None: whole
    logits); mesh: a spec such as "fsdp=8" or a Mesh (None: one device);
    optim: the optimizer settings (AdamW's state is the same size whatever they are).
    Every parameter is trained, as in full fine-tuning.
    """
    seq_len = config.n_positions if seq_len is None else seq_len
    if not 1 <= seq_len <= config.n_positions:
        raise ValueError(f"seq_len is {seq_len} but the model holds {config.n_positions} positions")
    if batch < 1 or grad_accum < 1 or batch % grad_accum:
        raise ValueError(f"batch {batch} must be a positive multiple of grad_accum {grad_accum}")
    remat, loss_chunk = check_remat(remat), check_loss_chunk(loss_chunk)
    mesh = _mesh(mesh)
    model = abstract_model(config)
    model.remat = remat
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx, _ = make_optimizer(optim or OptimConfig(), 1000)
    opt_state = jax.eval_shape(tx.init, params)
    out_shardings = None
    if mesh is not None:
        param_shardings = state_shardings(params, mesh)
        by_path = param_shardings_by_path(params, mesh)
        replicated = NamedSharding(mesh, PartitionSpec())
        # the moments follow their params (found by optax through the params' own
        # structure: variables holding shardings); the step counts live whole on every device
        as_params = nnx.map_state(lambda path, var: var.replace(by_path[path]), params)
        opt_shardings = optax.tree_utils.tree_map_params(
            tx, lambda _, s: s, opt_state, as_params, transform_non_params=lambda _: replicated)
        params = _with_shardings(params, as_params)
        opt_state = _with_shardings(opt_state, opt_shardings)
        out_shardings = (param_shardings, opt_shardings, replicated)
    dropout = max(config.resid_pdrop, config.embd_pdrop, config.attn_pdrop) > 0
    step_fn = make_train_step(graphdef, tx, seed=0, dropout=dropout, skip_nonfinite=False,
                              out_shardings=out_shardings, loss_chunk=loss_chunk)
    shape = (grad_accum, batch // grad_accum, seq_len + 1)
    args = (params, opt_state, rest, _abstract_batch(shape, jnp.int32, mesh), _abstract_batch(shape, jnp.bool_, mesh),
            jax.ShapeDtypeStruct((), jnp.int32))
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        analysis = step_fn.lower(*args).compile().memory_analysis()
    spec = "data=1" if mesh is None else ",".join(f"{a}={s}" for a, s in mesh_sizes(mesh).items())
    plan = plan_bytes("train step", config, nnx.state(model, nnx.Param), spec, batch=batch, seq=seq_len,
                      optimizer="adamw", devices=1 if mesh is None else mesh.size)["per_device"]
    return TrainStepMemory(
        argument_bytes=analysis.argument_size_in_bytes, output_bytes=analysis.output_size_in_bytes,
        alias_bytes=analysis.alias_size_in_bytes, temp_bytes=analysis.temp_size_in_bytes,
        generated_code_bytes=analysis.generated_code_size_in_bytes,
        params_bytes=plan["params"], gradients_bytes=plan["gradients"], optimizer_bytes=plan["optimizer"],
        batch=batch, seq_len=seq_len, grad_accum=grad_accum, remat=remat, loss_chunk=loss_chunk,
        mesh=None if mesh is None else mesh_sizes(mesh), param_count=config.param_count())


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


def _with_shardings(tree, shardings):
    """The ShapeDtypeStructs of `tree`, each carrying its sharding from `shardings` (same structure)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

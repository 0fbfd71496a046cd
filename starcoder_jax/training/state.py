"""What a fine-tuning run starts from: its data sources, the model on its mesh,
split into trainable params and the rest, the optimizer state, and the
checkpoint it resumes from.

A checkpoint holds the trainable params, their optimizer state and, when
some params are frozen, those too (so a run directory alone gives its
model); variables that are not nnx.Params (derived arrays) are rebuilt with
the model, never saved. A LoRA run (a `lora:` section) saves its adapters
and their optimizer state only: the frozen base is rebuilt from model.path
(or the seed), and its digest in the fingerprint refuses a resume on another.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from starcoder_jax.config import StarCoderConfig, preset
from starcoder_jax.model.modules import StarCoder, init_model
from starcoder_jax.tokenizer import Tokenizer, load_tokenizer
from starcoder_jax.training.checkpoint import Checkpoints, abstract_like
from starcoder_jax.training.config import FinetuneConfig, LoopConfig, ModelSection, parse_config
from starcoder_jax.training.data import (
    DataSource,
    DocumentTokens,
    PackedSequences,
    ParallelRows,
    collect_documents,
    eval_sequences,
    split_documents,
    tokenize_documents,
)
from starcoder_jax.training.step import make_eval_fn, make_optimizer, make_train_step, path_name, trainable_filter


class TrainingError(RuntimeError):
    """The run cannot go on (bad settings, a non-finite loss, a mismatched output dir)."""


# The model.config fields a model.path model takes: how this machine computes,
# not the model's shape (which its checkpoint fixes).
PATH_MODEL_FIELDS = ("attention_impl", "matmul_impl")


def build_model(cfg: FinetuneConfig, tokenizer: Tokenizer) -> StarCoder:
    """The model of `cfg.model` (loaded from model.path, else initialised with seed train.seed)."""
    m = cfg.model
    model = _load_path_model(m, lora=cfg.lora is not None) if m.path else _new_model(cfg, tokenizer)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary "
                         f"holds {model.config.vocab_size}")
    if cfg.data.seq_len > model.config.n_positions:
        raise ValueError(f"data.seq_len is {cfg.data.seq_len} but the model holds "
                         f"{model.config.n_positions} positions")
    model.remat = m.remat
    return with_lora(model, cfg)


def with_lora(model: StarCoder, cfg: FinetuneConfig) -> StarCoder:
    """The model with model.quantize applied and cfg.lora's new adapters (seed
    train.seed; none without a lora section), in place."""
    if cfg.model.quantize is not None:
        model.quantize_(cfg.model.quantize)
    if cfg.lora is None:
        return model
    from starcoder_jax.model.lora import add_lora

    return add_lora(model, lora_config(cfg), seed=cfg.train.seed)


def lora_config(cfg: FinetuneConfig):
    """The model.lora.LoRAConfig of cfg.lora (PEFT's names)."""
    from starcoder_jax.model.lora import LoRAConfig

    lo = cfg.lora
    return LoRAConfig(r=lo.rank, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=lo.target_modules,
                      use_rslora=lo.use_rslora, rank_pattern=lo.rank_pattern, alpha_pattern=lo.alpha_pattern,
                      base_model_name_or_path=cfg.model.path)


def base_digest(model: StarCoder) -> str:
    """A digest of the frozen base of a LoRA model: sha256 over every variable but
    the adapters (quantized weights in their stored layout), each by path, shape, dtype
    and the values of up to 4096 evenly spaced elements. Cheap for any size, and a
    different checkpoint differs in nearly every element."""
    from starcoder_jax.model.weights import stored_state

    state = nnx.filter_state(stored_state(model), nnx.Not(nnx.LoRAParam))
    named = [(path_name(p), leaf) for p, var in nnx.to_flat_state(state) for leaf in jax.tree.leaves(var.get_value())]

    @jax.jit
    def samples(arrays):
        return [a.reshape(-1)[::max(1, a.size // 4096)][:4096].astype(jnp.float32) for a in arrays]

    h = hashlib.sha256()
    for (name, leaf), sample in zip(named, samples([leaf for _, leaf in named])):
        h.update(f"{name} {tuple(leaf.shape)} {leaf.dtype};".encode())
        h.update(np.asarray(sample).tobytes())
    return h.hexdigest()


def _load_path_model(m: ModelSection, *, lora: bool = False) -> StarCoder:
    from starcoder_jax.model.pretrained import load_pretrained

    shape_fields = sorted(set(m.config) - set(PATH_MODEL_FIELDS))
    if shape_fields:
        raise ValueError(f"model.config sets {', '.join(shape_fields)} but model.path {m.path!r} fixes the "
                         f"model's shape; with model.path, model.config takes only {', '.join(PATH_MODEL_FIELDS)}")
    model = load_pretrained(m.path, dtype="float32", compute_dtype=m.compute_dtype, **m.config)
    if model.config.quantization is not None and not lora:
        raise ValueError(f"model.path {m.path!r} holds a {model.config.quantization}-quantized "
                         "model (inference only); train from its float checkpoint, or train LoRA "
                         "adapters on it (a lora: section)")
    return model


def _new_model(cfg: FinetuneConfig, tokenizer: Tokenizer) -> StarCoder:
    m = cfg.model
    fields = dict(m.config)
    if "vocab_size" not in fields and not m.preset:
        fields["vocab_size"] = 128 * math.ceil(tokenizer.vocab_size / 128)
    fields.update(dtype=m.compute_dtype, param_dtype="float32",
                  eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.eos_id)
    config = preset(m.preset, **fields) if m.preset else StarCoderConfig(**fields)
    return init_model(config, seed=cfg.train.seed)


@dataclasses.dataclass
class TrainState:
    """A model split for training.

    params: the trainable state, which the optimizer updates; rest: every
    other variable of the model (frozen params, derived arrays), which the
    train step reads and leaves as it is; opt_state: the optimizer state of
    `params` only. save_frozen: whether checkpoints hold the frozen params
    (not for LoRA runs, whose base is rebuilt from its source).
    """

    graphdef: nnx.GraphDef
    params: nnx.State
    rest: nnx.State
    opt_state: Any
    save_frozen: bool = True

    @classmethod
    def create(cls, model: StarCoder, trainable: nnx.filterlib.Filter, tx, *,
               save_frozen: bool = True) -> TrainState:
        graphdef, params, rest = nnx.split(model, trainable, ...)
        if not jax.tree.leaves(params):
            raise ValueError("train.trainable and train.frozen leave no parameter to train")
        return cls(graphdef, params, rest, tx.init(params), save_frozen)

    def frozen(self) -> nnx.State:
        """The params that are not trained."""
        return nnx.filter_state(self.rest, nnx.Param)

    def checkpoint(self) -> dict:
        """The pytree a checkpoint holds (see the module docstring)."""
        tree = {"params": self.params, "opt_state": self.opt_state}
        frozen = self.frozen()
        # with none, a checkpoint keeps the layout it had before frozen sets
        if self.save_frozen and jax.tree.leaves(frozen):
            tree["frozen"] = frozen
        return tree

    def restored(self, checkpoints: Checkpoints, step: int | None = None) -> TrainState:
        """This state with the values of checkpoint `step` (None: the newest), each array
        on the sharding it has here."""
        saved, _ = checkpoints.restore(abstract_like(self.checkpoint()), step)
        rest = nnx.merge_state(self.rest, saved["frozen"]) if "frozen" in saved else self.rest
        return dataclasses.replace(self, params=saved["params"], rest=rest, opt_state=saved["opt_state"])

    def model(self) -> StarCoder:
        return nnx.merge(self.graphdef, self.params, self.rest)


def fingerprint(cfg: FinetuneConfig, state: TrainState, model_config: StarCoderConfig,
                base: str | None = None) -> dict:
    """What must match for an output dir's checkpoints to be resumed; base: a
    LoRA run's base_digest."""
    out = {"model": model_config.to_hf(), "seq_len": cfg.data.seq_len, "seed": cfg.train.seed}
    if cfg.lora is not None:  # the adapters' settings and the base they train on
        out["lora"] = cfg.to_dict()["lora"]  # as JSON holds it (lists, not tuples)
        out["base"] = base
    else:
        frozen = [path_name(path) for path, _ in nnx.to_flat_state(state.frozen())]
        if frozen:  # absent when every param trains, as in the runs written before frozen sets
            out["frozen"] = frozen
    if cfg.data.separate_documents:  # another loss: a resume must keep it (absent when off, as before)
        out["separate_documents"] = True
    return out


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a run's arrays live: the default device (mesh None) or a mesh."""

    mesh: jax.sharding.Mesh | None = None

    @classmethod
    def from_config(cls, loop: LoopConfig) -> Placement:
        if not loop.mesh:
            return cls()
        from starcoder_jax.parallel.mesh import mesh_from_spec

        mesh = mesh_from_spec(loop.mesh)
        data_parallel = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
        if loop.batch_size % data_parallel:
            raise ValueError(f"train.batch_size {loop.batch_size} is not divisible by the data-parallel "
                             f"size {data_parallel} of mesh {loop.mesh}")
        return cls(mesh)

    def model(self, model: StarCoder) -> StarCoder:
        """The model with each parameter on its mesh sharding (parallel.rules)."""
        if self.mesh is None:
            return model
        from starcoder_jax.parallel.mesh import shard_model

        return shard_model(model, self.mesh)

    def state(self, state: TrainState, tx) -> tuple[TrainState, StepShardings | None]:
        """The state with every array where the train step's shardings (step_shardings) put
        it (tx: the optimizer that made it), and those shardings."""
        if self.mesh is None:
            return state, None
        from starcoder_jax.parallel.mesh import map_placed, put

        shardings = step_shardings(tx, state.params, state.rest, state.opt_state, self.mesh)

        def place(tree, where):  # put: a step count on one local device joins a sharding that spans every process
            return map_placed(lambda x, s: x if x.sharding == s else put(x, s), tree, where)

        return dataclasses.replace(state, params=place(state.params, shardings.params),
                                   rest=place(state.rest, shardings.rest),
                                   opt_state=place(state.opt_state, shardings.opt_state)), shardings

    def batch(self, x: np.ndarray, batch_dim: int = 1) -> jax.Array:
        """x on the device(s), its rows (dimension batch_dim) over data and fsdp: a training
        batch [A, b, T + 1] (the rows of each micro-batch), or held-out rows [b, T + 1]
        with batch_dim 0."""
        if self.mesh is None:
            return jnp.asarray(x)
        from starcoder_jax.parallel.mesh import place_batch

        return place_batch(x, self.mesh, batch_dim=batch_dim)

    def source_batch(self, source: DataSource, step: int, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
        """The batch of `step`, ids and mask reshaped to `shape` [A, b, T + 1], on the device(s).

        On a mesh, a source with `rows` (data.PackedSequences) computes only the
        rows this process's devices hold, and the global arrays are built from
        them (parallel.mesh.place_rows); other sources give the whole batch.
        """
        if self.mesh is None or not hasattr(source, "rows"):
            ids, mask = source.batch(step)
            return self.batch(ids.reshape(shape)), self.batch(mask.reshape(shape))
        from starcoder_jax.parallel.mesh import place_rows

        return place_rows(lambda rows: source.rows(step, rows), shape, self.mesh, batch_dim=1)

    def context(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """Where every array of a train step lives on a mesh: the one source the run (Placement),
    the memory report and the compiled plans (training.memory.lower_train_step) read.

    params: the trained variables (per the rules, parallel.mesh.state_shardings); rest: the
    others (a LoRA run's frozen base, derived arrays), likewise; opt_state: the optimizer's
    moments follow their params (optax finds them through the params' own structure), its
    scalars (step counts) live on every device, as do the metrics; batches: rows over data
    and fsdp (parallel.mesh.batch_sharding).
    """

    mesh: jax.sharding.Mesh
    params: nnx.State
    rest: nnx.State
    opt_state: Any
    metrics: jax.sharding.NamedSharding

    @property
    def out(self) -> tuple:
        """The train step's out_shardings: (params, optimizer state, metrics)."""
        return self.params, self.opt_state, self.metrics

    def batch(self, ndim: int = 3, batch_dim: int = 1) -> jax.sharding.NamedSharding:
        """A training batch [A, b, T + 1] (the defaults), or held-out rows [E, T + 1] (2, 0)."""
        from starcoder_jax.parallel.mesh import batch_sharding

        return batch_sharding(self.mesh, ndim, batch_dim)


def step_shardings(tx, params: nnx.State, rest: nnx.State, opt_state, mesh: jax.sharding.Mesh) -> StepShardings:
    """The shardings of a train step on `mesh` (StepShardings). params, rest: the trained and
    the other variables; opt_state: tx's state of params (arrays or ShapeDtypeStructs)."""
    import optax
    from jax.sharding import NamedSharding, PartitionSpec

    from starcoder_jax.parallel.mesh import param_shardings, state_shardings

    replicated = NamedSharding(mesh, PartitionSpec())
    by_path = param_shardings(params, mesh)
    as_params = nnx.map_state(lambda path, var: var.replace(by_path[path]), params)
    opt_shardings = optax.tree_utils.tree_map_params(
        tx, lambda _, s: s, opt_state, as_params, transform_non_params=lambda _: replicated)
    return StepShardings(mesh, state_shardings(params, mesh), state_shardings(rest, mesh), opt_shardings,
                         replicated)


@dataclasses.dataclass
class Setup:
    """Everything a run's loop needs, built from its config by `prepare`."""

    cfg: FinetuneConfig
    out_dir: str
    train_data: DataSource
    eval_data: tuple[np.ndarray, np.ndarray] | None  # held-out ids, mask [E, T + 1]; None: no held-out set
    state: TrainState
    start_step: int
    checkpoints: Checkpoints
    fingerprint: dict
    placement: Placement
    schedule: Callable[[int], Any]
    train_step: Callable  # step.make_train_step
    eval_step: Callable  # step.make_eval_fn

    def meta(self, step: int) -> dict:
        """The JSON record saved with checkpoint `step`."""
        return {"step": step, "fingerprint": self.fingerprint, "config": self.cfg.to_dict()}


def prepare(cfg: FinetuneConfig, *, progress: bool | None = None) -> Setup:
    """Loads the data and the model, places them, and resumes from the newest
    checkpoint in cfg.train.output_dir (refused when it holds another run's)."""
    loop = cfg.train
    out_dir = os.path.abspath(loop.output_dir)
    if not cfg.tokenizer:
        raise ValueError("tokenizer is not set: give the path of a tokenizer.json or model directory")
    tokenizer = load_tokenizer(cfg.tokenizer)
    train_docs, held_docs = _documents(cfg, tokenizer, progress)
    model = build_model(cfg, tokenizer)
    base = base_digest(model) if cfg.lora is not None else None  # before placing: every array is local
    placement = Placement.from_config(loop)
    tx, schedule = make_optimizer(cfg.optim, loop.steps)
    state = TrainState.create(placement.model(model), run_filter(cfg), tx, save_frozen=cfg.lora is None)
    prints = fingerprint(cfg, state, model.config, base)
    checkpoints, start_step = _open_checkpoints(out_dir, loop, prints)
    train_data, eval_data = _data_sources(cfg, tokenizer, train_docs, held_docs)
    if start_step:
        state = state.restored(checkpoints)
    state, shardings = placement.state(state, tx)
    config = model.config
    dropout = max(config.resid_pdrop, config.embd_pdrop, config.attn_pdrop,
                  cfg.lora.dropout if cfg.lora is not None else 0) > 0
    separator = tokenizer.eos_id if cfg.data.separate_documents else None  # ends each packed document
    train_step = make_train_step(state.graphdef, tx, seed=loop.seed, dropout=dropout,
                                 skip_nonfinite=loop.nan_policy == "skip",
                                 out_shardings=None if shardings is None else shardings.out,
                                 loss_chunk=loop.loss_chunk, separator=separator)
    return Setup(cfg, out_dir, train_data, eval_data, state, start_step, checkpoints, prints, placement,
                 schedule, train_step, make_eval_fn(state.graphdef, loop.loss_chunk, separator))


def run_filter(cfg: FinetuneConfig) -> nnx.filterlib.Filter:
    """The trained variables of a run: train.trainable / train.frozen, among the
    LoRA adapters when cfg has a lora section."""
    return trainable_filter(cfg.train.trainable, cfg.train.frozen, lora=cfg.lora is not None)


def _open_checkpoints(out_dir: str, loop: LoopConfig, prints: dict) -> tuple[Checkpoints, int]:
    """The output dir's checkpoints and the step to resume from (0: a new run), whose
    fingerprint must be `prints`."""
    os.makedirs(out_dir, exist_ok=True)
    checkpoints = Checkpoints(os.path.join(out_dir, "checkpoints"), keep=loop.keep_checkpoints,
                              async_save=loop.async_checkpoints)
    start_step = checkpoints.latest_step() or 0
    if start_step and checkpoints.read_meta().get("fingerprint") != prints:
        checkpoints.close()
        raise TrainingError(
            f"{out_dir} holds checkpoints of a different run (model config, seq_len, seed, frozen "
            "params, data.separate_documents, lora settings or LoRA base model differ); use another "
            "--output-dir or delete it")
    return checkpoints, start_step


def _documents(cfg: FinetuneConfig, tokenizer: Tokenizer, progress: bool | None
               ) -> tuple[DocumentTokens, DocumentTokens | None]:
    """The training and held-out documents as token ids (None: no held-out set): a
    token store's splits (refused when another tokenizer wrote it), or the source
    files tokenized here."""
    if cfg.data.store:
        from starcoder_jax.training.store import TokenStore

        store = TokenStore(cfg.data.store)
        store.check_tokenizer(tokenizer)
        held = store.split(held_out=True)
        return store.split(held_out=False), held if len(held.lengths) else None
    train_docs, held_docs = split_documents(collect_documents(cfg.data), cfg.data.eval_fraction)
    return (tokenize_documents(train_docs, tokenizer, progress),
            tokenize_documents(held_docs, tokenizer) if held_docs else None)


def _data_sources(cfg: FinetuneConfig, tokenizer: Tokenizer, train_docs: DocumentTokens,
                  held_docs: DocumentTokens | None
                  ) -> tuple[DataSource, tuple[np.ndarray, np.ndarray] | None]:
    """The training batches and the held-out sequences (None without held-out documents)."""
    loop = cfg.train
    train_data = PackedSequences(train_docs, tokenizer, cfg.data, batch_size=loop.batch_size, seed=loop.seed)
    if cfg.data.loader_workers:
        train_data = ParallelRows(train_data, cfg.data.loader_workers)
    if held_docs is None:
        return train_data, None
    try:
        held = PackedSequences(held_docs, tokenizer, cfg.data, batch_size=loop.batch_size, seed=loop.seed,
                               shuffle=False, fim=False)
    except ValueError as e:
        n_held, n_all = len(held_docs.lengths), len(held_docs.lengths) + len(train_docs.lengths)
        raise ValueError(f"the held-out documents ({n_held} of {n_all}; data.eval_fraction or the store's "
                         f"--eval-fraction) are too short for one evaluation sequence: {e}; hold out more "
                         "or lower data.seq_len") from None
    return train_data, eval_sequences(held, loop.eval_sequences)


def load_run_model(output_dir: str, step: int | None = None) -> StarCoder:
    """The model of a run directory at its newest (or a given) checkpoint."""
    with open(os.path.join(output_dir, "config.yaml"), encoding="utf-8") as f:
        cfg = parse_config(yaml.safe_load(f))
    checkpoints = Checkpoints(os.path.join(output_dir, "checkpoints"), async_save=False)
    saved = checkpoints.read_meta(step)
    if saved is None:
        raise FileNotFoundError(f"{output_dir}: no checkpoints")
    config = StarCoderConfig.from_hf(saved["fingerprint"]["model"])
    runtime = {k: v for k, v in cfg.model.config.items() if k in PATH_MODEL_FIELDS}
    config = config.replace(dtype=cfg.model.compute_dtype, param_dtype="float32", **runtime)
    tx, _ = make_optimizer(cfg.optim, cfg.train.steps)
    if cfg.lora is None:
        model = init_model(config)
    else:  # the base from its source (checkpoints do not hold it), checked against the run's
        model = _load_path_model(cfg.model, lora=True) if cfg.model.path else init_model(config, cfg.train.seed)
        model = with_lora(model, cfg)
        if base_digest(model) != saved["fingerprint"].get("base"):
            checkpoints.close()
            raise TrainingError(f"{output_dir}: the base model ({cfg.model.path or 'seed ' + str(cfg.train.seed)}) "
                                "is not the one its adapters were trained on")
    state = TrainState.create(model, run_filter(cfg), tx, save_frozen=cfg.lora is None)
    try:
        return state.restored(checkpoints, step).model()
    finally:
        checkpoints.close()

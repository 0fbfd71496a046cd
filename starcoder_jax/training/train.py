"""Fine-tuning (or training from scratch) with optax, checkpointed by orbax.

One run = one output directory. Running the same command again resumes from
the newest checkpoint there; because the data order and the dropout keys are
pure functions of (seed, step), a resumed run reproduces the uninterrupted
one bit for bit on the same machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
import yaml
from flax import nnx
from tqdm import tqdm

from starcoder_jax.config import StarCoderConfig, preset
from starcoder_jax.model.modules import StarCoder, init_model
from starcoder_jax.tokenizer import load_tokenizer
from starcoder_jax.training.checkpoint import Checkpoints, abstract_like
from starcoder_jax.training.data import DataConfig, PackedDataset, collect_documents, eval_sequences, split_documents
from starcoder_jax.training.losses import token_nll_sum


class TrainingError(RuntimeError):
    """The run cannot go on (bad settings, a non-finite loss, a mismatched output dir)."""


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Which model to train.

    preset: a family preset to train from scratch (its shape; random init).
    path: an HF / orbax directory or hub id to fine-tune (overrides preset).
    config: StarCoderConfig fields for a from-scratch model (applied on top
      of the preset; vocab_size defaults to the tokenizer's, rounded up to 128).
    compute_dtype: dtype of activations and matmuls; params stay float32.
    remat: recompute each block's activations in the backward pass.
    """

    preset: str | None = None
    path: str | None = None
    config: dict = dataclasses.field(default_factory=dict)
    compute_dtype: str = "float32"
    remat: bool = False


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 3e-4
    schedule: str = "cosine"  # "cosine" (to min_lr_ratio * lr) or "constant", both after warmup
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0

    def __post_init__(self):
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"optim.schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.learning_rate <= 0:
            raise ValueError(f"optim.learning_rate must be > 0, got {self.learning_rate}")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    eval_every: int = 200
    eval_sequences: int = 64
    save_every: int = 200
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    log_every: int = 10
    nan_policy: str = "stop"  # "stop": end the run with an error; "skip": drop that update
    output_dir: str = "runs/finetune"
    mesh: str | None = None

    def __post_init__(self):
        if self.nan_policy not in ("stop", "skip"):
            raise ValueError(f"train.nan_policy must be 'stop' or 'skip', got {self.nan_policy!r}")
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"train.batch_size {self.batch_size} is not divisible by train.grad_accum "
                             f"{self.grad_accum}")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    model: ModelSection = ModelSection()
    tokenizer: str | None = None
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: LoopConfig = LoopConfig()

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


_SECTIONS = {"model": ModelSection, "data": DataConfig, "optim": OptimConfig, "train": LoopConfig}


def _build_section(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; "
                         f"{where} has: {', '.join(sorted(fields))}")
    clean = {k: (tuple(v) if isinstance(v, list) and k != "config" else v) for k, v in values.items()}
    return cls(**clean)


def parse_config(raw: dict, overrides: list[str] = ()) -> FinetuneConfig:
    """A FinetuneConfig from a YAML mapping plus `section.key=value` overrides."""
    raw = json.loads(json.dumps(raw or {}))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key and key != "tokenizer":
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. optim.learning_rate=1e-4)")
        parsed = _parse_value(value)
        if key == "tokenizer":
            raw["tokenizer"] = parsed
            continue
        section, name = key.split(".", 1)
        raw.setdefault(section, {})
        target = raw[section]
        if section == "model" and name.startswith("config."):
            target = target.setdefault("config", {})
            name = name.removeprefix("config.")
        target[name] = parsed
    unknown = sorted(set(raw) - set(_SECTIONS) - {"tokenizer"})
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(unknown)}; a config has: "
                         f"{', '.join(sorted([*_SECTIONS, 'tokenizer']))}")
    sections = {name: _build_section(cls, raw.get(name, {}), name) for name, cls in _SECTIONS.items()}
    return FinetuneConfig(tokenizer=raw.get("tokenizer"), **sections)


def _parse_value(text: str):
    """A YAML scalar, with numbers like 1e-4 read as floats (YAML 1.1 wants 1.0e-4)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_config(path: str, overrides: list[str] = ()) -> FinetuneConfig:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    base = os.path.dirname(os.path.abspath(path))
    cfg = parse_config(raw, overrides)
    return _resolve_paths(cfg, base)


def _resolve_paths(cfg: FinetuneConfig, base: str) -> FinetuneConfig:
    """Relative data/tokenizer paths in a config file are relative to the repo
    root when they exist there, else to the config file's folder."""
    def fix(p):
        if p is None or os.path.isabs(p) or os.path.exists(p):
            return p
        candidate = os.path.join(base, p)
        return candidate if os.path.exists(candidate) or any(c in p for c in "*?[") else p

    data = dataclasses.replace(cfg.data, paths=tuple(fix(p) for p in cfg.data.paths))
    return dataclasses.replace(cfg, data=data, tokenizer=fix(cfg.tokenizer))


# ---------------------------------------------------------------------------
# Model, optimizer, loss
# ---------------------------------------------------------------------------

def build_model(cfg: FinetuneConfig, tokenizer) -> StarCoder:
    m = cfg.model
    if m.path:
        from starcoder_jax.model.pretrained import load_pretrained

        model = load_pretrained(m.path, dtype="float32", compute_dtype=m.compute_dtype)
        if model.config.quantization is not None:
            raise ValueError(f"model.path {m.path!r} holds a {model.config.quantization}-quantized "
                             "model (inference only); train from its float checkpoint")
        if m.config:
            raise ValueError("model.config applies to from-scratch models; drop it when model.path is set")
    else:
        fields = dict(m.config)
        if "vocab_size" not in fields and not m.preset:
            fields["vocab_size"] = 128 * math.ceil(tokenizer.vocab_size / 128)
        fields.update(dtype=m.compute_dtype, param_dtype="float32",
                      eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.eos_id)
        config = preset(m.preset, **fields) if m.preset else StarCoderConfig(**fields)
        model = init_model(config, seed=cfg.train.seed)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary "
                         f"holds {model.config.vocab_size}")
    if cfg.data.seq_len > model.config.n_positions:
        raise ValueError(f"data.seq_len is {cfg.data.seq_len} but the model holds "
                         f"{model.config.n_positions} positions")
    model.remat = m.remat
    return model


def decay_mask(params):
    """Weight decay on matmul kernels only: not on biases, LayerNorm or embeddings."""
    def wants_decay(path, _):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        return "kernel" in names or "lm_head" in names
    return jax.tree_util.tree_map_with_path(wants_decay, params)


def learning_rate_schedule(o: OptimConfig, steps: int):
    warmup = min(o.warmup_steps, steps)
    if o.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, o.learning_rate, max(warmup, 1)),
             optax.constant_schedule(o.learning_rate)], [warmup])
    return optax.warmup_cosine_decay_schedule(
        0.0, o.learning_rate, warmup_steps=warmup, decay_steps=max(steps, warmup + 1),
        end_value=o.learning_rate * o.min_lr_ratio)


def make_optimizer(o: OptimConfig, steps: int):
    schedule = learning_rate_schedule(o, steps)
    tx = optax.chain(
        optax.clip_by_global_norm(o.clip_norm),
        optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask),
    )
    return tx, schedule


def make_train_step(graphdef, tx, *, seed: int, dropout: bool, skip_nonfinite: bool,
                    out_shardings=None):
    """A jitted step over a batch [A, b, T + 1] of A accumulation micro-batches.

    out_shardings: (params, optimizer state, metrics) shardings under a mesh, so
    gradients and updates stay split like their params instead of coming
    back whole on every device.
    """

    def micro_loss(params, ids, mask, key):
        model = nnx.merge(graphdef, params)
        rngs = nnx.Rngs(dropout=key) if dropout else None
        return token_nll_sum(model, ids, mask, rngs)

    @functools.partial(jax.jit, donate_argnums=(0, 1), out_shardings=out_shardings)
    def step_fn(params, opt_state, ids, mask, step):
        count = jnp.maximum(jnp.sum(mask[:, :, 1:]), 1).astype(jnp.float32)
        base = jax.random.fold_in(jax.random.key(seed), step)

        def body(carry, xs):
            grads, total = carry
            ids_i, mask_i, i = xs
            loss, g = jax.value_and_grad(micro_loss)(params, ids_i, mask_i, jax.random.fold_in(base, i))
            return (jax.tree.map(jnp.add, grads, g), total + loss), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        accum = jnp.arange(ids.shape[0])
        (grads, total), _ = jax.lax.scan(body, (zeros, jnp.float32(0)), (ids, mask, accum))
        grads = jax.tree.map(lambda g: g / count, grads)
        loss = total / count
        grad_norm = optax.tree.norm(grads)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_nonfinite:
            new_params = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_params, params)
            new_opt = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_opt, opt_state)
        return new_params, new_opt, {"loss": loss, "grad_norm": grad_norm, "finite": finite}

    return step_fn


def make_eval_fn(graphdef):
    @jax.jit
    def eval_fn(params, ids, mask):
        model = nnx.merge(graphdef, params)
        return token_nll_sum(model, ids, mask), jnp.sum(mask[:, 1:])
    return eval_fn


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------

class _Metrics:
    """metrics.jsonl (truncated to the resumed step) + TensorBoard events."""

    def __init__(self, out_dir: str, start_step: int):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        kept = []
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(kept)
        self.file = open(self.path, "a", encoding="utf-8")
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=start_step + 1)
        except ImportError:  # optional: metrics.jsonl always has everything
            self.tb = None

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _fingerprint(cfg: FinetuneConfig, model_config: StarCoderConfig) -> dict:
    """What must match for an output dir's checkpoints to be resumed."""
    return {"model": model_config.to_hf(), "seq_len": cfg.data.seq_len, "seed": cfg.train.seed}


def run(cfg: FinetuneConfig, *, progress: bool | None = None, export_hf: str | None = None,
        stop_after: int | None = None) -> dict:
    """Trains until cfg.train.steps (or a SIGTERM, or `stop_after` steps in this call).

    Returns a summary dict (final step, last loss, eval loss, output dir).
    """
    loop = cfg.train
    out_dir = os.path.abspath(loop.output_dir)
    if not cfg.tokenizer:
        raise ValueError("tokenizer is not set: give the path of a tokenizer.json or model directory")
    tokenizer = load_tokenizer(cfg.tokenizer)

    docs = collect_documents(cfg.data)
    train_docs, held_docs = split_documents(docs, cfg.data.eval_fraction)
    model = build_model(cfg, tokenizer)
    mesh = None
    if loop.mesh:
        from starcoder_jax.parallel.mesh import mesh_from_spec

        mesh = mesh_from_spec(loop.mesh)
        data_parallel = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
        if loop.batch_size % data_parallel:
            raise ValueError(f"train.batch_size {loop.batch_size} is not divisible by the data-parallel "
                             f"size {data_parallel} of mesh {loop.mesh}")

    os.makedirs(out_dir, exist_ok=True)
    ckpts = Checkpoints(os.path.join(out_dir, "checkpoints"), keep=loop.keep_checkpoints,
                        async_save=loop.async_checkpoints)
    fingerprint = _fingerprint(cfg, model.config)
    start_step = ckpts.latest_step() or 0
    if start_step:
        saved = ckpts.read_meta()
        if saved.get("fingerprint") != fingerprint:
            raise TrainingError(
                f"{out_dir} holds checkpoints of a different run (model config, seq_len or seed differ); "
                "use another --output-dir or delete it")

    train_set = PackedDataset(train_docs, tokenizer, cfg.data, seed=loop.seed, progress=progress)
    eval_set = (PackedDataset(held_docs, tokenizer, cfg.data, seed=loop.seed, shuffle=False, fim=False)
                if held_docs else None)

    if mesh is not None:
        from starcoder_jax.parallel.mesh import shard_model

        model = shard_model(model, mesh)
    graphdef, params = nnx.split(model)
    tx, schedule = make_optimizer(cfg.optim, loop.steps)
    opt_state = tx.init(params)
    if start_step:
        restored, _ = ckpts.restore(abstract_like({"params": params, "opt_state": opt_state}))
        params, opt_state = restored["params"], restored["opt_state"]
    config = model.config
    dropout = max(config.resid_pdrop, config.embd_pdrop, config.attn_pdrop) > 0
    out_shardings, place_batch = None, jnp.asarray
    if mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec

        from starcoder_jax.parallel.mesh import place_batch as place_on_mesh
        from starcoder_jax.parallel.mesh import state_shardings

        replicated = NamedSharding(mesh, PartitionSpec())
        # Moments follow their params; scalars (step counts) live on every device.
        opt_shardings = jax.tree.map(
            lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else replicated, opt_state)
        opt_state = jax.device_put(opt_state, opt_shardings)
        out_shardings = (state_shardings(params, mesh), opt_shardings, replicated)

        def place_batch(x):  # [A, b, T + 1]: rows of each micro-batch over data and fsdp
            return place_on_mesh(x, mesh, batch_dim=1)

    step_fn = make_train_step(graphdef, tx, seed=loop.seed, dropout=dropout,
                              skip_nonfinite=loop.nan_policy == "skip", out_shardings=out_shardings)
    eval_fn = make_eval_fn(graphdef)

    def mesh_context():
        return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()

    with open(os.path.join(out_dir, "config.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    tokenizer_src = _tokenizer_dir(cfg.tokenizer)
    metrics = _Metrics(out_dir, start_step)
    terminated = []
    previous = signal.signal(signal.SIGTERM, lambda *_: terminated.append(True))

    def meta(step):
        return {"step": step, "fingerprint": fingerprint, "config": cfg.to_dict()}

    def evaluate():
        if eval_set is None:
            return None
        ids, mask = eval_sequences(eval_set, loop.eval_sequences)
        total, count = 0.0, 0.0
        for i in range(0, len(ids), loop.batch_size):
            s, c = eval_fn(params, jnp.asarray(ids[i:i + loop.batch_size]),
                           jnp.asarray(mask[i:i + loop.batch_size]))
            total, count = total + float(s), count + float(c)
        return total / max(count, 1)

    tokens_per_step = loop.batch_size * loop.grad_accum * cfg.data.seq_len
    micro = loop.batch_size // loop.grad_accum
    bar = tqdm(total=loop.steps, initial=start_step, desc="finetune", unit="step",
               disable=(not progress) if progress is not None else None)
    step, last, eval_loss = start_step, {}, None
    window_start, window_tokens = time.perf_counter(), 0
    ran = 0
    try:
        while step < loop.steps:
            if terminated:
                ckpts.wait()
                if ckpts.latest_step() != step:
                    ckpts.save(step, {"params": params, "opt_state": opt_state}, meta(step), wait=True)
                bar.write(f"SIGTERM: saved step {step} to {ckpts.directory}; run the same command to resume")
                break
            ids, mask = train_set.batch(step, loop.batch_size)
            ids = place_batch(ids.reshape(loop.grad_accum, micro, -1))
            mask = place_batch(mask.reshape(loop.grad_accum, micro, -1))
            with mesh_context():
                params, opt_state, out = step_fn(params, opt_state, ids, mask, jnp.int32(step))
            step += 1
            ran += 1
            window_tokens += tokens_per_step
            if not bool(out["finite"]):
                if loop.nan_policy == "stop":
                    raise TrainingError(
                        f"the loss became {float(out['loss'])} at step {step} (grad norm "
                        f"{float(out['grad_norm'])}); stopped without saving. The last good checkpoint is "
                        f"step {ckpts.latest_step()}; lower optim.learning_rate or set train.nan_policy=skip")
                bar.write(f"step {step}: non-finite loss, update skipped")
            if step % loop.log_every == 0 or step == loop.steps:
                elapsed = time.perf_counter() - window_start
                last = {"step": step, "loss": float(out["loss"]), "grad_norm": float(out["grad_norm"]),
                        "learning_rate": float(schedule(step - 1)),
                        "tokens_per_second": window_tokens / elapsed, "finite": bool(out["finite"])}
                window_start, window_tokens = time.perf_counter(), 0
                if step % loop.eval_every == 0 or step == loop.steps:
                    eval_loss = evaluate()
                    if eval_loss is not None:
                        last["eval_loss"] = eval_loss
                        last["eval_perplexity"] = math.exp(min(eval_loss, 50))
                metrics.log(last)
                bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_second']:.0f}")
            bar.update()
            if step % loop.save_every == 0 or step == loop.steps:
                ckpts.save(step, {"params": params, "opt_state": opt_state}, meta(step))
            if stop_after is not None and ran >= stop_after:
                break
    finally:
        signal.signal(signal.SIGTERM, previous)
        bar.close()
        metrics.close()
        ckpts.close()

    model = nnx.merge(graphdef, params)
    if export_hf and step >= loop.steps:
        from starcoder_jax.model.weights import save_hf

        save_hf(model, export_hf, tokenizer_from=tokenizer_src)
    return {"step": step, "loss": last.get("loss"), "eval_loss": eval_loss, "output_dir": out_dir,
            "model": model, "terminated": bool(terminated)}


def _tokenizer_dir(name: str) -> str:
    """The folder holding the tokenizer files (copied next to exported models)."""
    if os.path.isdir(name):
        return name
    if os.path.isfile(name):
        return os.path.dirname(os.path.abspath(name))
    from starcoder_jax.model.pretrained import resolve_model_dir

    return resolve_model_dir(name)


def load_run_model(output_dir: str, step: int | None = None) -> StarCoder:
    """The model of a run directory at its newest (or a given) checkpoint."""
    with open(os.path.join(output_dir, "config.yaml"), encoding="utf-8") as f:
        cfg = parse_config(yaml.safe_load(f))
    ckpts = Checkpoints(os.path.join(output_dir, "checkpoints"), async_save=False)
    saved = ckpts.read_meta(step)
    if saved is None:
        raise FileNotFoundError(f"{output_dir}: no checkpoints")
    config = StarCoderConfig.from_hf(saved["fingerprint"]["model"])
    config = config.replace(dtype=cfg.model.compute_dtype, param_dtype="float32")
    graphdef, params = nnx.split(init_model(config))
    tx, _ = make_optimizer(cfg.optim, cfg.train.steps)
    abstract = abstract_like({"params": params, "opt_state": tx.init(params)})
    restored, _ = ckpts.restore(abstract, step)
    ckpts.close()
    return nnx.merge(graphdef, restored["params"])


def summarize(result: dict) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "model"}

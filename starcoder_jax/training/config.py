"""The fine-tuning YAML file as frozen dataclasses: model, tokenizer, data, optim, train.

`load_config(path, overrides)` reads a file (configs/finetune/) and applies
`section.key=value` overrides from the command line; every key is checked
against its section's fields, so a typo fails before anything loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import yaml

from starcoder_jax.config import check_quantization
from starcoder_jax.model.modules import DEFAULT_REMAT, check_remat
from starcoder_jax.training.data import DataConfig
from starcoder_jax.training.losses import LOSS_CHUNK, check_loss_chunk


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Which model to train.

    preset: a family preset to train from scratch (its shape; random init).
    path: an HF / orbax directory or hub id to fine-tune (overrides preset).
    config: StarCoderConfig fields for a from-scratch model (applied on top
      of the preset; vocab_size defaults to the tokenizer's, rounded up to 128).
      With `path`, only the runtime fields attention_impl and matmul_impl
      (the shapes come from the checkpoint).
    quantize: the base's matmul weights in a weight-only format, frozen, for
      LoRA fine-tuning only (a `lora:` section): "nf4" is QLoRA's (4-bit
      NormalFloat, double-quantized scales), "int8" and "int4" the others
      of config.QUANTIZATION_MODES.
    compute_dtype: dtype of activations and matmuls; params stay float32.
    remat: what each block keeps for the backward pass (model.modules.REMAT_POLICIES):
      "none" (everything), "elementwise" (everything but GELU's and LayerNorm's
      intermediates, recomputed from their inputs), "projections" (the dense
      projections' outputs: attention and GELU are rerun), "full" (its input
      only: the backward pass reruns the block); default "elementwise" (on
      XLA:CPU also faster than "none"); true / false (older configs) mean
      "full" / "none".
    """

    preset: str | None = None
    path: str | None = None
    config: dict = dataclasses.field(default_factory=dict)
    quantize: str | None = None
    compute_dtype: str = "float32"
    remat: str = DEFAULT_REMAT

    def __post_init__(self):
        object.__setattr__(self, "remat", check_remat(self.remat, "model.remat"))


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 3e-4
    schedule: str = "cosine"  # "cosine" (to min_lr_ratio * lr) or "constant", both after warmup
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1  # on the params whose metadata says weight_decay (the matmul kernels)
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
    """How long and how the loop runs.

    trainable / frozen: regular expressions searched in each parameter's path
    ("blocks/0/attn/query/kernel", "wte/embedding"). The trained set is every
    nnx.Param matching one of `trainable` (empty: every nnx.Param) and none of
    `frozen`; the others keep their values and have no optimizer state.
    """

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
    # Tokens per piece of the LM head and cross-entropy (training.losses): the
    # [B, T, V] float32 logits never exist at once. 0 or null: whole logits.
    loss_chunk: int | None = LOSS_CHUNK
    output_dir: str = "runs/finetune"
    mesh: str | None = None
    trainable: tuple[str, ...] = ()
    frozen: tuple[str, ...] = ()
    # Every export_every steps, at the last step and on SIGTERM, the model is
    # written to export_dir as an HF directory (a LoRA run: the base with its
    # adapters merged), replacing the previous export; 0: off. A run cut short
    # still leaves its newest weights in a form every tool loads.
    export_every: int = 0
    export_dir: str | None = None
    export_dtype: str | None = None  # float32, bfloat16 or float16; null: the params' (float32)
    export_max_shard_mb: float = 5120.0  # safetensors shards of at most this many MiB

    def __post_init__(self):
        if self.nan_policy not in ("stop", "skip"):
            raise ValueError(f"train.nan_policy must be 'stop' or 'skip', got {self.nan_policy!r}")
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        object.__setattr__(self, "loss_chunk", check_loss_chunk(self.loss_chunk, "train.loss_chunk"))
        if self.batch_size % self.grad_accum:
            raise ValueError(f"train.batch_size {self.batch_size} is not divisible by train.grad_accum "
                             f"{self.grad_accum}")
        for name in ("trainable", "frozen"):
            object.__setattr__(self, name, _patterns(getattr(self, name), f"train.{name}"))
        if self.export_every < 0:
            raise ValueError(f"train.export_every must be >= 0 (0: no exports), got {self.export_every}")
        if self.export_every and not self.export_dir:
            raise ValueError("train.export_every needs train.export_dir, the folder the exports are written to")
        if self.export_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError("train.export_dtype must be float32, bfloat16, float16 or null, "
                             f"got {self.export_dtype!r}")
        if not self.export_max_shard_mb > 0:
            raise ValueError(f"train.export_max_shard_mb must be > 0, got {self.export_max_shard_mb}")


@dataclasses.dataclass(frozen=True)
class LoRASection:
    """LoRA fine-tuning (PEFT's LoRA; model.lora): present, only the adapters train.

    rank, alpha, dropout, target_modules, use_rslora: PEFT's r, lora_alpha,
    lora_dropout, target_modules (a list; one name is a list of one) and
    use_rslora, with PEFT's defaults (targets: its gpt_bigcode default,
    c_attn). The scale is alpha / rank (alpha / sqrt(rank) with use_rslora).
    rank_pattern / alpha_pattern: PEFT's per-module exceptions, {pattern:
    rank} and {pattern: alpha}, a pattern being a regular expression matched
    against the end of a module's name (PEFT's rule: "c_fc" or "h\\.0\\.mlp\\.c_fc").
    train.trainable / train.frozen then choose among the adapters' paths
    ("blocks/0/attn/query/lora/a"). Run with `lora: {}` for every default.
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("c_attn",)
    use_rslora: bool = False
    rank_pattern: dict = dataclasses.field(default_factory=dict)
    alpha_pattern: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank must be a positive integer, got {self.rank!r}")
        _check_module_patterns(self.rank_pattern, "lora.rank_pattern", "a positive integer rank",
                               lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1)
        _check_module_patterns(self.alpha_pattern, "lora.alpha_pattern", "a positive alpha",
                               lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        targets = (self.target_modules,) if isinstance(self.target_modules, str) else self.target_modules
        if not targets or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"lora.target_modules must be a list of module names such as [c_attn, c_proj, "
                             f"c_fc], got {self.target_modules!r}")
        object.__setattr__(self, "target_modules", tuple(targets))


def _check_module_patterns(mapping, where: str, wanted: str, valid) -> None:
    """A {regular expression: value} mapping whose values pass `valid`."""
    if not isinstance(mapping, dict):
        raise ValueError(f"{where} must be a mapping of module-name patterns to values, got {mapping!r}")
    _patterns(list(mapping), where)
    for pattern, value in mapping.items():
        if not valid(value):
            raise ValueError(f"{where}: {pattern!r} must map to {wanted}, got {value!r}")


def _patterns(value, where: str) -> tuple[str, ...]:
    """A list of regular expressions (a single string is a list of one), each checked."""
    patterns = (value,) if isinstance(value, str) else value
    if not isinstance(patterns, (tuple, list)) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"{where} must be a list of regular expressions, got {value!r}")
    for p in patterns:
        try:
            re.compile(p)
        except re.error as err:
            raise ValueError(f"{where}: {p!r} is not a regular expression ({err})") from None
    return tuple(patterns)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    model: ModelSection = ModelSection()
    tokenizer: str | None = None
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: LoopConfig = LoopConfig()
    lora: LoRASection | None = None  # None: every (trainable) parameter trains

    def __post_init__(self):
        q = self.model.quantize
        if q is not None:
            check_quantization(q, "model.quantize")
            if self.lora is None:
                raise ValueError(f"model.quantize: {q} needs a lora: section: {q} weights are frozen, "
                                 "only LoRA adapters train on them")
            if self.train.export_every:
                raise ValueError(f"train.export_every on a {q} base would merge the adapters into {q} "
                                 "weights; export the adapters (--export-peft) and merge them into the float "
                                 "base with `starcoder-jax convert merge-lora`")

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
        if raw.get(section) is None:  # absent, or `lora: null` as config.yaml writes it
            raw[section] = {}
        target = raw[section]
        if section == "model" and name.startswith("config."):
            target = target.setdefault("config", {})
            name = name.removeprefix("config.")
        target[name] = parsed
    unknown = sorted(set(raw) - set(_SECTIONS) - {"tokenizer", "lora"})
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(unknown)}; a config has: "
                         f"{', '.join(sorted([*_SECTIONS, 'lora', 'tokenizer']))}")
    sections = {name: _build_section(cls, raw.get(name, {}), name) for name, cls in _SECTIONS.items()}
    if raw.get("lora") is not None:  # a lora mapping turns LoRA on (`lora: {}`: PEFT's defaults)
        sections["lora"] = _build_section(LoRASection, raw["lora"] or {}, "lora")
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

    data = dataclasses.replace(cfg.data, paths=tuple(fix(p) for p in cfg.data.paths), store=fix(cfg.data.store))
    return dataclasses.replace(cfg, data=data, tokenizer=fix(cfg.tokenizer))

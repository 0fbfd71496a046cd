"""`StarCoderConfig`: one frozen description of a GPTBigCode model.

The config is the single source of truth for model shapes. It is read from
(and written back to) Hugging Face `config.json` files with `from_hf` /
`to_hf`, and the family's published sizes are available as presets.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# Activation names transformers accepts for this family, mapped to "use the
# tanh approximation of GELU?". gelu_new, gelu_fast and gelu_pytorch_tanh are
# the same formula 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
ACTIVATIONS = {
    "gelu": False,
    "gelu_pytorch_tanh": True,
    "gelu_new": True,
    "gelu_fast": True,
}

DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATION_KEY = "starcoder_jax_quantization"  # config.json key of quantized orbax dirs
QUANTIZATION_MODES = ("int8",)  # weight formats of starcoder_jax.ops.int8; also the int8 KV cache's
# Backend forms (starcoder_jax.ops), chosen per model; "auto" picks per backend and phase.
ATTENTION_IMPLS = ("auto", "xla", "cpu_blocked", "cpu_key_major", "chunked", "cudnn", "splash")
MATMUL_IMPLS = ("auto", "xla", "cpu")
RUNTIME_FIELDS = ("dtype", "param_dtype", "quantization", "attention_impl", "matmul_impl")  # not in config.json


def check_quantization(mode: str | None, argument: str = "quantization", none_means: str = "") -> str | None:
    """`mode` if it is None or one of QUANTIZATION_MODES, else a ValueError that
    names the caller's `argument` (and what None means there, e.g. " (the
    compute dtype)" for a KV cache)."""
    if mode is not None and mode not in QUANTIZATION_MODES:
        allowed = " or ".join(repr(m) for m in QUANTIZATION_MODES)
        raise ValueError(f"{argument} must be None{none_means} or {allowed}, got {mode!r}")
    return mode


@dataclasses.dataclass(frozen=True)
class StarCoderConfig:
    """Shapes and numerics of a GPTBigCode (StarCoder family) model.

    Field names follow transformers' `GPTBigCodeConfig` so that a reader who
    knows `config.json` knows this class. `dtype` is the compute dtype of
    activations and matmuls; `param_dtype` is the storage dtype of weights.
    """

    vocab_size: int = 49152
    n_positions: int = 8192
    n_embd: int = 2048
    n_layer: int = 24
    n_head: int = 16
    n_inner: int | None = None
    multi_query: bool = True
    activation_function: str = "gelu_pytorch_tanh"
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True
    scale_attn_weights: bool = True
    initializer_range: float = 0.02
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0
    pad_token_id: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    # "int8": matmul weights stored as int8 with per-output-channel scales
    # (starcoder_jax.ops.int8). Not a transformers field: our own orbax
    # directories record it as "starcoder_jax_quantization".
    quantization: str | None = None
    # Which form of each backend kernel runs (starcoder_jax.ops): "auto" picks
    # per backend and phase; a name forces that form everywhere it applies.
    # How this machine computes, not what the model is: never written to config.json.
    attention_impl: str = "auto"
    matmul_impl: str = "auto"

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner <= 0):
            raise ValueError(f"n_inner must be a positive integer or None, got {self.n_inner!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"activation_function {self.activation_function!r} is not supported; "
                f"expected one of {sorted(ACTIVATIONS)}"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        check_quantization(self.quantization)
        for name, allowed in (("attention_impl", ATTENTION_IMPLS), ("matmul_impl", MATMUL_IMPLS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    # Derived shapes: computed, never stored.
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return 1 if self.multi_query else self.n_head

    @property
    def mlp_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def gelu_approximate(self) -> bool:
        return ACTIVATIONS[self.activation_function]

    def replace(self, **changes: Any) -> StarCoderConfig:
        return dataclasses.replace(self, **changes)

    def param_count(self) -> int:
        """Number of parameters (tied LM head counted once)."""
        d, f, v, p = self.n_embd, self.mlp_dim, self.vocab_size, self.n_positions
        kv = self.kv_heads * self.head_dim
        attn = d * (d + 2 * kv) + (d + 2 * kv) + d * d + d
        mlp = d * f + f + f * d + d
        per_layer = attn + mlp + 4 * d
        head = 0 if self.tie_word_embeddings else v * d
        return v * d + p * d + self.n_layer * per_layer + 2 * d + head

    # ---- transformers config.json <-> StarCoderConfig ----

    @classmethod
    def from_hf(cls, source: dict | str | os.PathLike, **overrides: Any) -> StarCoderConfig:
        """Builds a config from a `config.json` dict, file, or the directory holding it.

        Raises ValueError for a model_type other than gpt_bigcode and for
        settings this port cannot honour (cross-attention, unknown activation).
        """
        hf = _read_hf_config(source)
        where = hf.pop("__file__", "config")
        model_type = hf.get("model_type")
        if model_type != "gpt_bigcode":
            raise ValueError(
                f"{where}: model_type is {model_type!r}, expected 'gpt_bigcode' "
                "(StarCoder, StarCoderBase, SantaCoder, tiny_starcoder); "
                "StarCoder2 ('starcoder2') is a different architecture"
            )
        if hf.get("add_cross_attention"):
            raise ValueError(f"{where}: add_cross_attention=True is not supported (decoder-only port)")
        if not hf.get("attention_softmax_in_fp32", True):
            # We always take the softmax in float32; a float16 softmax would be a
            # different (less exact) model, so refuse rather than silently differ.
            raise ValueError(f"{where}: attention_softmax_in_fp32=False is not supported")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in hf.items() if k in fields and k not in RUNTIME_FIELDS}
        if hf.get(QUANTIZATION_KEY) is not None:
            kwargs["quantization"] = hf[QUANTIZATION_KEY]
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = kwargs[key][0] if kwargs[key] else None
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None

    def to_hf(self) -> dict:
        """The `config.json` dict transformers' GPTBigCodeForCausalLM loads."""
        out = {
            "architectures": ["GPTBigCodeForCausalLM"],
            "model_type": "gpt_bigcode",
            "attention_softmax_in_fp32": True,
            "scale_attention_softmax_in_fp32": True,
            "add_cross_attention": False,
            "use_cache": True,
        }
        for f in dataclasses.fields(self):
            if f.name in RUNTIME_FIELDS:
                continue
            out[f.name] = getattr(self, f.name)
        if self.quantization is not None:
            out[QUANTIZATION_KEY] = self.quantization
        out["torch_dtype"] = self.param_dtype
        return dict(sorted(out.items()))


def _read_hf_config(source: dict | str | os.PathLike) -> dict:
    if isinstance(source, dict):
        return dict(source)
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json at {path}")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    hf["__file__"] = path
    return hf


# ---- the family's published sizes ----
# Shapes from each model's config.json on the Hugging Face hub (bigcode/<name>);
# the three smaller StarCoderBase sizes are also listed in candle's
# candle-transformers/src/models/bigcode.rs. All use one shared K/V head (MQA),
# vocab 49152 and <|endoftext|> = 0 as bos/eos, except SantaCoder (vocab 49280,
# eos 49152, 2048 positions).
PRESETS: dict[str, StarCoderConfig] = {
    # bigcode/starcoderbase-1b: 1,137,207,296 parameters.
    "starcoderbase-1b": StarCoderConfig(
        n_embd=2048, n_layer=24, n_head=16, n_inner=8192, n_positions=8192
    ),
    # bigcode/starcoderbase-3b
    "starcoderbase-3b": StarCoderConfig(
        n_embd=2816, n_layer=36, n_head=22, n_inner=11264, n_positions=8192
    ),
    # bigcode/starcoderbase-7b
    "starcoderbase-7b": StarCoderConfig(
        n_embd=4096, n_layer=42, n_head=32, n_inner=16384, n_positions=8192
    ),
    # bigcode/starcoderbase and bigcode/starcoder (15.5B): exact erf GELU.
    "starcoderbase": StarCoderConfig(
        n_embd=6144, n_layer=40, n_head=48, n_inner=24576, n_positions=8192,
        activation_function="gelu",
    ),
    # bigcode/tiny_starcoder_py: 164M parameters, Python only.
    "tiny_starcoder_py": StarCoderConfig(
        n_embd=768, n_layer=20, n_head=12, n_inner=3072, n_positions=8192
    ),
    # bigcode/gpt_bigcode-santacoder: 1.1B, Python/Java/JavaScript.
    "gpt_bigcode-santacoder": StarCoderConfig(
        vocab_size=49280, n_embd=2048, n_layer=24, n_head=16, n_inner=8192,
        n_positions=2048, bos_token_id=49152, eos_token_id=49152,
    ),
}
PRESETS["starcoder"] = PRESETS["starcoderbase"]


def preset(name: str, **overrides: Any) -> StarCoderConfig:
    """A preset by name (`starcoderbase-1b` or `bigcode/starcoderbase-1b`)."""
    key = name.removeprefix("bigcode/")
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return PRESETS[key].replace(**overrides)

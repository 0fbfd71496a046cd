"""`StarCoderConfig`: one frozen description of a StarCoder-family model.

Two architectures share it, named by `model_type` as transformers names them:
"gpt_bigcode" (StarCoder, StarCoderBase, SantaCoder: learned positions, one
or all K/V heads) and "starcoder2" (StarCoder2: rotary positions, grouped K/V
heads, a sliding attention window, optional biases). The config is the single
source of truth for model shapes. It is read from (and written back to)
Hugging Face `config.json` files with `from_hf` / `to_hf`, and the family's
published sizes are available as presets.
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
QUANTIZATION_MODES = ("int8", "int4", "nf4")  # weight formats: starcoder_jax.ops.int8, ops.int4
KV_CACHE_MODES = ("int8",)  # the KV cache's (model.kv_cache)
# Backend forms (starcoder_jax.ops), chosen per model; "auto" picks per backend and phase.
ATTENTION_IMPLS = ("auto", "xla", "cpu_blocked", "cpu_key_major", "chunked", "cudnn", "splash")
MATMUL_IMPLS = ("auto", "xla", "cpu")
RUNTIME_FIELDS = ("dtype", "param_dtype", "quantization", "attention_impl", "matmul_impl")  # not in config.json
MODEL_TYPES = ("gpt_bigcode", "starcoder2")
# Fields only StarCoder2 sets; a gpt_bigcode config keeps their defaults and never writes them.
STARCODER2_FIELDS = ("n_kv_head", "rope_theta", "sliding_window", "use_bias")
# StarCoder2's config.json names -> ours (the GPTBigCode names, which this class keeps)
STARCODER2_NAMES = {
    "hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
    "num_key_value_heads": "n_kv_head", "intermediate_size": "n_inner",
    "max_position_embeddings": "n_positions", "hidden_act": "activation_function",
    "norm_epsilon": "layer_norm_epsilon", "attention_dropout": "attn_pdrop",
    "residual_dropout": "resid_pdrop", "embedding_dropout": "embd_pdrop",
}


def check_quantization(mode: str | None, argument: str = "quantization", none_means: str = "",
                       modes: tuple[str, ...] = QUANTIZATION_MODES) -> str | None:
    """`mode` if it is None or one of `modes` (the weight formats by default),
    else a ValueError that names the caller's `argument` (and what None
    means there, e.g. " (the compute dtype)" for a KV cache)."""
    if mode is not None and mode not in modes:
        allowed = ", ".join(repr(m) for m in modes)
        raise ValueError(f"{argument} must be None{none_means} or {allowed}, got {mode!r}")
    return mode


@dataclasses.dataclass(frozen=True)
class StarCoderConfig:
    """Shapes and numerics of a StarCoder-family model (GPTBigCode or StarCoder2).

    Field names follow transformers' `GPTBigCodeConfig` so that a reader who
    knows `config.json` knows this class; `from_hf` / `to_hf` translate
    StarCoder2's names (STARCODER2_NAMES). `dtype` is the compute dtype of
    activations and matmuls; `param_dtype` is the storage dtype of weights.

    model_type "starcoder2" switches the architecture: rotary position
    embeddings of base `rope_theta` (no position table), `n_kv_head` K/V
    heads (StarCoder2's num_key_value_heads; None: one per query head), a
    token sees the `sliding_window` newest positions up to its own (None:
    all), and `use_bias` puts biases on every projection. multi_query is
    GPTBigCode's switch only: StarCoder2 derives its K/V heads from n_kv_head.
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
    model_type: str = "gpt_bigcode"
    n_kv_head: int | None = None  # starcoder2 only
    rope_theta: float = 10000.0  # starcoder2 only
    sliding_window: int | None = None  # starcoder2 only
    use_bias: bool = True  # starcoder2 only (GPTBigCode always has biases)
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
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {', '.join(MODEL_TYPES)}, got {self.model_type!r}")
        if self.model_type == "gpt_bigcode":
            changed = [f"{name}={getattr(self, name)!r}" for name in STARCODER2_FIELDS
                       if getattr(self, name) != _FIELD_DEFAULTS[name]]
            if changed:
                raise ValueError(f"{', '.join(changed)} need model_type='starcoder2'; GPTBigCode has learned "
                                 "positions, one or all K/V heads (multi_query), no window and biases")
        for name in ("n_kv_head", "sliding_window"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta!r}")
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
        if self.model_type == "starcoder2":
            return self.n_head if self.n_kv_head is None else self.n_kv_head
        return 1 if self.multi_query else self.n_head

    @property
    def rotary(self) -> bool:
        """Rotary position embeddings (StarCoder2) rather than a learned table (GPTBigCode)."""
        return self.model_type == "starcoder2"

    @property
    def fused_qkv(self) -> bool:
        """HF holds q, k and v as one projection (GPTBigCode's c_attn) rather than three."""
        return self.model_type == "gpt_bigcode"

    @property
    def window(self) -> int | None:
        """Keys a query sees at most (itself included), or None: the attention window
        in effect, which a window as long as the context does not narrow."""
        w = self.sliding_window
        return None if w is None or w >= self.n_positions else w

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
        d, f, v = self.n_embd, self.mlp_dim, self.vocab_size
        p = 0 if self.rotary else self.n_positions
        kv = self.kv_heads * self.head_dim
        biases = (d + 2 * kv) + d + f + d if self.use_bias else 0
        per_layer = d * (d + 2 * kv) + d * d + d * f + f * d + biases + 4 * d
        head = 0 if self.tie_word_embeddings else v * d
        return v * d + p * d + self.n_layer * per_layer + 2 * d + head

    # ---- transformers config.json <-> StarCoderConfig ----

    @classmethod
    def from_hf(cls, source: dict | str | os.PathLike, **overrides: Any) -> StarCoderConfig:
        """Builds a config from a `config.json` dict, file, or the directory holding it.

        Raises ValueError for a model_type other than gpt_bigcode or
        starcoder2 and for settings this port cannot honour (cross-attention,
        unknown activation, a RoPE scaling).
        """
        hf = _read_hf_config(source)
        where = hf.pop("__file__", "config")
        model_type = hf.get("model_type")
        if model_type == "starcoder2":
            hf = _starcoder2_fields(hf, where)
        elif model_type != "gpt_bigcode":
            raise ValueError(
                f"{where}: model_type is {model_type!r}, expected 'gpt_bigcode' "
                "(StarCoder, StarCoderBase, SantaCoder, tiny_starcoder) or 'starcoder2' (StarCoder2)"
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
        """The `config.json` dict transformers' GPTBigCodeForCausalLM (or
        Starcoder2ForCausalLM, for model_type starcoder2) loads."""
        if self.model_type == "starcoder2":
            return self._starcoder2_hf()
        out = {
            "architectures": ["GPTBigCodeForCausalLM"],
            "model_type": "gpt_bigcode",
            "attention_softmax_in_fp32": True,
            "scale_attention_softmax_in_fp32": True,
            "add_cross_attention": False,
            "use_cache": True,
        }
        for f in dataclasses.fields(self):
            if f.name in RUNTIME_FIELDS or f.name in STARCODER2_FIELDS:
                continue
            out[f.name] = getattr(self, f.name)
        if self.quantization is not None:
            out[QUANTIZATION_KEY] = self.quantization
        out["torch_dtype"] = self.param_dtype
        return dict(sorted(out.items()))

    def _starcoder2_hf(self) -> dict:
        out = {"architectures": ["Starcoder2ForCausalLM"], "model_type": "starcoder2", "use_cache": True,
               "num_key_value_heads": self.kv_heads,
               "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta}}
        ours_to_hf = {v: k for k, v in STARCODER2_NAMES.items()}
        skip = {*RUNTIME_FIELDS, "n_kv_head", "rope_theta", "multi_query", "scale_attn_weights"}
        for f in dataclasses.fields(self):
            if f.name not in skip:
                out[ours_to_hf.get(f.name, f.name)] = getattr(self, f.name)
        out["intermediate_size"] = self.mlp_dim
        if self.quantization is not None:
            out[QUANTIZATION_KEY] = self.quantization
        out["torch_dtype"] = self.param_dtype
        return dict(sorted(out.items()))


_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(StarCoderConfig)}


def _starcoder2_fields(hf: dict, where: str) -> dict:
    """A StarCoder2 config.json dict in our field names (STARCODER2_NAMES)."""
    out = {k: v for k, v in hf.items() if k not in STARCODER2_NAMES and k != "multi_query"}
    for theirs, ours in STARCODER2_NAMES.items():
        if theirs in hf:
            out[ours] = hf[theirs]
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ValueError(f"{where}: rope_type {kind!r} is not supported (only the default rotary embedding)")
    theta = rope.get("rope_theta", hf.get("rope_theta"))
    if theta is not None:
        out["rope_theta"] = float(theta)
    if hf.get("head_dim") not in (None, hf.get("hidden_size", 0) // max(hf.get("num_attention_heads", 1), 1)):
        raise ValueError(f"{where}: head_dim={hf['head_dim']} other than hidden_size / num_attention_heads "
                         "is not supported")
    if out.get("n_kv_head") is not None:
        out["multi_query"] = out["n_kv_head"] == 1
    return out


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


def _starcoder2(**shape: Any) -> StarCoderConfig:
    return StarCoderConfig(model_type="starcoder2", vocab_size=49152, n_positions=16384, sliding_window=4096,
                           multi_query=False, layer_norm_epsilon=1e-5, activation_function="gelu_pytorch_tanh",
                           use_bias=True, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, **shape)


# StarCoder2 (arXiv:2402.19173), from each model's config.json on the Hugging Face hub
# (huggingface.co/bigcode/starcoder2-{3b,7b,15b}/blob/main/config.json): vocab 49152,
# max_position_embeddings 16384, sliding_window 4096, norm_epsilon 1e-5, use_bias true,
# gelu_pytorch_tanh, bos = eos = 0. Per size: hidden_size, num_hidden_layers,
# num_attention_heads, num_key_value_heads, intermediate_size, rope_theta and
# initializer_range, as also pinned in NVIDIA NeMo's Starcoder2Config3B/7B/15B
# (nemo/collections/llm/gpt/model/starcoder2.py). The files do not set
# tie_word_embeddings, so transformers' default (tied) holds.
PRESETS.update({
    # bigcode/starcoder2-3b: 3.03B parameters.
    "starcoder2-3b": _starcoder2(n_embd=3072, n_layer=30, n_head=24, n_kv_head=2, n_inner=12288,
                                 rope_theta=999999.4420358813, initializer_range=0.018042),
    # bigcode/starcoder2-7b: 7.17B parameters.
    "starcoder2-7b": _starcoder2(n_embd=4608, n_layer=32, n_head=36, n_kv_head=4, n_inner=18432,
                                 rope_theta=1000000.0, initializer_range=0.018042),
    # bigcode/starcoder2-15b: 15.7B parameters.
    "starcoder2-15b": _starcoder2(n_embd=6144, n_layer=40, n_head=48, n_kv_head=4, n_inner=24576,
                                  rope_theta=100000.0, initializer_range=0.01275),
})


def preset(name: str, **overrides: Any) -> StarCoderConfig:
    """A preset by name (`starcoderbase-1b` or `bigcode/starcoderbase-1b`)."""
    key = name.removeprefix("bigcode/")
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return PRESETS[key].replace(**overrides)

"""LoRA adapters on the StarCoder projections, configured and named as PEFT's LoRA.

PEFT names a model's projections by their transformers module names
(`transformer.h.3.attn.c_attn` in GPTBigCode, `model.layers.3.self_attn.q_proj`
in StarCoder2: `Architecture`) and picks the adapted ones with
`target_modules`. `LoRAConfig` holds the PEFT fields our adapters
represent; `LoRAConfig.targets` resolves the names the way PEFT does;
`add_lora` puts an adapter (model.modules.LoRA) on each targeted Dense and
`merge_lora` folds them into the kernels. The PEFT directory format is
model/peft.py.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from starcoder_jax.config import StarCoderConfig
from starcoder_jax.model.modules import Dense, LoRA, StarCoder, jnp_dtype

# A layer's HF module (under transformer.h.{i}) -> our Dense modules (under blocks/{i}).
# HF's c_attn is one projection for query, key and value: one A (held by the query's
# adapter), one B for each part.
SITES: dict[str, tuple[tuple[str, str], ...]] = {
    "attn.c_attn": (("attn", "query"), ("attn", "key"), ("attn", "value")),
    "attn.c_proj": (("attn", "out"),),
    "mlp.c_fc": (("mlp", "fc"),),
    "mlp.c_proj": (("mlp", "proj"),),
}
DEFAULT_TARGETS = ("c_attn",)  # PEFT's default target_modules for gpt_bigcode
# transformers' other module names in a GPTBigCodeForCausalLM, for matching as PEFT does
_LAYER_OTHERS = ("ln_1", "attn", "attn.resid_dropout", "ln_2", "mlp", "mlp.act", "mlp.dropout")
_EMBEDDINGS = ("transformer.wte", "transformer.wpe", "lm_head")
# StarCoder2 keeps its four attention projections apart: an adapter (its own A) on each.
STARCODER2_SITES: dict[str, tuple[tuple[str, str], ...]] = {
    "self_attn.q_proj": (("attn", "query"),),
    "self_attn.k_proj": (("attn", "key"),),
    "self_attn.v_proj": (("attn", "value"),),
    "self_attn.o_proj": (("attn", "out"),),
    "mlp.c_fc": (("mlp", "fc"),),
    "mlp.c_proj": (("mlp", "proj"),),
}


@dataclasses.dataclass(frozen=True)
class Architecture:
    """transformers' module names of one model_type, as PEFT sees them."""

    layers: str  # the prefix of layer i's modules: f"{layers}.{i}"
    sites: dict[str, tuple[tuple[str, str], ...]]  # adaptable module -> our Dense modules
    layer_others: tuple[str, ...]  # the layer's other modules
    embeddings: tuple[str, ...]  # modules that hold an embedding or the LM head
    others: tuple[str, ...]  # the model's other modules outside the layers


ARCHITECTURES = {
    "gpt_bigcode": Architecture("transformer.h", SITES, _LAYER_OTHERS, _EMBEDDINGS,
                                ("transformer", "transformer.drop", "transformer.h", "transformer.ln_f")),
    "starcoder2": Architecture("model.layers", STARCODER2_SITES,
                               ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp", "mlp.act"),
                               ("model.embed_tokens", "lm_head"),
                               ("model", "model.layers", "model.norm", "model.rotary_emb")),
}


def architecture(config: StarCoderConfig) -> Architecture:
    return ARCHITECTURES[config.model_type]


def _tuple(value):
    """A JSON list (or a tuple) as a tuple; a string, number or None as it is."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """The fields of PEFT's LoraConfig that our adapters represent, under PEFT's names.

    r: the rank; lora_alpha: the scale is lora_alpha / r (lora_alpha / sqrt(r)
    with use_rslora); lora_dropout: dropout on the adapters' inputs in
    training. target_modules: module names matched as PEFT matches them (a
    list: a whole name or its end after a dot, so "c_proj" is both
    attn.c_proj and mlp.c_proj; a string: a regular expression for the whole
    name). rank_pattern / alpha_pattern: {pattern: r or alpha} for the
    modules whose name ends with a match (PEFT's rule; dicts are held as
    tuples of pairs). exclude_modules, layers_to_transform, layers_pattern:
    as in PEFT. base_model_name_or_path: written to exports (not used here).
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | str = DEFAULT_TARGETS
    use_rslora: bool = False
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    exclude_modules: tuple[str, ...] | str | None = None
    layers_to_transform: tuple[int, ...] | int | None = None
    layers_pattern: tuple[str, ...] | str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        for name in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        for name in ("rank_pattern", "alpha_pattern"):
            object.__setattr__(self, name, tuple(dict(getattr(self, name) or ()).items()))
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA r must be a positive integer, got {self.r!r}")
        bad = [f"{k}: {v!r}" for k, v in self.rank_pattern if not isinstance(v, int) or v < 1]
        if bad:
            raise ValueError(f"LoRA rank_pattern ranks must be positive integers, got {', '.join(bad)}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"LoRA lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not self.target_modules:
            raise ValueError("LoRA target_modules is empty; name the projections to adapt, e.g. ['c_attn']")

    def rank_and_alpha(self, name: str) -> tuple[int, float]:
        """(r, lora_alpha) of module `name`: the first rank_pattern / alpha_pattern key
        that matches the end of the name (PEFT's get_pattern_key), else r / lora_alpha."""
        def pick(pattern, default):
            for key, value in pattern:
                if re.match(rf"(.*\.)?({key})$", name):
                    return value
            return default

        return pick(self.rank_pattern, self.r), pick(self.alpha_pattern, self.lora_alpha)

    def scale(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def matches(self, name: str) -> bool:
        """Whether PEFT's LoRA adapts the module `name` (PEFT's check_target_module_exists)."""
        if self.exclude_modules is not None and _named(self.exclude_modules, name):
            return False
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None
        if name in self.target_modules:
            return True
        if not any(name.endswith(f".{t}") for t in self.target_modules):
            return False
        if self.layers_to_transform is None or self.layers_to_transform == ():
            return True
        patterns = self.layers_pattern or ()
        patterns = (patterns,) if isinstance(patterns, str) else patterns
        if patterns:
            found = (re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name) for p in patterns)
            match = next((m for m in found if m), None)
        else:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        if match is None:
            return False
        layers = self.layers_to_transform
        return int(match["idx"]) in (layers if isinstance(layers, tuple) else (layers,))

    def targets(self, config: StarCoderConfig) -> list[tuple[int, str, int, float]]:
        """(layer, site, r, lora_alpha) of every adapted projection (site: a key of
        SITES); raises ValueError, naming target_modules, when it selects a module
        that cannot take an adapter here (an embedding, the LM head, a LayerNorm)
        or no projection at all."""
        found = []
        arch = architecture(config)
        names = [*arch.others, *arch.embeddings]
        for i in range(config.n_layer):
            layer = f"{arch.layers}.{i}"
            names.append(layer)
            names += [f"{layer}.{other}" for other in arch.layer_others]
            for site in arch.sites:
                if self.matches(f"{layer}.{site}"):
                    r, alpha = self.rank_and_alpha(f"{layer}.{site}")
                    found.append((i, site, r, alpha))
        refused = [n for n in names if self.matches(n)]
        if refused:
            kind = ("the embedding or LM head" if any(n in arch.embeddings for n in refused)
                    else "a module that is not a projection")
            raise ValueError(f"LoRA target_modules {self._targets_text()} selects {', '.join(refused[:4])}: "
                             f"adapters on {kind} are not supported; starcoder-jax adapts "
                             f"{', '.join(arch.sites)}")
        if not found:
            example = (["c_attn", "c_proj", "c_fc"] if config.fused_qkv
                       else ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"])
            raise ValueError(f"LoRA target_modules {self._targets_text()} matches none of the projections "
                             f"{', '.join(arch.sites)} (e.g. {example})")
        return found

    def _targets_text(self) -> str:
        t = self.target_modules
        return repr(t) if isinstance(t, str) else repr(list(t))


def _named(names, name: str) -> bool:
    """PEFT's exclude_modules rule: a regular expression for the whole name, or a list of names / ends."""
    if isinstance(names, str):
        return re.fullmatch(names, name) is not None
    return name in names or any(name.endswith(f".{n}") for n in names)


def has_lora(model: StarCoder) -> bool:
    return getattr(model, "lora_config", None) is not None


def site_modules(model: StarCoder, layer: int, site: str) -> list[Dense]:
    """The Dense modules of HF module {layers}.{layer}.{site} (transformer.h or model.layers)."""
    block = model.blocks[layer]
    return [getattr(getattr(block, parent), name) for parent, name in architecture(model.config).sites[site]]


def adapted(model: StarCoder) -> list[tuple[int, str, list[Dense]]]:
    """(layer, site, its Dense modules) of every adapter of a model (model.lora_config's targets)."""
    return [(i, site, site_modules(model, i, site)) for i, site, _, _ in model.lora_config.targets(model.config)]


def add_lora(model: StarCoder, lora: LoRAConfig, *, seed: int = 0, dtype: str | None = None) -> StarCoder:
    """Adds a new adapter (A kaiming-uniform from `seed`, B zero) to every projection
    `lora` targets, in place; returns the model. Its outputs stay as they were until
    B moves. dtype: the adapters' dtype (default: the model's param dtype); quantized
    kernels (int8, int4, nf4) stay as they are, frozen, beside them."""
    if has_lora(model):
        raise ValueError("the model has LoRA adapters already; merge them (merge_lora) or load the base again")
    targets = lora.targets(model.config)
    rngs = nnx.Rngs(params=seed)
    dt = jnp_dtype(dtype or model.config.param_dtype)
    for i, site, r, alpha in targets:
        for j, dense in enumerate(site_modules(model, i, site)):
            kernel = dense.kernel
            shape, axes = tuple(kernel.get_value().shape), kernel.get_metadata()["out_sharding"]
            dense.lora = LoRA(shape[:dense.n_in], shape[dense.n_in:], axes, rank=r, scale=lora.scale(r, alpha),
                              dropout=lora.lora_dropout, dtype=dt, matmul_impl=dense.matmul_impl, rngs=rngs,
                              shared_a=j > 0)
    model.lora_config = lora
    return model


def lora_delta(a: jax.Array, adapter: LoRA) -> jax.Array:
    """A [*in, r] @ B [r, *out] * scale as a float32 kernel update [*in, *out]."""
    r = a.shape[-1]
    a2 = a.reshape(-1, r).astype(jnp.float32)
    b2 = adapter.b[...].reshape(r, -1).astype(jnp.float32)
    delta = jnp.dot(a2, b2, precision=jax.lax.Precision.HIGHEST) * adapter.scale
    return delta.reshape(*a.shape[:-1], *adapter.b.shape[1:])


def merge_lora(model: StarCoder) -> StarCoder:
    """A model without adapters whose kernels are W + A @ B * scale (PEFT's
    merge_and_unload); `model` itself keeps its adapters. The base must be float:
    a quantized kernel cannot take the update without a second rounding."""
    if not has_lora(model):
        raise ValueError("the model has no LoRA adapters to merge")
    if model.config.quantization is not None:
        raise ValueError(f"merge_lora needs a float base, this one is {model.config.quantization}: load the "
                         "base without quantize (the merged model can be quantized after)")
    merged = nnx.merge(*nnx.split(model))  # new variables over the same arrays
    for _, _, denses in adapted(merged):
        a = denses[0].lora.a[...]
        for dense in denses:
            kernel = dense.kernel
            w = kernel.get_value()
            kernel.set_value((w.astype(jnp.float32) + lora_delta(a, dense.lora)).astype(w.dtype))
        for dense in denses:
            dense.lora = None
    merged.lora_config = None
    return merged.adapt_to_backend_()

"""`load_pretrained`: one entry point for local HF directories, orbax directories and hub ids."""

from __future__ import annotations

import os
import re

from starcoder_jax.config import StarCoderConfig, check_quantization
from starcoder_jax.model import weights
from starcoder_jax.model.modules import StarCoder

# Models shipped inside the package, loadable by name with no download.
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
DEFAULT_MODEL = "pystdlib-9m"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Only what a GPTBigCode model needs: never the *.bin pickles next to them.
_HUB_PATTERNS = ["*.json", "*.safetensors", "merges.txt", "vocab.json"]


def resolve_model_dir(name_or_path: str | os.PathLike) -> str:
    """A local directory for `name_or_path`: the path itself, a model shipped
    in the package (by name, e.g. "pystdlib-9m"), or a hub snapshot.

    Hub ids (`bigcode/starcoderbase-1b`) are downloaded into the huggingface_hub
    cache; gated repositories read the token from HF_TOKEN or `hf auth login`.
    """
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        return path
    shipped = os.path.join(SHIPPED_DIR, path)
    if "/" not in path and os.path.isdir(shipped):
        return shipped
    if os.path.exists(path):
        raise ValueError(f"model path {path!r} is a file; expected a model directory")
    if not _HUB_ID.match(path):
        raise FileNotFoundError(
            f"model path {path!r} does not exist (and is not a hub id such as "
            "'bigcode/starcoderbase-1b')"
        )
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, allow_patterns=_HUB_PATTERNS,
                                 token=os.environ.get("HF_TOKEN"))
    except Exception as err:  # offline, gated, missing: all end here with the reason
        raise FileNotFoundError(
            f"could not fetch {path!r} from the Hugging Face hub: {type(err).__name__}: {err}. "
            "Gated models (bigcode/*) need an accepted licence and HF_TOKEN; offline "
            "machines need a local directory."
        ) from None


def load_pretrained(name_or_path: str | os.PathLike, *, dtype: str = "float32",
                    compute_dtype: str | None = None, progress: bool | None = None,
                    shardings: dict | None = None, mesh=None,
                    quantize: str | None = None, attention_impl: str = "auto",
                    matmul_impl: str = "auto", adapter: str | os.PathLike | None = None) -> StarCoder:
    """Loads a StarCoder-family model.

    name_or_path: an HF-format directory (config.json + safetensors), a
      directory written by `starcoder-jax convert hf-to-jax` (orbax params),
      or a hub id.
    dtype: parameter dtype ("float32", "bfloat16", "float16"); compute_dtype
      defaults to it.
    shardings: parameter path -> jax Sharding; each tensor goes straight there.
    mesh: a jax Mesh or a spec such as "fsdp=4,tensor=2": shardings from the
      rules in starcoder_jax.parallel.rules (give mesh or shardings, not both).
    quantize: quantizes every matmul weight after loading, weight-only:
      "int8" (per-output-channel scales; starcoder_jax.ops.int8), "int4"
      (groups of 64 inputs) or "nf4" (QLoRA's NormalFloat, blocks of 64,
      double-quantized scales; both starcoder_jax.ops.int4). A directory
      written by `starcoder-jax convert hf-to-jax --quantize MODE` is
      quantized already and loads as such without it.
    attention_impl, matmul_impl: which form of the attention and projection
      kernels runs (config.ATTENTION_IMPLS, config.MATMUL_IMPLS; starcoder_jax.ops).
      "auto" picks per backend and phase; they are never written to config.json.
      The model comes laid out for the projection form (`StarCoder.adapt_to_backend_`).
    adapter: a PEFT LoRA directory (or hub id) for this base (model.peft.load_peft),
      added after quantizing: quantized base weights, adapters in `dtype`.
    """
    impls = dict(attention_impl=attention_impl, matmul_impl=matmul_impl)
    StarCoderConfig(**impls)  # checks both names before anything is read
    check_quantization(quantize, "quantize")
    path = resolve_model_dir(name_or_path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: no config.json (not a model directory)")
    if mesh is not None:
        if shardings is not None:
            raise ValueError("give load_pretrained either mesh or shardings, not both")
        from flax import nnx

        from starcoder_jax.model.modules import abstract_model
        from starcoder_jax.parallel.mesh import param_shardings

        shardings = param_shardings(nnx.state(abstract_model(StarCoderConfig.from_hf(path))), mesh)
    elif shardings is not None and quantize is not None:
        raise ValueError("quantize with shardings= is not supported: pass mesh= so the quantized "
                         "weights and scales are placed by the sharding rules")
    if weights.is_orbax_dir(path):
        model = weights.load_orbax(path, dtype=dtype, compute_dtype=compute_dtype,
                                   shardings=shardings, **impls)
    else:
        model = weights.load_hf(path, dtype=dtype, compute_dtype=compute_dtype,
                                progress=progress, shardings=shardings, **impls)
    sharded = mesh is not None or shardings is not None
    if quantize is not None and model.config.quantization not in (None, quantize):
        raise ValueError(f"{path} is {model.config.quantization}-quantized; it cannot load as {quantize} "
                         "(convert the float checkpoint with --quantize, or load without quantize)")
    if quantize is not None and model.config.quantization is None:
        model.quantize_(quantize, sharded=sharded)
        if mesh is not None:  # the quantized weights and scales go where the rules put them
            from starcoder_jax.parallel.mesh import shard_model

            shard_model(model, mesh)
    if adapter is not None:
        from starcoder_jax.model.peft import load_peft

        load_peft(model, resolve_model_dir(adapter))
        if mesh is not None:  # the adapters go where the rules put them
            from starcoder_jax.parallel.mesh import shard_model

            shard_model(model, mesh)
        elif shardings is not None:
            _place_adapters(model, shardings)
    return model.adapt_to_backend_(sharded=sharded)


def _place_adapters(model: StarCoder, shardings: dict) -> None:
    """Puts the LoRA adapters beside a base placed by `shardings=`: an adapter path the dict
    names goes there; the others where the rules put them on the mesh of the dict's named
    shardings, or, with none named, whole on a device of its first sharding."""
    import jax
    from flax import nnx

    from starcoder_jax.parallel.mesh import param_shardings

    lora = nnx.state(model, nnx.LoRAParam)
    given = jax.tree.leaves(shardings)
    named = [x for x in given if isinstance(x, jax.sharding.NamedSharding)]
    rules = param_shardings(lora, named[0].mesh) if named else {}
    for path, var in nnx.to_flat_state(lora):
        target = shardings.get(path) or rules.get(path)
        if target is None and given:
            target = min(given[0].device_set, key=lambda d: d.id)
        if target is not None:
            var.set_value(jax.device_put(var.get_value(), target))

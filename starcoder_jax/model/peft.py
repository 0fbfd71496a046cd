"""PEFT LoRA adapter directories <-> our adapters (model.lora).

A PEFT directory holds `adapter_config.json` (PEFT's LoraConfig) and
`adapter_model.safetensors`, with tensors named
`base_model.model.transformer.h.{i}.{site}.lora_A.weight` (and `lora_B`;
`base_model.model.model.layers.{i}.{site}...` for StarCoder2) in
nn.Linear's [out, in] layout: lora_A [r, in], lora_B [out, r]. Ours are
A [*in, r] and B [r, *out] with named head axes; c_attn's one lora_B has
its rows laid out like c_attn's own weight (weights.split_qkv_weight), so it
splits into the B of query, key and value, while its lora_A is the query's A.

As for full checkpoints, the mapping is one table (`adapter_table`) of keys
and per-key transforms, every problem with a directory is reported at once,
and nothing is added to a model before the whole directory checks out.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from starcoder_jax.model.lora import LoRAConfig, add_lora, architecture, has_lora, site_modules
from starcoder_jax.model.modules import StarCoder, jnp_dtype
from starcoder_jax.model.weights import CheckpointError, Entry, join_qkv_weight, split_qkv_weight

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel's name for the wrapped transformers model

# PEFT LoraConfig fields that change what an adapter computes in ways ours cannot:
# each must be unset (null, false or empty) in a directory we load.
UNSUPPORTED = {
    "use_dora": "DoRA adapters (a learned magnitude per output)",
    "lora_bias": "a trained bias on lora_B",
    "modules_to_save": "whole modules trained and saved beside the adapters",
    "fan_in_fan_out": "[in, out] (Conv1D) base weights; StarCoder's projections are nn.Linear",
    "use_qalora": "QA-LoRA's pooled adapter inputs",
    "target_parameters": "adapters on bare parameters",
    "trainable_token_indices": "trained embedding rows",
    "layer_replication": "replicated layers",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "megatron_config": "Megatron-parallel layers",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow adapter routing",
    "kasa_config": "KaSA adapters",
    "monteclora_config": "MonteCLoRA adapters",
    "velora_config": "VeLoRA adapters",
}
# init_lora_weights methods that change the base weights as well as the adapter (PiSSA, OLoRA,
# CorDA, LoftQ, LoRA-GA): such a directory only works with the changed base, which it does not hold.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def read_peft_config(path: str) -> LoRAConfig:
    """The LoRAConfig of a PEFT adapter directory; a ValueError names the first
    field whose setting our adapters cannot represent."""
    file = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    with open(file, encoding="utf-8") as f:
        raw = json.load(f)
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{file}: peft_type is {raw['peft_type']!r}; only LORA adapters are supported")
    for field, what in UNSUPPORTED.items():
        if raw.get(field):
            raise ValueError(f"{file}: {field}={raw[field]!r} is not supported ({what})")
    if raw.get("bias", "none") != "none":
        raise ValueError(f"{file}: bias={raw['bias']!r} is not supported (trained biases); only bias='none'")
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise ValueError(f"{file}: init_lora_weights={init!r} is not supported: that initialisation changes "
                         "the base weights too, and the directory holds only the adapter")
    fields = ("r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern", "alpha_pattern", "exclude_modules",
              "layers_to_transform", "layers_pattern", "base_model_name_or_path")
    kwargs = {k: raw[k] for k in fields if raw.get(k) is not None}
    if raw.get("target_modules") is not None:
        kwargs["target_modules"] = raw["target_modules"]
    try:
        return LoRAConfig(**kwargs)
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from None


def peft_config_dict(lora: LoRAConfig, base_model_name_or_path: str | None = None) -> dict:
    """The adapter_config.json PEFT's LoraConfig reads for `lora`."""
    def listed(value):
        return list(value) if isinstance(value, tuple) else value

    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or lora.base_model_name_or_path,
        "r": lora.r,
        "lora_alpha": lora.lora_alpha,
        "lora_dropout": lora.lora_dropout,
        "target_modules": listed(lora.target_modules),
        "exclude_modules": listed(lora.exclude_modules),
        "layers_to_transform": listed(lora.layers_to_transform),
        "layers_pattern": listed(lora.layers_pattern),
        "use_rslora": lora.use_rslora,
        "rank_pattern": dict(lora.rank_pattern),
        "alpha_pattern": dict(lora.alpha_pattern),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def adapter_table(model: StarCoder, lora: LoRAConfig) -> list[Entry]:
    """Every tensor of the PEFT adapter `lora` on `model` (with or without its
    adapters yet) and how it maps to our adapter params."""
    config = model.config
    arch = architecture(config)
    entries = []
    for i, site, r, _ in lora.targets(config):
        denses = site_modules(model, i, site)
        shapes = [tuple(d.kernel.get_value().shape) for d in denses]
        n_in = denses[0].n_in
        in_shape, outs = shapes[0][:n_in], [s[n_in:] for s in shapes]
        n_inputs, n_outputs = math.prod(in_shape), sum(math.prod(o) for o in outs)
        key = f"{PREFIX}{arch.layers}.{i}.{site}"
        paths = [("blocks", i, parent, name, "lora") for parent, name in arch.sites[site]]

        def a_to_ours(a, in_shape=in_shape, r=r):
            return (a.T.reshape(*in_shape, r),)

        def a_to_hf(a, r=r):
            return a.reshape(-1, r).T

        fused = len(outs) > 1  # c_attn: the B of query, key and value in one tensor

        def b_to_ours(b, out=outs[0], r=r, fused=fused):
            return split_qkv_weight(b, config) if fused else (b.T.reshape(r, *out),)

        def b_to_hf(*b, r=r):
            return join_qkv_weight(*b, config) if len(b) > 1 else b[0].reshape(r, -1).T

        entries.append(Entry(f"{key}.lora_A.weight", (r, n_inputs), ((*paths[0], "a"),), a_to_ours, a_to_hf))
        entries.append(Entry(f"{key}.lora_B.weight", (n_outputs, r), tuple((*p, "b") for p in paths),
                             b_to_ours, b_to_hf))
    return entries


def _variable(model: StarCoder, path):
    node = model
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def load_peft(model: StarCoder, path: str) -> StarCoder:
    """Adds the adapters of PEFT directory `path` to `model` (in place; returns it),
    in the model's param dtype, after checking every tensor: a missing, extra or
    misshapen one is a CheckpointError that lists them all, and leaves the model
    as it was."""
    path = os.fspath(path)
    lora = read_peft_config(path)
    file = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no {ADAPTER_WEIGHTS}")
    table = adapter_table(model, lora)
    arrays = {}
    with safe_open(file, framework="numpy") as f:
        keys = set(f.keys())
        problems = [f"missing tensor {e.hf_key} (expected shape {list(e.hf_shape)})"
                    for e in table if e.hf_key not in keys]
        expected = {e.hf_key for e in table}
        problems += [f"unexpected tensor {k}" for k in sorted(keys - expected)]
        for e in table:
            if e.hf_key in keys:
                arrays[e.hf_key] = f.get_tensor(e.hf_key)
                if arrays[e.hf_key].shape != e.hf_shape:
                    problems.append(f"{e.hf_key} has shape {list(arrays[e.hf_key].shape)}, expected "
                                    f"{list(e.hf_shape)}")
    if problems:
        raise CheckpointError(f"{path} does not fit this model and its {ADAPTER_CONFIG} "
                              f"({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n  "
                              + "\n  ".join(problems[:20]))
    add_lora(model, lora)
    dtype = jnp_dtype(model.config.param_dtype)
    for e in table:
        for p, value in zip(e.paths, e.to_ours(arrays[e.hf_key])):
            _variable(model, p).set_value(jnp.asarray(np.ascontiguousarray(value), dtype))
    return model


def save_peft(model: StarCoder, out_dir: str, *, base_model_name_or_path: str | None = None,
              dtype: str | None = None) -> str:
    """Writes the model's adapters as a PEFT directory (adapter_config.json,
    adapter_model.safetensors) that `PeftModel.from_pretrained(base, out_dir)`
    loads; the base is not written. dtype: the tensors' dtype (default: the
    adapters' own). Both files are written in a temporary directory first and
    moved into place when complete.

    On several processes (jax.distributed) every process calls it: adapters
    split across processes are gathered collectively, process 0 writes, and
    each returns once the directory is complete.
    """
    if not has_lora(model):
        raise ValueError("the model has no LoRA adapters to save (add_lora, load_pretrained(adapter=...) or a "
                         "finetune run with a lora: section)")
    lora = model.lora_config
    tensors = {}
    for e in adapter_table(model, lora):
        ours = [_whole(_variable(model, p).get_value()) for p in e.paths]
        out = e.to_hf(*ours)
        tensors[e.hf_key] = np.ascontiguousarray(out.astype(jnp.dtype(dtype)) if dtype else out)
    config = peft_config_dict(lora, base_model_name_or_path)

    def write(folder):
        save_file(tensors, os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(folder, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)

    if jax.process_index() == 0:
        _write_atomically(out_dir, write)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"save_peft {os.path.abspath(out_dir)}")
    return out_dir


def _whole(x) -> np.ndarray:
    """The whole array on this host; gathered from every process (a collective) where this
    process holds only some of its shards."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _write_atomically(out_dir: str, write) -> None:
    """Runs write(folder) on a new temporary folder beside out_dir, then moves the
    result into place (the whole folder when out_dir does not exist yet, else file by
    file); a failure leaves out_dir as it was."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir} is a file; expected a directory for the adapter")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        write(tmp)
        if not os.path.exists(out_dir):
            os.replace(tmp, out_dir)
            return
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

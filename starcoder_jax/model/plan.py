"""The shard plan of a model named by preset, directory or config (`starcoder-jax shard-plan`)."""

from __future__ import annotations

import os

from flax import nnx

from starcoder_jax.config import PRESETS, StarCoderConfig, preset
from starcoder_jax.model.modules import abstract_model
from starcoder_jax.parallel.plan import plan_bytes


def model_config(model: str | StarCoderConfig) -> tuple[str, StarCoderConfig]:
    if isinstance(model, StarCoderConfig):
        return "config", model
    if os.path.isdir(model):
        return model, StarCoderConfig.from_hf(model)
    if model.removeprefix("bigcode/") in PRESETS:
        return model, preset(model)
    raise ValueError(f"model {model!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                     "nor a directory with a config.json")


def shard_plan(model: str | StarCoderConfig, mesh_spec: str, *, dtype: str | None = None, **kwargs) -> dict:
    """Bytes per device of `model` (a StarCoderConfig, a preset name or a model
    directory) on the mesh of `mesh_spec`, from shapes only; dtype: parameter and
    compute dtype (default: the config's). kwargs: those of `parallel.plan.plan_bytes`
    (batch, seq, optimizer, devices, device_memory_gb)."""
    name, config = model_config(model)
    if dtype is not None:
        config = config.replace(param_dtype=dtype, dtype=dtype)
    params = nnx.state(abstract_model(config))
    return plan_bytes(name, config, params, mesh_spec, **kwargs)

"""shard-plan: bytes per device of params, gradients, optimizer state, activations
and KV cache for a model on a (data, fsdp, tensor) mesh, from shapes only.

Shape letters as in the model: B batch, T tokens, S cache length, D width,
N query heads, K kv heads, H head dim, F mlp width, V vocab, L layers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from starcoder_jax.config import StarCoderConfig
from starcoder_jax.parallel.mesh import abstract_mesh_from_spec, batch_rows_per_device, check_fits, param_axes
from starcoder_jax.parallel.rules import logical_spec, mesh_sizes

ACTIVATION_FORMULA = {
    "inference": ("b*T*(dt*(4*D + 2*F/t) + 4*(N/t)*T) + 4*b*V/t: one block's live set "
                  "(residual, LayerNorm out, MLP hidden) and its float32 attention scores, "
                  "plus the last position's float32 logits"),
    "train": ("L*b*T*(dt*(4*D + 2*D/t + 2*K*H/tk + 2*F/t) + 8*(N/t)*T) + 8*b*T*V/t: every "
              "layer keeps its inputs for the backward pass (residuals, LayerNorm outs, "
              "q/k/v, attention out, MLP hidden pre/post GELU, float32 scores and probs), "
              "plus float32 logits and their gradient; no rematerialisation"),
}
KV_FORMULA = ("L*2*b*S*(K/tk)*H*dt (k and v per layer); with a sliding window W < S, "
              "S = W slots of a ring buffer + L*b*W*4 bytes of slot positions")
SYMBOLS = ("b = batch rows per device = B/(data*fsdp); t = tensor; tk = t where it divides the "
           "K kv heads, else 1 (a shared head, or grouped heads t does not divide, is whole on "
           "every device); dt = bytes of the compute dtype")


def plan_bytes(name: str, config: StarCoderConfig, params: nnx.State, mesh_spec: str, *, batch: int = 1,
               seq: int | None = None, optimizer: str | None = None,
               devices: int | None = None, device_memory_gb: float | None = None) -> dict:
    """Bytes per device of a model on a mesh, from shapes only (nothing is allocated).

    config: the model's config (in the dtype planned for); params: the
    state of its abstract model (`nnx.state(abstract_model(config))`),
    whose parameters carry their logical axes.
    mesh_spec: e.g. "data=-1,fsdp=8"; `devices` (default: this machine's
      device count) lets a 64-device pod be planned from a laptop.
    batch, seq: the global batch B and sequence / cache length S (default:
      n_positions).
    optimizer: None (inference: params + activations + KV cache) or "adamw"
      (training: params + gradients + AdamW state + activations).
    device_memory_gb: when given, `fits` says whether the total fits (GiB).

    Returns a dict: per_device and whole_model byte counts, the formulas
    used, and the mesh.
    """
    if optimizer not in (None, "none", "adamw"):
        raise ValueError(f"optimizer must be None or 'adamw', got {optimizer!r}")
    training = optimizer == "adamw"
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    seq = config.n_positions if seq is None else seq
    if not isinstance(seq, int) or not 1 <= seq <= config.n_positions:
        raise ValueError(f"seq must be in [1, {config.n_positions}] (n_positions), got {seq!r}")
    n_devices = jax.device_count() if devices is None else devices
    mesh = abstract_mesh_from_spec(mesh_spec, n_devices)
    sizes = mesh_sizes(mesh)
    check_fits(params, mesh)

    pdt, cdt = jnp.dtype(config.param_dtype).itemsize, jnp.dtype(config.dtype).itemsize
    param_elems = whole_elems = 0
    for path, var in nnx.to_flat_state(params):
        shape = var.get_value().shape
        spec = logical_spec(param_axes(path, var), mesh, shape)
        param_elems += math.prod(NamedSharding(mesh, spec).shard_shape(shape))
        whole_elems += math.prod(shape)

    t = sizes["tensor"]
    tk = t if config.kv_heads % t == 0 else 1
    rows = batch_rows_per_device(batch, sizes)
    d, f, n, h = config.n_embd, config.mlp_dim, config.n_head, config.head_dim
    k, v, layers = config.kv_heads, config.vocab_size, config.n_layer
    if training:
        acts = layers * rows * seq * (cdt * (4 * d + 2 * d // t + 2 * k * h // tk + 2 * f // t)
                                      + 8 * (n // t) * seq) + 8 * rows * seq * v // t
    else:
        acts = rows * seq * (cdt * (4 * d + 2 * f // t) + 4 * (n // t) * seq) + 4 * rows * v // t
    # AdamW: two float32 moments, plus a float32 master copy of low-precision params.
    opt_per_elem = (8 + (4 if pdt < 4 else 0)) if training else 0
    per_device = {
        "params": param_elems * pdt,
        "gradients": param_elems * pdt if training else 0,
        "optimizer": param_elems * opt_per_elem,
        "activations": acts,
        "kv_cache": 0 if training else _kv_cache_bytes(config, rows, seq, tk, cdt),
    }
    per_device["total"] = sum(per_device.values())
    limit = None if device_memory_gb is None else int(device_memory_gb * 2**30)
    return {
        "model": name,
        "mesh": sizes,
        "devices": n_devices,
        "mode": "train" if training else "inference",
        "batch": batch,
        "seq": seq,
        "param_dtype": config.param_dtype,
        "dtype": config.dtype,
        "param_count": whole_elems,
        "per_device": per_device,
        "whole_model": {"params": whole_elems * pdt},
        "device_memory": limit,
        "fits": None if limit is None else per_device["total"] <= limit,
        "notes": _notes(config, t, seq, training),
        "formulas": {
            "activations": ACTIVATION_FORMULA["train" if training else "inference"],
            "kv_cache": KV_FORMULA if not training else "no cache in training",
            "optimizer": ("AdamW: mu and nu in float32 (8 bytes per parameter) + a float32 "
                          "master copy when params are 16-bit (4 bytes)") if training else "none",
            "symbols": SYMBOLS,
        },
    }


def _kv_cache_bytes(config: StarCoderConfig, rows: int, seq: int, tk: int, cdt: int) -> int:
    window = config.window
    slots = seq if window is None or window >= seq else window
    ring = 0 if slots == seq else config.n_layer * rows * slots * 4  # int32 slot positions
    return config.n_layer * 2 * rows * slots * (config.kv_heads // tk) * config.head_dim * cdt + ring


def _notes(config: StarCoderConfig, t: int, seq: int, training: bool) -> list[str]:
    """What the numbers above take from the model rather than the mesh."""
    k, notes = config.kv_heads, []
    if k == 1 and t > 1:
        notes.append("kv heads: one K/V head shared by all query heads cannot be split; k/v projections "
                     f"and the KV cache are whole on each of the tensor={t} devices")
    elif 1 < k < config.n_head and t > 1:
        notes.append(f"kv heads: n_kv_head={k} split over tensor={t}" if k % t == 0 else
                     f"kv heads: n_kv_head={k} is not divisible by tensor={t}, so k/v projections and the "
                     f"KV cache are whole on every device (each computes all {k} heads)")
    window = config.window
    if window is not None and window < seq and not training:
        notes.append(f"KV cache: a ring buffer of sliding_window={window} slots per layer, not seq={seq}")
    return notes


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB"


def format_shard_plan(plan: dict) -> str:
    """The plan as a table of per-device bytes, then the formulas behind it."""
    mesh = ",".join(f"{a}={s}" for a, s in plan["mesh"].items())
    lines = [
        f"model {plan['model']}: {plan['param_count']:,} parameters "
        f"({plan['param_dtype']}, whole model {_gib(plan['whole_model']['params'])})",
        f"mesh {mesh} over {plan['devices']} devices; {plan['mode']}, batch {plan['batch']} "
        f"x seq {plan['seq']}",
        "",
        f"{'per device':<14}{'bytes':>18}{'GiB':>12}",
    ]
    for key, value in plan["per_device"].items():
        if key == "total":
            lines.append("-" * 44)
        lines.append(f"{key:<14}{value:>18,}{value / 2**30:>12.3f}")
    if plan["fits"] is not None:
        verdict = "fits in" if plan["fits"] else "does NOT fit in"
        lines.append(f"\n{verdict} {_gib(plan['device_memory'])} per device")
    for note in plan.get("notes", ()):
        lines.append(f"note: {note}")
    lines.append("")
    for key, text in plan["formulas"].items():
        lines.append(f"{key}: {text}")
    return "\n".join(lines)

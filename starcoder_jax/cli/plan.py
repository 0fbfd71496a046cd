"""`starcoder-jax shard-plan`: bytes per device of a model on a mesh (shapes only)."""

from __future__ import annotations

import argparse
import json

from starcoder_jax.model.plan import shard_plan
from starcoder_jax.parallel.plan import format_shard_plan
from starcoder_jax.parallel.rules import MESH_EXAMPLE


def cmd_shard_plan(args) -> int:
    plan = shard_plan(args.model, args.mesh, batch=args.batch, seq=args.seq, dtype=args.dtype,
                      optimizer=None if args.optimizer == "none" else args.optimizer,
                      devices=args.devices, device_memory_gb=args.device_memory)
    print(json.dumps(plan, indent=2) if args.json else format_shard_plan(plan))
    return 0 if plan["fits"] in (None, True) else 1


def register(subparsers) -> argparse.ArgumentParser:
    """Adds `starcoder-jax shard-plan` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "shard-plan", help="bytes per device of a model on a mesh (shapes only, no compute)",
        description="Bytes per device of params, gradients, optimizer state, activations and "
                    "KV cache for a model on a (data, fsdp, tensor) mesh. Exit status 1 when "
                    "--device-memory is given and the total does not fit.")
    p.add_argument("--model", required=True, help="preset name (e.g. starcoderbase-1b) or a "
                                                   "model directory with config.json")
    p.add_argument("--mesh", required=True, help=f"mesh spec, e.g. {MESH_EXAMPLE} "
                                                 "(one axis may be -1: the rest)")
    p.add_argument("--batch", type=int, default=1, help="global batch size")
    p.add_argument("--seq", type=int, default=None,
                   help="sequence / cache length (default: the model's n_positions)")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"),
                   help="parameter and compute dtype (default bfloat16)")
    p.add_argument("--optimizer", default="none", choices=("none", "adamw"),
                   help="adamw plans training (gradients + AdamW state)")
    p.add_argument("--devices", type=int, default=None,
                   help="plan for this many devices (default: this machine's)")
    p.add_argument("--device-memory", type=float, default=None, metavar="GB",
                   help="memory per device in GiB: report whether the plan fits")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_shard_plan)
    return p

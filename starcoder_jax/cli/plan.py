"""`starcoder-jax shard-plan`: bytes per device of a model on a mesh, from shapes
(default) or from the compiled step (`--compile`)."""

from __future__ import annotations

import argparse
import json

from starcoder_jax.config import QUANTIZATION_MODES
from starcoder_jax.model.modules import REMAT_POLICIES
from starcoder_jax.model.plan import shard_plan
from starcoder_jax.parallel.plan import format_shard_plan
from starcoder_jax.parallel.rules import MESH_EXAMPLE
from starcoder_jax.parallel.targets import TARGETS
from starcoder_jax.training.losses import LOSS_CHUNK

GIB = 2**30


def cmd_shard_plan(args) -> int:
    if args.compile:
        return _compiled(args)
    if len(args.mesh) > 1:
        raise SystemExit("shard-plan: several --mesh flags need --compile")
    plan = shard_plan(args.model, args.mesh[0], batch=args.batch, seq=args.seq, dtype=args.dtype,
                      optimizer=None if args.optimizer == "none" else args.optimizer,
                      devices=args.devices, device_memory_gb=args.device_memory)
    if args.json is not None:
        _write_json(plan, args.json)
    if args.json != "-":
        print(format_shard_plan(plan))
    return 0 if plan["fits"] in (None, True) else 1


def _compiled(args) -> int:
    from starcoder_jax.compiled import compiled_plans

    meshes = [None if m in ("none", "1") else m for m in args.mesh]
    from starcoder_jax.parallel.chips import MissingExtra

    if args.compiler == "chip" and args.target is None and (args.topology or args.gpus_per_node):
        raise SystemExit("shard-plan: --topology and --gpus-per-node describe a --target chip")
    try:
        plans = compiled_plans(args.model, meshes, step=args.step, batch=args.batch, seq_len=args.seq,
                               layers=args.layers, remat=args.remat, lora_rank=args.lora,
                               quantize=args.quantize, dtype=args.dtype, target_name=args.target,
                               compiler=args.compiler, topology=args.topology, gpus_per_node=args.gpus_per_node,
                               attention_impl=args.attention, loss_chunk=args.loss_chunk or None,
                               dump_hlo=args.dump_hlo, jobs=args.jobs,
                               progress=True)
    except (MissingExtra, ValueError) as error:
        raise SystemExit(f"shard-plan: {error}") from None
    if args.json is not None:
        _write_json(plans, args.json)
    if args.json != "-":
        print(format_compiled(plans))
    fits = [p["estimate"]["fits"] for p in plans if p.get("estimate")]
    return 0 if all(fits) else 1


def _write_json(obj, where: str) -> None:
    text = json.dumps(obj, indent=2)
    if where == "-":
        print(text)
        return
    with open(where, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def format_compiled(plans: list[dict]) -> str:
    """A table of compiled plans (one row per mesh) and each one's collectives."""
    p0 = plans[0]
    lines = [f"model {p0['model']}: {p0['step']} step, batch {p0['batch']} x {p0['seq_len']} tokens, "
             f"remat {p0['remat']}" + (f", LoRA rank {p0['lora_rank']}" if p0["lora_rank"] else "")
             + (f", {p0['quantize']} base" if p0["quantize"] else "")]
    if p0["compiled_layers"] != [p0["layers"]]:
        lines.append(f"compiled with {p0['compiled_layers'][0]} and {p0['compiled_layers'][1]} layers, "
                     f"every figure extended linearly to the model's {p0['layers']}")
    about = p0["compiler"]
    lines.append(f"compiled by {about['compiler']} for {about['device_kind']} ({about['topology']}), jax "
                 f"{about['jax']}" + (f", cuDNN {about['cudnn']}" if about.get("cudnn") else ""))
    if about["platform"] == "cpu":
        lines.append("per device; an ESTIMATE from XLA:CPU's compile (GPU and TPU compilers fuse and "
                     "plan memory differently: give --target a chip to compile with its own compiler)")
    else:
        lines.append("per chip; FLOPs: the model's (matmuls and attention, no recomputation); HBM bytes: "
                     + ("the compiler's cost analysis" if p0["compiler_flops"] else
                        "arguments read and outputs written once (XLA:GPU has no cost analysis)"))
    lines.append(f"attention: {', '.join(p0['attention_forms']) or '-'}\n")
    target = p0.get("estimate")
    head = (f"{'mesh':<26}{'args GiB':>10}{'temp GiB':>10}{'peak GiB':>10}{'params':>9}{'grads':>8}"
            f"{'AdamW':>8}{'TFLOP':>9}{'comm GB':>9}{'kernels':>9}")
    if target:
        head += f"{'step s':>9}{'no-ovl s':>10}  fits {target['target']}"
    lines += [head, "-" * len(head)]
    for p in plans:
        comm = sum(c["bytes"] for c in p["collectives"]) / 1e9
        row = (f"{p['mesh']:<26}{p['argument_bytes'] / GIB:>10.2f}{p['temp_bytes'] / GIB:>10.2f}"
               f"{p['peak_bytes'] / GIB:>10.2f}{p['params_bytes'] / GIB:>9.2f}{p['gradients_bytes'] / GIB:>8.2f}"
               f"{p['optimizer_bytes'] / GIB:>8.2f}{p['flops'] / 1e12:>9.2f}{comm:>9.2f}"
               f"{p['kernels']['launches']:>9}")
        if p.get("estimate"):
            e = p["estimate"]
            row += f"{e['estimated_step_s']:>9.3f}{e['no_overlap_step_s']:>10.3f}  {'yes' if e['fits'] else 'NO'}"
        lines.append(row)
    for p in plans:
        lines.append(f"\n{p['mesh']}: collectives per step")
        for c in p["collectives"]:
            axes = ",".join(c["mesh_axes"]) or "-"
            lines.append(f"  {c['kind']:<20}{'over ' + axes:<26}{c['count']:>7} x{c['bytes'] / 1e6:>12.1f} MB")
        k = p["kernels"]
        calls = ", ".join(f"{name} x{n}" for name, n in {**k["custom_calls"], **{
            kind: n for kind, n in k["fusion_kinds"].items() if kind.startswith("__")}}.items())
        lines.append(f"  kernels: {k['launches']} ({k['fusions']} fusions)" + (f"; {calls}" if calls else ""))
        if p.get("estimate"):
            e = p["estimate"]
            lines.append(f"  compute {e['compute_s']:.4f} s, HBM {e['hbm_s']:.4f} s, links {e['comm_s']:.4f} s "
                         + " ".join(f"({k} {v:.4f} s)" for k, v in e["comm_s_by_link"].items()))
    return "\n".join(lines)


def register(subparsers) -> argparse.ArgumentParser:
    """Adds `starcoder-jax shard-plan` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "shard-plan", help="bytes per device of a model on a mesh (shapes, or the compiled step)",
        description="Bytes per device of params, gradients, optimizer state, activations and "
                    "KV cache for a model on a (data, fsdp, tensor) mesh, from shapes. With --compile: "
                    "the real train / prefill / decode step compiled, never run: for --target's chip by "
                    "its own compiler (libtpu, XLA:GPU) on this host, else on fake CPU devices: "
                    "XLA's memory and cost analyses and the collectives of the partitioned program, per "
                    "device, and with --target a roofline estimate of the step time. Exit status 1 when "
                    "--device-memory (or --target's HBM) is given and the plan does not fit.")
    p.add_argument("--model", "--preset", dest="model", required=True,
                   help="preset name (e.g. starcoderbase-1b) or a model directory with config.json")
    p.add_argument("--mesh", required=True, action="append",
                   help=f"mesh spec, e.g. {MESH_EXAMPLE} (one axis may be -1: the rest, without "
                        "--compile); with --compile it may be repeated: one row per mesh")
    p.add_argument("--batch", type=int, default=1, help="global batch size")
    p.add_argument("--seq", "--seq-len", dest="seq", type=int, default=None,
                   help="sequence length (train), prompt length (prefill) or cache length (decode); "
                        "default: the model's n_positions")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (and parameter dtype, except training with --compile, whose "
                        "params stay float32 as fine-tuning keeps them); default bfloat16")
    p.add_argument("--optimizer", default="none", choices=("none", "adamw"),
                   help="without --compile: adamw plans training (gradients + AdamW state)")
    p.add_argument("--devices", type=int, default=None,
                   help="without --compile: plan for this many devices (default: this machine's)")
    p.add_argument("--device-memory", type=float, default=None, metavar="GB",
                   help="without --compile: memory per device in GiB: report whether the plan fits")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="write the plan(s) as JSON to FILE (alone: print JSON instead of the table)")
    c = p.add_argument_group("--compile")
    c.add_argument("--compile", action="store_true",
                   help="compile the library's real step for each mesh (in subprocesses with fake CPU "
                        "devices when this process has too few)")
    c.add_argument("--step", default="train", choices=("train", "prefill", "decode"))
    c.add_argument("--layers", type=int, default=None, metavar="N",
                   help="compile N and N+1 layers (N >= 2) and extend the figures to the model's depth")
    c.add_argument("--remat", default="full", choices=REMAT_POLICIES,
                   help="training's model.remat (default full)")
    c.add_argument("--lora", type=int, default=None, metavar="RANK",
                   help="train LoRA adapters of this rank on c_attn, c_proj and c_fc (a frozen base)")
    c.add_argument("--quantize", default=None, choices=QUANTIZATION_MODES,
                   help="a quantized base: int8, int4 or nf4 (QLoRA's; with --lora for training)")
    c.add_argument("--loss-chunk", type=int, default=LOSS_CHUNK, metavar="TOKENS",
                   help=f"training's train.loss_chunk: the LM head and loss over this many tokens at a time "
                        f"(default {LOSS_CHUNK}; 0: the whole row at once)")
    c.add_argument("--target", default=None, metavar="CHIP",
                   help=f"compile for this chip with its own compiler on this host ({', '.join(TARGETS)}, or "
                        "a TPU slice such as v5e-8, v5p-128): per-chip memory, kernels, the roofline step "
                        "time and whether the peak fits its HBM (extras: tpu, cuda)")
    c.add_argument("--topology", default=None, metavar="AxB[xC]",
                   help="a TPU target's slice shape (default: the usual one for the mesh's chips)")
    c.add_argument("--gpus-per-node", type=int, default=None, metavar="N",
                   help="a GPU target's GPUs per node (default 8, or fewer for a smaller mesh)")
    c.add_argument("--compiler", default="chip", choices=("chip", "cpu"),
                   help="chip (default): the target's compiler; cpu: XLA:CPU on fake CPU devices, with the "
                        "target's roofline (the plans made before chips compiled here)")
    c.add_argument("--attention", default=None, metavar="IMPL",
                   help="force an attention form (default: auto on a chip, chunked on fake CPU devices)")
    c.add_argument("--dump-hlo", default=None, metavar="DIR", help="write each compiled program's optimized HLO")
    c.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="compile in N processes at once (default: one per CPU core, at most one per mesh)")
    p.set_defaults(func=cmd_shard_plan)
    return p

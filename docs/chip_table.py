"""README's "Compiled for the chips": steps compiled on this host by each chip's own
compiler (libtpu, XLA:GPU), beside the XLA:CPU fake-device plans they replace.

    pip install -e '.[tpu,cuda]'
    python docs/chip_table.py [--json chips.json] [--jobs N] [--only NAME ...]

Every row is one `starcoder-jax shard-plan --compile --target CHIP` call (printed
beside it); the rows run in --jobs processes (default: one per CPU core), each
compiling the model at N and N + 1 layers and extending the figures to its depth.
Prints the markdown tables and writes every plan as JSON as it comes.
"""

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# name -> (model, target, mesh, options). GPU training rows compile the whole model (XLA:GPU
# compiles the 15.5B in 4-6 min here; its 2- and 3-layer programs extended to 40 layers
# gave 100.6 GiB where the whole model takes 45.3: docs/sharding.md); TPU rows extend
# from 2 and 3 layers (libtpu takes about a minute a layer at 8192 tokens).
TRAIN_8K = dict(step="train", seq_len=8192, layers=2, remat="full")
WHOLE_8K = dict(TRAIN_8K, layers=None)
LORA = dict(lora_rank=16, quantize="int8")
ROWS = {
    # starcoderbase-1b full fine-tuning at 8192 tokens, one sequence a chip
    "1b-full-v5e-8": ("starcoderbase-1b", "v5e-8", "fsdp=8", dict(TRAIN_8K, batch=8)),
    "1b-full-v5p-8": ("starcoderbase-1b", "v5p-8", "fsdp=4", dict(TRAIN_8K, batch=4)),
    "1b-full-h100x8": ("starcoderbase-1b", "h100-sxm", "fsdp=8", dict(WHOLE_8K, batch=8)),
    # starcoder 15.5B LoRA on an int8 base at 8192 tokens on one chip
    "15b-lora-h100": ("starcoder", "h100-sxm", None, dict(WHOLE_8K, batch=1, **LORA)),
    "15b-lora-a100-40": ("starcoder", "a100-40gb", None, dict(WHOLE_8K, batch=1, **LORA)),
    "15b-lora-v5e": ("starcoder", "tpu-v5e", None, dict(TRAIN_8K, batch=1, **LORA)),
    "15b-lora-v5e-4k": ("starcoder", "tpu-v5e", None, dict(TRAIN_8K, batch=1, seq_len=4096, **LORA)),
    "15b-lora-v5e-4": ("starcoder", "v5e-4", "fsdp=4", dict(TRAIN_8K, batch=4, **LORA)),
    # QLoRA: the same adapters on an nf4 base, on one 24 GB GPU
    "15b-qlora-l4": ("starcoder", "l4", None, dict(WHOLE_8K, batch=1, lora_rank=16, quantize="nf4")),
    # starcoder 15.5B full fine-tuning at 8192 tokens: the smallest slices
    "15b-full-v5p-8": ("starcoder", "v5p-8", "fsdp=4", dict(TRAIN_8K, batch=4)),
    "15b-full-v5p-16": ("starcoder", "v5p-16", "fsdp=8", dict(TRAIN_8K, batch=8)),
    "15b-full-h100x4": ("starcoder", "h100-sxm", "fsdp=4", dict(WHOLE_8K, batch=4)),
    "15b-full-h100x8": ("starcoder", "h100-sxm", "fsdp=8", dict(WHOLE_8K, batch=8)),
    # decode: one new token a row over a 2048-token cache, bfloat16 weights
    **{f"{size}-decode-b{b}-{chip}": (model, target, None, dict(step="decode", batch=b, seq_len=2047, layers=2))
       for size, model in (("1b", "starcoderbase-1b"), ("15b", "starcoder"))
       for b in (1, 64) for chip, target in (("h100", "h100-sxm"), ("v5e", "tpu-v5e"))},
}


def command(model, target, mesh, o) -> str:
    extra = f" --lora {o['lora_rank']} --quantize {o['quantize']}" if "lora_rank" in o else ""
    remat = f" --remat {o['remat']}" if "remat" in o else ""
    layers = f" --layers {o['layers']}" if o.get("layers") else ""
    return (f"starcoder-jax shard-plan --compile --model {model} --mesh {mesh or 'none'} --target {target} "
            f"--step {o['step']} --seq-len {o['seq_len']} --batch {o['batch']}{layers}{remat}{extra}")


def row(name) -> dict:
    from starcoder_jax.compiled import compiled_plan

    model, target, mesh, o = ROWS[name]
    start = time.perf_counter()
    plan = compiled_plan(model, mesh, target_name=target, **o).to_dict()
    plan.update(name=name, command=command(model, target, mesh, o), compile_s=round(time.perf_counter() - start, 1))
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="chips.json")
    parser.add_argument("--only", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    plans, start = [], time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(row, name): name for name in args.only}
        for future in as_completed(futures):
            try:
                plan = future.result()
            except Exception as error:  # noqa: BLE001 -- a row that cannot compile says why, in the table
                plan = {"name": futures[future], "error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
            plans.append(plan)
            done = f"peak {plan['peak_bytes'] / 2**30:.2f} GiB in {plan['compile_s']} s" if "error" not in plan \
                else plan["error"]
            print(f"{plan['name']}: {done} ({len(plans)}/{len(args.only)}, {time.perf_counter() - start:.0f} s)",
                  file=sys.stderr, flush=True)
            with open(args.json, "w") as f:
                json.dump(plans, f, indent=1)
    print(table(plans))


def table(plans) -> str:
    """Markdown: one row per training plan (per-chip memory, whether it fits, FLOPs,
    kernels, attention form, roofline step time), one per decode plan (bytes read a
    token, the HBM floor they set, kernels a decode call launches), and the commands."""
    from starcoder_jax.parallel.targets import TARGETS

    gib = 2**30
    train = ["| row | chip (compiler) | mesh | args GiB | temp GiB | peak GiB | fits | TFLOP/chip model "
             "(compiler's) | kernels | attention | roofline s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    decode = ["| row | chip | batch | weights + cache GiB | peak GiB | fits | HBM floor ms/token | "
              "roofline ms | kernels per call |", "|---|---|---|---|---|---|---|---|---|"]
    commands = []
    for p in sorted(plans, key=lambda p: list(ROWS).index(p["name"])):
        model, target, mesh, o = ROWS[p["name"]]
        if "error" in p:
            (decode if o["step"] == "decode" else train).append(
                f"| {p['name']} | {target} | {mesh or 'one chip'} | {p['error']} |")
            continue
        c, e = p["compiler"], p["estimate"]
        fits = "yes" if e["fits"] else "NO"
        if o["step"] == "decode":
            floor = p["argument_bytes"] / TARGETS[e["target"]].hbm_bandwidth * 1e3
            decode.append(f"| {p['name']} | {c['device_kind']} | {p['batch']} | {p['argument_bytes'] / gib:.2f} | "
                          f"{p['peak_bytes'] / gib:.2f} | {fits} | {floor:.2f} | {e['estimated_step_s'] * 1e3:.2f} | "
                          f"{p['kernels']['launches']} |")
        else:
            theirs = f" ({p['compiler_flops'] / 1e12:.1f})" if p.get("compiler_flops") else ""
            train.append(f"| {p['name']} | {c['device_kind']} ({c['compiler']}) | "
                         f"{p['mesh'] if p['devices'] > 1 else 'one chip'} | {p['argument_bytes'] / gib:.2f} | "
                         f"{p['temp_bytes'] / gib:.2f} | {p['peak_bytes'] / gib:.2f} | {fits} | "
                         f"{p['flops'] / 1e12:.1f}{theirs} | {p['kernels']['launches']} | "
                         f"{', '.join(p['attention_forms'])} | {e['estimated_step_s']:.3f} |")
        depths = " and ".join(map(str, p["compiled_layers"]))
        commands.append(f"- {p['name']}: `{p['command']}` ({depths} layers, {p['compile_s']} s)")
    return "\n".join(train) + "\n\n" + "\n".join(decode) + "\n\n" + "\n".join(commands)


if __name__ == "__main__":
    main()

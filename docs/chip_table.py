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

# name -> (model, target, mesh, step, batch, seq_len, options)
TRAIN_8K = dict(step="train", seq_len=8192, layers=2, remat="full")
LORA = dict(lora_rank=16, quantize="int8")
ROWS = {
    # starcoderbase-1b full fine-tuning at 8192 tokens, one sequence a chip
    "1b-full-v5e-8": ("starcoderbase-1b", "v5e-8", "fsdp=8", dict(TRAIN_8K, batch=8)),
    "1b-full-v5p-8": ("starcoderbase-1b", "v5p-8", "fsdp=4", dict(TRAIN_8K, batch=4)),
    "1b-full-h100x8": ("starcoderbase-1b", "h100-sxm", "fsdp=8", dict(TRAIN_8K, batch=8)),
    # starcoder 15.5B LoRA on an int8 base at 8192 tokens on one chip
    "15b-lora-h100": ("starcoder", "h100-sxm", None, dict(TRAIN_8K, batch=1, **LORA)),
    "15b-lora-a100-40": ("starcoder", "a100-40gb", None, dict(TRAIN_8K, batch=1, **LORA)),
    "15b-lora-v5e": ("starcoder", "tpu-v5e", None, dict(TRAIN_8K, batch=1, **LORA)),
    # starcoder 15.5B full fine-tuning at 8192 tokens: the smallest slices
    "15b-full-v5p-8": ("starcoder", "v5p-8", "fsdp=4", dict(TRAIN_8K, batch=4)),
    "15b-full-v5p-16": ("starcoder", "v5p-16", "fsdp=8", dict(TRAIN_8K, batch=8)),
    "15b-full-h100x4": ("starcoder", "h100-sxm", "fsdp=4", dict(TRAIN_8K, batch=4)),
    "15b-full-h100x8": ("starcoder", "h100-sxm", "fsdp=8", dict(TRAIN_8K, batch=8)),
    # decode: one new token a row over a 2048-token cache, bfloat16 weights
    **{f"{size}-decode-b{b}-{chip}": (model, target, None, dict(step="decode", batch=b, seq_len=2047, layers=2))
       for size, model in (("1b", "starcoderbase-1b"), ("15b", "starcoder"))
       for b in (1, 64) for chip, target in (("h100", "h100-sxm"), ("v5e", "tpu-v5e"))},
}


def command(model, target, mesh, o) -> str:
    extra = f" --lora {o['lora_rank']} --quantize {o['quantize']}" if "lora_rank" in o else ""
    remat = f" --remat {o['remat']}" if "remat" in o else ""
    return (f"starcoder-jax shard-plan --compile --model {model} --mesh {mesh or 'none'} --target {target} "
            f"--step {o['step']} --seq-len {o['seq_len']} --batch {o['batch']} --layers {o['layers']}{remat}{extra}")


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
    """One markdown row per plan: the chip and its compiler, per-chip memory, whether it
    fits, FLOPs, kernels, attention form and the roofline step time."""
    gib = 2**30
    head = ("| row | chip (compiler) | mesh | args GiB | temp GiB | peak GiB | fits | TFLOP/chip | kernels "
            "| attention | roofline s |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines, commands = [], []
    for p in sorted(plans, key=lambda p: list(ROWS).index(p["name"])):
        if "error" in p:
            lines.append(f"| {p['name']} | {ROWS[p['name']][1]} | {ROWS[p['name']][2] or 'one chip'} | "
                         f"{p['error']} |||||||")
            continue
        c, e = p["compiler"], p["estimate"]
        lines.append(f"| {p['name']} | {c['device_kind']} ({c['compiler']}) | {p['mesh'] if p['devices'] > 1 else 'one chip'} | "
                     f"{p['argument_bytes'] / gib:.2f} | {p['temp_bytes'] / gib:.2f} | {p['peak_bytes'] / gib:.2f} | "
                     f"{'yes' if e['fits'] else 'NO'} | {p['flops'] / 1e12:.2f} | {p['kernels']['launches']} | "
                     f"{', '.join(p['attention_forms'])} | {e['estimated_step_s']:.4f} |")
        commands.append(f"- {p['name']}: `{p['command']}` ({p['compile_s']} s)")
    return head + "\n" + "\n".join(lines) + "\n\n" + "\n".join(commands)


if __name__ == "__main__":
    main()

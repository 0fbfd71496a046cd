"""README's "How big a model fits where": the compiled train step's peak memory per device.

    python docs/fit_table.py [--json fit.json] [--jobs N]

For each StarCoder size, full fine-tuning and LoRA (rank 16 on c_attn, c_proj and
c_fc) over an int8 base, at 2048 and 8192 tokens, batch one sequence per device,
bfloat16 compute, full remat: the peak of XLA's memory analysis on one device and on
fsdp=8, each from

    starcoder-jax shard-plan --compile --preset P --mesh M --step train --seq-len T \\
        --batch B --layers N [--lora 16 --quantize int8]

(N and N + 1 layers compiled, extended to the model's depth: N = 4 for full
fine-tuning, 2 for LoRA, deeper while the peak is still in its flat phase, the whole
model when a deeper pair would cost over half of it; each plan records the depths).
The 32 compiles run in --jobs processes (default: one per CPU core) with 8 fake CPU
devices each; prints the markdown table and writes every plan as JSON as it comes.
"""

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

# read by every process (the spawned workers import this module first): 8 fake devices,
# and no LLVM optimizations for programs that are compiled and never run
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

MODELS = {"starcoderbase-1b": "1B", "starcoderbase-3b": "3B", "starcoderbase-7b": "7B", "starcoder": "15.5B"}
COLUMNS = [("full", 2048), ("full", 8192), ("lora", 2048), ("lora", 8192)]
MESHES = [("data=1", 1), ("fsdp=8", 8)]


def layers(kind) -> int:
    """Compiled depths start past the flat phase of a full fine-tune's peak (starcoder_jax/compiled.py)."""
    return 2 if kind == "lora" else 4


def command(model, mesh, batch, seq, kind) -> str:
    extra = " --lora 16 --quantize int8" if kind == "lora" else ""
    return (f"starcoder-jax shard-plan --compile --preset {model} --mesh {mesh} --step train "
            f"--seq-len {seq} --batch {batch} --layers {layers(kind)}{extra}")


def cell(model, kind, seq, mesh, batch) -> dict:
    from starcoder_jax.compiled import compiled_plan

    lora = dict(lora_rank=16, quantize="int8") if kind == "lora" else {}
    start = time.perf_counter()
    plan = compiled_plan(model, mesh, step="train", batch=batch, seq_len=seq, layers=layers(kind),
                         remat="full", **lora).to_dict()
    plan["command"] = command(model, mesh, batch, seq, kind)
    plan["compile_s"] = round(time.perf_counter() - start, 1)
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="fit.json")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    cells = [(model, kind, seq, mesh, batch) for model in reversed(args.models)  # the largest first
             for kind, seq in COLUMNS for mesh, batch in MESHES]
    plans, start = [], time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(cell, *c): c for c in cells}
        for future in as_completed(futures):
            model, kind, seq, mesh, _ = futures[future]
            plan = future.result()
            plans.append(plan)
            print(f"{model} {kind} {seq} {mesh}: peak {plan['peak_bytes'] / 2**30:.2f} GiB, depths "
                  f"{plan['compiled_layers']} ({len(plans)}/{len(cells)}, {time.perf_counter() - start:.0f} s)",
                  file=sys.stderr, flush=True)
            with open(args.json, "w") as f:
                json.dump(plans, f, indent=1)
    print(table(plans))


def table(plans) -> str:
    """The markdown table (one device / fsdp=8 per cell, cells lettered a-h per row) and
    the list of the commands behind each cell, with the depths compiled."""
    by = {(p["model"], p["lora_rank"] is not None, p["seq_len"], p["mesh"]): p for p in plans}
    head = ("| model | full, 2k | full, 8k | LoRA int8, 2k | LoRA int8, 8k |\n"
            "|---|---|---|---|---|")
    rows, commands = [], []
    for model, short in MODELS.items():
        cells = []
        for kind, seq in COLUMNS:
            pair = [by.get((model, kind == "lora", seq, f"data=1,fsdp={n},tensor=1")) for n in (1, 8)]
            if None in pair:
                cells.append("-")
                continue
            cells.append(" / ".join(f"{p['peak_bytes'] / 2**30:.1f}" for p in pair))
            for p in pair:
                depths = " and ".join(map(str, p["compiled_layers"]))
                how = "whole" if len(p["compiled_layers"]) == 1 else f"{depths} layers, extended"
                commands.append(f"- {short}, {'LoRA int8' if kind == 'lora' else 'full'}, {seq // 1024}k, "
                                f"{'one device' if p['devices'] == 1 else 'fsdp=8'}: `{p['command']}` ({how})")
        rows.append(f"| {short} (`{model}`) | " + " | ".join(cells) + " |")
    return head + "\n" + "\n".join(rows) + "\n\n" + "\n".join(commands)


if __name__ == "__main__":
    main()

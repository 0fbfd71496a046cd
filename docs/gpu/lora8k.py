"""The starcoderbase-1b LoRA recipe at 8192 tokens, run on this machine's accelerator.

    python docs/gpu/lora8k.py [--steps 12] [--out runs/lora8k-check]

configs/finetune/starcoderbase-1b-lora-8k.yaml with a random-weight base of the same
shape (the machine may have no hub access) and this Python's standard library as data:
int8 base, rank-16 adapters, chunked attention and loss, full remat, 8 x 8192 tokens per
step. Prints the device allocator's peak (`memory_stats`), the compiled report's peak of
the same step (XLA's analysis, compiled here) and tokens/s after the first steps.
"""

import argparse
import json
import os
import statistics
import sys

import jax

from starcoder_jax.compiled import compiled_plan
from starcoder_jax.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs/finetune/starcoderbase-1b-lora-8k.yaml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default="runs/lora8k-check")
    args = parser.parse_args()
    overrides = ["model.path=null", "model.preset=starcoderbase-1b", "tokenizer=pystdlib-9m",
                 'data.paths=["{stdlib}"]', "data.eval_fraction=0.0", f"train.steps={args.steps}",
                 f"train.save_every={args.steps}", f"train.eval_every={args.steps}", "train.log_every=1",
                 f"train.output_dir={args.out}"]
    cfg = train.load_config(CONFIG, overrides)
    report = compiled_plan("starcoderbase-1b", None, step="train", batch=1, seq_len=cfg.data.seq_len,
                           remat=cfg.model.remat, lora_rank=cfg.lora.rank, quantize="int8",
                           attention_impl="auto")
    train.run(cfg, progress=False)
    peak = jax.devices()[0].memory_stats().get("peak_bytes_in_use")
    with open(os.path.join(args.out, "metrics.jsonl")) as f:
        rates = [r["tokens_per_second"] for r in map(json.loads, f) if "tokens_per_second" in r][2:]
    out = {"device": str(jax.devices()[0].device_kind), "allocator_peak_bytes": peak,
           "compiled_peak_bytes": report.peak_bytes, "compiled_temp_bytes": report.temp_bytes,
           "tokens_per_second_median": statistics.median(rates) if rates else None}
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()

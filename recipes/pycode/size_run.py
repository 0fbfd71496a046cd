"""Sizes the default model's training run (configs/pycode-27m.yaml) before a GPU is lent:

- parameters and model FLOPs per token (bench.train_flops_per_token);
- XLA's memory analysis of the train step at the config's batch and length,
  compiled here (never run; training.memory.train_step_memory);
- tokens/s of a few executed steps here, on the config's shapes at a small batch;
- what a budget of training seconds on one GPU gives at a few utilizations of
  its measured bf16 matrix rate (default 788 TFLOP/s: an 8192^3 product on an
  H200 of the lending pool, on random data).

    python recipes/pycode/size_run.py [--config C] [--budget 300] [--cpu-batch 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import types

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(REPO, "configs", "pycode-27m.yaml"))
    p.add_argument("--budget", type=float, default=300, help="seconds of training on the GPU")
    p.add_argument("--matrix-tflops", type=float, default=788.0, help="the GPU's bf16 matrix rate")
    p.add_argument("--cpu-batch", type=int, default=2, help="sequences per step of the executed steps here")
    p.add_argument("--cpu-steps", type=int, default=3, help="timed steps here (after one compiling step)")
    args = p.parse_args()

    from starcoder_jax import bench
    from starcoder_jax.config import StarCoderConfig
    from starcoder_jax.model.modules import init_model
    from starcoder_jax.training.memory import train_step_memory
    from starcoder_jax.training.train import load_config

    cfg = load_config(args.config)
    config = StarCoderConfig(**cfg.model.config, dtype=cfg.model.compute_dtype)
    t, b = cfg.data.seq_len, cfg.train.batch_size
    flops = bench.train_flops_per_token(config, t)
    print(f"{args.config}: {config.param_count():,} parameters, {flops / 1e9:.3f} GFLOP per trained token "
          f"(6N + 12 L D T), batch {b} x {t} = {b * t:,} tokens a step")

    memory = train_step_memory(config, batch=b, seq_len=t, remat=cfg.model.remat, loss_chunk=cfg.train.loss_chunk,
                               grad_accum=cfg.train.grad_accum, optim=cfg.optim)
    gib = 2**30
    print(f"train step at batch {b}, one device, compiled here: peak {memory.peak_bytes / gib:.2f} GiB "
          f"(arguments {memory.argument_bytes / gib:.2f}, temporaries {memory.temp_bytes / gib:.2f})")

    model = init_model(config, seed=0)
    run = bench.bench_train_ours(model, types.SimpleNamespace(train_batch=args.cpu_batch, train_seq_len=t,
                                                               repeats=args.cpu_steps))
    rate = run["tokens_per_s"]
    print(f"executed here: {rate:,.0f} tokens/s at batch {args.cpu_batch} ({rate * flops / 1e9:.1f} GFLOP/s), "
          f"median of {args.cpu_steps} steps")

    print(f"one GPU at {args.matrix_tflops:.0f} TFLOP/s, {args.budget:.0f} s of training:")
    for utilization in (0.1, 0.2, 0.3):
        tokens_per_s = utilization * args.matrix_tflops * 1e12 / flops
        tokens = tokens_per_s * args.budget
        print(f"  {utilization:.0%} of it: {tokens_per_s / 1e3:,.0f}k tokens/s, {tokens / 1e6:,.0f}M tokens, "
              f"{tokens / (b * t):,.0f} steps")


if __name__ == "__main__":
    main()

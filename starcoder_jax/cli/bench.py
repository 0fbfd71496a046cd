"""`starcoder-jax bench`: the command over `starcoder_jax.bench`'s measurements.

Prefill / decode throughput against the memory-bandwidth limit, or with
--train training-step throughput and MFU; see starcoder_jax.bench for what
is measured and how. `--train --memory` compiles the train step on abstract
shapes without running it and prints XLA's memory analysis per device
(starcoder_jax.training.memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics

from starcoder_jax.cli import common
from starcoder_jax.config import KV_CACHE_MODES, QUANTIZATION_MODES
from starcoder_jax.model.modules import DEFAULT_REMAT, REMAT_POLICIES
from starcoder_jax.training.losses import LOSS_CHUNK


def register(subparsers) -> argparse.ArgumentParser:
    """Adds `starcoder-jax bench` to an argparse subparsers object."""
    p = subparsers.add_parser("bench", help="prefill / decode throughput against the memory-bandwidth limit; "
                                            "--train: training-step throughput and MFU")
    common.add_model_args(p, model_help="model directory (default: random weights of --preset)",
                   dtypes=("float32", "bfloat16"),
                   dtype_help="parameter and compute dtype; with --train the compute dtype only",
                   quantize={"choices": None, "default": "none",
                             "help": "our variants, comma separated, run one after the other: none (the "
                                     "--dtype weights) and/or weight-only int8, int4, nf4, e.g. none,int8,int4"})
    p.add_argument("--preset", default="starcoderbase-1b", help="shape to benchmark with random weights")
    p.add_argument("--layers", type=int, help="override the number of layers (quick runs)")
    p.add_argument("--batch-sizes", default="1,8", help="decode batch sizes, comma separated")
    p.add_argument("--kv-cache", choices=KV_CACHE_MODES, default=None,
                   help="int8: an int8 KV cache with a scale per token (default: the compute dtype)")
    p.add_argument("--prompt-len", type=int, default=512, help="prefill length (tokens)")
    p.add_argument("--decode-context", type=int, default=128, help="prompt length before decoding")
    p.add_argument("--decode-steps", type=int, default=16, help="decode steps per timed run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compare-transformers", action="store_true")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--train", action="store_true",
                   help="time training steps (forward + backward + AdamW) instead of prefill/decode; "
                        "--dtype is then the compute dtype, params and optimizer state stay float32")
    p.add_argument("--train-batch", type=int, default=8, help="--train: sequences per step")
    p.add_argument("--train-seq-len", type=int, default=512, help="--train: tokens per sequence")
    p.add_argument("--memory", action="store_true",
                   help="with --train: compile the train step on abstract shapes (no weights, nothing "
                        "run) and print XLA's memory analysis per device beside params, gradients and AdamW")
    p.add_argument("--remat", choices=REMAT_POLICIES, default=None,
                   help="--train: what each block keeps for the backward pass (default: full with "
                        "--memory, elementwise for timed steps)")
    p.add_argument("--loss-chunk", type=int, default=LOSS_CHUNK,
                   help=f"--train: tokens per piece of the LM head and loss (default {LOSS_CHUNK}; "
                        "0: whole [B, T, V] logits)")
    p.add_argument("--mesh", default=None,
                   help="--train --memory: compile for this mesh, e.g. fsdp=8 (needs that many devices; "
                        "on a CPU host XLA_FLAGS=--xla_force_host_platform_device_count=8 fakes them)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """The `bench` handler: returns the exit code."""
    if args.memory and not args.train:
        raise ValueError("--memory measures the train step: use it with --train")
    if args.mesh and not args.memory:
        raise ValueError("--mesh applies to --train --memory only")
    if args.train and args.memory:
        return run_train_memory(args)
    return run_train(args) if args.train else run_decode(args)


def _variants(spec: str) -> list[str]:
    """--quantize's comma-separated variants, unquantized first (each quantizes a copy of the same weights)."""
    variants = [v.strip() for v in spec.split(",") if v.strip()]
    unknown = [v for v in variants if v not in ("none", *QUANTIZATION_MODES)]
    if unknown or not variants or len(set(variants)) != len(variants):
        raise ValueError(f"--quantize takes none and/or {', '.join(QUANTIZATION_MODES)}, comma separated, "
                         f"each once; got {spec!r}")
    return sorted(variants, key=lambda v: v != "none")


def _model(args: argparse.Namespace, *, param_dtype: str, **load):
    """(model, name): --model loaded as a float model (load: load_pretrained keywords), else
    random weights of --preset (--layers of them) with parameters in param_dtype."""
    if args.model:
        return common.load_model(args, quantize=None, **load), args.model
    if getattr(args, "adapter", None):
        raise ValueError("--adapter needs --model: the base model the adapter was trained on")
    from starcoder_jax.config import preset
    from starcoder_jax.model.modules import init_model

    overrides = {"dtype": args.dtype, "param_dtype": param_dtype, "attention_impl": args.attention_impl,
                 "matmul_impl": args.matmul_impl}
    if args.layers:
        overrides["n_layer"] = args.layers
    return init_model(preset(args.preset, **overrides)), args.preset + (
        f" ({args.layers} layers)" if args.layers else "")


def _report_head(name: str, config, dtype_line: str, args: argparse.Namespace) -> dict:
    """Prints what runs where and returns the report's common fields."""
    import jax

    device = jax.devices()[0]
    print(f"model: {name}  params: {config.param_count():,}  {dtype_line}")
    print(f"device: {device.platform} {device.device_kind}  jax {jax.__version__}  "
          f"host: {platform.machine()} {platform.processor() or ''}".rstrip())
    return {"model": name, "dtype": args.dtype, "params": config.param_count(),
            "device": f"{device.platform} {device.device_kind}", "jax": jax.__version__}


def _write_json(path: str | None, report: dict) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)


def run_decode(args: argparse.Namespace) -> int:
    """Prefill and decode of each --quantize variant, the bandwidth limit, and transformers beside them."""
    from flax import nnx

    from starcoder_jax import bench

    batch_sizes = [int(x) for x in args.batch_sizes.split(",") if x]
    variants = _variants(args.quantize)
    model, name = _model(args, param_dtype=args.dtype)
    config = model.config
    report = _report_head(name, config, f"dtype: {args.dtype}  variants: {', '.join(variants)}", args)
    platform_name = report["device"].split()[0]
    # The limit is the best read the device can do: sampled before and after each
    # variant (a shared host's bandwidth moves over minutes), the best sample taken,
    # and on a CPU checked against a reader outside XLA (numpy, a thread per core).
    samples = bench.memory_bandwidth()
    reference = bench.host_reference_bandwidth() if platform_name == "cpu" else []
    ours = {}
    for variant in variants:
        quantized = model if variant == "none" else nnx.clone(model).quantize_(variant)
        ours[variant] = bench.bench_ours(quantized, args, batch_sizes)
        del quantized
        samples += bench.memory_bandwidth()
    if reference:
        reference += bench.host_reference_bandwidth()
    bandwidth = max(samples + reference)
    report.update(ours=ours, bandwidth_bytes_per_s=bandwidth, bandwidth_samples_bytes_per_s=samples,
                  reference_bandwidth_samples_bytes_per_s=reference)
    print(_bandwidth_line("host" if platform_name == "cpu" else platform_name, samples, reference))
    del model
    theirs = bench.bench_transformers(config, args, batch_sizes) if args.compare_transformers else None
    report["transformers"] = theirs
    _print_decode_table(args, batch_sizes, variants, ours, theirs, bandwidth)
    _write_json(args.json, report)
    return 0


def _bandwidth_line(where: str, samples: list[float], reference: list[float]) -> str:
    """The limit (the best sample of either reader) and how sure it is: the XLA
    reader's spread, and how far the reference reader's best lies from its best."""
    gb = 1e9
    line = (f"{where} read bandwidth: {max(samples + reference) / gb:.1f} GB/s, the best sample "
            f"(XLA matrix-vector reads: {len(samples)} samples, {min(samples) / gb:.1f}-{max(samples) / gb:.1f}, "
            f"median {statistics.median(samples) / gb:.1f}")
    if reference:
        gap = max(reference) / max(samples) - 1
        line += (f"; numpy reference, a thread per core: {len(reference)} samples, best "
                 f"{max(reference) / gb:.1f}, {100 * gap:+.0f}% against XLA's best")
    return line + ")"


def _print_decode_table(args, batch_sizes, variants, ours, theirs, bandwidth) -> None:
    """Prints tok/s per row and variant; adds each decode row's bandwidth limit and the
    ratio to transformers' best dtype to `ours` as it goes."""
    rows = [("prefill", f"prefill {args.prompt_len} tok")] + [
        (f"decode_b{b}", f"decode batch {b}") for b in batch_sizes]
    label = {"none": args.dtype, **{m: m for m in QUANTIZATION_MODES}}
    header = f"{'':20s}"
    for v in variants:
        header += f" {label[v] + ' tok/s':>12s}"
        if bandwidth:
            header += f" {'% limit':>8s}"
    if theirs:
        header += f" {'hf f32':>9s} {'hf bf16':>9s}" + "".join(f" {label[v] + ' vs best':>14s}" for v in variants)
    print(header)
    for key, text in rows:
        line = f"{text:20s}"
        for v in variants:
            r = ours[v][key]
            line += f" {r['tokens_per_s']:12.2f}"
            if bandwidth and key.startswith("decode"):
                limit = r["batch"] * bandwidth / r["bytes_per_step"]
                r["bandwidth_limit_tokens_per_s"] = limit
                r["fraction_of_limit"] = r["tokens_per_s"] / limit
                line += f" {100 * r['fraction_of_limit']:7.0f}%"
            elif bandwidth:
                line += f" {'':>8s}"
        if theirs:
            f32 = theirs["float32"][key]["tokens_per_s"]
            b16 = theirs["bfloat16"][key]["tokens_per_s"]
            line += f" {f32:9.2f} {b16:9.2f}"
            for v in variants:
                ratio = ours[v][key]["tokens_per_s"] / max(f32, b16)
                ours[v][key]["vs_transformers_best"] = ratio
                line += f" {ratio:13.2f}x"
        print(line)


def run_train(args: argparse.Namespace) -> int:
    """Optimizer steps per second of ours (and transformers beside it), FLOP/s and MFU."""
    from starcoder_jax import bench

    if args.quantize != "none":
        raise ValueError(f"--quantize {args.quantize} applies to prefill/decode; --train trains float32 weights")
    for name in ("train_batch", "train_seq_len", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    model, name = _model(args, param_dtype="float32", dtype="float32", compute_dtype=args.dtype)
    model.remat = args.remat or DEFAULT_REMAT
    if model.config.quantization is not None:
        raise ValueError(f"--model {args.model!r} is {model.config.quantization}-quantized; "
                         "--train needs a float checkpoint")
    config = model.config
    b, t = args.train_batch, args.train_seq_len
    if t > config.n_positions:
        raise ValueError(f"--train-seq-len is {t} but the model holds {config.n_positions} positions")
    flops_token = bench.train_flops_per_token(config, t)
    o = bench.train_optim()
    report = _report_head(name, config, f"compute dtype: {args.dtype} (params and AdamW state float32)", args)
    print(f"train step: batch {b} x {t} tokens; AdamW lr {o.learning_rate:g}, weight decay {o.weight_decay:g}, "
          f"betas ({o.b1:g}, {o.b2:g}), clip {o.clip_norm:g}; "
          f"model FLOPs 6N + 12 L D T = {flops_token / 1e9:.3f} GFLOP/token")
    report["train"] = {"batch": b, "seq_len": t, "tokens_per_step": b * t, "flops_per_token": flops_token,
                       "optimizer": dataclasses.asdict(o)}
    ours = bench.bench_train_ours(model, args)
    del model
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:  # GPU / TPU: what the allocator saw, beside --memory's analysis
        ours["device_peak_bytes"] = stats["peak_bytes_in_use"]
        print(f"device memory peak: {stats['peak_bytes_in_use'] / 2**30:.2f} GiB (allocator's peak_bytes_in_use)")
    theirs = bench.bench_train_transformers(config, args) if args.compare_transformers else None
    report["ours"], report["transformers"] = ours, theirs
    _print_train_table(args, ours, theirs, flops_token, report["device"])
    _write_json(args.json, report)
    return 0


def _print_train_table(args, ours: dict, theirs: dict | None, flops_token: int, device: str) -> None:
    """Prints tok/s, s/step, FLOP/s and loss per side, and MFU on a GPU; adds the FLOP/s,
    the ratio to transformers' best and the MFU to the rows as it goes."""
    from starcoder_jax import bench

    rows = [(f"ours ({args.dtype})", ours)]
    if theirs:
        rows += [("hf float32", theirs["float32"]), ("hf bf16 autocast", theirs["bfloat16_autocast"])]
        best = max(r["tokens_per_s"] for r in theirs.values())
        ours["vs_transformers_best"] = ours["tokens_per_s"] / best
    print(f"{'':18s} {'tok/s':>10s} {'s/step':>9s} {'GFLOP/s':>9s} {'loss':>7s}")
    for label, r in rows:
        r["flops_per_s"] = r["tokens_per_s"] * flops_token
        print(f"{label:18s} {r['tokens_per_s']:10.1f} {r['seconds_per_step']:9.3f} "
              f"{r['flops_per_s'] / 1e9:9.1f} {r['loss']:7.3f}")
    if theirs:
        print(f"ours / best transformers: {ours['vs_transformers_best']:.2f}x")
    platform_name, _, kind = device.partition(" ")
    if platform_name == "gpu":
        peak = bench.peak_flops(kind, args.dtype)
        if peak is None:
            print(f"MFU: unknown (no peak FLOP/s listed for {kind!r})")
        else:
            ours["peak_flops_per_s"], ours["mfu"] = peak, ours["flops_per_s"] / peak
            print(f"MFU: {100 * ours['mfu']:.1f}% of {peak / 1e12:g} TFLOP/s ({args.dtype} dense peak)")


def run_train_memory(args: argparse.Namespace) -> int:
    """XLA's memory analysis of the train step (compiled, not run) for --preset's shape."""
    from starcoder_jax.config import preset
    from starcoder_jax.training.memory import train_step_memory

    if args.model:
        raise ValueError("--train --memory takes the shape of --preset (and --layers); not --model")
    if args.quantize != "none":
        raise ValueError(f"--quantize {args.quantize} applies to prefill/decode; --train trains float32 weights")
    if args.loss_chunk < 0:
        raise ValueError(f"--loss-chunk must be >= 0 (0: whole logits), got {args.loss_chunk}")
    overrides = {"dtype": args.dtype, "param_dtype": "float32", "attention_impl": args.attention_impl,
                 "matmul_impl": args.matmul_impl}
    if args.layers:
        overrides["n_layer"] = args.layers
    config = preset(args.preset, **overrides)
    name = args.preset + (f" ({args.layers} layers)" if args.layers else "")
    b, t = args.train_batch, args.train_seq_len
    if t > config.n_positions:
        raise ValueError(f"--train-seq-len is {t} but the model holds {config.n_positions} positions")
    report = _report_head(name, config, f"compute dtype: {args.dtype} (params and AdamW state float32)", args)
    remat = args.remat or "full"
    chunk = args.loss_chunk or None
    print(f"train step memory: batch {b} x {t} tokens, remat {remat}, loss chunk "
          f"{chunk or 'none (whole logits)'}, mesh {args.mesh or 'none (one device)'}; compiled, not run")
    memory = train_step_memory(config, batch=b, seq_len=t, remat=remat, loss_chunk=chunk, mesh=args.mesh)
    print(memory.table())
    report.update(memory.to_dict())
    _write_json(args.json, report)
    return 0

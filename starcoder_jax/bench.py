"""`starcoder-jax bench`: prefill and decode throughput, against the physical limits.

Decode reads every weight (and the whole static KV cache) once per step, so
its yardstick is memory bandwidth: limit tok/s = batch * bandwidth / bytes
read per step. Prefill is bound by matmul throughput. With
`--compare-transformers`, transformers' GPTBigCode (torch, CPU) runs the same
config in the same process, in float32 and bfloat16, and its best dtype is
the reference. Medians of `--repeats` runs are reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model directory (default: random weights of --preset)")
    p.add_argument("--preset", default="starcoderbase-1b", help="shape to benchmark with random weights")
    p.add_argument("--layers", type=int, help="override the number of layers (quick runs)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--quantize", default="none",
                   help="our variants, comma separated, run one after the other: none (the --dtype "
                        "weights) and/or int8 (weight-only int8), e.g. none,int8")
    p.add_argument("--batch-sizes", default="1,8", help="decode batch sizes, comma separated")
    p.add_argument("--prompt-len", type=int, default=512, help="prefill length (tokens)")
    p.add_argument("--decode-context", type=int, default=128, help="prompt length before decoding")
    p.add_argument("--decode-steps", type=int, default=16, help="decode steps per timed run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compare-transformers", action="store_true")
    p.add_argument("--json", help="also write the results to this JSON file")


def memory_bandwidth(size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Host read bandwidth in bytes/s: best of an XLA reduction over a large array."""
    x = jnp.ones((size_bytes // 4,), jnp.float32)
    total = jax.jit(lambda a: jnp.sum(a))
    total(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        total(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    del x
    return size_bytes / best


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def weight_bytes_per_step(model) -> int:
    """Bytes of weights a decode step reads: every array of the model (int8
    weights, their scales, float biases and norms) but the position table, of
    which a step reads one row; the token table is read whole as the LM head."""
    from flax import nnx

    _, state = nnx.split(model)
    return sum(v.get_value().nbytes for path, v in nnx.to_flat_state(state) if path[0] != "wpe")


def decode_bytes_per_step(config, batch: int, cache_len: int, weight_bytes: int) -> int:
    """Bytes a decode step must read: the weights plus the whole static cache
    (every slot is read by the attention)."""
    cache_bytes = jnp.dtype(config.dtype).itemsize
    cache = 2 * config.n_layer * batch * cache_len * config.kv_heads * config.head_dim * cache_bytes
    return weight_bytes + cache


def bench_ours(model, args, batch_sizes) -> dict:
    from flax import nnx

    from starcoder_jax.generate import STOP_ID_SLOTS, bucket, decode_loop, prefill
    from starcoder_jax.kv_cache import KVCache
    from starcoder_jax.sampling import SamplingParams

    config = model.config
    graphdef, params = nnx.split(model)
    # The same head layout the Generator uses (see Generator.__init__).
    head = model.output_head() if (config.tie_word_embeddings and config.quantization is None
                                   and jax.default_backend() == "cpu") else None
    weight_bytes = weight_bytes_per_step(model)
    rng = np.random.default_rng(0)
    results = {}

    def consts(b, max_new):
        return dict(knobs=SamplingParams().arrays(b), seed=jnp.asarray([0, 0], jnp.int32),
                    stop_ids=jnp.full((STOP_ID_SLOTS,), -1, jnp.int32),
                    max_new=jnp.int32(max_new), vocab_limit=jnp.int32(config.vocab_size), head=head)

    def run_prefill(b, t, s, max_new):
        ids = jnp.asarray(rng.integers(1, config.vocab_size, (b, t)), jnp.int32)
        cache = KVCache.init(config, b, s)
        state = prefill(graphdef, params, ids, jnp.full((b,), t, jnp.int32), cache,
                        out_len_like=jnp.zeros((bucket(max_new, 16),), jnp.int8),
                        active=jnp.ones((b,), bool), **consts(b, max_new))
        jax.block_until_ready(state)
        return state

    # Prefill: one prompt of prompt_len tokens.
    t = args.prompt_len
    run_prefill(1, t, t + 16, 1)  # compile
    seconds = _median_time(lambda: run_prefill(1, t, t + 16, 1), args.repeats)
    results["prefill"] = {"tokens": t, "seconds": seconds, "tokens_per_s": t / seconds}

    # Decode: batch b, starting after decode_context tokens, timed in chunks.
    steps = args.decode_steps
    for b in batch_sizes:
        total_new = steps * (args.repeats + 1) + 1
        s = bucket(args.decode_context + total_new, 16)
        state = run_prefill(b, args.decode_context, s, total_new)
        c = consts(b, total_new)
        state = decode_loop(graphdef, params, state, jnp.int32(steps), **c)  # compile + warm
        jax.block_until_ready(state)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            state = decode_loop(graphdef, params, state, jnp.int32(steps), **c)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - t0)
        seconds = statistics.median(times) / steps
        results[f"decode_b{b}"] = {
            "batch": b, "seconds_per_step": seconds, "tokens_per_s": b / seconds,
            "cache_len": s, "bytes_per_step": decode_bytes_per_step(config, b, s, weight_bytes),
        }
    return results


def bench_transformers(config, args, batch_sizes) -> dict:
    import torch
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    torch.manual_seed(0)
    hf_config = GPTBigCodeConfig(**{k: v for k, v in config.to_hf().items()
                                    if k not in ("architectures", "model_type", "torch_dtype")})
    out = {}
    model32 = GPTBigCodeForCausalLM(hf_config).eval()
    for dtype in (torch.float32, torch.bfloat16):
        model = model32 if dtype == torch.float32 else model32.to(dtype)
        name = str(dtype).removeprefix("torch.")
        res = {}
        with torch.inference_mode():
            ids = torch.randint(1, config.vocab_size, (1, args.prompt_len))
            model(ids)
            seconds = _median_time(lambda m=model, x=ids: m(x), args.repeats)
            res["prefill"] = {"tokens_per_s": args.prompt_len / seconds, "seconds": seconds}
            for b in batch_sizes:
                ctx = torch.randint(1, config.vocab_size, (b, args.decode_context))
                step_ids = torch.randint(1, config.vocab_size, (b, 1))
                times = []
                for _ in range(args.repeats + 1):
                    past = model(ctx, use_cache=True).past_key_values
                    t0 = time.perf_counter()
                    for _ in range(args.decode_steps):
                        o = model(step_ids, past_key_values=past, use_cache=True)
                        past = o.past_key_values
                        step_ids = o.logits[:, -1].argmax(-1, keepdim=True)
                    times.append((time.perf_counter() - t0) / args.decode_steps)
                seconds = statistics.median(times[1:])
                res[f"decode_b{b}"] = {"seconds_per_step": seconds, "tokens_per_s": b / seconds}
        out[name] = res
    del model32
    return out


def main(args) -> int:
    from starcoder_jax.config import preset
    from starcoder_jax.model import init_model
    from starcoder_jax.pretrained import load_pretrained

    batch_sizes = [int(x) for x in args.batch_sizes.split(",") if x]
    variants = [v.strip() for v in args.quantize.split(",") if v.strip()]
    unknown = [v for v in variants if v not in ("none", "int8")]
    if unknown or not variants or len(set(variants)) != len(variants):
        raise ValueError(f"--quantize takes none and/or int8, comma separated, each once; got {args.quantize!r}")
    # unquantized first: quantizing is done in place on the same weights
    variants.sort(key=lambda v: v != "none")
    if args.model:
        model = load_pretrained(args.model, dtype=args.dtype)
        config = model.config
        name = args.model
    else:
        overrides = {"dtype": args.dtype, "param_dtype": args.dtype}
        if args.layers:
            overrides["n_layer"] = args.layers
        config = preset(args.preset, **overrides)
        model = init_model(config)
        name = args.preset + (f" ({args.layers} layers)" if args.layers else "")
    device = jax.devices()[0]
    print(f"model: {name}  params: {config.param_count():,}  dtype: {args.dtype}  "
          f"variants: {', '.join(variants)}")
    print(f"device: {device.platform} {device.device_kind}  jax {jax.__version__}  "
          f"host: {platform.machine()} {platform.processor() or ''}".rstrip())
    report = {"model": name, "dtype": args.dtype, "params": config.param_count(),
              "device": f"{device.platform} {device.device_kind}", "jax": jax.__version__}
    if device.platform == "cpu":
        bandwidth = memory_bandwidth()
        report["bandwidth_bytes_per_s"] = bandwidth
        print(f"host read bandwidth: {bandwidth / 1e9:.1f} GB/s")
    else:
        bandwidth = None
    ours = {}
    for variant in variants:
        if variant == "int8":
            model.quantize_("int8")
        ours[variant] = bench_ours(model, args, batch_sizes)
    report["ours"] = ours
    del model
    theirs = bench_transformers(config, args, batch_sizes) if args.compare_transformers else None
    report["transformers"] = theirs

    rows = [("prefill", f"prefill {args.prompt_len} tok")] + [
        (f"decode_b{b}", f"decode batch {b}") for b in batch_sizes]
    label = {"none": args.dtype, "int8": "int8"}
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
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0

"""Measurements behind `starcoder-jax bench` (starcoder_jax.cli.bench): prefill and decode
throughput, against the physical limits.

Decode reads every weight (and the whole static KV cache) once per step, so
its yardstick is memory bandwidth: limit tok/s = batch * bandwidth / bytes
read per step. Prefill is bound by matmul throughput. With
`--compare-transformers`, transformers' model (GPTBigCode, or Starcoder2 for a
StarCoder2 config; torch) runs the same
config in the same process, on the same kind of device (CUDA when JAX runs on
a GPU and torch sees one, else the CPU), in float32 and bfloat16, and its best
dtype is the reference. Medians of `--repeats` runs are reported.

`--train` measures training instead: full optimizer steps (forward, backward,
clipping, AdamW) built by the library's own training loop (starcoder_jax.training.step),
in tokens/s and in model FLOP/s (and MFU on a GPU with a known peak). With
`--compare-transformers`, torch AdamW steps of transformers' model on the
same config and batch run beside it, in float32 and under bfloat16 autocast.
"""

from __future__ import annotations

import inspect
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def memory_bandwidth(size_bytes: int = 1 << 30, repeats: int = 5) -> list[float]:
    """Read bandwidth of the default device's memory in bytes/s, one sample per
    run, read the way a decode step reads its weights: a matrix-vector
    product of one float32 row with a [8192, size / 32 KiB] matrix (host
    memory on the CPU, HBM on a GPU)."""
    k = 8192
    w = jnp.ones((k, max(1, size_bytes // (4 * k))), jnp.float32)
    x = jnp.ones((1, k), jnp.float32)
    read = jax.jit(lambda x, w: x @ w)
    read(x, w).block_until_ready()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        read(x, w).block_until_ready()
        samples.append(w.nbytes / (time.perf_counter() - t0))
    del w
    return samples


def host_reference_bandwidth(size_bytes: int = 1 << 30, repeats: int = 5,
                             threads: int | None = None) -> list[float]:
    """The host's read bandwidth in bytes/s by a reader outside XLA: one thread
    per core (`threads`, default the cores this process may run on), each
    summing its own contiguous part of one buffer with numpy (which releases
    the GIL while it reduces); a sample is the whole buffer over the time
    from a common start to the last thread's end."""
    import threading

    threads = threads or len(os.sched_getaffinity(0))
    buf = np.ones(size_bytes // 4, np.float32)
    parts = np.array_split(buf, threads)
    for part in parts:  # fault every page in before timing
        np.add.reduce(part)

    def read(part, start):
        start.wait()
        np.add.reduce(part)

    samples = []
    for _ in range(repeats):
        start = threading.Barrier(threads + 1)
        workers = [threading.Thread(target=read, args=(part, start)) for part in parts]
        for w in workers:
            w.start()
        start.wait()
        t0 = time.perf_counter()
        for w in workers:
            w.join()
        samples.append(buf.nbytes / (time.perf_counter() - t0))
    return samples


def _median_time(fn, repeats: int, sync=lambda: None) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _torch_device():
    """(device, sync) for transformers: CUDA when JAX runs on a GPU and torch
    sees one (the same kind of device as ours), else the CPU."""
    import torch

    if jax.devices()[0].platform == "gpu" and torch.cuda.is_available():
        return torch.device("cuda"), torch.cuda.synchronize
    return torch.device("cpu"), lambda: None


def weight_bytes_per_step(model) -> int:
    """Bytes of weights a decode step reads: every weight of the model (quantized
    weights with their scales, float biases and norms) but the position table
    (its logical axes start with "positions"), of which a step reads one row;
    the token table counts once, read whole as the LM head (itself, or its
    derived [D, V] copy, which is not counted again)."""
    from flax import nnx

    from starcoder_jax.model.modules import Derived

    state = nnx.state(model, nnx.Not(Derived))
    return sum(v.get_value().nbytes for _, v in nnx.to_flat_state(state)
               if v.get_metadata()["out_sharding"][0] != "positions")


def decode_consts(config, batch: int, max_new: int):
    """The fixed arguments of `generate.prefill` / `generate.decode_loop` for a
    greedy batch with no stop ids, as the Generator makes them."""
    from starcoder_jax.inference.generate import DecodeConsts

    return DecodeConsts.make(batch, max_new, config.vocab_size)


def prefilled(graphdef, params, config, ids, cache_len: int, consts, kv_cache=None):
    """The DecodeState after prefilling ids [B, T] (every row T tokens long) into
    a fresh cache of cache_len slots: what `generate.decode_loop` continues.
    consts: a `generate.DecodeConsts`."""
    from starcoder_jax.inference.generate import MIN_NEW_BUCKET, bucket, prefill
    from starcoder_jax.model.kv_cache import KVCache

    b, t = ids.shape
    cache = KVCache.init(config, b, cache_len, quantize=kv_cache)
    state = prefill(graphdef, params, ids, jnp.full((b,), t, jnp.int32), cache, consts,
                    out_len_like=jnp.zeros((bucket(int(consts.max_new), MIN_NEW_BUCKET),), jnp.int8),
                    active=jnp.ones((b,), bool))
    return jax.block_until_ready(state)


def bench_ours(model, args, batch_sizes) -> dict:
    from flax import nnx

    from starcoder_jax.inference.generate import bucket, decode_loop

    config = model.config
    graphdef, params = nnx.split(model.adapt_to_backend_(decode=True))  # laid out as the Generator runs it
    weight_bytes = weight_bytes_per_step(model)
    rng = np.random.default_rng(0)
    results = {}

    def run_prefill(b, t, s, max_new):
        ids = jnp.asarray(rng.integers(1, config.vocab_size, (b, t)), jnp.int32)
        return prefilled(graphdef, params, config, ids, s, decode_consts(config, b, max_new), args.kv_cache)

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
        c = decode_consts(config, b, total_new)
        state = decode_loop(graphdef, params, state, jnp.int32(steps), c)  # compile + warm
        jax.block_until_ready(state)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            state = decode_loop(graphdef, params, state, jnp.int32(steps), c)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - t0)
        seconds = statistics.median(times) / steps
        results[f"decode_b{b}"] = {
            "batch": b, "seconds_per_step": seconds, "tokens_per_s": b / seconds,
            # every slot of the static cache is read each step, with the weights
            "cache_len": s, "bytes_per_step": weight_bytes + state.cache.nbytes(),
        }
    return results


def _hf_config(config):
    from transformers import GPTBigCodeConfig, Starcoder2Config

    kind = Starcoder2Config if config.model_type == "starcoder2" else GPTBigCodeConfig
    return kind(**{k: v for k, v in config.to_hf().items() if k not in ("architectures", "model_type", "torch_dtype")})


def _hf_model(config):
    """A randomly initialised transformers model of `config`'s architecture (torch)."""
    from transformers import GPTBigCodeForCausalLM, Starcoder2ForCausalLM

    kind = Starcoder2ForCausalLM if config.model_type == "starcoder2" else GPTBigCodeForCausalLM
    return kind(_hf_config(config))


def bench_transformers(config, args, batch_sizes) -> dict:
    import torch

    device, sync = _torch_device()
    torch.manual_seed(0)
    out = {}
    model32 = _hf_model(config).eval().to(device)
    # the key/value cache's argument and output field: `cache` in recent
    # transformers, `past_key_values` (now deprecated) before
    cache_name = "cache" if "cache" in inspect.signature(model32.forward).parameters else "past_key_values"
    for dtype in (torch.float32, torch.bfloat16):
        model = model32 if dtype == torch.float32 else model32.to(dtype)
        name = str(dtype).removeprefix("torch.")
        res = {"device": str(device)}
        with torch.inference_mode():
            ids = torch.randint(1, config.vocab_size, (1, args.prompt_len), device=device)
            model(ids)
            seconds = _median_time(lambda m=model, x=ids: m(x), args.repeats, sync)
            res["prefill"] = {"tokens_per_s": args.prompt_len / seconds, "seconds": seconds}
            for b in batch_sizes:
                ctx = torch.randint(1, config.vocab_size, (b, args.decode_context), device=device)
                step_ids = torch.randint(1, config.vocab_size, (b, 1), device=device)
                times = []
                for _ in range(args.repeats + 1):
                    past = getattr(model(ctx, use_cache=True), cache_name)
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(args.decode_steps):
                        o = model(step_ids, **{cache_name: past}, use_cache=True)
                        past = getattr(o, cache_name)
                        step_ids = o.logits[:, -1].argmax(-1, keepdim=True)
                    sync()
                    times.append((time.perf_counter() - t0) / args.decode_steps)
                seconds = statistics.median(times[1:])
                res[f"decode_b{b}"] = {"seconds_per_step": seconds, "tokens_per_s": b / seconds}
        out[name] = res
    del model, model32
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------
# --train: optimizer steps per second
# ---------------------------------------------------------------------------

def train_optim():
    """The optimizer settings both sides use: the library's AdamW defaults
    (weight decay 0.1, betas 0.9 / 0.95, eps 1e-8, global-norm clip 1.0) at a
    constant 1e-4, so no step of the timed window differs from another."""
    from starcoder_jax.training.config import OptimConfig

    return OptimConfig(learning_rate=1e-4, schedule="constant", warmup_steps=0)


# Peak dense (no sparsity) tensor-core FLOP/s, from NVIDIA's datasheets (H100
# and H200 Tensor Core GPU datasheets, A100 Tensor Core GPU datasheet; their
# headline figures are with 2:4 sparsity, halved here). XLA runs float32
# matmuls on TF32 tensor cores on these GPUs by default (JAX "Matmul
# precision" docs), so TF32 is the float32 peak.
# Keys are matched in order against jax's lower-cased device_kind, e.g.
# "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA H200".
PEAK_FLOPS = (
    ("h100 pcie", {"bfloat16": 756e12, "float32": 378e12}),
    ("h100 nvl", {"bfloat16": 835.5e12, "float32": 417.5e12}),
    ("h200 nvl", {"bfloat16": 835.5e12, "float32": 417.5e12}),
    ("h100", {"bfloat16": 989e12, "float32": 494.5e12}),
    ("h200", {"bfloat16": 989e12, "float32": 494.5e12}),
    ("a100", {"bfloat16": 312e12, "float32": 156e12}),
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """Peak dense FLOP/s of a GPU for matmuls in `dtype`, or None when unknown."""
    kind = device_kind.lower()
    for key, peaks in PEAK_FLOPS:
        if key in kind:
            return peaks[dtype]
    return None


def train_flops_per_token(config, seq_len: int) -> int:
    """Model FLOPs of one trained token (forward + backward), PaLM's estimate
    (Chowdhery et al. 2022, appendix B):

        6 * N + 12 * n_layer * n_embd * seq_len

    N = the non-embedding parameters plus the V x D LM head (the tied token
    table used as a matmul); the position table and the token lookup are not
    matmuls. The second term is attention's QK^T and AV (2 FLOPs per
    multiply-add, twice again for the backward) over the whole sequence, not
    halved for the causal mask. Recomputation (remat) is not counted: model
    FLOPs, not hardware FLOPs.
    """
    d, v = config.n_embd, config.vocab_size
    head = v * d
    tables = v * d + config.n_positions * d + (0 if config.tie_word_embeddings else head)
    non_embedding = config.param_count() - tables
    return 6 * (non_embedding + head) + 12 * config.n_layer * d * seq_len


def _train_batch(config, batch: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """Random token ids [batch, seq_len + 1] (inputs and shifted targets)."""
    return np.random.default_rng(seed).integers(1, config.vocab_size, (batch, seq_len + 1), dtype=np.int32)


def bench_train_ours(model, args) -> dict:
    """Seconds per optimizer step of starcoder_jax.training's jitted step (one
    micro-batch, full loss mask, every parameter trained): median of --repeats
    after a compiling step."""
    from flax import nnx

    from starcoder_jax.training.step import make_optimizer, make_train_step

    config = model.config
    b, t = args.train_batch, args.train_seq_len
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx, _ = make_optimizer(train_optim(), args.repeats + 1)
    opt_state = tx.init(params)
    dropout = max(config.resid_pdrop, config.embd_pdrop, config.attn_pdrop) > 0
    step_fn = make_train_step(graphdef, tx, seed=0, dropout=dropout, skip_nonfinite=False)
    ids = jnp.asarray(_train_batch(config, b, t)[None])  # [A=1, B, T + 1]
    mask = jnp.ones(ids.shape, bool)
    times = []
    for i in range(args.repeats + 1):
        t0 = time.perf_counter()
        params, opt_state, out = step_fn(params, opt_state, rest, ids, mask, jnp.int32(i))
        jax.block_until_ready((params, opt_state, out))
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times[1:])
    return {"seconds_per_step": seconds, "tokens_per_s": b * t / seconds,
            "compile_and_first_step_s": times[0], "loss": float(out["loss"])}


def bench_train_transformers(config, args) -> dict:
    """transformers' model + torch AdamW (on CUDA beside a JAX GPU run,
    else the CPU), same config, batch and optimizer settings (decay on matmul
    weights only, like training.step.decay_mask): float32, then bfloat16 autocast over
    float32 master weights. Each starts from the same fresh model, so its loss
    is comparable with ours."""
    import torch

    o = train_optim()
    device, sync = _torch_device()
    # The same T tokens per row as ours: transformers shifts the labels itself.
    ids = torch.from_numpy(_train_batch(config, args.train_batch, args.train_seq_len)[:, :-1].astype(np.int64))
    ids = ids.to(device)
    tokens = args.train_batch * args.train_seq_len
    out = {}
    for name, autocast in (("float32", False), ("bfloat16_autocast", True)):
        torch.manual_seed(0)
        model = _hf_model(config).train().to(device)
        decay, rest = [], []
        for key, p in model.named_parameters():  # a tied lm_head is wte, listed once
            embedding = key.endswith(("wte.weight", "wpe.weight", "embed_tokens.weight"))
            (decay if p.ndim == 2 and not embedding else rest).append(p)
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                       {"params": rest, "weight_decay": 0.0}],
                                      lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps)

        def step(model=model, optimizer=optimizer, autocast=autocast) -> float:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = model(ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
            optimizer.step()
            return loss.item()

        step()  # warm-up
        losses = []
        seconds = _median_time(lambda f=step, sink=losses: sink.append(f()), args.repeats, sync)
        out[name] = {"seconds_per_step": seconds, "tokens_per_s": tokens / seconds, "loss": losses[-1],
                     "device": str(device)}
        del model, optimizer, step  # free the float32 model before the next one
    return out

"""Our CPU prefill and decode against llama.cpp's, side by side in one run.

llama.cpp is what a CPU user would run a StarCoder model with. This script
builds it from the vendored tree of the llama-cpp-python sdist on PyPI
(`pip download`, then cmake: `llama-bench` and `llama-quantize`, for this
CPU) into --cache, once; or takes --llama-bench / --llama-quantize built
elsewhere. The model: random weights of --preset, written as a Hugging Face
directory with --tokenizer's files, converted by llama.cpp's own
`convert_hf_to_gguf.py` to an f32 GGUF, and quantized by `llama-quantize`
to q8_0 and q4_0. The converter knows the StarCoder tokenizer by its
pre-tokenizer's hash, so --tokenizer must be a StarCoder tokenizer
directory (the vocabulary of the StarCoderBase models, 49152 tokens).

Pairs, ours against theirs: float32 / f32, int8 / q8_0, int4 / q4_0. Each
round runs every pair, ours then llama.cpp's, and the rounds alternate in
time; the figures are medians over the rounds (at least 3). Prefill:
--prompt-len tokens from an empty cache. Decode: batch 1, --decode-tokens
tokens (ours after 16 cached tokens, on the static cache; llama-bench's
tg test from an empty context). Both use every core (--threads).

    python docs/bench_llamacpp.py --tokenizer DIR                   # 1B shape, 24 layers
    python docs/bench_llamacpp.py --tokenizer DIR --layers 4 --rounds 3 --json out.json
    python docs/bench_llamacpp.py --tokenizer DIR --llama-bench ~/llama.cpp/build/bin/llama-bench \\
        --llama-quantize ~/llama.cpp/build/bin/llama-quantize

It is not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from starcoder_jax import bench  # noqa: E402
from starcoder_jax.config import preset  # noqa: E402
from starcoder_jax.model.modules import init_model  # noqa: E402
from starcoder_jax.model.weights import save_hf  # noqa: E402

SDIST = "llama-cpp-python"
PAIRS = (("none", "f32"), ("int8", "q8_0"), ("int4", "q4_0"))
OURS_NAME = {"none": "float32", "int8": "int8", "int4": "int4"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(map(str, cmd))}\n{done.stderr[-3000:]}")
    return done


def source_tree(cache: Path, version: str) -> Path:
    """The vendored llama.cpp tree of the sdist in cache: downloaded from PyPI and
    unpacked the first time."""
    src = cache / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (src / "convert_hf_to_gguf.py").exists():
        return src
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / f"llama_cpp_python-{version}.tar.gz"
    if not archive.exists():
        log(f"downloading the {SDIST} {version} sdist from PyPI")
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"{SDIST}=={version}", "-d", str(cache)])
    with tarfile.open(archive) as tar:
        tar.extractall(cache, filter="data")
    return src


def build_llamacpp(cache: Path, version: str) -> tuple[Path, Path, Path]:
    """(llama-bench, llama-quantize, source tree) built from the sdist into cache."""
    src = source_tree(cache, version)
    bindir = src / "build" / "bin"
    if not (bindir / "llama-bench").exists():
        log(f"building llama-bench and llama-quantize in {src / 'build'} (minutes)")
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        run(["cmake", "-S", str(src), "-B", str(src / "build"), *generator, "-DCMAKE_BUILD_TYPE=Release",
             "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF"])
        run(["cmake", "--build", str(src / "build"), "--target", "llama-bench", "llama-quantize",
             "-j", str(os.cpu_count())])
    return bindir / "llama-bench", bindir / "llama-quantize", src


def make_ggufs(model, work: Path, tokenizer: str, src: Path, quantize_bin: Path) -> dict[str, Path]:
    """The model as GGUF files f32 / q8_0 / q4_0, by llama.cpp's converter and quantizer."""
    hf = work / "hf"
    ggufs = {fmt: work / f"model-{fmt}.gguf" for _, fmt in PAIRS}
    if all(p.exists() for p in ggufs.values()):
        return ggufs
    log(f"writing the model as safetensors to {hf}")
    save_hf(model, str(hf), tokenizer_from=tokenizer, dtype="float32")
    log("converting with llama.cpp's convert_hf_to_gguf.py")
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
    run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf), "--outtype", "f32",
         "--outfile", str(ggufs["f32"])], env=env)
    for fmt in ("q8_0", "q4_0"):
        log(f"llama-quantize -> {fmt}")
        run([str(quantize_bin), str(ggufs["f32"]), str(ggufs[fmt]), fmt])
    shutil.rmtree(hf)
    return ggufs


def llama_bench(binary: Path, gguf: Path, args) -> dict[str, float]:
    """tok/s of llama-bench's prefill (pp) and decode (tg) tests, one repetition each."""
    out = run([str(binary), "-m", str(gguf), "-p", str(args.prompt_len), "-n", str(args.decode_tokens),
               "-t", str(args.threads), "-r", "1", "-o", "json"]).stdout
    result = {}
    for test in json.loads(out):
        key = "prefill" if test["n_prompt"] > 0 else "decode_b1"
        result[key] = float(test["avg_ts"])
    return result


def ours(model, args) -> dict[str, float]:
    ns = argparse.Namespace(prompt_len=args.prompt_len, decode_context=16, decode_steps=args.decode_tokens,
                            repeats=1, kv_cache=None)
    r = bench.bench_ours(model, ns, [1])
    return {"prefill": r["prefill"]["tokens_per_s"], "decode_b1": r["decode_b1"]["tokens_per_s"],
            "bytes_per_step": r["decode_b1"]["bytes_per_step"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="a StarCoder tokenizer directory (tokenizer.json ...)")
    p.add_argument("--preset", default="starcoderbase-1b")
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the preset's (quick runs)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "starcoder_jax", "llamacpp"))
    p.add_argument("--sdist-version", default="0.3.36")
    p.add_argument("--llama-bench", default=None, help="a built llama-bench (skips the build)")
    p.add_argument("--llama-quantize", default=None, help="a built llama-quantize (with --llama-bench)")
    p.add_argument("--formats", default="none,int8,int4", help="ours of none,int8,int4 (with their pairs)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.rounds < 3:
        raise SystemExit("--rounds must be >= 3 (medians of alternating runs)")
    cache = Path(args.cache)
    if args.llama_bench:
        if not args.llama_quantize:
            raise SystemExit("--llama-bench needs --llama-quantize too")
        bench_bin, quantize_bin = Path(args.llama_bench), Path(args.llama_quantize)
        src = source_tree(cache, args.sdist_version)
    else:
        bench_bin, quantize_bin, src = build_llamacpp(cache, args.sdist_version)

    overrides = {} if args.layers is None else {"n_layer": args.layers}
    config = preset(args.preset, **overrides)
    name = f"{args.preset}" + ("" if args.layers is None else f"-{args.layers}l")
    work = cache / "models" / name
    work.mkdir(parents=True, exist_ok=True)
    log(f"model {name}: random weights, {config.param_count():,} parameters")
    model = init_model(config)
    ggufs = make_ggufs(model, work, args.tokenizer, src, quantize_bin)

    pairs = [(v, fmt) for v, fmt in PAIRS if v in args.formats.split(",")]
    models = {v: model if v == "none" else nnx.clone(model).quantize_(v) for v, _ in pairs}
    bandwidth = bench.memory_bandwidth() + bench.host_reference_bandwidth()
    rows: dict[str, dict[str, list[float]]] = {v: {} for v, _ in pairs}
    step_bytes = {}  # ours: bytes a decode step reads (weights and the whole static cache)
    for r in range(args.rounds):
        for v, fmt in pairs:
            mine = ours(models[v], args)
            theirs = llama_bench(bench_bin, ggufs[fmt], args)
            log(f"round {r + 1}: {OURS_NAME[v]} prefill {mine['prefill']:.1f} decode {mine['decode_b1']:.2f} | "
                f"{fmt} prefill {theirs['prefill']:.1f} decode {theirs['decode_b1']:.2f} tok/s")
            for key in ("prefill", "decode_b1"):
                rows[v].setdefault(f"ours_{key}", []).append(mine[key])
                rows[v].setdefault(f"llamacpp_{key}", []).append(theirs[key])
            step_bytes[v] = mine["bytes_per_step"]
    bandwidth += bench.memory_bandwidth() + bench.host_reference_bandwidth()
    limit = max(bandwidth)

    cpu = bench_cpu_name()
    print(f"\n{name}, {args.threads} threads, {cpu}, jax {jax.__version__}; llama.cpp from {SDIST} "
          f"{args.sdist_version}; medians of {args.rounds} alternating rounds; read bandwidth {limit / 1e9:.1f} GB/s "
          "(best sample)")
    print(f"{'':32s} {'llama.cpp':>10s} {'ours':>10s} {'ratio':>7s} {'ours % of limit':>16s}")
    summary = {}
    for v, fmt in pairs:
        for key, label in (("prefill", f"prefill {args.prompt_len}"), ("decode_b1", "decode batch 1")):
            theirs_m = statistics.median(rows[v][f"llamacpp_{key}"])
            ours_m = statistics.median(rows[v][f"ours_{key}"])
            row = f"{label}, {fmt} / {OURS_NAME[v]}"
            line = f"{row:32s} {theirs_m:10.2f} {ours_m:10.2f} {ours_m / theirs_m:6.2f}x"
            if key == "decode_b1":
                line += f" {100 * ours_m * step_bytes[v] / limit:15.0f}%"
            print(line)
            summary[f"{key}_{v}"] = {"llamacpp": theirs_m, "ours": ours_m, "ratio": ours_m / theirs_m}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": name, "threads": args.threads, "cpu": cpu, "rounds": rows, "medians": summary,
                       "bytes_per_step": step_bytes,
                       "bandwidth_samples": bandwidth, "host": platform.node()}, f, indent=2)
    return 0


def bench_cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())

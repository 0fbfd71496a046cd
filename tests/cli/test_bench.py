"""`starcoder-jax bench` (prefill/decode) and `bench --train`: the report's fields, the
bandwidth limits and the FLOPs count (no timing asserts)."""

import json
import os
import subprocess
import sys

import pytest
from builders import REPO_ROOT

from starcoder_jax import bench
from starcoder_jax.cli.main import main

TINY = ["bench", "--train", "--preset", "tiny_starcoder_py", "--layers", "1",
        "--train-batch", "2", "--train-seq-len", "32", "--repeats", "1"]
# tiny_starcoder_py with one layer: D 768, V 49152. 6,006,656 is transformers'
# parameter count of that GPTBigCode without wte and wpe (one block + ln_f).
FLOPS_PER_TOKEN = 6 * (6_006_656 + 49152 * 768) + 12 * 1 * 768 * 32


@pytest.mark.torch
@pytest.mark.slow
def test_decode_bench_reports_limits_for_each_variant(tmp_path, capsys):
    out = tmp_path / "decode.json"
    argv = ["bench", "--preset", "tiny_starcoder_py", "--layers", "1", "--quantize", "none,int8",
            "--batch-sizes", "1,2", "--prompt-len", "16", "--decode-context", "8", "--decode-steps", "2",
            "--repeats", "1", "--compare-transformers", "--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    samples = report["bandwidth_samples_bytes_per_s"]
    reference = report["reference_bandwidth_samples_bytes_per_s"]
    assert len(samples) == 15  # 5 before the runs and 5 after each of the two variants
    assert len(reference) == 10  # the numpy reader, 5 before and 5 after
    assert report["bandwidth_bytes_per_s"] == max(samples + reference)  # the best read
    for variant in ("none", "int8"):
        for b in (1, 2):
            r = report["ours"][variant][f"decode_b{b}"]
            assert r["tokens_per_s"] == pytest.approx(b / r["seconds_per_step"])
            limit = b * report["bandwidth_bytes_per_s"] / r["bytes_per_step"]
            assert r["bandwidth_limit_tokens_per_s"] == pytest.approx(limit)
            assert r["fraction_of_limit"] == pytest.approx(r["tokens_per_s"] / limit)
            best = max(report["transformers"][d][f"decode_b{b}"]["tokens_per_s"] for d in ("float32", "bfloat16"))
            assert r["vs_transformers_best"] == pytest.approx(r["tokens_per_s"] / best)
    # int8 weights: about a quarter of the float32 bytes per step (scales, norms, biases and the cache stay float)
    int8, f32 = (report["ours"][v]["decode_b1"]["bytes_per_step"] for v in ("int8", "none"))
    ratio = int8 / f32
    assert 0.25 < ratio < 0.3
    printed = capsys.readouterr().out
    assert "the best sample (XLA matrix-vector reads: 15 samples" in printed and "int8 vs best" in printed
    assert "numpy reference, a thread per core: 10 samples" in printed


def test_two_readers_measure_the_read_bandwidth():
    """The XLA reader (a matrix-vector product, as decode reads) and the numpy
    reference (a thread per core) each give one sample a repeat, in a plausible range."""
    xla = bench.memory_bandwidth(size_bytes=32 << 20, repeats=2)
    reference = bench.host_reference_bandwidth(size_bytes=32 << 20, repeats=3, threads=2)
    assert len(xla) == 2 and len(reference) == 3
    assert all(1e8 < b < 1e13 for b in xla + reference), (xla, reference)


@pytest.mark.torch
@pytest.mark.slow
def test_train_bench_against_transformers(tmp_path, capsys):
    out = tmp_path / "train.json"
    assert main([*TINY, "--compare-transformers", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["train"]["flops_per_token"] == FLOPS_PER_TOKEN
    assert report["train"]["tokens_per_step"] == 64
    rows = [report["ours"], report["transformers"]["float32"], report["transformers"]["bfloat16_autocast"]]
    for row in rows:
        assert row["tokens_per_s"] > 0
        assert row["tokens_per_s"] == pytest.approx(64 / row["seconds_per_step"])
        assert row["flops_per_s"] == pytest.approx(row["tokens_per_s"] * FLOPS_PER_TOKEN)
        assert 0 < row["loss"] < 20
    best = max(r["tokens_per_s"] for r in rows[1:])
    assert report["ours"]["vs_transformers_best"] == pytest.approx(report["ours"]["tokens_per_s"] / best)
    printed = capsys.readouterr().out
    assert "hf bf16 autocast" in printed and "ours / best transformers" in printed


def test_train_bench_alone_bfloat16(tmp_path, capsys):
    out = tmp_path / "train.json"
    assert main([*TINY, "--dtype", "bfloat16", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["transformers"] is None
    assert report["dtype"] == "bfloat16"
    assert report["ours"]["tokens_per_s"] > 0
    assert report["ours"]["flops_per_s"] == pytest.approx(report["ours"]["tokens_per_s"] * FLOPS_PER_TOKEN)
    assert "hf float32" not in capsys.readouterr().out


def test_train_bench_rejects_a_sequence_longer_than_the_model(capsys):
    args = [*TINY, "--train-seq-len", "9000"]
    assert main(args) == 2
    assert "--train-seq-len is 9000 but the model holds 8192 positions" in capsys.readouterr().err


def test_peak_flops_table():
    assert bench.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert bench.peak_flops("NVIDIA H100 80GB HBM3", "float32") == 494.5e12
    assert bench.peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert bench.peak_flops("NVIDIA H200", "bfloat16") == 989e12
    assert bench.peak_flops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312e12
    assert bench.peak_flops("Tesla T4", "bfloat16") is None


MEMORY = ["bench", "--train", "--memory", "--preset", "tiny_starcoder_py", "--layers", "1",
          "--train-batch", "2", "--train-seq-len", "64", "--loss-chunk", "16"]


def test_train_memory_report_compiles_without_running(tmp_path, capsys):
    out = tmp_path / "memory.json"
    assert main([*MEMORY, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["peak_bytes"] == r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"]
    assert (r["remat"], r["loss_chunk"], r["mesh"], r["seq_len"], r["batch"]) == ("full", 16, None, 64, 2)
    assert r["params_bytes"] == r["gradients_bytes"] == 4 * r["params"]
    assert abs(r["optimizer_bytes"] - 2 * r["params_bytes"]) <= 64  # mu, nu and AdamW's step counts
    # params and AdamW moments come in and, donated, go out in the same buffers
    assert r["argument_bytes"] >= r["params_bytes"] + r["optimizer_bytes"]
    assert r["alias_bytes"] >= r["params_bytes"] + r["optimizer_bytes"]
    assert r["temp_bytes"] >= r["gradients_bytes"]
    printed = capsys.readouterr().out
    assert "compiled, not run" in printed and "temporaries" in printed and "AdamW moments" in printed


def test_train_memory_mesh_needs_its_devices(capsys):
    assert main([*MEMORY, "--mesh", "fsdp=8"]) == 2
    assert "xla_force_host_platform_device_count" in capsys.readouterr().err
    assert main(["bench", "--memory"]) == 2


@pytest.mark.slow
def test_train_memory_on_eight_fake_devices(tmp_path):
    """fsdp=8 on fake CPU devices: each holds an eighth of the params, gradients and moments."""
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    results = {}
    for name, extra in (("one", []), ("fsdp8", ["--mesh", "fsdp=8", "--train-batch", "8"])):
        out = tmp_path / f"{name}.json"
        subprocess.run([sys.executable, "-m", "starcoder_jax.cli", *MEMORY, *extra, "--json", str(out)],
                       env=env, check=True, cwd=REPO_ROOT)
        results[name] = json.loads(out.read_text())
    one, eight = results["one"], results["fsdp8"]
    assert eight["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    # the tables split 8 ways; LayerNorms and biases stay whole on every device
    assert one["params_bytes"] / 8 < eight["params_bytes"] < one["params_bytes"] / 7
    assert eight["argument_bytes"] < one["argument_bytes"] / 6

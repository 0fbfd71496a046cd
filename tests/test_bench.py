"""`starcoder-jax bench --train`: the report's fields and the FLOPs count (no timing asserts)."""

import json

import pytest

from starcoder_jax import bench
from starcoder_jax.cli import main

TINY = ["bench", "--train", "--preset", "tiny_starcoder_py", "--layers", "1",
        "--train-batch", "2", "--train-seq-len", "32", "--repeats", "1"]
# tiny_starcoder_py with one layer: D 768, V 49152. 6,006,656 is transformers'
# parameter count of that GPTBigCode without wte and wpe (one block + ln_f).
FLOPS_PER_TOKEN = 6 * (6_006_656 + 49152 * 768) + 12 * 1 * 768 * 32


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

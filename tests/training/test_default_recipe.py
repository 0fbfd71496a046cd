"""The default model's training recipe at toy size: docs/gpu/train_default.py
from a corpus archive to weights in OUT/model (token store, calibration,
a run sized to its budget, periodic exports)."""

import json
import os
import subprocess
import sys
import tarfile

import jax.numpy as jnp
import numpy as np
import pytest
from builders import CORPUS, REPO_ROOT

from starcoder_jax.model.pretrained import load_pretrained
from starcoder_jax.training import train

DRIVER = os.path.join(REPO_ROOT, "docs", "gpu", "train_default.py")


def corpus_archive(tmp_path):
    """A tar.xz laid out as recipes/pycode writes it: pycode-corpus/{stdlib,packages}."""
    root = tmp_path / "src" / "pycode-corpus"
    rng = np.random.default_rng(0)
    for folder, count in (("stdlib", 6), ("packages/toy", 30)):
        (root / folder).mkdir(parents=True)
        for i in range(count):
            parts = [CORPUS[j] for j in rng.permutation(len(CORPUS))[:3]]
            (root / folder / f"m{i:02d}.py").write_text(f"# {folder} {i}\n" + "\n".join(parts))
    archive = tmp_path / "pycode-corpus.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(root, arcname="pycode-corpus")
    return str(archive)


@pytest.mark.slow
def test_the_recipe_trains_to_its_budget_and_returns_the_last_export(tmp_path, tokenizer_dir):
    out, work = tmp_path / "out", tmp_path / "work"
    small = ["model.config.n_embd=32", "model.config.n_layer=2", "model.config.n_head=4",
             "model.config.n_inner=64", "model.config.n_positions=64", "model.config.vocab_size=512",
             "model.compute_dtype=float32", f"tokenizer={tokenizer_dir}", "data.seq_len=32",
             "data.loader_workers=0", "train.batch_size=4", "optim.warmup_steps=8", "train.steps=100",
             "train.export_every=5", "train.export_dtype=float32", "train.eval_every=10",
             "train.eval_sequences=4", "train.save_every=10"]
    proc = subprocess.run([sys.executable, DRIVER, "--out", str(out), "--work", str(work),
                           "--corpus", corpus_archive(tmp_path), "--budget", "240", "--calibration", "4",
                           "--reserve", "10", "--max-steps", "12", *small],
                          capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{\"steps\"")][-1])
    assert summary["steps"] == 12 and summary["exit"] == 0, summary

    # what comes back: weights and config of the last step, the metrics, nothing else
    assert sorted(os.listdir(out)) == ["metrics.jsonl", "model"]
    assert sorted(os.listdir(out / "model")) == ["config.json", "model.safetensors"]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records][-1] == 12
    assert any("eval_loss" in r for r in records)
    run_model = train.load_run_model(str(work / "run"))
    exported = load_pretrained(str(out / "model"))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 512, (2, 20)), jnp.int32)
    np.testing.assert_array_equal(np.asarray(exported(ids)), np.asarray(run_model(ids)))

    # the calibration stopped inside the warmup and the sized run resumed from it
    log = proc.stdout
    assert "calibration:" in log and "training to step 12" in log
    store = json.load(open(work / "store" / "manifest.json"))
    assert store["documents"]["total"] == 36 and store["documents"]["held_out"] >= 1

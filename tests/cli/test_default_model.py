"""The shipped default model: loads offline by name, matches transformers, drives the CLI."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from builders import hf_logits

import starcoder_jax as sj
from starcoder_jax.model.pretrained import DEFAULT_MODEL, SHIPPED_DIR


def test_default_model_is_shipped_small_and_loads_by_name():
    path = os.path.join(SHIPPED_DIR, DEFAULT_MODEL)
    sizes = {f: os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= set(sizes)
    assert sum(sizes.values()) <= 25 * 2**20
    model, tok = sj.load_pretrained(DEFAULT_MODEL), sj.load_tokenizer(DEFAULT_MODEL)
    assert model.config.multi_query and model.config.vocab_size == tok.vocab_size == 8192
    assert tok.require("<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>") == [0, 1, 2, 3, 4]


@pytest.mark.torch
def test_shipped_weights_match_transformers():
    path = os.path.join(SHIPPED_DIR, DEFAULT_MODEL)
    tok = sj.load_tokenizer(DEFAULT_MODEL)
    ids = np.asarray([tok.encode("import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n")])
    ours = np.asarray(sj.load_pretrained(DEFAULT_MODEL)(jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(ours, hf_logits(path, ids), rtol=0, atol=1e-4)


def test_readme_first_command_runs_offline(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "starcoder_jax.cli", "generate", "--json", "--max-new-tokens", "16",
                          "def fibonacci(n):"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert record["prompt"] == "def fibonacci(n):" and 1 <= len(record["ids"]) <= 16 and record["text"]
    infill = subprocess.run([sys.executable, "-m", "starcoder_jax.cli", "infill", "--prefix", "def add(a, b):\n    ",
                             "--suffix", "\n", "--max-new-tokens", "8"], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert infill.returncode == 0, infill.stderr[-2000:]

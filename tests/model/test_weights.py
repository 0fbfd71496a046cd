"""HF safetensors <-> ours: round trips, sharded files, orbax, and clear errors for bad checkpoints."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from builders import hf_logits, make_hf_model
from safetensors.numpy import load_file, save_file

import starcoder_jax as sj
from starcoder_jax.cli.main import main as cli_main
from starcoder_jax.model import weights


def read_all_tensors(path):
    out = {}
    for file in weights.safetensors_files(path):
        out.update(load_file(file))
    return out


@pytest.mark.torch
@pytest.mark.parametrize("multi_query", [True, False])
def test_hf_round_trip_is_exact(tmp_path, multi_query):
    src = make_hf_model(str(tmp_path / "src"), multi_query=multi_query, n_head=4, n_embd=32)
    dst = str(tmp_path / "dst")
    sj.save_hf(sj.load_pretrained(src), dst)
    original, exported = read_all_tensors(src), read_all_tensors(dst)
    assert set(exported) == set(original)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    ids = np.random.default_rng(0).integers(0, 512, (2, 50))
    np.testing.assert_array_equal(hf_logits(dst, ids), hf_logits(src, ids))


@pytest.mark.torch
def test_sharded_export_and_load(tmp_path, tiny_model_dir):
    model = sj.load_pretrained(tiny_model_dir)
    dst = str(tmp_path / "sharded")
    sj.save_hf(model, dst, max_shard_bytes=100_000)
    index = json.load(open(os.path.join(dst, weights.SAFE_INDEX)))
    assert len(set(index["weight_map"].values())) > 2
    ids = np.random.default_rng(1).integers(0, 512, (1, 30))
    np.testing.assert_array_equal(hf_logits(dst, ids), hf_logits(tiny_model_dir, ids))
    again = sj.load_pretrained(dst)
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(ids))), np.asarray(model(jnp.asarray(ids))))


@pytest.mark.torch
def test_bfloat16_export_loads_in_transformers(tmp_path, tiny_model_dir):
    dst = str(tmp_path / "bf16")
    sj.save_hf(sj.load_pretrained(tiny_model_dir), dst, dtype="bfloat16")
    assert json.load(open(os.path.join(dst, "config.json")))["torch_dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(os.path.join(dst, "model.safetensors"), "numpy") as f:
        assert f.get_slice("transformer.wte.weight").get_dtype() == "BF16"
    ids = np.random.default_rng(2).integers(0, 512, (1, 20))
    ref = hf_logits(tiny_model_dir, ids)
    assert np.abs(hf_logits(dst, ids) - ref).max() <= 0.05 * np.abs(ref).max()


def test_orbax_round_trip_and_cli(tmp_path, tiny_model_dir):
    jax_dir, hf_dir = str(tmp_path / "jax"), str(tmp_path / "hf")
    assert cli_main(["convert", "hf-to-jax", tiny_model_dir, jax_dir]) == 0
    assert weights.is_orbax_dir(jax_dir)
    assert os.path.isfile(os.path.join(jax_dir, "tokenizer.json"))
    assert cli_main(["convert", "jax-to-hf", jax_dir, hf_dir]) == 0
    original, exported = read_all_tensors(tiny_model_dir), read_all_tensors(hf_dir)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 512, (1, 20)), jnp.int32)
    from_orbax = sj.load_pretrained(jax_dir)
    np.testing.assert_array_equal(np.asarray(from_orbax(ids)),
                                  np.asarray(sj.load_pretrained(tiny_model_dir)(ids)))
    as_bf16 = sj.load_pretrained(jax_dir, dtype="bfloat16")
    assert as_bf16.blocks[0].mlp.fc.kernel[...].dtype == jnp.bfloat16


# ---- bad input: each one gets a message that names the problem ----

def copy_model(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_missing_config(tmp_path, tiny_model_dir):
    path = copy_model(tiny_model_dir, tmp_path / "m")
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        sj.load_pretrained(path)


def test_missing_weights(tmp_path, tiny_model_dir):
    path = copy_model(tiny_model_dir, tmp_path / "m")
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(sj.CheckpointError, match="no model.safetensors"):
        sj.load_pretrained(path)


def test_nonexistent_path():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sj.load_pretrained("/no/such/model/dir")


def test_wrong_model_type(tmp_path, tiny_model_dir):
    path = copy_model(tiny_model_dir, tmp_path / "m")
    cfg_file = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_file))
    cfg["model_type"] = "llama"
    json.dump(cfg, open(cfg_file, "w"))
    with pytest.raises(ValueError, match="model_type is 'llama', expected 'gpt_bigcode'"):
        sj.load_pretrained(path)
    # GPTBigCode tensors under a StarCoder2 config.json: every name is reported
    cfg["model_type"] = "starcoder2"
    json.dump(cfg, open(cfg_file, "w"))
    with pytest.raises(weights.CheckpointError, match="missing tensor model.embed_tokens.weight") as err:
        sj.load_pretrained(path)
    assert "unexpected tensor transformer.wpe.weight" in str(err.value)


def test_every_tensor_problem_is_reported_at_once(tmp_path, tiny_model_dir):
    path = copy_model(tiny_model_dir, tmp_path / "m")
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    del tensors["transformer.h.1.mlp.c_fc.bias"]  # missing
    tensors["transformer.h.0.attn.c_proj.weight"] = np.zeros((64, 63), np.float32)  # wrong shape
    tensors["transformer.h.0.ln_1.weight"] = np.zeros((64,), np.int32)  # wrong dtype
    tensors["transformer.h.7.mlp.c_fc.weight"] = np.zeros((4, 4), np.float32)  # extra
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(sj.CheckpointError) as err:
        sj.load_pretrained(path)
    msg = str(err.value)
    assert "4 problems" in msg
    assert "missing tensor transformer.h.1.mlp.c_fc.bias" in msg
    assert "model.safetensors: transformer.h.0.attn.c_proj.weight has shape [64, 63], expected [64, 64]" in msg
    assert "transformer.h.0.ln_1.weight has dtype I32, expected a float type" in msg
    assert "unexpected tensor transformer.h.7.mlp.c_fc.weight" in msg


def test_truncated_file(tmp_path, tiny_model_dir):
    path = copy_model(tiny_model_dir, tmp_path / "m")
    file = os.path.join(path, "model.safetensors")
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(sj.CheckpointError, match="truncated"):
        sj.load_pretrained(path)


def test_corrupted_header(tmp_path, tiny_model_dir):
    path = copy_model(tiny_model_dir, tmp_path / "m")
    file = os.path.join(path, "model.safetensors")
    with open(file, "r+b") as f:
        f.write(b"\xff" * 64)
    with pytest.raises(sj.CheckpointError, match="not a readable safetensors file"):
        sj.load_pretrained(path)


@pytest.mark.torch
def test_pickle_checkpoints_are_refused(tmp_path, tiny_model_dir):
    path = copy_model(tiny_model_dir, tmp_path / "m")
    os.remove(os.path.join(path, "model.safetensors"))
    marker = tmp_path / "unpickled"
    # A pickle that would create a file if it were ever loaded.
    import pickle

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(sj.CheckpointError, match="never unpickles") as err:
        sj.load_pretrained(path)
    assert "save_pretrained" in str(err.value)
    assert not marker.exists()


def test_input_ids_out_of_range(tiny_model_dir):
    model = sj.load_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match=r"token id 512, outside the vocabulary \[0, 512\)"):
        model(jnp.asarray([[1, 512]], jnp.int32))
    with pytest.raises(ValueError, match="token id -1"):
        model(jnp.asarray([[-1, 2]], jnp.int32))
    with pytest.raises(ValueError, match="has 513 tokens but the model holds 512 positions"):
        model(jnp.zeros((1, 513), jnp.int32))

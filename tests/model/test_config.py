"""Config translation, presets, and the full-size shapes (nnx.eval_shape, no memory)."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

import starcoder_jax as sj
from starcoder_jax.config import PRESETS, StarCoderConfig


def n_params(model) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_starcoderbase_1b_parameter_count():
    model = sj.abstract_model(sj.preset("starcoderbase-1b"))
    assert n_params(model) == 1_137_207_296
    assert sj.preset("starcoderbase-1b").param_count() == 1_137_207_296
    kernel = model.blocks[23].attn.key.kernel.get_value()
    assert isinstance(kernel, jax.ShapeDtypeStruct) and kernel.shape == (2048, 1, 128)


QUICK_PRESETS = ("starcoderbase-1b", "tiny_starcoder_py", "starcoder2-3b", "gpt_bigcode-santacoder")


# the quick tier builds the smallest preset of each family; the full one every preset
@pytest.mark.parametrize("name", [n if n in QUICK_PRESETS else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(PRESETS)])
def test_every_preset_builds_abstractly(name):
    config = sj.preset(name)
    assert n_params(sj.abstract_model(config)) == config.param_count()


def test_preset_sizes():
    # Published sizes: starcoderbase-3b ~3.0B, 7b ~7.3B, 15.5B; tiny_starcoder_py 164M; santacoder 1.1B.
    counts = {name: sj.preset(name).param_count() for name in PRESETS}
    assert 2.9e9 < counts["starcoderbase-3b"] < 3.2e9
    assert 7.0e9 < counts["starcoderbase-7b"] < 7.6e9
    assert 15.4e9 < counts["starcoderbase"] < 16.1e9
    assert 0.15e9 < counts["tiny_starcoder_py"] < 0.17e9
    assert 1.1e9 < counts["gpt_bigcode-santacoder"] < 1.2e9
    assert sj.preset("starcoder").activation_function == "gelu"
    assert sj.preset("bigcode/starcoderbase-1b") == PRESETS["starcoderbase-1b"]


@pytest.mark.torch
def test_hf_config_round_trip_through_transformers(tmp_path):
    from transformers import GPTBigCodeConfig

    ours = sj.preset("starcoderbase-1b")
    hf = GPTBigCodeConfig(**{k: v for k, v in ours.to_hf().items() if k not in ("architectures", "model_type")})
    hf.save_pretrained(tmp_path)
    again = StarCoderConfig.from_hf(str(tmp_path))
    assert again == ours
    assert again.kv_heads == 1 and again.head_dim == 128 and again.mlp_dim == 8192


def test_from_hf_defaults_n_inner_and_lists():
    config = StarCoderConfig.from_hf({"model_type": "gpt_bigcode", "n_embd": 64, "n_head": 4, "n_layer": 1,
                                      "vocab_size": 10, "n_positions": 8, "eos_token_id": [0, 5]})
    assert config.mlp_dim == 256 and config.eos_token_id == 0


@pytest.mark.parametrize("change,message", [
    ({"model_type": "llama"}, "model_type is 'llama', expected 'gpt_bigcode'"),
    ({"add_cross_attention": True}, "add_cross_attention=True is not supported"),
    ({"activation_function": "relu"}, "activation_function 'relu' is not supported"),
    ({"n_head": 5}, r"n_embd \(64\) must be divisible by n_head \(5\)"),
    ({"attention_softmax_in_fp32": False}, "attention_softmax_in_fp32=False is not supported"),
    ({"n_layer": 0}, "n_layer must be a positive integer"),
])
def test_from_hf_refuses_what_it_cannot_honour(tmp_path, change, message):
    hf = {"model_type": "gpt_bigcode", "n_embd": 64, "n_head": 4, "n_layer": 1, "vocab_size": 10, "n_positions": 8}
    hf.update(change)
    file = tmp_path / "config.json"
    file.write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=message) as err:
        StarCoderConfig.from_hf(str(tmp_path))
    assert str(file) in str(err.value)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'starcoder-9b'; available:"):
        sj.preset("starcoder-9b")

"""The tied LM head's derived [D, V] copy on the "cpu" projection form.

It is made where the model is laid out for decoding (the Generator), is
never trained or saved, and never read once its source table has
changed: a model whose weights changed decodes exactly what a model that
never had a copy decodes.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import starcoder_jax as sj
from starcoder_jax.inference.generate import Generator, generate
from starcoder_jax.model.modules import Derived
from starcoder_jax.model.weights import save_hf, save_orbax

PROMPTS = [[5, 9, 33, 2], list(range(40, 57))]


def _tokens(model):
    return [g.ids for g in generate(model, PROMPTS, max_new_tokens=12, ignore_eos=True)]


@pytest.fixture()
def loaded(tiny_model_dir):
    model = sj.load_pretrained(tiny_model_dir)
    assert "decode_head" not in vars(model)  # loading (for training, converting, scoring) makes none
    Generator(model)
    return model


@pytest.mark.slow
def test_the_copy_is_made_for_decoding_on_the_cpu_form_only(loaded, tiny_model_dir):
    table = np.asarray(loaded.wte.embedding[...])
    copy = loaded.decode_head
    assert isinstance(copy, Derived) and not isinstance(copy, nnx.Param)
    np.testing.assert_array_equal(np.asarray(copy.get_value()), table.T)
    for model in (sj.load_pretrained(tiny_model_dir, matmul_impl="xla"),
                  sj.load_pretrained(tiny_model_dir, quantize="int8")):
        Generator(model)
        assert "decode_head" not in vars(model)
    # decoding reads it, and reads what the table gives
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 1, table.shape[1])), jnp.float32)
    np.testing.assert_allclose(np.asarray(loaded.logits(x)), np.asarray(loaded.wte.attend(x)),
                               rtol=0, atol=1e-5 * float(np.abs(loaded.wte.attend(x)).max()))
    assert _tokens(loaded) == _tokens(sj.load_pretrained(tiny_model_dir, matmul_impl="xla"))


def test_the_copy_is_not_trained_nor_saved(loaded, tmp_path):
    params = nnx.state(loaded, nnx.Param)
    assert all(p[0] != "decode_head" for p, _ in nnx.to_flat_state(params))
    out = save_orbax(loaded, str(tmp_path / "orbax"))
    with open(os.path.join(out, "params", "_METADATA")) as f:
        saved = json.load(f)["tree_metadata"]
    assert any("'wte'" in key for key in saved) and not any("decode_head" in key for key in saved)
    again = sj.load_pretrained(out)
    assert "decode_head" not in vars(again)
    Generator(again)
    np.testing.assert_array_equal(np.asarray(again.decode_head.get_value()), np.asarray(loaded.decode_head.get_value()))
    save_hf(loaded, str(tmp_path / "hf"))  # the weight table writes only the model's own weights
    assert sj.load_pretrained(str(tmp_path / "hf"), matmul_impl="xla").config.tie_word_embeddings


def test_a_model_whose_table_changed_never_decodes_with_the_old_copy(loaded, tiny_model_dir):
    """A training step's way of changing weights: new Params merged with the
    rest of the state (the old copy among it)."""
    graphdef, params, rest = nnx.split(loaded, nnx.Param, ...)
    trained = jax.tree.map(lambda a: a * 1.5, params)
    model = nnx.merge(graphdef, trained, rest)
    stale = model.decode_head.get_value()
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 1, stale.shape[0])), jnp.float32)
    want = np.asarray(model.wte.attend(x))
    # the old copy would give other logits: the guard below is what keeps them right
    assert np.abs(np.asarray(jnp.einsum("BTD,DV->BTV", x, stale)) - want).max() > 0.1 * np.abs(want).max()
    np.testing.assert_allclose(np.asarray(model.logits(x)), want, rtol=0, atol=1e-5 * np.abs(want).max())

    fresh = sj.load_pretrained(tiny_model_dir, matmul_impl="xla")
    f_graphdef, f_params, f_rest = nnx.split(fresh, nnx.Param, ...)
    fresh = nnx.merge(f_graphdef, jax.tree.map(lambda a: a * 1.5, f_params), f_rest)
    assert _tokens(model) == _tokens(fresh)
    # the generator laid the model out again: the copy now comes from the new table
    np.testing.assert_array_equal(np.asarray(model.decode_head.get_value()),
                                  np.asarray(model.wte.embedding[...]).T)


def test_quantize_drops_the_copy(loaded, tiny_model_dir):
    loaded.quantize_()
    assert "decode_head" not in vars(loaded)
    assert _tokens(loaded) == _tokens(sj.load_pretrained(tiny_model_dir, quantize="int8"))

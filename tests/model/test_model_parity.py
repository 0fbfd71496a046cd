"""Logit parity with transformers' GPTBigCodeForCausalLM (torch, CPU)."""

import jax.numpy as jnp
import numpy as np
import pytest
from builders import hf_logits, make_hf_model

import starcoder_jax as sj
from starcoder_jax.ops.attention import FORMS

F32_TOL = 1e-4  # max |ours - transformers| on float32 logits


@pytest.mark.parametrize(
    "multi_query,activation,n_head,n_embd,vocab",
    [
        (True, "gelu_pytorch_tanh", 8, 64, 1000),  # head_dim 8, odd vocab
        pytest.param(False, "gelu_pytorch_tanh", 8, 64, 1000, marks=pytest.mark.slow),
        pytest.param(True, "gelu", 4, 48, 777, marks=pytest.mark.slow),  # head_dim 12
        (False, "gelu", 6, 48, 777),  # head_dim 8
    ],
)
@pytest.mark.torch
def test_logits_match_transformers(tmp_path, multi_query, activation, n_head, n_embd, vocab):
    path = make_hf_model(str(tmp_path), vocab_size=vocab, n_positions=320, n_embd=n_embd, n_head=n_head,
                         n_layer=2, n_inner=3 * n_embd, multi_query=multi_query,
                         activation_function=activation)
    ids = np.random.default_rng(0).integers(0, vocab, (2, 300))
    ref = hf_logits(path, ids)
    model = sj.load_pretrained(path)
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    assert ours.shape == (2, 300, vocab) and ours.dtype == np.float32
    assert np.abs(ref).max() > 1.0  # logits large enough for the tolerance to mean something
    np.testing.assert_allclose(ours, ref, rtol=0, atol=F32_TOL)


@pytest.mark.torch
@pytest.mark.parametrize("impl", FORMS)
def test_each_attention_form_matches_transformers(tiny_model_dir, impl):
    """Every attention form, forced, gives transformers' logits; 150 tokens
    make three blocks of the blocked form, the last one short."""
    ids = np.random.default_rng(4).integers(0, 512, (2, 150))
    model = sj.load_pretrained(tiny_model_dir, attention_impl=impl)
    assert model.config.attention_impl == impl
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(ours, hf_logits(tiny_model_dir, ids), rtol=0, atol=F32_TOL)


@pytest.mark.torch
def test_untied_lm_head(tmp_path):
    path = make_hf_model(str(tmp_path), tie_word_embeddings=False, n_positions=64)
    ids = np.random.default_rng(1).integers(0, 512, (1, 40))
    model = sj.load_pretrained(path)
    assert not model.config.tie_word_embeddings
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), hf_logits(path, ids), atol=F32_TOL)


def test_bfloat16_close_to_float32(tiny_model_dir):
    """bfloat16 params + compute track float32 within 5% of the logit range, and
    agree on the argmax for the large majority of positions."""
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 512, (2, 64)), jnp.int32)
    f32 = np.asarray(sj.load_pretrained(tiny_model_dir)(ids))
    bf16_model = sj.load_pretrained(tiny_model_dir, dtype="bfloat16")
    assert bf16_model.wte.embedding[...].dtype == jnp.bfloat16
    bf16 = np.asarray(bf16_model(ids))
    scale = np.abs(f32).max()
    assert np.abs(bf16 - f32).max() <= 0.05 * scale
    assert (bf16.argmax(-1) == f32.argmax(-1)).mean() >= 0.9


def test_positions_matter(tiny_model_dir):
    """A shifted copy of the same tokens gives different logits (learned positions are used)."""
    model = sj.load_pretrained(tiny_model_dir)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 512, (1, 16)), jnp.int32)
    a = np.asarray(model(ids))
    b = np.asarray(model(ids, positions=jnp.arange(16)[None] + 100))
    assert np.abs(a - b).max() > 1e-2


@pytest.mark.slow
def test_dropout_off_by_default_and_on_with_rngs(tiny_model_dir):
    from flax import nnx

    from starcoder_jax.config import StarCoderConfig

    config = StarCoderConfig.from_hf(tiny_model_dir, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    model = sj.init_model(config.replace(n_layer=1))
    ids = jnp.asarray([[1, 2, 3, 4]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(model(ids)))
    train_a = np.asarray(model(ids, rngs=nnx.Rngs(dropout=0)))
    train_b = np.asarray(model(ids, rngs=nnx.Rngs(dropout=1)))
    assert np.abs(train_a - train_b).max() > 1e-3

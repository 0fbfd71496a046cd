"""Logit parity with transformers' GPTBigCodeForCausalLM (torch, CPU)."""

import jax.numpy as jnp
import numpy as np
import pytest
from builders import hf_logits, make_hf_model

import starcoder_jax as sj

F32_TOL = 1e-4  # max |ours - transformers| on float32 logits


@pytest.mark.parametrize(
    "multi_query,activation,n_head,n_embd,vocab",
    [
        (True, "gelu_pytorch_tanh", 8, 64, 1000),  # head_dim 8, odd vocab
        (False, "gelu_pytorch_tanh", 8, 64, 1000),
        (True, "gelu", 4, 48, 777),  # head_dim 12
        (False, "gelu", 6, 48, 777),  # head_dim 8
    ],
)
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


def _attention_and_inputs(multi_query, b, t, s, rng):
    """An attention layer with 6 heads of 8 and random q [b, t, K, G, 8], k/v [b, s, K, 8]."""
    from flax import nnx

    from starcoder_jax.config import StarCoderConfig
    from starcoder_jax.model.modules import Attention

    config = StarCoderConfig(vocab_size=64, n_positions=64, n_embd=48, n_layer=1, n_head=6,
                             multi_query=multi_query)
    kv = config.kv_heads
    q = jnp.asarray(rng.standard_normal((b, t, kv, 6 // kv, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, s, kv, 8)), jnp.float32) for _ in range(2))
    return Attention(config, rngs=nnx.Rngs(0)), q, k, v


@pytest.mark.parametrize("multi_query", [True, False])
@pytest.mark.parametrize("t,s", [(1, 40), (5, 40), (40, 40)])
def test_attention_layouts_compute_the_same(multi_query, t, s):
    """The key-major attention (XLA:CPU) and the query-major one (GPU, TPU)
    agree to float32 round-off, rows with no visible key included; the CPU
    parity tests above check the key-major form against transformers, this
    one carries that check over to the form the accelerators run."""
    rng = np.random.default_rng(1)
    attention, q, k, v = _attention_and_inputs(multi_query, 3, t, s, rng)
    mask = jnp.asarray(rng.random((3, t, s)) < 0.7).at[1, 0].set(False)  # row 1, query 0 sees nothing
    want = np.asarray(attention.attend_query_major(q, k, v, mask))
    got = np.asarray(attention.attend_key_major(q, k, v, mask))
    assert got.shape == want.shape == q.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("multi_query", [True, False])
@pytest.mark.parametrize("t", [2, 16, 37])
def test_query_blocks_compute_causal_attention(multi_query, t, monkeypatch):
    """The blocked causal form (XLA:CPU prefill and training) equals the
    query-major form under a causal mask, in value and in gradient, with
    blocks of 8 queries: one block, whole blocks, and a shorter last one."""
    import jax

    from starcoder_jax.model import modules as model_lib
    from starcoder_jax.model.modules import attention_mask

    monkeypatch.setattr(model_lib, "CPU_QUERY_BLOCK", 8)
    rng = np.random.default_rng(2)
    attention, q, k, v = _attention_and_inputs(multi_query, 2, t, t, rng)
    positions = jnp.broadcast_to(jnp.arange(t) + 3, (2, t))
    mask = attention_mask(positions, positions)
    weights = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def loss(form, q, k, v):
        out = form(q, k, v, mask)
        return jnp.sum(out * weights), out

    grad = jax.grad(loss, argnums=(1, 2, 3), has_aux=True)
    want_grads, want = grad(attention.attend_query_major, q, k, v)
    got_grads, got = grad(attention.attend_query_blocks, q, k, v)
    assert got.shape == want.shape == q.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)
    for g_got, g_want in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), rtol=0, atol=1e-4)


def test_cpu_attention_form_per_use(monkeypatch):
    """On XLA:CPU a forward pass without cache (training) and a prefill run
    the blocked causal form, a decode step the key-major one: the key-major
    form's backward pass is slow, and it once became every CPU forward's
    attention unnoticed."""
    import jax
    from flax import nnx

    from starcoder_jax.bench import decode_consts, prefilled
    from starcoder_jax.config import StarCoderConfig
    from starcoder_jax.inference.generate import decode_loop
    from starcoder_jax.model.modules import Attention, init_model

    if jax.default_backend() != "cpu":
        pytest.skip("the CPU forms")
    calls = []
    for form in ("attend_key_major", "attend_query_blocks", "attend_query_major"):
        original = getattr(Attention, form)

        def counted(self, *args, _form=form, _original=original, **kwargs):
            calls.append(_form)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Attention, form, counted)
    # a shape no other test compiles, so that every jitted program below is traced here
    config = StarCoderConfig(vocab_size=40, n_positions=40, n_embd=24, n_layer=1, n_head=3)
    model = init_model(config)
    ids = jnp.asarray([[1, 2, 3, 4, 5, 6]], jnp.int32)

    nnx.grad(lambda m: jnp.sum(m(ids)))(model)
    assert set(calls) == {"attend_query_blocks"}
    calls.clear()
    graphdef, params = nnx.split(model)
    consts = decode_consts(config, 1, 4)
    state = prefilled(graphdef, params, config, ids, 16, consts)
    assert set(calls) == {"attend_query_blocks"}
    calls.clear()
    decode_loop(graphdef, params, state, jnp.int32(2), consts)
    assert set(calls) == {"attend_key_major"}

"""StarCoder2 (model_type starcoder2): parity with transformers' Starcoder2ForCausalLM,
HF round trips, greedy generation across the window and the ring-buffer KV cache."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from builders import builds_with_torch, hf_logits, hf_model, make_hf_starcoder2
from flax import nnx

import starcoder_jax as sj
from starcoder_jax.config import StarCoderConfig
from starcoder_jax.inference.generate import generate
from starcoder_jax.model.kv_cache import KVCache
from starcoder_jax.model.weights import load_hf, weight_table

F32_TOL = 1e-4  # max |ours - transformers| on float32 logits


@pytest.fixture(scope="module")
@builds_with_torch
def gqa_dir(tmp_path_factory):
    """4 query heads over 2 K/V heads, a window of 8, weights wide enough that greedy
    outputs vary."""
    return make_hf_starcoder2(str(tmp_path_factory.mktemp("sc2_gqa")), weight_std=0.35, seed=3)


@pytest.mark.parametrize("case", ["gqa_window", "multi_query_untied", "multi_head_no_window"])
def test_logits_match_transformers(tmp_path, gqa_dir, case):
    """Random Starcoder2ForCausalLM models, 40 tokens (5 windows of 8 for the windowed ones)."""
    path = {
        "gqa_window": lambda: gqa_dir,
        "multi_query_untied": lambda: make_hf_starcoder2(
            str(tmp_path), num_attention_heads=8, num_key_value_heads=1, sliding_window=16,
            tie_word_embeddings=False, vocab_size=300, rope_parameters={"rope_type": "default",
                                                                        "rope_theta": 500.0}),
        "multi_head_no_window": lambda: make_hf_starcoder2(
            str(tmp_path), num_attention_heads=4, num_key_value_heads=4, sliding_window=None, use_bias=False),
    }[case]()
    ids = np.random.default_rng(0).integers(0, 300, (2, 40))
    ref = hf_logits(path, ids)
    model = sj.load_pretrained(path)
    assert model.config.model_type == "starcoder2" and model.wpe is None
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(ours, ref, rtol=0, atol=F32_TOL)
    if case == "multi_query_untied":
        assert model.config.kv_heads == 1 and not model.config.tie_word_embeddings
    if case == "multi_head_no_window":
        assert model.config.window is None and model.blocks[0].attn.query.bias is None


@pytest.mark.slow
def test_the_window_matters(gqa_dir):
    """The same weights without the window give other logits past the window (so
    the parity above tests it)."""
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 512, (1, 24)), jnp.int32)
    model = sj.load_pretrained(gqa_dir)
    wide = load_hf(gqa_dir, model.config.replace(sliding_window=None))
    a, b = np.asarray(model(ids)), np.asarray(wide(ids))
    np.testing.assert_allclose(a[:, :8], b[:, :8], atol=1e-5)
    assert np.abs(a[:, 8:] - b[:, 8:]).max() > 1e-2


def test_round_trip_hf_ours_hf_is_bit_exact(tmp_path, gqa_dir):
    from safetensors.numpy import load_file

    model = sj.load_pretrained(gqa_dir)
    out = sj.save_hf(model, str(tmp_path / "export"))
    theirs, ours = load_file(f"{gqa_dir}/model.safetensors"), load_file(f"{out}/model.safetensors")
    assert set(ours) == {e.hf_key for e in weight_table(model.config)}
    assert set(ours) == set(theirs) - {"lm_head.weight"}  # tied: the head is the table
    for key, value in ours.items():
        np.testing.assert_array_equal(value, theirs[key], err_msg=key)
    with open(f"{out}/config.json") as f:
        exported = json.load(f)
    assert exported["model_type"] == "starcoder2" and exported["num_key_value_heads"] == 2
    assert StarCoderConfig.from_hf(out) == model.config.replace(attention_impl="auto")
    ids = np.random.default_rng(2).integers(0, 512, (1, 30))
    np.testing.assert_allclose(hf_logits(out, ids), hf_logits(gqa_dir, ids), rtol=0, atol=0)


@pytest.mark.torch
def test_config_translation():
    from transformers import Starcoder2Config

    ours = sj.preset("starcoder2-7b")
    hf = Starcoder2Config(**{k: v for k, v in ours.to_hf().items() if k != "model_type"})
    again = StarCoderConfig.from_hf(hf.to_dict())
    assert again == ours
    assert (again.kv_heads, again.head_dim, again.window, again.rope_theta) == (4, 128, 4096, 1e6)
    assert hf.num_key_value_heads == 4 and hf.sliding_window == 4096 and hf.max_position_embeddings == 16384
    legacy = dict(hf.to_dict(), rope_theta=5.0)  # transformers < 5 wrote rope_theta at the top level
    del legacy["rope_parameters"]
    assert StarCoderConfig.from_hf(legacy).rope_theta == 5.0
    with pytest.raises(ValueError, match="rope_type 'linear' is not supported"):
        StarCoderConfig.from_hf(dict(hf.to_dict(), rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                   "rope_theta": 1e4}))
    with pytest.raises(ValueError, match="sliding_window=4 need model_type='starcoder2'"):
        sj.preset("starcoderbase-1b", sliding_window=4)
    with pytest.raises(ValueError, match=r"n_head \(24\) must be divisible by n_kv_head \(5\)"):
        sj.preset("starcoder2-3b", n_kv_head=5)


def test_preset_sizes():
    counts = {name: sj.preset(name).param_count() for name in ("starcoder2-3b", "starcoder2-7b", "starcoder2-15b")}
    assert 2.9e9 < counts["starcoder2-3b"] < 3.1e9
    assert 7.0e9 < counts["starcoder2-7b"] < 7.3e9
    assert 15.5e9 < counts["starcoder2-15b"] < 16.1e9
    abstract = sj.abstract_model(sj.preset("starcoder2-3b"))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == counts[
        "starcoder2-3b"]


def hf_greedy(path, prompt, n):
    import torch

    model = hf_model(path)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.slow
def test_greedy_matches_transformers_across_the_window(gqa_dir):
    """Prompts of 3 and 11 tokens (past the window of 8), 30 new tokens each: batched
    (mixed lengths in one prompt bucket) and alone, equal to transformers' greedy
    generate token for token; the cache holds 8 slots a layer throughout."""
    model = sj.load_pretrained(gqa_dir)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 512, n).tolist() for n in (3, 11)]
    batched = generate(model, prompts, max_new_tokens=30, ignore_eos=True)
    for prompt, result in zip(prompts, batched):
        ref = hf_greedy(gqa_dir, prompt, 30)
        assert len(set(ref)) > 5  # only meaningful if the sequence varies
        assert result.ids == ref
    assert generate(model, [prompts[1]], max_new_tokens=30, ignore_eos=True)[0].ids == hf_greedy(
        gqa_dir, prompts[1], 30)


@pytest.mark.slow
def test_cached_decode_equals_full_forward_past_the_window(gqa_dir):
    """Prefill 10 tokens (past the window of 8), a 5-token chunk continuing the cache,
    then one-token steps up to 40: every logit equals the full forward's, through a
    ring of 8 slots per layer (and is close to it through an int8 ring)."""
    model = sj.load_pretrained(gqa_dir)
    ids = jnp.asarray(np.random.default_rng(1).integers(1, 512, (2, 40)), jnp.int32)
    full = np.asarray(model(ids))
    cache = KVCache.init(model.config, 2, 64)
    assert cache.ring and cache.length == 8 and cache.capacity == 64

    graphdef, params = nnx.split(model)

    @functools.partial(jax.jit, static_argnames="read_cache")
    def step(params, ids, pos, cache, read_cache):
        model = nnx.merge(graphdef, params)
        hidden, cache = model.hidden(ids, pos, cache, read_cache=read_cache)
        return model.logits(hidden), cache

    def run(lo, hi, cache, read_cache=True):
        pos = jnp.broadcast_to(jnp.arange(lo, hi), (2, hi - lo))
        logits, cache = step(params, ids[:, lo:hi], pos, cache, read_cache)
        return np.asarray(logits), cache

    def decode(cache):
        first, cache = run(0, 10, cache, read_cache=False)
        chunk, cache = run(10, 15, cache)
        steps = [first, chunk]
        for t in range(15, 40):
            logits, cache = run(t, t + 1, cache)
            steps.append(logits)
        return np.concatenate(steps, axis=1)

    np.testing.assert_allclose(decode(cache), full, rtol=0, atol=F32_TOL)
    # an int8 ring (per-token scales) tracks the full forward to its rounding
    int8 = decode(KVCache.init(model.config, 2, 64, quantize="int8"))
    assert np.abs(int8 - full).max() <= 0.05 * np.abs(full).max()


def test_windowed_cache_memory_is_bounded_by_the_window():
    """Bytes per layer of a starcoder2-3b cache for 16k positions: those of its 4096-slot
    window (k, v and the slots' positions), the same as for a 4096-position request, and
    about a quarter of what 16k slots would take."""
    config = sj.preset("starcoder2-3b", n_layer=2)
    per_layer = [KVCache.init(config, 1, n, dtype=jnp.bfloat16).nbytes() // 2 for n in (4096, 8192, 16384)]
    slab = 4096 * config.kv_heads * config.head_dim * 2  # slots x K x H x bfloat16, k or v
    assert per_layer[0] == 2 * slab  # exactly the window: a plain cache
    assert per_layer[1] == per_layer[2] == 2 * slab + 4096 * 4  # a ring: + int32 positions
    wide = KVCache.init(config.replace(sliding_window=None), 1, 16384, dtype=jnp.bfloat16).nbytes() // 2
    assert wide == 4 * 2 * slab
    short = KVCache.init(config, 1, 100)
    assert not short.ring and short.length == 100  # shorter than the window: a plain cache

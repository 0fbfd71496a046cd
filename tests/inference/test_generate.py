"""Generation: parity with transformers' greedy generate, cache correctness, sampling, compilation counts."""

import gc
import json
import logging
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from builders import builds_with_torch, make_hf_model

import starcoder_jax as sj
from starcoder_jax.inference import generate as gen_mod
from starcoder_jax.inference.generate import generate, stream
from starcoder_jax.inference.sampling import SamplingParams, argmax, filter_logits, sample
from starcoder_jax.model.kv_cache import KVCache
from starcoder_jax.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
@builds_with_torch
def varied_model_dir(tmp_path_factory):
    """A random MQA model whose greedy outputs do not collapse to one repeated token."""
    return make_hf_model(str(tmp_path_factory.mktemp("varied")), vocab_size=512, n_positions=256,
                         n_embd=64, n_head=4, n_layer=2, weight_std=0.35, seed=3)


def hf_greedy(path, prompt, n):
    import torch
    from transformers import GPTBigCodeForCausalLM

    model = GPTBigCodeForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("multi_query", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_greedy_matches_transformers_alone_and_batched(tmp_path, varied_model_dir, multi_query):
    path = varied_model_dir if multi_query else make_hf_model(
        str(tmp_path), vocab_size=512, n_positions=256, multi_query=False, weight_std=0.35, seed=3)
    model = sj.load_pretrained(path)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 512, n).tolist() for n in (3, 17, 40)]
    batched = generate(model, prompts, max_new_tokens=40, ignore_eos=True)
    for prompt, result in zip(prompts, batched):
        ref = hf_greedy(path, prompt, 40)
        assert len(set(ref)) > 5  # the check is only meaningful if the sequence varies
        alone = generate(model, [prompt], max_new_tokens=40, ignore_eos=True)[0]
        assert alone.ids == ref
        assert result.ids == ref
        assert result.prompt_ids == prompt


def test_cached_decode_equals_full_forward(varied_model_dir):
    """Prefill + one-token decode steps through the cache give the full-forward logits."""
    model = sj.load_pretrained(varied_model_dir)
    ids = jnp.asarray(np.random.default_rng(1).integers(1, 512, (2, 24)), jnp.int32)
    full = np.asarray(model(ids))
    cache = KVCache.init(model.config, 2, 32)
    positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
    hidden, cache = model.hidden(ids[:, :10], positions, cache, read_cache=False)
    steps = [np.asarray(model.logits(hidden))]
    for t in range(10, 24):
        pos = jnp.full((2, 1), t)
        hidden, cache = model.hidden(ids[:, t:t + 1], pos, cache)
        steps.append(np.asarray(model.logits(hidden)))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_rows_with_different_positions_in_one_decode_step(varied_model_dir):
    """Rows at different cache positions decode independently (per-row positions)."""
    model = sj.load_pretrained(varied_model_dir)
    rng = np.random.default_rng(2)
    a, b = rng.integers(1, 512, 7).tolist(), rng.integers(1, 512, 19).tolist()
    both = generate(model, [a, b], max_new_tokens=12, logprobs=True, ignore_eos=True)
    ref_a = np.asarray(model(jnp.asarray([a + both[0].ids[:-1]])))[0, len(a) - 1:]
    chosen = ref_a[np.arange(12), both[0].ids]
    log_z = jax.nn.logsumexp(ref_a, axis=-1)
    np.testing.assert_allclose(both[0].logprobs, chosen - log_z, atol=1e-4)
    assert both[0].ids == list(ref_a.argmax(-1))


@pytest.mark.slow
def test_sampling_is_reproducible_and_seed_dependent(varied_model_dir):
    model = sj.load_pretrained(varied_model_dir)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    kw = dict(max_new_tokens=24, temperature=1.0, top_p=0.9, top_k=50, ignore_eos=True)
    first = [r.ids for r in generate(model, prompts, seed=7, **kw)]
    again = [r.ids for r in generate(model, prompts, seed=7, **kw)]
    other = [r.ids for r in generate(model, prompts, seed=8, **kw)]
    assert first == again
    assert first != other
    # The batch split does not change the samples: rows draw from (seed, row index).
    split = [r.ids for r in generate(model, prompts, seed=7, batch_size=1, **kw)]
    assert split == first


@pytest.mark.slow
def test_no_recompilation_within_buckets(varied_model_dir):
    model = sj.load_pretrained(varied_model_dir)
    generate(model, [[1, 2, 3]], max_new_tokens=8)
    prefills, loops = gen_mod.prefill._cache_size(), gen_mod.decode_loop._cache_size()
    generate(model, [list(range(1, 12))], max_new_tokens=8, temperature=0.7, top_k=5, seed=3)
    generate(model, [list(range(1, 15))], max_new_tokens=5, temperature=1.3, top_p=0.5, min_p=0.1,
             repetition_penalty=1.2, stop_ids=[7, 9])
    assert gen_mod.prefill._cache_size() == prefills
    assert gen_mod.decode_loop._cache_size() == loops
    generate(model, [list(range(1, 40))], max_new_tokens=8)  # a longer prompt bucket compiles once more
    assert gen_mod.prefill._cache_size() == prefills + 1


def _compiled(caplog, fn) -> list[str]:
    """What XLA compiled while fn ran (jax's compile log)."""
    caplog.clear()
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        fn()
    return [r.getMessage()[:120] for r in caplog.records if r.getMessage().startswith("Compiling ")]


@pytest.mark.parametrize("mesh", [None, pytest.param("data=1", marks=pytest.mark.slow)])
def test_a_second_identical_generate_compiles_nothing(varied_model_dir, tokenizer_dir, caplog, monkeypatch, mesh):
    """Nothing compiles and nothing is prepared again (no re-split, no re-placement on the mesh).

    jax's own caches already spare a re-made Generator its compilations, so
    the Generators made are counted too: that count is what a lost reuse shows.
    """
    model, tok = sj.load_pretrained(varied_model_dir), load_tokenizer(tokenizer_dir)
    kwargs = dict(tokenizer=tok, max_new_tokens=6, stop=["\n\n"], mesh=mesh)
    first = sj.generate(model, ["def f(x):", "import os"], **kwargs)
    made = []
    init = gen_mod.Generator.__init__
    monkeypatch.setattr(gen_mod.Generator, "__init__", lambda self, *a, **k: made.append(a) or init(self, *a, **k))
    again = []
    assert _compiled(caplog, lambda: again.extend(sj.generate(model, ["def f(x):", "import os"], **kwargs))) == []
    assert again == first
    pieces = []
    assert _compiled(caplog, lambda: pieces.extend(sj.stream(model, "def f(x):", **kwargs))) == []
    assert "".join(pieces) == first[0].text
    assert made == []


@pytest.mark.slow
def test_generate_reuses_one_generator_per_model_and_settings(varied_model_dir, tokenizer_dir):
    model, tok = sj.load_pretrained(varied_model_dir), load_tokenizer(tokenizer_dir)
    # A mesh Generator places the model's own arrays on its mesh: the one before it no longer matches.
    before_mesh = gen_mod.generator_for(model, tok)
    on_mesh = gen_mod.generator_for(model, tok, mesh="data=1")
    gen = gen_mod.generator_for(model, tok)
    assert gen is not before_mesh and gen_mod.generator_for(model, tok) is gen
    others = [on_mesh, gen_mod.generator_for(model, load_tokenizer(tokenizer_dir)), gen_mod.generator_for(model),
              gen_mod.generator_for(model, tok, kv_cache="int8"),
              gen_mod.generator_for(sj.load_pretrained(varied_model_dir), tok)]
    assert all(other is not gen for other in others) and len({id(o) for o in others}) == len(others)
    assert gen_mod.generator_for(model, tok) is gen  # the others did not replace it
    assert gen_mod.generator_for(model, tok, mesh="data=1") is on_mesh

    # New weights in the same model: a new Generator, and it runs them.
    prompt = [[5, 6, 7]]
    before = generate(model, prompt, max_new_tokens=8, ignore_eos=True)[0].ids
    wpe = model.wpe.embedding
    wpe.set_value(wpe.get_value()[::-1])
    assert gen_mod.generator_for(model, tok) is not gen
    after = generate(model, prompt, max_new_tokens=8, ignore_eos=True)[0].ids
    assert after == gen_mod.Generator(model).run(prompt, max_new_tokens=8, ignore_eos=True)[0].ids
    assert after != before
    # A new config (int8 weights): the same.
    gen = gen_mod.generator_for(model)
    model.quantize_("int8")
    assert gen_mod.generator_for(model) is not gen

    # The cache holds no model alive.
    ref = weakref.ref(model)
    del model, gen, others, on_mesh, before_mesh, wpe
    gc.collect()
    assert ref() is None


def test_stops_on_eos_and_stop_ids(varied_model_dir):
    model = sj.load_pretrained(varied_model_dir)
    prompt = [11, 12, 13]
    free = generate(model, [prompt], max_new_tokens=20, ignore_eos=True)[0].ids
    target = free[5]
    first = free.index(target)
    res = generate(model, [prompt], max_new_tokens=20, stop_ids=[target])[0]
    assert res.ids == free[:first + 1] and res.finish_reason == "stop"
    # The same token as the model's eos id ends generation with reason "eos".
    config = model.config.replace(eos_token_id=target)
    from starcoder_jax.model.modules import StarCoder  # noqa: F401

    model_eos = sj.load_pretrained(varied_model_dir)
    object.__setattr__(model_eos, "config", config)
    res = generate(model_eos, [prompt], max_new_tokens=20)[0]
    assert res.ids == free[:first + 1] and res.finish_reason == "eos"


def test_stop_strings_and_streaming(varied_model_dir, tokenizer_dir):
    model = sj.load_pretrained(varied_model_dir)
    tok = load_tokenizer(tokenizer_dir)
    prompt = "def add(a, b):"
    full = generate(model, [prompt], tokenizer=tok, max_new_tokens=30, ignore_eos=True)[0]
    assert full.text == tok.decode(full.ids)
    stop = full.text[8:11]
    assert stop
    cut = generate(model, [prompt], tokenizer=tok, max_new_tokens=30, stop=[stop], ignore_eos=True)[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.find(stop)]
    assert stop in tok.decode(cut.ids) and stop not in tok.decode(cut.ids[:-1])
    pieces = list(stream(model, prompt, tokenizer=tok, max_new_tokens=30, stop=[stop], ignore_eos=True))
    assert len(pieces) > 1 and "".join(pieces) == cut.text
    plain = list(stream(model, prompt, tokenizer=tok, max_new_tokens=30, ignore_eos=True))
    assert "".join(plain) == full.text


def test_padded_vocab_rows_are_never_sampled(varied_model_dir, tokenizer_dir):
    """The model has 512 rows, the tokenizer fewer: ids past the tokenizer never come out."""
    model = sj.load_pretrained(varied_model_dir)
    tok = load_tokenizer(tokenizer_dir)
    assert tok.vocab_size < 512
    res = generate(model, ["x = 1"] * 4, tokenizer=tok, max_new_tokens=40, temperature=5.0, seed=1,
                   ignore_eos=True)
    assert max(max(r.ids) for r in res) < tok.vocab_size


# ---- sampling filters on crafted logits ----

def knobs(b, **kw):
    return SamplingParams(temperature=1.0, **kw).arrays(b)


def test_top_k_top_p_min_p_sets():
    logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]] * 3, jnp.float32))
    allowed_k = np.isfinite(np.asarray(filter_logits(logits, knobs(3, top_k=2))))
    assert allowed_k.tolist() == [[True, True, False, False, False]] * 3
    allowed_p = np.isfinite(np.asarray(filter_logits(logits, knobs(3, top_p=0.8))))
    assert allowed_p[0].tolist() == [True, True, True, False, False]  # 0.5+0.2 < 0.8 <= 0.85
    allowed_m = np.isfinite(np.asarray(filter_logits(logits, knobs(3, min_p=0.3))))
    assert allowed_m[0].tolist() == [True, True, True, False, False]  # >= 0.3 * 0.5
    rows = 3000
    many = jnp.broadcast_to(logits[:1], (rows, 5))
    keys = jax.random.split(jax.random.key(0), rows)
    draw = jax.jit(sample)
    for name, kw, allowed in (("k", dict(top_k=2), {0, 1}), ("p", dict(top_p=0.8), {0, 1, 2}),
                              ("min", dict(min_p=0.3), {0, 1, 2}), ("off", {}, {0, 1, 2, 3, 4})):
        seen = set(np.asarray(draw(many, knobs(rows, **kw), keys)).tolist())
        assert seen == allowed, name
    greedy = sample(logits, SamplingParams().arrays(3), keys[:3])
    assert np.asarray(greedy).tolist() == [0, 0, 0]


def test_argmax_is_jnp_argmax():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 1000)).astype(np.float32)
    x[1, [7, 300]] = 9.0  # a tie: the first index
    x[2] = -np.inf
    x[3, 42] = np.nan  # a NaN wins, as in jnp.argmax
    x[4, [10, 20]] = np.nan
    x[5] = np.round(x[5])  # many ties
    got = np.asarray(jax.jit(argmax)(jnp.asarray(x)))
    assert got.dtype == np.int32
    assert got.tolist() == np.asarray(jnp.argmax(jnp.asarray(x), -1)).tolist()
    assert got[1] == 7 and got[3] == 42 and got[4] == 10


def test_greedy_and_sampled_rows_in_one_batch():
    """A batch that mixes greedy and sampled rows: the greedy rows take the
    argmax, the sampled rows follow their distribution; an all-greedy batch
    (which skips the draw) chooses what the mixed batch's greedy rows do."""
    rows = 4000
    logits = jnp.broadcast_to(jnp.log(jnp.asarray([0.1, 0.6, 0.3], jnp.float32)), (rows, 3))
    keys = jax.random.split(jax.random.key(7), rows)
    temperature = jnp.where(jnp.arange(rows) % 2 == 0, 0.0, 1.0)
    knobs = {**SamplingParams().arrays(rows), "temperature": temperature}
    got = np.asarray(jax.jit(sample)(logits, knobs, keys))
    assert (got[0::2] == 1).all()
    share = np.bincount(got[1::2], minlength=3) / (rows // 2)
    np.testing.assert_allclose(share, [0.1, 0.6, 0.3], atol=0.03)
    greedy = np.asarray(jax.jit(sample)(logits, SamplingParams().arrays(rows), keys))
    assert (greedy == 1).all()


def test_repetition_penalty_changes_the_greedy_choice():
    logits = jnp.asarray([[2.0, 1.9, -1.0]], jnp.float32)
    seen = jnp.asarray([[True, False, False]])
    keys = jax.random.split(jax.random.key(0), 1)
    assert int(sample(logits, SamplingParams().arrays(1), keys, seen)[0]) == 0
    assert int(sample(logits, SamplingParams(repetition_penalty=1.2).arrays(1), keys, seen)[0]) == 1


# ---- bad input ----

@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(min_p=1.0), r"min_p must be in \[0, 1\)"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(max_new_tokens=254), "that is 257 positions but the model holds 256"),
])
def test_bad_generation_settings(varied_model_dir, kwargs, message):
    model = sj.load_pretrained(varied_model_dir)
    with pytest.raises(ValueError, match=message):
        generate(model, [[1, 2, 3]], **kwargs)


def test_bad_prompts(varied_model_dir, tmp_path):
    model = sj.load_pretrained(varied_model_dir)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []])
    with pytest.raises(ValueError, match="string prompts need a tokenizer"):
        generate(model, ["hello"])
    with pytest.raises(ValueError, match=r"token id 600, outside the vocabulary \[0, 512\)"):
        generate(model, [[1, 600]])
    from builders import make_tokenizer

    big = load_tokenizer(make_tokenizer(str(tmp_path / "tok")))
    big.backend.add_tokens([f"<extra_{i}>" for i in range(100)])
    assert big.vocab_size > 512
    with pytest.raises(ValueError, match="they do not belong together"):
        generate(model, ["def add(a, b): return a + b"], tokenizer=big)


def test_cli_generate_json(tiny_model_dir, capsys):
    from starcoder_jax.cli.main import main

    assert main(["generate", "--model", tiny_model_dir, "--max-new-tokens", "6", "--json",
                 "def add(a, b):", "import os"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["prompt"] for x in lines] == ["def add(a, b):", "import os"]
    tok = load_tokenizer(tiny_model_dir)
    for line in lines:
        assert line["prompt_ids"] == tok.encode(line["prompt"])
        assert 1 <= len(line["ids"]) <= 6 and isinstance(line["text"], str)


def test_cli_generate_streams_and_rejects_missing_model(tiny_model_dir, capsys):
    from starcoder_jax.cli.main import main

    assert main(["generate", "--model", tiny_model_dir, "--max-new-tokens", "5", "x = 1"]) == 0
    assert capsys.readouterr().out.startswith("x = 1")
    assert main(["generate", "--model", "/no/such/dir", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err

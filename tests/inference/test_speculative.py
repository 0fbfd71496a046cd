"""Speculative decoding: greedy output equals plain greedy, sampled output keeps plain sampling's
distribution (chi-square against the exact joint probabilities), caches, stops, errors, compiles."""

import itertools
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

import starcoder_jax as sj
from starcoder_jax.inference import speculative as spec
from starcoder_jax.inference.generate import generate, stream
from starcoder_jax.inference.sampling import SamplingParams, distribution
from starcoder_jax.tokenizer import load_tokenizer


def varied(config, seed=0):
    """A random model with larger weights than the default init, so greedy output varies."""
    return sj.init_model(config.replace(initializer_range=0.35), seed=seed)


@pytest.fixture(scope="module")
def model():
    return varied(sj.StarCoderConfig(vocab_size=512, n_positions=256, n_embd=64, n_head=4, n_layer=4))


@pytest.fixture(scope="module")
def windowed():
    """StarCoder2 with grouped heads and a window of 16: generation runs far past it (a ring cache)."""
    return varied(sj.StarCoderConfig(model_type="starcoder2", vocab_size=512, n_positions=256, n_embd=64,
                                           n_head=4, n_kv_head=2, n_layer=4, sliding_window=16), seed=1)


def prompts(seed=0, lengths=(3, 17, 40)):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 512, n).tolist() for n in lengths]


def ids(results):
    return [r.ids for r in results]


@pytest.mark.parametrize("draft", ["prompt-lookup", pytest.param("self", marks=pytest.mark.slow)])
def test_greedy_equals_plain_greedy_batched(model, draft):
    draft = spec.first_layers(model, 2) if draft == "self" else draft
    batch = prompts()
    plain = generate(model, batch, max_new_tokens=24, ignore_eos=True, logprobs=True)
    assert all(len(set(r.ids)) > 5 for r in plain)  # only meaningful if the sequences vary
    fast = generate(model, batch, max_new_tokens=24, ignore_eos=True, logprobs=True, draft=draft,
                    num_draft_tokens=3)
    assert ids(fast) == ids(plain)
    assert all(r.finish_reason == "length" for r in fast)
    assert sum(r.accepted_tokens for r in fast) > 0  # some drafts were kept
    assert all(0 <= r.accepted_tokens <= r.draft_tokens for r in fast)
    for a, b in zip(fast, plain):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("k,draft", [(1, "self"), (7, "prompt-lookup")])
def test_greedy_equals_plain_greedy_alone_and_for_any_k(model, k, draft):
    draft = spec.first_layers(model, 2) if draft == "self" else draft
    batch = prompts()
    plain = generate(model, batch, max_new_tokens=40, ignore_eos=True)
    assert ids(generate(model, batch, max_new_tokens=40, ignore_eos=True, draft=draft,
                        num_draft_tokens=k)) == ids(plain)
    alone = generate(model, [batch[1]], max_new_tokens=40, ignore_eos=True, draft=draft, num_draft_tokens=k)
    assert alone[0].ids == plain[1].ids


@pytest.mark.slow
def test_greedy_up_to_the_models_last_position(model):
    """Prompt + max_new_tokens = n_positions: the verify pass feeds positions past the table
    (the learned position embedding), for tokens that are never kept."""
    prompt = prompts(4, (200,))
    plain = generate(model, prompt, max_new_tokens=56, ignore_eos=True)
    for draft in ("prompt-lookup", spec.first_layers(model, 2)):
        fast = generate(model, prompt, max_new_tokens=56, ignore_eos=True, draft=draft, num_draft_tokens=7)
        assert ids(fast) == ids(plain)


@pytest.mark.slow
def test_a_draft_that_is_the_model_is_always_kept_and_one_always_wrong_never(model):
    batch = prompts()
    plain = generate(model, batch, max_new_tokens=40, ignore_eos=True)
    same = generate(model, batch, max_new_tokens=40, ignore_eos=True, draft=model, num_draft_tokens=4)
    assert ids(same) == ids(plain)
    assert all(r.accepted_tokens == r.draft_tokens > 0 for r in same)
    # A draft that always proposes a token the model never picks: zero weights, the final norm's
    # bias all ones and that token's (tied) embedding all ones give it the only positive logit.
    never = min(set(range(1, 512)) - {t for r in plain for t in r.ids})
    wrong = sj.init_model(model.config.replace(n_layer=1))
    nnx.update(wrong, jax.tree.map(jnp.zeros_like, nnx.state(wrong)))
    wrong.ln_f.bias[...] = jnp.ones_like(wrong.ln_f.bias[...])
    wrong.wte.embedding[...] = wrong.wte.embedding[...].at[never].set(1.0)
    wrong = generate(model, batch, max_new_tokens=40, ignore_eos=True, draft=wrong, num_draft_tokens=4)
    assert ids(wrong) == ids(plain)
    assert all(r.accepted_tokens == 0 and r.draft_tokens > 0 for r in wrong)


@pytest.mark.slow
@pytest.mark.parametrize("kv_cache", [None, "int8"])
def test_greedy_across_the_window_of_starcoder2(windowed, kv_cache):
    """Rejected drafts land in the ring buffer past each row's position; they must stay hidden."""
    batch = prompts(1, (5, 30))
    plain = generate(windowed, batch, max_new_tokens=80, ignore_eos=True, kv_cache=kv_cache)
    assert all(len(set(r.ids)) > 5 for r in plain)
    for draft in ("prompt-lookup", spec.first_layers(windowed, 1)):
        fast = generate(windowed, batch, max_new_tokens=80, ignore_eos=True, kv_cache=kv_cache, draft=draft,
                        num_draft_tokens=5)
        assert ids(fast) == ids(plain)
        assert sum(r.draft_tokens - r.accepted_tokens for r in fast) > 0  # some drafts were rejected


@pytest.mark.slow
def test_stop_ids_stop_strings_and_streaming(model, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    prompt = "def add(a, b):\n    return a + b\n\ndef add(a, b):"
    full = generate(model, [prompt], tokenizer=tok, max_new_tokens=30, ignore_eos=True)[0]
    stop = full.text[8:11]
    assert stop
    kwargs = dict(tokenizer=tok, max_new_tokens=30, stop=[stop], ignore_eos=True)
    cut = generate(model, [prompt], **kwargs)[0]
    for draft in ("prompt-lookup", spec.first_layers(model, 2)):
        fast = generate(model, [prompt], draft=draft, num_draft_tokens=4, **kwargs)[0]
        assert (fast.ids, fast.text, fast.finish_reason) == (cut.ids, cut.text, "stop")
        pieces = list(stream(model, prompt, draft=draft, num_draft_tokens=4, **kwargs))
        assert len(pieces) > 1 and "".join(pieces) == cut.text
    target = full.ids[6]
    by_id = generate(model, [prompt], tokenizer=tok, max_new_tokens=30, stop_ids=[target], ignore_eos=True)[0]
    fast = generate(model, [prompt], tokenizer=tok, max_new_tokens=30, stop_ids=[target], ignore_eos=True,
                    draft="prompt-lookup", num_draft_tokens=6)[0]
    assert fast.ids == by_id.ids and fast.ids[-1] == target and fast.finish_reason == "stop"


@pytest.mark.slow
def test_infill_with_a_draft_equals_plain_infill(model, tokenizer_dir):
    from starcoder_jax.inference.fim import infill_generations

    tok = load_tokenizer(tokenizer_dir)
    pairs = [("def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"), ("import os\n", "\n")]
    plain = infill_generations(model, tok, pairs, max_new_tokens=24)
    fast = infill_generations(model, tok, pairs, max_new_tokens=24, draft="prompt-lookup", num_draft_tokens=3)
    assert [(g.ids, g.text) for g in fast] == [(g.ids, g.text) for g in plain]
    assert sj.inference.fim.infill(model, tok, *pairs[0], max_new_tokens=24, draft=spec.first_layers(model, 2)) \
        == plain[0].text


def test_prompt_lookup_drafts_what_followed_the_longest_latest_match():
    history = jnp.asarray([[5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 5, 6, 7, 0, 0, 0],  # "5 6 7": latest earlier at 5..7
                           [1, 2, 3, 4, 2, 3, 9, 3, 0, 0, 0, 0, 0, 0, 0, 0],  # only "3" recurs: 9, then the end
                           [4, 4, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # a run: repeats the last token
                           [1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])  # no match: the last token
    position = jnp.asarray([12, 7, 3, 2])
    drafts = np.asarray(spec.lookup(history, position, 4, 3))
    assert drafts.tolist() == [[1, 2, 5, 6], [9, 3, 3, 3], [4, 4, 4, 4], [3, 3, 3, 3]]


def test_first_layers_shares_the_model_arrays(model):
    draft = spec.first_layers(model, 2)
    assert draft.config.n_layer == 2
    shared = {id(x) for x in jax.tree.leaves(nnx.state(model))}
    assert all(id(x) in shared for x in jax.tree.leaves(nnx.state(draft)))
    for bad in (0, 4, 2.5):
        with pytest.raises(ValueError, match="self-draft takes 1 to 3"):
            spec.first_layers(model, bad)


@pytest.mark.parametrize("kwargs,message", [
    (dict(draft="lookup"), "draft must be a StarCoder model or 'prompt-lookup'"),
    (dict(draft=3), "draft must be a StarCoder model"),
    (dict(draft="prompt-lookup", num_draft_tokens=0), r"num_draft_tokens must be an integer in \[1, 32\]"),
    (dict(draft="prompt-lookup", num_draft_tokens=33), "num_draft_tokens must be"),
    (dict(draft="prompt-lookup", num_draft_tokens=True), "num_draft_tokens must be"),
    (dict(num_draft_tokens=4), "num_draft_tokens needs a draft"),
])
def test_bad_speculation_settings(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(model, [[1, 2, 3]], max_new_tokens=4, **kwargs)


def test_a_draft_must_share_the_vocabulary(model):
    other = sj.init_model(model.config.replace(vocab_size=640, n_layer=1))
    with pytest.raises(ValueError, match="draft model's vocabulary holds 640 tokens and the model's 512"):
        generate(model, [[1, 2, 3]], max_new_tokens=4, draft=other)
    eos = sj.init_model(model.config.replace(eos_token_id=7, n_layer=1))
    with pytest.raises(ValueError, match="draft model's eos_token_id is 7"):
        generate(model, [[1, 2, 3]], max_new_tokens=4, draft=eos)
    short = sj.init_model(model.config.replace(n_positions=32, n_layer=1))
    with pytest.raises(ValueError, match="needs 43 positions but the draft model holds 32"):
        generate(model, [[1, 2, 3]], max_new_tokens=40, draft=short)
    # prompt lookup after that call is not held to the draft model's positions
    assert len(generate(model, [[1, 2, 3]], max_new_tokens=40, draft="prompt-lookup", ignore_eos=True)[0].ids) == 40
    with pytest.raises(ValueError, match="a draft model runs on one device"):
        generate(model, [[1, 2, 3]], max_new_tokens=4, draft=spec.first_layers(model, 1), mesh="data=1")


@pytest.mark.slow
def test_speculation_compiles_once(model, caplog):
    """A round is one program whatever was kept; a second call in the same buckets compiles nothing."""
    draft = spec.first_layers(model, 2)
    for d in ("prompt-lookup", draft):
        first = generate(model, prompts(), max_new_tokens=30, ignore_eos=True, draft=d, num_draft_tokens=3)
        caplog.clear()
        with jax.log_compiles(), caplog.at_level(logging.WARNING):
            again = generate(model, prompts(2), max_new_tokens=28, ignore_eos=True, draft=d, num_draft_tokens=3)
        assert [r.getMessage()[:80] for r in caplog.records if r.getMessage().startswith("Compiling ")] == []
        assert len(again) == len(first)


@pytest.mark.slow
def test_prompt_lookup_on_a_mesh(model):
    batch = prompts()
    plain = generate(model, batch, max_new_tokens=20, ignore_eos=True)
    fast = generate(model, batch, max_new_tokens=20, ignore_eos=True, mesh="data=1", draft="prompt-lookup")
    assert ids(fast) == ids(plain)


@pytest.mark.slow
def test_cli_generate_and_infill_with_a_draft(model, tokenizer_dir, tmp_path, capsys):
    from starcoder_jax.cli.main import main
    from starcoder_jax.model.weights import copy_tokenizer_files

    path = str(tmp_path / "model")
    sj.save_hf(model, path)
    copy_tokenizer_files(tokenizer_dir, path)
    runs = {}
    for extra in ([], ["--draft", "prompt-lookup", "--num-draft-tokens", "3"], ["--draft", "self:2"],
                  ["--draft", path]):
        assert main(["generate", "--model", path, "--max-new-tokens", "12", "--json", "def f(x):", *extra]) == 0
        runs[" ".join(extra)] = json.loads(capsys.readouterr().out)["ids"]
    assert len(set(map(tuple, runs.values()))) == 1, runs
    assert main(["infill", "--model", path, "--prefix", "def f(x):\n    ", "--suffix", "\n", "--json",
                 "--max-new-tokens", "8", "--draft", "prompt-lookup"]) == 0
    fast = json.loads(capsys.readouterr().out)
    assert main(["infill", "--model", path, "--prefix", "def f(x):\n    ", "--suffix", "\n", "--json",
                 "--max-new-tokens", "8"]) == 0
    assert json.loads(capsys.readouterr().out) == fast
    for bad, message in ((["--draft", "self:9"], "self-draft takes 1 to 3"),
                         (["--num-draft-tokens", "3"], "needs a draft")):
        assert main(["generate", "--model", path, "--max-new-tokens", "4", "x", *bad]) == 2
        assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Sampling: the joint distribution of the first tokens, against the exact one

VOCAB = 8
PROMPT = [1, 2, 3, 1, 2]  # a repeat, so prompt lookup drafts from it
N_SAMPLES = 6144
ALPHA = 1e-3


def conditionals(model, knobs: SamplingParams, n_tokens: int) -> list[np.ndarray]:
    """p(t_i | t_1 .. t_i-1) for i = 1 .. n as arrays [V] * i, under the row's processing
    (penalty over the prompt and earlier tokens, temperature, filters), from forward passes
    over every prefix."""
    out = []
    for i in range(n_tokens):
        prefixes = list(itertools.product(range(VOCAB), repeat=i))
        seqs = np.asarray([PROMPT + list(prefix) for prefix in prefixes])
        logits = model(jnp.asarray(seqs))[:, -1]  # [V^i, V]
        seen = np.zeros((len(seqs), VOCAB), bool)
        np.put_along_axis(seen, seqs, True, axis=1)
        p = np.exp(np.asarray(distribution(logits, knobs.arrays(len(seqs)), jnp.asarray(seen))))
        out.append(p.reshape([VOCAB] * (i + 1)))
    return out


def joint(conds: list[np.ndarray]) -> np.ndarray:
    """The joint [V] * n from the conditionals."""
    n = len(conds)
    result = np.ones([VOCAB] * n)
    for i, c in enumerate(conds):
        result = result * c.reshape(c.shape + (1,) * (n - 1 - i))
    return result


def chi_square(counts: np.ndarray, expected_p: np.ndarray):
    """Pearson's test over cells with >= 5 expected counts, the rest pooled; (p-value, df, cells' p)."""
    n = counts.sum()
    e = expected_p.ravel() * n
    big = e >= 5
    obs = np.append(counts.ravel()[big], counts.ravel()[~big].sum())
    exp = np.append(e[big], e[~big].sum())
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = keep.sum() - 1
    return stats.chi2.sf(stat, df), df, np.append(expected_p.ravel()[big], expected_p.ravel()[~big].sum())[keep]


def power(p_cells: np.ndarray, alt_cells: np.ndarray, df: int, n: int) -> float:
    """The chance the test rejects (at ALPHA) if the tokens came from alt instead (noncentral chi-square)."""
    lam = n * ((alt_cells - p_cells) ** 2 / p_cells).sum()
    return stats.ncx2.sf(stats.chi2.isf(ALPHA, df), df, lam)


def pooled(joint: np.ndarray, reference: np.ndarray) -> np.ndarray:
    e = reference.ravel() * N_SAMPLES
    big = e >= 5
    cells = np.append(joint.ravel()[big], joint.ravel()[~big].sum())
    return cells[np.append(e[big], e[~big].sum()) > 0]


@pytest.mark.slow
@pytest.mark.parametrize("settings", [
    dict(temperature=1.0),
    dict(temperature=0.8, top_k=5, top_p=0.9, repetition_penalty=1.3),
])
def test_sampled_tokens_keep_the_model_distribution(settings):
    """The first 3 tokens of N_SAMPLES rows (independent random streams) against their exact
    joint distribution: plain sampling, and speculation with a draft that is mostly wrong (another
    random model), one that is always right (the model itself) and prompt lookup.

    Power (noncentral chi-square, ALPHA = 0.001): a sampler that kept every draft of the wrong
    draft model (tokens 2 and 3 then come from the draft) is rejected with probability > 0.99
    (asserted); a joint mixed with uniform noise is found 9 times in 10 from 1.6% noise at
    temperature 1 and 7.2% with the filters (printed; the filtered joint has few cells).
    """
    config = sj.StarCoderConfig(vocab_size=VOCAB, n_positions=64, n_embd=32, n_head=2, n_layer=2,
                                eos_token_id=0, bos_token_id=0)
    model = varied(config, seed=5)
    other = varied(config, seed=6)
    knobs = SamplingParams(**settings)
    mine = conditionals(model, knobs, 3)
    exact = joint(mine)
    rows = [PROMPT] * N_SAMPLES
    kwargs = dict(max_new_tokens=3, ignore_eos=True, seed=11, **settings)

    def counts(results):
        c = np.zeros([VOCAB] * 3)
        for r in results:
            c[tuple(r.ids)] += 1
        return c

    runs = {"plain": generate(model, rows, **kwargs),
            "wrong draft": generate(model, rows, draft=other, num_draft_tokens=2, **kwargs),
            "the model as draft": generate(model, rows, draft=model, num_draft_tokens=2, **kwargs),
            "prompt lookup": generate(model, rows, draft="prompt-lookup", num_draft_tokens=2, **kwargs)}
    for name, results in runs.items():
        p_value, df, cells = chi_square(counts(results), exact)
        assert p_value > ALPHA, (name, p_value, df)
    wrong = runs["wrong draft"]
    assert sum(r.accepted_tokens for r in wrong) < 0.8 * sum(r.draft_tokens for r in wrong)
    same = runs["the model as draft"]
    assert sum(r.accepted_tokens for r in same) == sum(r.draft_tokens for r in same)
    # Power against "every draft kept": token 1 from the model, tokens 2 and 3 from the other model.
    theirs = conditionals(other, knobs, 3)
    keep_all = joint([mine[0], theirs[1], theirs[2]])
    _, df, cells = chi_square(counts(runs["plain"]), exact)
    assert power(cells, pooled(keep_all, exact), df, N_SAMPLES) > 0.99
    # The smallest mixture with uniform noise the test finds 9 times in 10.
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        noisy = (1 - mid) * exact + mid / exact.size
        lo, hi = (lo, mid) if power(cells, pooled(noisy, exact), df, N_SAMPLES) >= 0.9 else (mid, hi)
    print(f"{settings}: {df} degrees of freedom; 90% power against {hi:.1%} uniform noise")

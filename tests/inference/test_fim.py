"""Fill-in-the-middle: prompt layouts, truncation, infill, the training transform, the CLI."""

import argparse
import json
import math

import numpy as np
import pytest
from builders import CORPUS, STARCODER_SPECIAL_TOKENS, make_tokenizer

from starcoder_jax.cli.infill import UsageError, cursor_offset, register_cli
from starcoder_jax.inference.fim import (
    FIMTransform,
    build_prompt,
    encode_literal,
    infill,
    infill_batch,
    infill_stop_ids,
    truncate_context,
)
from starcoder_jax.tokenizer import EOS, FIM_MIDDLE, FIM_PAD, FIM_PREFIX, FIM_SUFFIX, load_tokenizer

PREFIX = "def add(a, b):\n    "
SUFFIX = "\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def fim_ids(tok):
    return {name: tok.token_id(name) for name in (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD)}


# ---------------------------------------------------------------------------
# Prompt layouts


def test_psm_prompt_is_prefix_suffix_middle(tok, fim_ids):
    ids = build_prompt(tok, PREFIX, SUFFIX, "psm")
    p, m, s = fim_ids[FIM_PREFIX], fim_ids[FIM_MIDDLE], fim_ids[FIM_SUFFIX]
    assert ids == [p] + tok.encode(PREFIX) + [s] + tok.encode(SUFFIX) + [m]
    assert (p, m, s) == (1, 2, 3)  # StarCoder's own ids in the test tokenizer


def test_spm_prompt_is_bigcodes_variant(tok, fim_ids):
    # BigCode's SPM: <fim_prefix><fim_suffix> suffix <fim_middle> prefix, so the
    # middle the model writes continues the prefix.
    ids = build_prompt(tok, PREFIX, SUFFIX, "spm")
    p, m, s = fim_ids[FIM_PREFIX], fim_ids[FIM_MIDDLE], fim_ids[FIM_SUFFIX]
    assert ids == [p, s] + tok.encode(SUFFIX) + [m] + tok.encode(PREFIX)


def test_empty_prefix_and_suffix_are_allowed(tok, fim_ids):
    p, m, s = fim_ids[FIM_PREFIX], fim_ids[FIM_MIDDLE], fim_ids[FIM_SUFFIX]
    assert build_prompt(tok, "", "", "psm") == [p, s, m]
    assert build_prompt(tok, "", "", "spm") == [p, s, m]


def test_special_ids_are_looked_up_by_name(tmp_path):
    reordered = list(reversed(STARCODER_SPECIAL_TOKENS))
    other = load_tokenizer(make_tokenizer(str(tmp_path / "reordered"), specials=reordered))
    p, m, s = (other.token_id(t) for t in (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX))
    assert (p, m, s) != (1, 2, 3)
    assert build_prompt(other, PREFIX, SUFFIX, "psm") == (
        [p] + other.encode(PREFIX) + [s] + other.encode(SUFFIX) + [m])
    stops = infill_stop_ids(other)
    assert other.token_id(EOS) in stops and {p, m, s, other.token_id(FIM_PAD)} <= set(stops)


def test_tokenizer_without_fim_tokens_is_refused(tmp_path):
    plain = load_tokenizer(make_tokenizer(str(tmp_path / "plain"), specials=[EOS]))
    with pytest.raises(ValueError, match="fim_prefix.*fim_middle.*fim_suffix"):
        build_prompt(plain, PREFIX, SUFFIX)
    with pytest.raises(ValueError, match="fill-in-the-middle"):
        FIMTransform(plain)


def test_unknown_mode_names_the_allowed_ones(tok):
    with pytest.raises(ValueError, match="psm, spm.*'pms'"):
        build_prompt(tok, PREFIX, SUFFIX, "pms")


def test_special_token_text_in_the_code_stays_text(tok, fim_ids):
    # A file that mentions "<fim_middle>" must not put a second <fim_middle> in the prompt.
    prefix = "marker = '<fim_middle><|endoftext|>'\n"
    assert fim_ids[FIM_MIDDLE] in tok.encode(prefix)  # what the plain encoder would do
    ids = build_prompt(tok, prefix, SUFFIX)
    assert ids.count(fim_ids[FIM_MIDDLE]) == 1 and tok.eos_id not in ids
    assert tok.decode(encode_literal(tok, prefix)) == prefix


# ---------------------------------------------------------------------------
# Truncation


def test_truncate_context_policy():
    p, s = list(range(100, 120)), list(range(200, 230))  # 20 prefix, 30 suffix tokens
    assert truncate_context(p, s, 50) == (p, s)  # fits: untouched
    assert truncate_context(p, s, 11) == (p[-6:], s[:5])  # both long: halves, odd token to the prefix
    assert truncate_context(p, s, 0) == ([], [])
    # The short side keeps everything and gives the rest away.
    assert truncate_context(p[:3], s, 20) == (p[:3], s[:17])
    assert truncate_context(p, s[:2], 12) == (p[-10:], s[:2])
    with pytest.raises(ValueError, match="budget"):
        truncate_context(p, s, -1)


@pytest.mark.parametrize("budget", [0, 1, 7, 25, 49, 50, 60])
@pytest.mark.parametrize("lengths", [(0, 40), (40, 0), (3, 40), (40, 3), (25, 25), (30, 21)])
def test_truncate_context_invariants(budget, lengths):
    p, s = list(range(1000, 1000 + lengths[0])), list(range(2000, 2000 + lengths[1]))
    kp, ks = truncate_context(p, s, budget)
    assert len(kp) + len(ks) == min(budget, len(p) + len(s))
    assert kp == p[len(p) - len(kp):] and ks == s[:len(ks)]  # nearest the cursor survives
    if len(p) >= (budget + 1) // 2 and len(s) >= budget // 2 and len(p) + len(s) > budget:
        assert (len(kp), len(ks)) == ((budget + 1) // 2, budget // 2)


def test_build_prompt_truncates_to_the_budget(tok, fim_ids):
    prefix = "".join(CORPUS) * 2
    suffix = "".join(reversed(CORPUS)) * 2
    enc_p, enc_s = tok.encode(prefix), tok.encode(suffix)
    for budget in (3, 4, 40, 101):
        ids = build_prompt(tok, prefix, suffix, "psm", max_prompt_tokens=budget)
        assert len(ids) == budget
        split = ids.index(fim_ids[FIM_SUFFIX])
        kept_p, kept_s = ids[1:split], ids[split + 1:-1]
        assert kept_p == enc_p[len(enc_p) - len(kept_p):] and kept_s == enc_s[:len(kept_s)]
        assert abs(len(kept_p) - len(kept_s)) <= 1
    short = build_prompt(tok, "x = ", suffix, "spm", max_prompt_tokens=40)
    assert len(short) == 40 and short[-len(tok.encode("x = ")):] == tok.encode("x = ")
    with pytest.raises(ValueError, match="max_prompt_tokens must be >= 3"):
        build_prompt(tok, prefix, suffix, max_prompt_tokens=2)


# ---------------------------------------------------------------------------
# infill (needs the model)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from starcoder_jax import load_pretrained

    return load_pretrained(tiny_model_dir)


PAIRS = [(doc[:k], doc[k + 10:]) for doc in CORPUS for k in (5, 15, 30)]


def test_infill_is_greedy_generate_cut_at_the_first_stop_token(model, tok):
    from starcoder_jax.inference.generate import generate

    n = 24
    stops = set(infill_stop_ids(tok))
    for mode in ("psm", "spm"):
        prompts = [build_prompt(tok, p, s, mode) for p, s in PAIRS]
        raw = generate(model, prompts, tokenizer=tok, max_new_tokens=n, ignore_eos=True)
        expected, cut_rows = [], 0
        for r in raw:
            first = next((i for i, t in enumerate(r.ids) if t in stops), None)
            cut_rows += first is not None
            expected.append(tok.decode(r.ids if first is None else r.ids[:first]))
        # The random model writes a FIM token or eos within n tokens in some rows:
        # without such a row this test would not test stopping.
        assert 0 < cut_rows < len(PAIRS), cut_rows
        assert infill_batch(model, tok, PAIRS, mode=mode, max_new_tokens=n) == expected


@pytest.mark.slow
def test_batched_infill_equals_one_by_one(model, tok):
    # With the fixture's model, PAIRS[4] and ("x = ", "") end on <fim_prefix>; the others run to length.
    pairs = [PAIRS[0], PAIRS[4], ("", ""), ("x = ", "")]
    batched = infill_batch(model, tok, pairs, max_new_tokens=12)
    assert batched == [infill(model, tok, p, s, max_new_tokens=12) for p, s in pairs]
    assert infill_batch(model, tok, [], max_new_tokens=12) == []


@pytest.mark.slow
def test_infill_fits_a_long_file_into_the_context(model, tok):
    long_prefix = "".join(CORPUS) * 12  # well over the tiny model's 512 positions
    assert len(tok.encode(long_prefix)) > model.config.n_positions
    out = infill(model, tok, long_prefix, SUFFIX, max_new_tokens=8)
    assert isinstance(out, str)
    with pytest.raises(ValueError, match="needs at least 3"):
        infill(model, tok, PREFIX, SUFFIX, max_new_tokens=model.config.n_positions - 2)
    with pytest.raises(ValueError, match="mode must be one of psm, spm"):
        infill(model, tok, PREFIX, SUFFIX, mode="fim")


# ---------------------------------------------------------------------------
# The training transform


def _parts(ids, fim_ids):
    """(mode, text of prefix+middle+suffix reassembled) from a FIM sample without pads."""
    p, m, s = fim_ids[FIM_PREFIX], fim_ids[FIM_MIDDLE], fim_ids[FIM_SUFFIX]
    ids = list(ids)
    assert ids[0] == p and ids.count(m) == 1 and ids.count(s) == 1
    i_s, i_m = ids.index(s), ids.index(m)
    if i_s == 1:  # SPM (or PSM with an empty prefix: the same tokens)
        return "spm", ids[2:i_m], ids[i_m + 1:]
    return "psm", ids[i_s + 1:i_m], ids[1:i_s] + ids[i_m + 1:]


def test_fim_parts_rejoin_to_the_document(tok, fim_ids):
    transform = FIMTransform(tok, fim_rate=1.0, fim_spm_rate=0.5, truncate_or_pad=False)
    rng = np.random.default_rng(0)
    modes = set()
    for doc in CORPUS + ["héllo wörld = '日本語'\n", "x"]:
        for _ in range(8):
            ids, mask = transform(doc, rng)
            assert ids.dtype == np.int32 and mask.dtype == bool and mask.all()
            mode, suffix, before = _parts(ids, fim_ids)
            modes.add(mode)
            # PSM: prefix, middle = ids before <fim_suffix> and after <fim_middle>;
            # SPM: prefix + middle after <fim_middle>. Either way text = before + suffix.
            assert tok.decode(before) + tok.decode(suffix) == doc
    assert modes == {"psm", "spm"}


def test_token_input_matches_text_input(tok):
    transform = FIMTransform(tok, fim_rate=0.7, fim_spm_rate=0.5)
    for seed, doc in enumerate(CORPUS):
        a = transform(doc, seed, length=48)
        b = transform(np.array(tok.encode(doc)), seed, length=48)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_no_fim_passes_the_document_through(tok):
    transform = FIMTransform(tok, fim_rate=0.0, truncate_or_pad=False)
    doc = CORPUS[1]
    ids, mask = transform(tok.encode(doc), 0)
    assert ids.tolist() == tok.encode(doc) and mask.all()
    ids, _ = transform(doc, 0)
    assert ids.tolist() == tok.encode(doc)


@pytest.mark.parametrize("mask_pad", [True, False])
def test_fixed_length_cuts_the_suffix_and_pads_at_the_end(tok, fim_ids, mask_pad):
    natural = FIMTransform(tok, fim_rate=1.0, truncate_or_pad=False)
    fixed = FIMTransform(tok, fim_rate=1.0, truncate_or_pad=False, mask_pad=mask_pad)
    pad = fim_ids[FIM_PAD]
    cut = fell_back = padded = 0
    for seed in range(40):
        doc = CORPUS[seed % len(CORPUS)]
        full, _ = natural(doc, seed)  # the same seed draws the same cuts and layout
        for length in (8, len(full) - 4, len(full), len(full) + 9):
            ids, mask = fixed(doc, seed, length)
            assert ids.shape == mask.shape == (length,)
            if length >= len(full):
                padded += length > len(full)
                assert ids[:len(full)].tolist() == full.tolist()
                assert (ids[len(full):] == pad).all()
                assert mask.tolist() == [True] * len(full) + [not mask_pad] * (length - len(full))
                continue
            excess = len(full) - length
            full_l = full.tolist()
            start = full_l.index(fim_ids[FIM_SUFFIX]) + 1
            end = full_l.index(fim_ids[FIM_MIDDLE])
            if end - start > excess:  # the suffix's last tokens go
                cut += 1
                assert ids.tolist() == full_l[:end - excess] + full_l[end:] and mask.all()
            else:  # nothing left of the suffix: the document without FIM, cut or padded at its end
                fell_back += 1
                plain = tok.encode(doc)[:length]
                n_pad = length - len(plain)
                assert ids.tolist() == plain + [pad] * n_pad
                assert mask.tolist() == [True] * len(plain) + [not mask_pad] * n_pad
    assert cut and fell_back and padded


def test_truncate_or_pad_keeps_the_documents_length(tok):
    transform = FIMTransform(tok, fim_rate=1.0, truncate_or_pad=True)
    for seed, doc in enumerate(CORPUS):
        ids, _ = transform(doc, seed)
        assert len(ids) == len(tok.encode(doc))


def _five_sigma(n, p):
    return 5 * math.sqrt(n * p * (1 - p))


def test_fim_rate_is_respected(tok, fim_ids):
    n, rate = 3000, 0.3
    transform = FIMTransform(tok, fim_rate=rate, truncate_or_pad=False)
    rng = np.random.default_rng(1)
    hits = sum(int(transform(CORPUS[i % len(CORPUS)], rng)[0][0] == fim_ids[FIM_PREFIX]) for i in range(n))
    assert abs(hits - n * rate) < _five_sigma(n, rate), hits


def test_spm_rate_is_respected(tok, fim_ids):
    n, spm_rate = 2000, 0.25
    doc = "".join(CORPUS)
    transform = FIMTransform(tok, fim_rate=1.0, fim_spm_rate=spm_rate, truncate_or_pad=False)
    rng = np.random.default_rng(2)
    spm_like = sum(int(transform(doc, rng)[0][1] == fim_ids[FIM_SUFFIX]) for _ in range(n))
    # A PSM sample with an empty prefix reads as SPM: P(first cut at 0) = 1 - (c/(c+1))^2.
    c = len(doc)
    expected = spm_rate + (1 - spm_rate) * (1 - (c / (c + 1)) ** 2)
    assert abs(spm_like - n * expected) < _five_sigma(n, expected), spm_like


def test_same_seed_same_sample(tok):
    transform = FIMTransform(tok, fim_rate=0.5, fim_spm_rate=0.5)
    doc = CORPUS[2]
    runs = [transform(doc, np.random.default_rng(7), 64)[0].tolist() for _ in range(2)]
    assert runs[0] == runs[1] == transform(doc, 7, 64)[0].tolist()
    assert len({tuple(transform(doc, s, 64)[0].tolist()) for s in range(10)}) > 1
    with pytest.raises(TypeError, match="rng"):
        transform(doc, 0.5)
    with pytest.raises(ValueError, match="fim_rate must be a probability"):
        FIMTransform(tok, fim_rate=1.5)


# ---------------------------------------------------------------------------
# CLI


def _parser():
    parser = argparse.ArgumentParser(prog="starcoder-jax")
    register_cli(parser.add_subparsers(dest="command"))
    return parser


def _run(argv):
    args = _parser().parse_args(argv)
    return args.func(args)


def test_cursor_offset():
    text = "ab\ncd\n"
    assert [cursor_offset(text, c) for c in ("1:1", "1:3", "2:1", "2:3", "3:1")] == [0, 2, 3, 5, 6]
    assert cursor_offset("ab\r\ncd", "1:3") == 2 and cursor_offset("ab\r\ncd", "2:2") == 5
    for bad in ("1:4", "4:1", "3:2", "0:1", "1", "a:b"):
        with pytest.raises(UsageError):
            cursor_offset(text, bad)
    with pytest.raises(UsageError, match="outside line 1 .* columns 1..3"):
        cursor_offset("ab\r\ncd", "1:4")


def test_cli_cursor_outside_the_file(tmp_path, capsys):
    src = tmp_path / "a.py"
    src.write_text("def f():\n    return 1\n", encoding="utf-8")
    assert _run(["infill", "--model", "unused", "--file", str(src), "--cursor", "9:1"]) == 2
    assert "outside" in capsys.readouterr().err
    assert _run(["infill", "--model", "unused", "--file", str(src), "--cursor", "1:40"]) == 2
    assert "columns 1..9" in capsys.readouterr().err
    assert _run(["infill", "--model", "unused", "--file", str(src), "--cursor", "two:1"]) == 2
    assert "LINE:COL" in capsys.readouterr().err


def test_cli_rejects_non_utf8_and_missing_files(tmp_path, capsys):
    src = tmp_path / "latin1.py"
    src.write_bytes("x = 'caf\u00e9'\n".encode("latin-1"))
    assert _run(["infill", "--model", "unused", "--file", str(src), "--cursor", "1:1"]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    assert _run(["infill", "--model", "unused", "--file", str(tmp_path / "nope.py"), "--cursor", "1:1"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_argument_combinations(tmp_path, capsys, monkeypatch):
    import starcoder_jax.cli.common

    assert _run(["infill", "--model", "m"]) == 2
    assert "--prefix/--suffix, or --file" in capsys.readouterr().err
    assert _run(["infill", "--model", "m", "--file", "x.py"]) == 2
    assert "go together" in capsys.readouterr().err
    assert _run(["infill", "--model", "m", "--prefix", "a", "--file", "x.py", "--cursor", "1:1"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    monkeypatch.setattr(starcoder_jax.cli.common, "DEFAULT_MODEL", None)
    assert _run(["infill", "--prefix", "a"]) == 2
    assert "--model is required" in capsys.readouterr().err


def test_cli_infill_json(tiny_model_dir, model, tok, tmp_path, capsys):
    src = tmp_path / "f.py"
    src.write_text(PREFIX + SUFFIX, encoding="utf-8")
    cursor = f"{PREFIX.count(chr(10)) + 1}:{len(PREFIX.split(chr(10))[-1]) + 1}"
    argv = ["infill", "--model", tiny_model_dir, "--file", str(src), "--cursor", cursor,
            "--mode", "spm", "--max-new-tokens", "10", "--json"]
    assert _run(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_ids"] == build_prompt(tok, PREFIX, SUFFIX, "spm")
    assert out["text"] == infill(model, tok, PREFIX, SUFFIX, mode="spm", max_new_tokens=10)
    assert 1 <= len(out["ids"]) <= 10


def test_local_reencoding_gives_the_ids_of_whole_reencoding(tok):
    """FIM of a document's own ids (ids_are_encodings: training data) re-encodes only near the
    cuts (LocalReencoder); the samples equal those of encoding each part whole, on texts built
    to stress the pre-tokenizer: runs of spaces, tabs and newlines, digits, contractions,
    non-ASCII letters and spaces, special-token strings."""
    from starcoder_jax.inference.fim import LocalReencoder, encode_literal

    assert LocalReencoder.supported(tok)
    pieces = ["def", " f", "(x)", ":", "\n", "    ", "  ", "\t", " ", "\n\n", "\r\n", "123", "4", "'s", "'t", "it",
              "é", "wörld", "\u00a0", "\u2003", "..", "''", " =", "<|endoftext|>", "<fim_middle>", "#", "x", "->"]
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(pieces, size=rng.integers(1, 120))) for _ in range(150)] + list(CORPUS)
    whole = FIMTransform(tok, 1.0, 0.5)
    local = FIMTransform(tok, 1.0, 0.5, ids_are_encodings=True)
    assert local.local is not None and whole.local is None
    for i, text in enumerate(texts):
        ids = np.asarray(encode_literal(tok, text), np.int32)
        for seed in range(4):
            want, got = whole(ids, 1000 * i + seed), local(ids, 1000 * i + seed)
            np.testing.assert_array_equal(got[0], want[0], err_msg=repr(text))
            np.testing.assert_array_equal(got[1], want[1])

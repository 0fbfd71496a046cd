"""Fill-in-the-middle (FIM): infilling prompts and the training transform.

StarCoder was trained on documents cut at two random character positions
into prefix / middle / suffix and rearranged around three special tokens
(the method of Bavarian et al. 2022, "Efficient Training of Language Models
to Fill in the Middle", as BigCode's Megatron-LM fork implements it in
`permute`, megatron/data/gpt_dataset.py):

    PSM  <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle
    SPM  <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle

BigCode's SPM keeps <fim_prefix> first and puts the prefix text after
<fim_middle>, so the middle is a plain continuation of the prefix. An
infilling prompt is the layout up to where the middle starts; the model
writes the middle and ends it with <|endoftext|>.

Prefix, middle and suffix are always tokenized separately and joined with
the special-token ids, which are looked up in the tokenizer by name. Their
text is encoded literally (`encode_literal`): a source file that contains
the string "<fim_middle>" or "<|endoftext|>" gets the tokens of that text,
not the special tokens, so file content can never forge prompt structure.
"""

from __future__ import annotations

import dataclasses
import re
import weakref
from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer as _HFTokenizer

from starcoder_jax.tokenizer import EOS, FILE_SEP, FIM_MIDDLE, FIM_PAD, FIM_PREFIX, FIM_SUFFIX, Tokenizer

MODES = ("psm", "spm")
# The special tokens of a prompt: <fim_prefix>, <fim_suffix>, <fim_middle>.
PROMPT_SPECIAL_TOKENS = 3


@dataclasses.dataclass(frozen=True)
class FIMTokens:
    """The FIM special-token ids of one tokenizer."""

    prefix: int
    middle: int
    suffix: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> FIMTokens:
        names = (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD)
        ids = [tokenizer.token_id(name) for name in names]
        missing = [name for name, i in zip(names, ids) if i is None]
        if missing:
            raise ValueError(
                f"tokenizer {tokenizer.source or '(in memory)'} has no fill-in-the-middle tokens "
                f"{', '.join(missing)}; FIM needs a StarCoder-family tokenizer"
            )
        return cls(*ids)


# Tokenizer -> a copy of its backend that reads special-token strings as plain text.
_LITERAL_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def encode_literal(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of `text`, with special-token strings inside it encoded as ordinary text.

    `Tokenizer.encode` turns "<|endoftext|>" written in a file into the
    special token. The literal encoder is a copy of the backend with
    `encode_special_tokens` set (made once per tokenizer, ~0.1 s for
    StarCoder's), so the shared backend is never mutated. On text without
    special-token strings both give the same ids.
    """
    return literal_backend(tokenizer).encode(text, add_special_tokens=False).ids


def literal_backend(tokenizer: Tokenizer) -> _HFTokenizer:
    """The `tokenizers` backend that `encode_literal` uses (for batch encoding the same way)."""
    backend = _LITERAL_BACKENDS.get(tokenizer)
    if backend is None:
        backend = _HFTokenizer.from_str(tokenizer.backend.to_str())
        backend.encode_special_tokens = True
        _LITERAL_BACKENDS[tokenizer] = backend
    return backend


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


def layout(tokens: FIMTokens, prefix: Sequence[int], suffix: Sequence[int],
           middle: Sequence[int] = (), mode: str = "psm") -> list[int]:
    """The one definition of the two layouts; `middle=()` gives the inference prompt."""
    if check_mode(mode) == "psm":
        return [tokens.prefix, *prefix, tokens.suffix, *suffix, tokens.middle, *middle]
    return [tokens.prefix, tokens.suffix, *suffix, tokens.middle, *prefix, *middle]


def truncate_context(prefix_ids: Sequence[int], suffix_ids: Sequence[int],
                     budget: int) -> tuple[list[int], list[int]]:
    """Cuts prefix + suffix to at most `budget` tokens, keeping the tokens nearest the cursor.

    Policy: if both fit, nothing changes. Otherwise the prefix keeps its LAST
    tokens and the suffix its FIRST tokens. Each side is offered half of the
    budget (the prefix gets the odd token, since the middle continues it);
    a side shorter than its half keeps all of its tokens and gives what it
    does not use to the other side.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0 tokens; got {budget}")
    prefix_ids, suffix_ids = list(prefix_ids), list(suffix_ids)
    if len(prefix_ids) + len(suffix_ids) <= budget:
        return prefix_ids, suffix_ids
    suffix_share = budget // 2
    prefix_share = budget - suffix_share
    if len(suffix_ids) < suffix_share:
        keep_prefix, keep_suffix = budget - len(suffix_ids), len(suffix_ids)
    elif len(prefix_ids) < prefix_share:
        keep_prefix, keep_suffix = len(prefix_ids), budget - len(prefix_ids)
    else:
        keep_prefix, keep_suffix = prefix_share, suffix_share
    # Slice from len - keep, not -keep: -0 would keep the whole prefix.
    return prefix_ids[len(prefix_ids) - keep_prefix:], suffix_ids[:keep_suffix]


def build_prompt(tokenizer: Tokenizer, prefix: str, suffix: str, mode: str = "psm", *,
                 max_prompt_tokens: int | None = None) -> list[int]:
    """Token ids of an infilling prompt; the model's continuation is the middle.

    psm: [<fim_prefix>] + enc(prefix) + [<fim_suffix>] + enc(suffix) + [<fim_middle>]
    spm: [<fim_prefix>, <fim_suffix>] + enc(suffix) + [<fim_middle>] + enc(prefix)

    max_prompt_tokens: if given, the prompt (3 special tokens included) is cut
      to at most this many tokens with `truncate_context`: the end of the
      prefix and the start of the suffix survive.
    """
    check_mode(mode)
    for name, value in (("prefix", prefix), ("suffix", suffix)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str; got {type(value).__name__}")
    tokens = FIMTokens.from_tokenizer(tokenizer)
    prefix_ids, suffix_ids = encode_literal(tokenizer, prefix), encode_literal(tokenizer, suffix)
    if max_prompt_tokens is not None:
        if max_prompt_tokens < PROMPT_SPECIAL_TOKENS:
            raise ValueError(
                f"max_prompt_tokens must be >= {PROMPT_SPECIAL_TOKENS} (the FIM special tokens); "
                f"got {max_prompt_tokens}"
            )
        prefix_ids, suffix_ids = truncate_context(
            prefix_ids, suffix_ids, max_prompt_tokens - PROMPT_SPECIAL_TOKENS)
    return layout(tokens, prefix_ids, suffix_ids, mode=mode)


def infill_stop_ids(tokenizer: Tokenizer) -> list[int]:
    """Tokens that end a middle: end of text, <file_sep> if the vocabulary has it,
    and every FIM token (a model that emits one has left the middle)."""
    tokens = FIMTokens.from_tokenizer(tokenizer)
    ids = [tokenizer.eos_id, tokens.prefix, tokens.middle, tokens.suffix, tokens.pad]
    for name in (EOS, FILE_SEP):
        found = tokenizer.token_id(name)
        if found is not None:
            ids.append(found)
    return sorted(set(ids))


def infill_generations(model, tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]], *,
                       mode: str = "psm", max_new_tokens: int = 128, temperature: float = 0.0,
                       top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, seed: int = 0,
                       stop: Sequence[str] = (), draft=None, num_draft_tokens: int | None = None) -> list:
    """One batched `generate` call over (prefix, suffix) pairs; returns its Generations.

    Each prompt is truncated to the model's n_positions - max_new_tokens
    positions (see `truncate_context`). A Generation's `text` is the middle.
    draft, num_draft_tokens: speculative decoding, as in `generate` ("prompt-lookup"
    suits infilling: the middle often repeats code around it).
    """
    from starcoder_jax.inference.generate import generate

    check_mode(mode)
    pairs = [tuple(pair) for pair in pairs]
    for i, pair in enumerate(pairs):
        if len(pair) != 2:
            raise ValueError(f"pairs[{i}] must be a (prefix, suffix) pair; got {len(pair)} items")
    if not pairs:
        return []
    n_positions = model.config.n_positions
    budget = n_positions - max_new_tokens
    if budget < PROMPT_SPECIAL_TOKENS:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves {budget} of the model's {n_positions} positions "
            f"for the prompt; a FIM prompt needs at least {PROMPT_SPECIAL_TOKENS}"
        )
    prompts = [build_prompt(tokenizer, prefix, suffix, mode, max_prompt_tokens=budget)
               for prefix, suffix in pairs]
    return generate(model, prompts, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                    temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                    stop=tuple(stop), stop_ids=tuple(infill_stop_ids(tokenizer)), seed=seed, draft=draft,
                    num_draft_tokens=num_draft_tokens)


def infill_batch(model, tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]], **kwargs) -> list[str]:
    """The middles for many (prefix, suffix) pairs, in one batched generate call.

    Keyword arguments are those of `infill`.
    """
    return [g.text for g in infill_generations(model, tokenizer, pairs, **kwargs)]


def infill(model, tokenizer: Tokenizer, prefix: str, suffix: str, *, mode: str = "psm",
           max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           min_p: float = 0.0, seed: int = 0, stop: Sequence[str] = (), draft=None,
           num_draft_tokens: int | None = None) -> str:
    """The text the model writes between `prefix` and `suffix` (the middle only).

    Generation ends at <|endoftext|>, <file_sep> (if the tokenizer has it),
    any FIM token, a string of `stop`, or after max_new_tokens tokens; the
    ending token or stop string is not part of the result. draft,
    num_draft_tokens: speculative decoding, as in `generate`.
    """
    return infill_batch(model, tokenizer, [(prefix, suffix)], mode=mode, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
                        stop=stop, draft=draft, num_draft_tokens=num_draft_tokens)[0]


# ---------------------------------------------------------------------------
# The training transform


class _Unsynced(Exception):
    """A cut the local re-encoding cannot place exactly: encode the part whole."""


# Where every scan of the ByteLevel regex has a pre-token boundary (LocalReencoder): a
# space after a printable ASCII character (no pattern runs across "x ": the word and
# punctuation classes hold no space, and a whitespace run cannot start at "x"; the
# space begins the next pre-token, alone or as the prefix of " word"), and a
# printable ASCII character after "\n" (a whitespace run stops before it).
_SYNC = re.compile(r"(?<=[!-~]) |(?<=\n)(?=[!-~])")


class LocalReencoder:
    """The ids of a slice of a document's text, from the document's own ids: BPE reruns
    only near the slice's ends.

    For a StarCoder-style tokenizer (no normalizer; Digits(individual) then GPT-2's
    ByteLevel regex; plain BPE; every added token special, and encoded literally),
    pre-tokenization is local: at the `_SYNC` points every scan has a pre-token
    boundary, whatever came before, and tokens never cross pre-tokens. So the encoding of text[a:b] equals the
    document's ids between two such points inside (a, b), with only the pieces
    before the first and after the last encoded afresh. A piece cut short at such a
    point is encoded with its next character (a one-byte token, then dropped) so that
    the whitespace rule `\\s+(?!\\S)` sees what follows, as it does in text[a:b].
    Exactness is tested against whole re-encoding (tests/inference/test_fim.py);
    anything else falls back to encoding the slice whole.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.backend = literal_backend(tokenizer)
        vocab = self.backend.get_vocab(with_added_tokens=True)
        self.byte_len = np.zeros(max(vocab.values()) + 1, np.int64)
        for token, i in vocab.items():
            self.byte_len[i] = len(token)  # byte-level BPE: one character per byte

    @staticmethod
    def supported(tokenizer: Tokenizer) -> bool:
        import json

        spec = json.loads(tokenizer.backend.to_str())
        pre = spec.get("pre_tokenizer") or {}
        parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
        return (spec.get("normalizer") is None and spec["model"].get("type") == "BPE"
                and not spec["model"].get("dropout") and not spec["model"].get("byte_fallback")
                and [p.get("type") for p in parts] == ["Digits", "ByteLevel"]
                and parts[0].get("individual_digits") is True and parts[1].get("use_regex") is True
                and not parts[1].get("add_prefix_space")
                and all(t.get("special") for t in spec.get("added_tokens", [])))

    def _encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    @staticmethod
    def _sync_after(text: str, lo: int, hi: int) -> int | None:
        """The first sync point q with lo < q < hi (its character before inside the slice)."""
        found = _SYNC.search(text, lo + 1, hi)
        return found.start() if found else None

    @staticmethod
    def _sync_before(text: str, lo: int, hi: int) -> int | None:
        """The last sync point q with lo < q < hi."""
        width = 256
        while True:
            found = [m.start() for m in _SYNC.finditer(text, max(lo + 1, hi - width), hi)]
            if found or hi - width <= lo + 1:
                return found[-1] if found else None
            width *= 16

    def _encode_to(self, text: str, a: int, q: int) -> list[int]:
        """ids of text[a:q] where q is a sync point, as a longer slice encodes them."""
        ids = self._encode(text[a:q + 1])
        if not ids or self.byte_len[ids[-1]] != 1:
            raise _Unsynced
        return ids[:-1]

    def parts(self, text: str, ids: np.ndarray, start: int, end: int) -> tuple[list[int], ...]:
        """ids of text[:start], text[start:end], text[end:] (ids: the encoding of text)."""
        offsets = np.concatenate([[0], np.cumsum(self.byte_len[ids])])

        def token_at(q: int) -> int:
            b = len(text[:q].encode("utf-8"))
            k = int(np.searchsorted(offsets, b))
            if k >= len(offsets) or offsets[k] != b:
                raise _Unsynced
            return k

        def piece(a: int, b: int) -> list[int]:
            try:
                first = self._sync_after(text, a, b) if a > 0 else a
                last = self._sync_before(text, max(a, (first or a) - 1), b) if b < len(text) else b
                if first is None or last is None or last < first:
                    raise _Unsynced
                head = self._encode_to(text, a, first) if first > a else []
                tail = self._encode(text[last:b]) if b > last else []
                return head + ids[token_at(first):token_at(last)].tolist() + tail
            except _Unsynced:
                return self._encode(text[a:b])

        return piece(0, start), piece(start, end), piece(end, len(text))


class FIMTransform:
    """Per-document FIM augmentation for fine-tuning, after BigCode's `permute`.

    With probability fim_rate a document is cut at two character positions
    drawn uniformly from 0..len(text) (either part may be empty) into
    prefix / middle / suffix, each part is tokenized on its own, and the
    parts are laid out as SPM with probability fim_spm_rate, else PSM.
    Otherwise the document passes through unchanged.

    Token input is decoded to text first, cut, and each part re-encoded, as
    BigCode does: the cut points are characters, so a cut never falls inside
    a token. Byte-level BPE round-trips valid UTF-8 exactly; token ids that
    end inside a multi-byte character decode to U+FFFD, so feed whole
    documents (one file, without <|endoftext|> inside: split on it first;
    all text is encoded literally, see `encode_literal`).

    Fixed length (an explicit `length`, or with truncate_or_pad=True the
    document's own token count, which is what BigCode keeps): a FIM sample
    that came out longer loses tokens from the END of its suffix; if the
    suffix would be emptied, the document is used without FIM instead (as
    BigCode does). Short samples are padded with <fim_pad> at the END of the
    sequence, after the middle, so pads never sit in the context a middle is
    predicted from; a non-FIM document is cut or padded at its end.
    BigCode's `permute(truncate_or_pad=True)` puts the pads inside the
    suffix instead; its dataset (which StarCoder trained with) pads at the end.

    __call__(doc, rng, length=None) -> (ids, loss_mask)
      ids: [L] int32; loss_mask: [L] bool, False on the padding when
      mask_pad=True, else all True.
    """

    def __init__(self, tokenizer: Tokenizer, fim_rate: float = 0.5, fim_spm_rate: float = 0.5, *,
                 truncate_or_pad: bool = True, mask_pad: bool = True, ids_are_encodings: bool = False):
        for name, rate in (("fim_rate", fim_rate), ("fim_spm_rate", fim_spm_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1]; got {rate}")
        self.tokenizer = tokenizer
        self.tokens = FIMTokens.from_tokenizer(tokenizer)
        self.fim_rate = float(fim_rate)
        self.fim_spm_rate = float(fim_spm_rate)
        self.truncate_or_pad = truncate_or_pad
        self.mask_pad = mask_pad
        # Token input that is the literal encoding of its text (a training document)
        # is cut without re-encoding it whole (LocalReencoder): the same ids, faster.
        self.local = (LocalReencoder(tokenizer) if ids_are_encodings and LocalReencoder.supported(tokenizer)
                      else None)

    def __call__(self, doc: str | Sequence[int] | np.ndarray, rng: np.random.Generator | int,
                 length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        rng = _as_generator(rng)
        if length is not None and length < 1:
            raise ValueError(f"length must be >= 1 token; got {length}")
        if isinstance(doc, str):
            text, doc_ids, doc_array = doc, None, None
        else:
            doc_array = np.asarray(doc).reshape(-1)
            doc_ids, text = doc_array.tolist(), None
        if length is None and self.truncate_or_pad:
            if doc_ids is None:
                doc_ids = encode_literal(self.tokenizer, text)
                doc_array = np.asarray(doc_ids)  # the literal encoding of `text`
            length = len(doc_ids)

        sample = None
        if rng.random() < self.fim_rate:
            if text is None:
                text = self.tokenizer.backend.decode(doc_ids, skip_special_tokens=False)
            sample = self._permute(text, rng, length, doc_array)
        if sample is None:  # no FIM, or the FIM sample could not be cut to length
            sample = doc_ids if doc_ids is not None else encode_literal(self.tokenizer, text)
        return self._fit(sample, length)

    def _permute(self, text: str, rng: np.random.Generator, length: int | None,
                 doc_ids: np.ndarray | None = None) -> list[int] | None:
        start, end = sorted(int(c) for c in rng.integers(0, len(text) + 1, size=2))
        if self.local is not None and doc_ids is not None:
            prefix, middle, suffix = self.local.parts(text, doc_ids, start, end)
        else:
            prefix, middle, suffix = (encode_literal(self.tokenizer, part)
                                      for part in (text[:start], text[start:end], text[end:]))
        mode = "spm" if rng.random() < self.fim_spm_rate else "psm"
        if length is not None:
            excess = len(prefix) + len(middle) + len(suffix) + PROMPT_SPECIAL_TOKENS - length
            if excess > 0:
                if len(suffix) <= excess:
                    return None
                suffix = suffix[:len(suffix) - excess]
        return layout(self.tokens, prefix, suffix, middle, mode)

    def _fit(self, ids: list[int], length: int | None) -> tuple[np.ndarray, np.ndarray]:
        out = np.asarray(ids, dtype=np.int32)
        real = len(out) if length is None else min(len(out), length)
        if length is not None:
            out = np.concatenate([out[:length], np.full(length - real, self.tokens.pad, np.int32)])
        mask = np.ones(len(out), dtype=bool)
        if self.mask_pad:
            mask[real:] = False
        return out, mask


def _as_generator(rng: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy Generator or an int seed; got {type(rng).__name__}")

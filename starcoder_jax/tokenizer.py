"""The StarCoder tokenizer through the `tokenizers` library.

StarCoder's tokenizer is byte-level BPE with digits split one by one and 19
special tokens at ids 0..18 (`<|endoftext|>` = 0, then the FIM tokens
`<fim_prefix>` 1, `<fim_middle>` 2, `<fim_suffix>` 3, `<fim_pad>` 4, ...).
Nothing is added when encoding: no BOS, no EOS. Special-token ids are always
looked up by name, never assumed from their position.
"""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer as _HFTokenizer

EOS = "<|endoftext|>"
FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD = "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"
FILE_SEP = "<file_sep>"


class Tokenizer:
    """A thin wrapper: encode / decode and special-token ids by name."""

    def __init__(self, tokenizer: _HFTokenizer, *, eos_token: str = EOS, source: str = ""):
        self.backend = tokenizer
        self.source = source
        self.eos_token = eos_token
        self.eos_id = self.token_id(eos_token)
        if self.eos_id is None:
            raise ValueError(f"tokenizer {source or ''} has no end-of-text token {eos_token!r}")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        path = os.fspath(path)
        try:
            backend = _HFTokenizer.from_file(path)
        except Exception as err:
            raise ValueError(f"{path}: not a readable tokenizer.json ({err})") from None
        eos = EOS
        config = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        if os.path.isfile(config):
            with open(config, encoding="utf-8") as f:
                named = json.load(f).get("eos_token")
            if isinstance(named, dict):
                named = named.get("content")
            if isinstance(named, str) and backend.token_to_id(named) is not None:
                eos = named
        return cls(backend, eos_token=eos, source=path)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        """The id of a (special) token by name, or None if the vocabulary lacks it."""
        return self.backend.token_to_id(token)

    def require(self, *tokens: str) -> list[int]:
        """Ids of tokens that must exist; ValueError naming the missing ones."""
        ids = [self.token_id(t) for t in tokens]
        missing = [t for t, i in zip(tokens, ids) if i is None]
        if missing:
            raise ValueError(f"tokenizer {self.source} lacks the tokens {', '.join(missing)}")
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings inside it are encoded as text too
        only if the tokenizer does not know them (so prefer building prompts from ids)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def special_ids(self) -> set[int]:
        return {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}


def load_tokenizer(name_or_path: str | os.PathLike) -> Tokenizer:
    """Loads `tokenizer.json` from a model directory, a file path, or a hub id."""
    path = os.fspath(name_or_path)
    if os.path.isfile(path):
        return Tokenizer.from_file(path)
    if not os.path.isdir(path):
        from starcoder_jax.model.pretrained import resolve_model_dir

        path = resolve_model_dir(path)
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no tokenizer.json")
    return Tokenizer.from_file(file)


# StarCoder's special tokens, in StarCoder's order (ids 0..18).
STARCODER_SPECIAL_TOKENS = (
    EOS, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD, "<filename>", "<gh_stars>",
    "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>",
    "<jupyter_code>", "<jupyter_output>", "<empty_output>", "<commit_before>", "<commit_msg>",
    "<commit_after>", "<reponame>",
)


def train_tokenizer(texts, out_dir: str, *, vocab_size: int = 8192, progress: bool = False,
                    special_tokens=STARCODER_SPECIAL_TOKENS) -> Tokenizer:
    """Trains a byte-level BPE the way StarCoder's was built and saves it to out_dir.

    Pipeline: digits split one by one, then GPT-2's byte-level pre-tokenizer
    without a prefix space; byte-level decoder; `special_tokens` at ids 0..
    (StarCoder's 19 by default). Writes tokenizer.json and tokenizer_config.json.
    """
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size must be at least {256 + len(special_tokens)} "
                         f"(bytes + special tokens), got {vocab_size}")
    backend = _HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    backend.train_from_iterator(texts, trainer=trainer)
    os.makedirs(out_dir, exist_ok=True)
    backend.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS,
                   "unk_token": EOS, "add_prefix_space": False, "model_max_length": 1_000_000,
                   "clean_up_tokenization_spaces": False}, f, indent=2)
    return Tokenizer(backend, source=os.path.join(out_dir, "tokenizer.json"))

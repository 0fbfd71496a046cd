"""Training data: source files or JSONL -> FIM-augmented, packed fixed-length sequences.

The batch at step s is a pure function of (seed, s): epoch e visits the
documents in the order permutation(seed, e), applies the FIM transform with
a generator seeded by (seed, e, document index), joins them with
<|endoftext|>, cuts the stream into sequences of seq_len + 1 tokens (the
+1 gives the target of the last input) and shuffles those sequences. The FIM transform keeps each
document's token count, so every epoch has the same number of sequences and
step s maps to (epoch, offset) by arithmetic. A resumed run therefore sees
exactly the batches it would have seen.

Written with numpy rather than a loader framework: the corpora this targets
fit in host memory, and the whole order is the two lines of arithmetic
above, which a framework would only hide.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from tqdm import tqdm

from starcoder_jax.inference.fim import FIMTransform, encode_literal
from starcoder_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it becomes sequences.

    paths: directories (searched recursively for `extensions`), glob
      patterns, single files, or .jsonl / .jsonl.gz files (one document per
      line in `text_field`).
    eval_fraction: share of documents held out, chosen by a hash of the
      document's name, so the split does not depend on the file order; above
      0, at least one document is held out (`split_documents`).
    separate_documents: a token attends only to earlier tokens of its own
      document, and positions restart at 0 with each document of a packed
      sequence (segment ids from the <|endoftext|> that ends each document).
      Off by default: StarCoder was trained on packed sequences that attend
      across documents.
    """

    paths: tuple[str, ...] = ()
    extensions: tuple[str, ...] = (".py",)
    text_field: str = "text"
    seq_len: int = 512
    fim_rate: float = 0.5
    fim_spm_rate: float = 0.5
    mask_fim_pad: bool = True
    eval_fraction: float = 0.01
    max_documents: int | None = None
    max_document_chars: int = 200_000
    separate_documents: bool = False
    # Folder names never entered: installed third-party packages are not part
    # of a standard-library corpus (and differ from machine to machine).
    exclude_dirs: tuple[str, ...] = ("site-packages", "dist-packages", "__pycache__", ".git")

    def __post_init__(self):
        if self.seq_len < 1:
            raise ValueError(f"data.seq_len must be >= 1, got {self.seq_len}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")


def expand_path(path: str) -> str:
    """`~` and `{stdlib}` (this Python's standard library folder) in a data path."""
    if "{stdlib}" in path:
        import sysconfig

        path = path.replace("{stdlib}", sysconfig.get_paths()["stdlib"])
    return os.path.expanduser(path)


def _expand(path: str, extensions: Sequence[str], exclude_dirs: Sequence[str] = ()
            ) -> list[tuple[str, str]]:
    """(file, name) pairs; names are relative to a directory argument, so that the
    held-out split is the same on every machine."""
    if os.path.isdir(path):
        found = []
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d not in exclude_dirs)
            found += [os.path.join(root, f) for f in sorted(files) if f.endswith(tuple(extensions))]
        return [(f, os.path.relpath(f, path)) for f in found]
    if os.path.isfile(path):
        return [(path, os.path.basename(path))]
    return [(f, f) for f in sorted(glob.glob(path, recursive=True))]


def _read_jsonl(file: str, field: str):
    import gzip

    opener = gzip.open if file.endswith(".gz") else open
    with opener(file, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            record = json.loads(line)
            if field not in record:
                raise ValueError(f"{file}:{n + 1}: no field {field!r} (fields: {sorted(record)})")
            yield f"{file}:{n + 1}", record[field]


def collect_documents(config: DataConfig) -> list[tuple[str, str]]:
    """(name, text) of every document, in a deterministic order."""
    if not config.paths:
        raise ValueError("data.paths is empty: give directories, globs or .jsonl files")
    docs = []
    for path in config.paths:
        files = _expand(expand_path(path), config.extensions, config.exclude_dirs)
        if not files:
            raise ValueError(f"data path {path!r} matches no files (extensions {list(config.extensions)})")
        for file, name in files:
            if file.endswith((".jsonl", ".jsonl.gz")):
                docs += list(_read_jsonl(file, config.text_field))
                continue
            try:
                with open(file, encoding="utf-8") as f:
                    text = f.read()
            except UnicodeDecodeError:
                continue  # not UTF-8 text: not a training document
            docs.append((name, text))
    docs = [(name, text[:config.max_document_chars]) for name, text in docs if text.strip()]
    if config.max_documents:
        docs = docs[:config.max_documents]
    if not docs:
        raise ValueError(f"data paths {list(config.paths)} hold no non-empty UTF-8 documents")
    return docs


def _hash_fraction(name: str) -> float:
    """The first 8 bytes of sha1(name) as a fraction in [0, 1)."""
    return int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big") / 2**64


def is_held_out(name: str, fraction: float) -> bool:
    """A stable, order-independent split: held out when the name's hash fraction is below `fraction`."""
    return _hash_fraction(name) < fraction


def split_documents(docs, fraction: float):
    """(train, held-out) documents: held out by `is_held_out`.

    With fraction > 0 and two or more documents, at least one is held out:
    when the hash picks none (a small corpus), the one with the lowest hash
    fraction, the first the split would take as the fraction grew. With one
    document there is nothing to hold out, which is an error: the config
    asked for a held-out loss that cannot exist.
    """
    if fraction > 0 and len(docs) < 2:
        raise ValueError(f"data.eval_fraction is {fraction} but the data holds {len(docs)} document; "
                         "a held-out loss needs at least two documents (or set data.eval_fraction=0)")
    held_names = {d[0] for d in docs if is_held_out(d[0], fraction)}
    if fraction > 0 and not held_names:
        held_names = {min((d[0] for d in docs), key=_hash_fraction)}
    train = [d for d in docs if d[0] not in held_names]
    held = [d for d in docs if d[0] in held_names]
    if not train:
        raise ValueError("every document was held out; lower data.eval_fraction")
    return train, held


class DataSource(Protocol):
    """Where the training loop takes its batches from.

    `batch(step)` -> (ids [B, T + 1] int32, mask [B, T + 1] bool): the B
    sequences of global step `step` (T + 1 tokens: the last input's target
    included; mask False on tokens that are not targets, e.g. padding). It
    must be a pure function of the step (and the source's own seed): a
    resumed run asks for the steps it has not done yet and must get the
    batches the uninterrupted run got.
    """

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]: ...


class PackedDataset:
    """Fixed-length sequences of a document set, a pure function of (seed, epoch); a DataSource.

    `batch(step)` -> (ids [batch_size, seq_len + 1] int32, mask [batch_size, seq_len + 1] bool);
    the mask is False on <fim_pad> padding (when masked) and True elsewhere.
    """

    def __init__(self, docs: list[tuple[str, str]], tokenizer: Tokenizer, config: DataConfig, *,
                 batch_size: int, seed: int = 0, shuffle: bool = True, fim: bool = True,
                 progress: bool | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.config, self.batch_size, self.seed, self.shuffle = config, batch_size, seed, shuffle
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_id
        self.names = [name for name, _ in docs]
        texts = [text for _, text in docs]
        self.doc_ids = [np.asarray(encode_literal(tokenizer, t), np.int32)
                        for t in tqdm(texts, desc="tokenizing", unit="doc",
                                      disable=(not progress) if progress is not None else None)]
        self.fim = FIMTransform(tokenizer, config.fim_rate if fim else 0.0, config.fim_spm_rate,
                                truncate_or_pad=True, mask_pad=config.mask_fim_pad)
        self.tokens_per_epoch = sum(len(d) + 1 for d in self.doc_ids)
        self.sequences_per_epoch = self.tokens_per_epoch // (config.seq_len + 1)
        if self.sequences_per_epoch == 0:
            raise ValueError(
                f"the documents hold {self.tokens_per_epoch} tokens, fewer than one sequence of "
                f"{config.seq_len + 1}; add data or lower data.seq_len")
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """All sequences of epoch e: ids and mask [sequences_per_epoch, seq_len + 1]."""
        if self._epoch_cache is not None and self._epoch_cache[0] == e:
            return self._epoch_cache[1:]
        n = len(self.doc_ids)
        order = (np.random.default_rng([self.seed, e]).permutation(n) if self.shuffle
                 else np.arange(n))
        ids_parts, mask_parts = [], []
        for i in order:
            ids, mask = self.fim(self.doc_ids[i], np.random.default_rng([self.seed, e, int(i)]))
            ids_parts += [ids, np.asarray([self.eos], np.int32)]
            mask_parts += [mask, np.ones(1, bool)]
        width = self.config.seq_len + 1
        usable = self.sequences_per_epoch * width
        ids = np.concatenate(ids_parts)[:usable].reshape(-1, width)
        mask = np.concatenate(mask_parts)[:usable].reshape(-1, width)
        if self.shuffle:
            # Consecutive sequences mostly come from one long file: without this
            # a batch would often be a single document.
            rows = np.random.default_rng([self.seed, e, 1]).permutation(len(ids))
            ids, mask = ids[rows], mask[rows]
        self._epoch_cache = (e, ids, mask)
        return ids, mask

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The batch of global step `step` (sequences step*B .. step*B + B - 1, across epochs)."""
        rows_ids, rows_mask = [], []
        for k in range(step * self.batch_size, (step + 1) * self.batch_size):
            e, j = divmod(k, self.sequences_per_epoch)
            ids, mask = self.epoch(e)
            rows_ids.append(ids[j])
            rows_mask.append(mask[j])
        return np.stack(rows_ids), np.stack(rows_mask)


def eval_sequences(dataset: PackedDataset, max_sequences: int) -> tuple[np.ndarray, np.ndarray]:
    """The first sequences of epoch 0 of a held-out set (no FIM for a plain LM loss)."""
    ids, mask = dataset.epoch(0)
    return ids[:max_sequences], mask[:max_sequences]

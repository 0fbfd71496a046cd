"""Training data: source files or JSONL -> FIM-augmented, packed fixed-length sequences.

The batch at step s is a pure function of (seed, s): epoch e visits the
documents in the order permutation(seed, e), applies the FIM transform with
a generator seeded by (seed, e, document index), joins them with
<|endoftext|>, cuts the stream into sequences of seq_len + 1 tokens (the
+1 gives the target of the last input) and shuffles those sequences. The FIM transform keeps each
document's token count, so every epoch has the same number of sequences and
step s maps to (epoch, offset) by arithmetic. A resumed run therefore sees
exactly the batches it would have seen.

The sequences are computed row by row (PackedSequences) from the documents'
token counts, over any document set: token arrays in memory (source files
tokenized at start-up, for small corpora) or a token store on disk
(training.store, written once by `starcoder-jax prepare-data`). Both go
through the same FIM and packing code, so they give the same batches for the
same documents. Written with numpy rather than a loader framework: the whole
order is the arithmetic above (training.store says what grain would cost).
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

    store: a token store directory (`starcoder-jax prepare-data`, training.store)
      to read instead of `paths`; its held-out split replaces eval_fraction.
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
    loader_workers: processes that compute the training rows (ParallelRows),
      the next step's ahead; 0: the training process computes them.
    """

    paths: tuple[str, ...] = ()
    store: str | None = None
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
    loader_workers: int = 0
    # Folder names never entered: installed third-party packages are not part
    # of a standard-library corpus (and differ from machine to machine).
    exclude_dirs: tuple[str, ...] = ("site-packages", "dist-packages", "__pycache__", ".git")

    def __post_init__(self):
        if self.seq_len < 1:
            raise ValueError(f"data.seq_len must be >= 1, got {self.seq_len}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.store and self.paths:
            raise ValueError("data.store and data.paths are both set: a run reads a token store or "
                             "source files, not both")


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
        raise ValueError("data.paths is empty: give directories, globs or .jsonl files, or a token store in data.store")
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


class DocumentTokens(Protocol):
    """A document set as token ids: what packing reads (in memory, or a token store on disk).

    lengths: [n] int64 token counts; tokens(i) -> [lengths[i]] ids of document i.
    """

    lengths: np.ndarray

    def tokens(self, i: int) -> np.ndarray: ...


class InMemoryDocuments:
    """DocumentTokens of token arrays held in a list."""

    def __init__(self, doc_ids: list[np.ndarray]):
        self.doc_ids = doc_ids
        self.lengths = np.asarray([len(d) for d in doc_ids], np.int64)

    def tokens(self, i: int) -> np.ndarray:
        return self.doc_ids[i]


class PackedSequences:
    """Fixed-length sequences of a document set, a pure function of (seed, epoch); a DataSource.

    The sequences of the module docstring, computed row by row: the document
    order of an epoch gives each document's place in the epoch's token stream
    (a cumulative sum of the token counts, which FIM keeps), so row k needs
    only the documents it overlaps. A process reads only its own rows
    (`rows`), and never the whole epoch.

    `batch(step)` -> (ids [batch_size, seq_len + 1] int32, mask [batch_size, seq_len + 1] bool);
    the mask is False on <fim_pad> padding (when masked) and True elsewhere.
    """

    def __init__(self, docs: DocumentTokens, tokenizer: Tokenizer, config: DataConfig, *,
                 batch_size: int, seed: int = 0, shuffle: bool = True, fim: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.config, self.batch_size, self.seed, self.shuffle = config, batch_size, seed, shuffle
        self.tokenizer, self.docs = tokenizer, docs
        self.eos = tokenizer.eos_id
        self.fim = FIMTransform(tokenizer, config.fim_rate if fim else 0.0, config.fim_spm_rate,
                                truncate_or_pad=True, mask_pad=config.mask_fim_pad, ids_are_encodings=True)
        self.width = config.seq_len + 1
        self.tokens_per_epoch = int(np.sum(docs.lengths + 1))
        self.sequences_per_epoch = self.tokens_per_epoch // self.width
        if self.sequences_per_epoch == 0:
            raise ValueError(
                f"the documents hold {self.tokens_per_epoch} tokens, fewer than one sequence of "
                f"{self.width}; add data or lower data.seq_len")
        self._plans: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
        self._documents: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def _plan(self, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Epoch e's document order, the stream end of each placed document (its
        <|endoftext|> included), and the row shuffle (None: unshuffled)."""
        if e not in self._plans:
            n = len(self.docs.lengths)
            order = (np.random.default_rng([self.seed, e]).permutation(n) if self.shuffle
                     else np.arange(n))
            ends = np.cumsum(self.docs.lengths[order] + 1)
            # Consecutive sequences mostly come from one long file: without the row
            # shuffle a batch would often be a single document.
            rows = (np.random.default_rng([self.seed, e, 1]).permutation(self.sequences_per_epoch)
                    if self.shuffle else None)
            if len(self._plans) >= 2:  # a batch spans at most two epochs
                self._plans.pop(min(self._plans))
            self._plans[e] = (order, ends, rows)
        return self._plans[e]

    def _document(self, e: int, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Document i as epoch e feeds it: FIM-transformed (seeded by (seed, e, i)), <|endoftext|> after."""
        key = (e, i)
        if key not in self._documents:
            ids, mask = self.fim(self.docs.tokens(i), np.random.default_rng([self.seed, e, i]))
            if len(self._documents) >= 16:  # the documents a row shares with its neighbours
                self._documents.pop(next(iter(self._documents)))
            self._documents[key] = (np.append(ids, np.int32(self.eos)), np.append(mask, True))
        return self._documents[key]

    def sequence(self, e: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens j*W .. (j+1)*W - 1 of epoch e's stream (W = seq_len + 1): ids, mask [W]."""
        order, ends, _ = self._plan(e)
        lo, hi = j * self.width, (j + 1) * self.width
        p = int(np.searchsorted(ends, lo, side="right"))
        start = int(ends[p - 1]) if p else 0
        ids, mask = [], []
        while start < hi:
            doc_ids, doc_mask = self._document(e, int(order[p]))
            cut = slice(max(lo - start, 0), hi - start)
            ids.append(doc_ids[cut])
            mask.append(doc_mask[cut])
            start = int(ends[p])
            p += 1
        return np.concatenate(ids), np.concatenate(mask)

    def row(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Sequence k of the run (across epochs): ids, mask [W]."""
        e, r = divmod(k, self.sequences_per_epoch)
        rows = self._plan(e)[2]
        return self.sequence(e, int(rows[r]) if rows is not None else r)

    def rows(self, step: int, indices) -> tuple[np.ndarray, np.ndarray]:
        """Rows `indices` (positions in the batch of global step `step`): ids, mask [len(indices), W]."""
        got = [self.row(step * self.batch_size + int(i)) for i in indices]
        if not got:
            return np.zeros((0, self.width), np.int32), np.zeros((0, self.width), bool)
        return np.stack([g[0] for g in got]), np.stack([g[1] for g in got])

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The batch of global step `step` (sequences step*B .. step*B + B - 1, across epochs)."""
        return self.rows(step, range(self.batch_size))

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """All sequences of epoch e, in row order: ids and mask [sequences_per_epoch, W]."""
        rows = [self.row(e * self.sequences_per_epoch + r) for r in range(self.sequences_per_epoch)]
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


    def __getstate__(self):  # what a loader worker needs (ParallelRows): no caches
        return {**self.__dict__, "_plans": {}, "_documents": {}}


class ParallelRows:
    """A PackedSequences whose rows are computed in `workers` processes: the rows of a
    step split between them, and the same rows of the next step computed ahead while
    the caller trains on this one. A DataSource, with the same batches as `source`.

    Processes, not threads: the FIM transform is Python and `tokenizers` calls that
    hold the GIL. Spawned, not forked (the parent runs JAX's threads); each worker
    gets a pickled copy of `source` (a token store's split reopens its memmap).
    """

    def __init__(self, source: PackedSequences, workers: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        if workers < 1:
            raise ValueError(f"data.loader_workers must be >= 1 for a worker pool, got {workers}")
        self.source, self.workers, self.batch_size = source, workers, source.batch_size
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_start_worker, initargs=(source,))
        self._ahead: dict[tuple, list] = {}

    def _submit(self, step: int, indices: tuple[int, ...]) -> list:
        chunks = np.array_split(np.asarray(indices, np.int64), min(self.workers, len(indices)))
        return [self.pool.submit(_worker_rows, step, chunk) for chunk in chunks]

    def rows(self, step: int, indices) -> tuple[np.ndarray, np.ndarray]:
        key = (step, tuple(int(i) for i in indices))
        if not key[1]:
            return self.source.rows(step, ())
        futures = self._ahead.pop(key, None) or self._submit(*key)
        for stale in self._ahead.values():
            for f in stale:
                f.cancel()
        self._ahead = {(step + 1, key[1]): self._submit(step + 1, key[1])}
        parts = [f.result() for f in futures]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        return self.rows(step, range(self.batch_size))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


_WORKER_SOURCE: PackedSequences | None = None


def _start_worker(source: PackedSequences) -> None:
    global _WORKER_SOURCE
    _WORKER_SOURCE = source


def _worker_rows(step: int, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _WORKER_SOURCE.rows(step, indices)


class PackedDataset(PackedSequences):
    """PackedSequences of (name, text) documents, tokenized in memory (small corpora)."""

    def __init__(self, docs: list[tuple[str, str]], tokenizer: Tokenizer, config: DataConfig, *,
                 batch_size: int, seed: int = 0, shuffle: bool = True, fim: bool = True,
                 progress: bool | None = None):
        self.names = [name for name, _ in docs]
        super().__init__(tokenize_documents(docs, tokenizer, progress), tokenizer, config,
                         batch_size=batch_size, seed=seed, shuffle=shuffle, fim=fim)


def tokenize_documents(docs: list[tuple[str, str]], tokenizer: Tokenizer,
                       progress: bool | None = None) -> InMemoryDocuments:
    """The token ids of (name, text) documents, each encoded literally (inference.fim.encode_literal)."""
    return InMemoryDocuments([np.asarray(encode_literal(tokenizer, text), np.int32)
                              for _, text in tqdm(docs, desc="tokenizing", unit="doc",
                                                  disable=(not progress) if progress is not None else None)])


def eval_sequences(dataset: PackedSequences, max_sequences: int) -> tuple[np.ndarray, np.ndarray]:
    """The first sequences of epoch 0 of a held-out set (no FIM for a plain LM loss)."""
    got = [dataset.sequence(0, j) for j in range(min(max_sequences, dataset.sequences_per_epoch))]
    return np.stack([g[0] for g in got]), np.stack([g[1] for g in got])

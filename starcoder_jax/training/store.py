"""A pre-tokenized token store: `prepare-data` writes it once, every host memory-maps it.

Layout of a store directory:

    tokens.bin     every document's token ids, back to back (uint16 when the
                   vocabulary fits, else uint32), no separators
    offsets.npy    [n + 1] int64: document i is tokens[offsets[i]:offsets[i + 1]]
    held_out.npy   [n] bool: the held-out split (data.is_held_out on the document's name)
    manifest.json  format version, tokenizer hash, sources, split rule, counts

Training reads it through `StoreDocuments` (a data.DocumentTokens), so the
store's batches are data.PackedSequences', the same as the in-memory path's
for the same documents: one FIM and packing implementation.

numpy.memmap rather than grain: a row of the packed stream is index
arithmetic over the offsets (data.PackedSequences), a pure function of
(seed, step) that needs no iterator state in the checkpoint and gives the
same batch for any process count; grain's iterator state would have to be
saved with the checkpoint and re-sharded when the process count changes.
Measured on the 1 GB benchmark store (BENCHMARKS.md, "Token store"): our
arithmetic finds a document's slice in 4.4 us, the same reads through a
grain MapDataset took 654 us each, and both are small beside the ~60 ms of
FIM and packing per 8 x 2049 batch (271k tokens/s in one process). Loader
parallelism comes from processes that each reopen the memmap
(data.ParallelRows).

Writing (`prepare_store`) streams documents in batches of about
`batch_bytes` of text through `tokenizers`' encode_batch (Rust threads), so
memory holds one batch, not the corpus. It writes into OUT.partial and
renames it to OUT when complete, so a store directory is never half-written;
a `progress.json` journal there lets an interrupted run continue where its
last batch ended (the same arguments only).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence

import numpy as np

from starcoder_jax.tokenizer import Tokenizer
from starcoder_jax.training.data import _expand, _hash_fraction, expand_path

FORMAT_VERSION = 1
MANIFEST, TOKENS, OFFSETS, HELD_OUT, JOURNAL = "manifest.json", "tokens.bin", "offsets.npy", "held_out.npy", \
    "progress.json"
FORMATS = ("auto", "files", "jsonl", "parquet")
SKIP_REASONS = ("undecodable", "bad_json", "missing_field", "empty")
SPLIT_RULE = ("held out when the first 8 bytes of sha1(name), as a fraction of 2**64, are below "
              "eval_fraction; with none held out and eval_fraction > 0, the document with the lowest "
              "fraction. Names: a file's path relative to its directory argument, FILE:LINE for JSONL, "
              "FILE:ROW for Parquet (1-based)")


class StoreError(ValueError):
    """A store that cannot be used or written (named, with what was expected and what came)."""


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """sha256 of the tokenizer's serialized form and end-of-text token: a store's
    ids mean something only under the tokenizer that wrote them."""
    h = hashlib.sha256(tokenizer.backend.to_str().encode("utf-8"))
    h.update(tokenizer.eos_token.encode("utf-8"))
    return h.hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


# ---------------------------------------------------------------------------
# Reading sources
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """Which documents prepare-data reads (the settings a resumed run must share)."""

    paths: tuple[str, ...]
    format: str = "auto"
    text_field: str = "content"
    extensions: tuple[str, ...] = (".py",)
    exclude_dirs: tuple[str, ...] = ("site-packages", "dist-packages", "__pycache__", ".git")
    max_document_chars: int = 200_000

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not self.paths:
            raise ValueError("no data paths: give files, directories or globs (--data)")


def file_format(file: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if file.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return "jsonl"
    if file.endswith(".parquet"):
        return "parquet"
    return "files"


def source_files(spec: SourceSpec) -> list[tuple[str, str]]:
    """(file, name) of every source file, in order; each path must match something."""
    extensions = {"jsonl": (".jsonl", ".jsonl.gz", ".ndjson"), "parquet": (".parquet",)}.get(
        spec.format, spec.extensions)
    files = []
    for path in spec.paths:
        found = _expand(expand_path(path), extensions, spec.exclude_dirs)
        if not found:
            raise FileNotFoundError(f"data path {path!r} matches no files (extensions {list(extensions)})")
        files += found
    return files


class _Rows:
    """Counts skipped rows, or raises, as on_error says."""

    def __init__(self, on_error: str, skipped: dict):
        if on_error not in ("skip", "fail"):
            raise ValueError(f"--on-error must be skip or fail, got {on_error!r}")
        self.on_error, self.skipped = on_error, skipped

    def bad(self, reason: str, where: str, detail: str, count: int = 1) -> None:
        if self.on_error == "fail":
            raise StoreError(f"{where}: {detail} (--on-error skip counts such rows in the manifest instead)")
        self.skipped[reason] = self.skipped.get(reason, 0) + count


def _read_file(file: str, name: str, rows: _Rows):
    with open(file, "rb") as f:
        raw = f.read()
    try:
        yield 1, name, raw.decode("utf-8"), len(raw)
    except UnicodeDecodeError as err:
        rows.bad("undecodable", file, f"not UTF-8 text (byte {err.start})")
        yield 1, None, None, len(raw)


def _read_jsonl(file: str, field: str, rows: _Rows, start: int):
    raw = open(file, "rb")
    stream = gzip.GzipFile(fileobj=raw) if file.endswith(".gz") else raw
    with raw, stream:
        for n, line in enumerate(stream):
            position = raw.tell()
            if n < start:
                continue
            where = f"{file}:{n + 1}"
            text = None
            if line.strip():
                try:
                    record = json.loads(line)
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    rows.bad("bad_json", where, f"not a JSON object ({err})")
                else:
                    text = record.get(field) if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                        rows.bad("missing_field", where, f"no text field {field!r} (found: {fields})")
            yield n + 1, where if text is not None else None, text, position


def _read_parquet(file: str, field: str, rows: _Rows, start: int):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading Parquet needs pyarrow: pip install 'starcoder-jax[data]'") from None
    pf = pq.ParquetFile(file)
    total, size = pf.metadata.num_rows, os.path.getsize(file)
    if field not in pf.schema_arrow.names:
        rows.bad("missing_field", file, f"no column {field!r} (columns: {pf.schema_arrow.names})", total)
        yield total, None, None, size
        return
    n = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[field]):
        values = batch.column(0).to_pylist()
        for text in values:
            n += 1
            if n <= start:
                continue
            where = f"{file}:{n}"
            if not isinstance(text, str):
                rows.bad("missing_field", where, f"column {field!r} is {text!r}, not text")
                where = None
            yield n, where, text if where else None, size * n // max(total, 1)


def read_documents(spec: SourceSpec, files: Sequence[tuple[str, str]], rows: _Rows,
                   start: tuple[int, int] = (0, 0)) -> Iterator[tuple[int, int, str | None, str | None, int]]:
    """(file index, row, name, text, bytes of the file read so far) of each row from
    `start` = (file index, rows of it already done). name and text are None for a
    skipped row; a text is cut to max_document_chars, and whitespace-only text is
    skipped (counted as empty), as data.collect_documents does."""
    for k in range(start[0], len(files)):
        file, name = files[k]
        first = start[1] if k == start[0] else 0
        fmt = file_format(file, spec.format)
        if fmt == "files":
            it = _read_file(file, name, rows) if first == 0 else iter(())
        elif fmt == "jsonl":
            it = _read_jsonl(file, spec.text_field, rows, first)
        else:
            it = _read_parquet(file, spec.text_field, rows, first)
        for row, doc_name, text, position in it:
            if text is not None and not text.strip():
                rows.skipped["empty"] = rows.skipped.get("empty", 0) + 1
                doc_name = text = None
            if text is not None:
                text = text[:spec.max_document_chars]
            yield k, row, doc_name, text, position


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------

def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: str, value: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _Journal:
    """Where an unfinished store stands: documents and tokens written, the next row to read."""

    def __init__(self, partial: str, plan: dict, dtype: np.dtype):
        self.partial, self.plan, self.dtype = partial, plan, dtype
        self.state = {"plan": plan, "next": [0, 0], "documents": 0, "tokens": 0, "skipped": {},
                      "lowest": None, "held_documents": 0}
        path = os.path.join(partial, JOURNAL)
        if os.path.isdir(partial):
            if not os.path.isfile(path):
                raise StoreError(f"{partial} exists but holds no {JOURNAL}: not an interrupted prepare-data "
                                 "run; delete it")
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            if saved["plan"] != plan:
                differ = sorted(k for k in set(plan) | set(saved["plan"]) if plan.get(k) != saved["plan"].get(k))
                raise StoreError(f"{partial} holds an interrupted prepare-data run with other settings "
                                 f"({', '.join(differ)} differ); rerun with its arguments to finish it, or "
                                 "delete it to start over")
            self.state = saved
            # Drop what was written after the journal's last entry.
            with open(os.path.join(partial, TOKENS), "r+b") as f:
                f.truncate(saved["tokens"] * dtype.itemsize)
            for name, size in (("lengths.bin", 8), ("held.bin", 1)):
                with open(os.path.join(partial, name), "r+b") as f:
                    f.truncate(saved["documents"] * size)
        else:
            os.makedirs(partial)
            for name in (TOKENS, "lengths.bin", "held.bin"):
                open(os.path.join(partial, name), "wb").close()
            self.save()

    @property
    def resumed(self) -> bool:
        return self.state["documents"] > 0 or self.state["next"] != [0, 0]

    def save(self) -> None:
        _write_json(os.path.join(self.partial, JOURNAL), self.state)


def prepare_store(spec: SourceSpec, tokenizer: Tokenizer, out: str, *, eval_fraction: float = 0.0,
                  on_error: str = "skip", workers: int | None = None, batch_bytes: int = 4 << 20,
                  progress: bool | None = None, stop_after_batches: int | None = None) -> dict:
    """Tokenizes `spec`'s documents into the store `out`; returns its manifest.

    workers: threads of `tokenizers`' encode_batch (RAYON_NUM_THREADS, read
    when `tokenizers` first runs in parallel; None: every core).
    stop_after_batches: end after that many batches, as an interrupted run
    would (for tests); the run can then be resumed.
    """
    if workers is not None:
        os.environ.setdefault("RAYON_NUM_THREADS", str(workers))
    from tqdm import tqdm

    from starcoder_jax.inference.fim import literal_backend

    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise StoreError(f"{out} already exists; delete it or choose another --out")
    files = source_files(spec)
    dtype = token_dtype(tokenizer.vocab_size)
    plan = {"sources": dataclasses.asdict(spec), "files": [f for f, _ in files], "eval_fraction": eval_fraction,
            "tokenizer": tokenizer_hash(tokenizer), "dtype": dtype.name, "on_error": on_error,
            "format_version": FORMAT_VERSION}
    plan = json.loads(json.dumps(plan))
    partial = out + ".partial"
    journal = _Journal(partial, plan, dtype)
    state = journal.state
    rows = _Rows(on_error, state["skipped"])
    backend = literal_backend(tokenizer)
    sizes = [os.path.getsize(f) for f, _ in files]
    done_bytes = sum(sizes[:state["next"][0]])
    bar = tqdm(total=sum(sizes), initial=done_bytes, unit="B", unit_scale=True, desc="prepare-data",
               disable=(not progress) if progress is not None else None)
    start_time, new_tokens = time.perf_counter(), 0
    paths = {name: os.path.join(partial, name) for name in (TOKENS, "lengths.bin", "held.bin")}
    handles = {name: open(path, "ab") for name, path in paths.items()}
    batches = 0
    try:
        documents = read_documents(spec, files, rows, tuple(state["next"]))
        while True:
            names, texts, held, size, position = [], [], [], 0, None
            for k, row, name, text, file_bytes in documents:
                position = (k, row, file_bytes)
                if text is None:
                    continue
                names.append(name)
                texts.append(text)
                size += len(text)
                if size >= batch_bytes:
                    break
            if position is None:
                break
            encoded = backend.encode_batch_fast(texts, add_special_tokens=False) if texts else []
            lengths = np.fromiter((len(e.ids) for e in encoded), np.int64, len(encoded))
            tokens = np.concatenate([np.asarray(e.ids, dtype) for e in encoded] or [np.zeros(0, dtype)])
            for i, name in enumerate(names):
                fraction = _hash_fraction(name)
                held.append(fraction < eval_fraction)
                lowest = state["lowest"]
                if lowest is None or fraction < lowest[0]:
                    state["lowest"] = [fraction, state["documents"] + i]
            handles[TOKENS].write(tokens.tobytes())
            handles["lengths.bin"].write(lengths.tobytes())
            handles["held.bin"].write(np.asarray(held, np.uint8).tobytes())
            for f in handles.values():
                f.flush()
                os.fsync(f.fileno())
            k, row, file_bytes = position
            state["documents"] += len(names)
            state["tokens"] += int(lengths.sum())
            state["held_documents"] += int(sum(held))
            state["next"] = [k, row]
            journal.save()
            new_tokens += int(lengths.sum())
            bar.update(sum(sizes[:k]) + file_bytes - done_bytes)
            done_bytes = sum(sizes[:k]) + file_bytes
            bar.set_postfix(tokens_s=f"{new_tokens / (time.perf_counter() - start_time):.3g}",
                            docs=state["documents"])
            batches += 1
            if stop_after_batches is not None and batches >= stop_after_batches:
                return {}
    except StoreError:  # bad input under --on-error fail: nothing to resume
        shutil.rmtree(partial)
        raise
    finally:
        for f in handles.values():
            f.close()
        bar.close()
    return _finish(journal, out, spec, tokenizer, eval_fraction, len(files))


def _finish(journal: _Journal, out: str, spec: SourceSpec, tokenizer: Tokenizer, eval_fraction: float,
            n_files: int) -> dict:
    """Offsets, split and manifest from the written documents; the partial directory renamed to `out`."""
    state, partial = journal.state, journal.partial
    n = state["documents"]
    skipped = {reason: state["skipped"].get(reason, 0) for reason in SKIP_REASONS}
    if n == 0:
        shutil.rmtree(partial)
        counted = ", ".join(f"{v} {k}" for k, v in skipped.items() if v) or "none"
        raise StoreError(f"the data paths {list(spec.paths)} hold no non-empty documents "
                         f"({n_files} files read; rows skipped: {counted}); nothing was written")
    lengths = np.fromfile(os.path.join(partial, "lengths.bin"), np.int64)
    held = np.fromfile(os.path.join(partial, "held.bin"), np.uint8).astype(bool)
    assert len(lengths) == len(held) == n and lengths.sum() == state["tokens"]
    if eval_fraction > 0:
        if n < 2:
            shutil.rmtree(partial)
            raise StoreError(f"--eval-fraction is {eval_fraction} but the data holds {n} document; a "
                             "held-out split needs at least two (or --eval-fraction 0)")
        if not held.any():  # a small corpus: data.split_documents' rule
            held[state["lowest"][1]] = True
        if held.all():
            shutil.rmtree(partial)
            raise StoreError("every document was held out; lower --eval-fraction")
    np.save(os.path.join(partial, OFFSETS), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    np.save(os.path.join(partial, HELD_OUT), held)
    _fsync(os.path.join(partial, TOKENS))

    def counts(select):
        return int(select.sum()), int((lengths[select] + 1).sum())

    (d_train, t_train), (d_held, t_held) = counts(~held), counts(held)
    manifest = {
        "format_version": FORMAT_VERSION,
        "tokenizer": {"sha256": tokenizer_hash(tokenizer), "vocab_size": tokenizer.vocab_size,
                      "eos_token": tokenizer.eos_token, "source": tokenizer.source},
        "dtype": journal.dtype.name,
        "sources": {**dataclasses.asdict(spec), "files": n_files},
        "split": {"eval_fraction": eval_fraction, "rule": SPLIT_RULE},
        # tokens: each document's tokens plus the <|endoftext|> that ends it in the packed stream
        "documents": {"total": n, "train": d_train, "held_out": d_held},
        "tokens": {"total": t_train + t_held, "train": t_train, "held_out": t_held},
        "stored_tokens": state["tokens"],
        "skipped": skipped,
    }
    _write_json(os.path.join(partial, MANIFEST), manifest)
    for name in (JOURNAL, "lengths.bin", "held.bin"):
        os.remove(os.path.join(partial, name))
    os.rename(partial, out)
    return manifest


# ---------------------------------------------------------------------------
# Reading a store
# ---------------------------------------------------------------------------

class StoreDocuments:
    """One split of a store as data.DocumentTokens: memory-mapped, read on demand."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, select: np.ndarray,
                 where: tuple[str, bool] | None = None):
        self._tokens, self._where = tokens, where
        self.index = np.flatnonzero(select)  # the store's document ids of this split, in order
        self.starts = offsets[:-1][self.index]
        self.lengths = offsets[1:][self.index] - self.starts

    def __reduce__(self):  # a loader worker reopens the store rather than copying it
        return _open_split, self._where

    def tokens(self, i: int) -> np.ndarray:
        start = int(self.starts[i])
        return self._tokens[start:start + int(self.lengths[i])]


class TokenStore:
    """An opened store directory (checked: manifest, format version, file sizes)."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        manifest = os.path.join(self.path, MANIFEST)
        if not os.path.isfile(manifest):
            partial = os.path.isdir(self.path + ".partial")
            raise StoreError(f"data.store {path!r} is not a token store (no {MANIFEST})" +
                             ("; its prepare-data run did not finish: run it again to resume" if partial else
                              "; write one with `starcoder-jax prepare-data`"))
        with open(manifest, encoding="utf-8") as f:
            self.manifest = json.load(f)
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(f"data.store {path!r} has format version {version}; this version reads "
                             f"{FORMAT_VERSION}: prepare it again")
        self.dtype = np.dtype(self.manifest["dtype"])
        stored = self.manifest["stored_tokens"]
        file = os.path.join(self.path, TOKENS)
        size = os.path.getsize(file) if os.path.isfile(file) else None
        if size != stored * self.dtype.itemsize:
            raise StoreError(f"data.store {path!r}: {TOKENS} holds {size} bytes but the manifest's "
                             f"{stored} {self.dtype.name} tokens need {stored * self.dtype.itemsize}: the "
                             "file is truncated or from another store; prepare the store again")
        self.offsets = np.load(os.path.join(self.path, OFFSETS), mmap_mode="r")
        self.held_out = np.load(os.path.join(self.path, HELD_OUT))
        n = self.manifest["documents"]["total"]
        if len(self.offsets) != n + 1 or self.offsets[-1] != stored or len(self.held_out) != n:
            raise StoreError(f"data.store {path!r}: {OFFSETS} / {HELD_OUT} do not match the manifest's "
                             f"{n} documents and {stored} tokens; prepare the store again")
        self.tokens = (np.memmap(file, self.dtype, mode="r") if stored else np.zeros(0, self.dtype))
        self.offsets = np.asarray(self.offsets)

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """StoreError unless the store was written with this tokenizer."""
        want = self.manifest["tokenizer"]
        if want["sha256"] != tokenizer_hash(tokenizer):
            raise StoreError(
                f"data.store {self.path!r} was tokenized with {want.get('source') or 'another tokenizer'} "
                f"(sha256 {want['sha256'][:12]}..., {want['vocab_size']} tokens) but the run's tokenizer "
                f"{tokenizer.source or '(in memory)'} hashes to {tokenizer_hash(tokenizer)[:12]}... "
                f"({tokenizer.vocab_size} tokens); prepare the store with the run's tokenizer")

    def split(self, held_out: bool) -> StoreDocuments:
        return StoreDocuments(self.tokens, self.offsets, self.held_out if held_out else ~self.held_out,
                              (self.path, held_out))


def _open_split(path: str, held_out: bool) -> StoreDocuments:
    return TokenStore(path).split(held_out)

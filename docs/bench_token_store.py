"""Scale benchmark of the token store (BENCHMARKS.md, "Token store").

    python docs/bench_token_store.py --tokenizer /path/to/starcoder-tokenizer --work /tmp/store-bench

1. Generates a corpus of at least --gigabytes GB of Python source as Parquet
   shards with a `content` column (The Stack's layout): this Python's standard
   library, each copy with its identifiers renamed so that copies differ.
2. Runs `starcoder-jax prepare-data` on it under /usr/bin/time -v (peak RSS).
3. Encodes the same text with `tokenizers`' encode_batch (and encode_batch_fast)
   in this process, shard by shard, timing the encoding only.
4. Reads batches of 8 x 2048 tokens with FIM at rate 0.5 from the store, in this
   process and with 1 and 2 loader worker processes (data.ParallelRows).
Deletes the corpus and the store at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time

import numpy as np

SHARD_BYTES = 64 << 20


def stdlib_sources() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    texts = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "__pycache__"))
        for name in sorted(files):
            if name.endswith(".py"):
                try:
                    with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                        texts.append(f.read())
                except (UnicodeDecodeError, OSError):
                    pass
    return texts


def generate(out: str, gigabytes: float) -> tuple[int, int]:
    """Parquet shards of at least `gigabytes` GB of text; returns (documents, bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(out)
    base = stdlib_sources()
    word = re.compile(r"\b(self|data|value|result|name|path|items|args|key|line)\b")
    target, total, docs, shard, copy = int(gigabytes * 1e9), 0, 0, [], 0
    while total < target:
        for text in base:
            text = word.sub(rf"\1_{copy}", text)
            shard.append(text)
            size = len(text.encode("utf-8"))
            total, docs = total + size, docs + 1
            if sum(len(t) for t in shard) >= SHARD_BYTES or total >= target:
                pq.write_table(pa.table({"content": shard}), os.path.join(out, f"shard-{docs:08d}.parquet"))
                shard = []
            if total >= target:
                break
        copy += 1
    return docs, total


def baseline(corpus: str, tokenizer_file: str, fraction: float = 1.0) -> dict:
    """tokenizers' own batch encoding of the same documents (text already in memory): the
    first `fraction` of the shards, as bytes per second."""
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(tokenizer_file)
    backend.encode_special_tokens = True  # as prepare-data encodes (literally)
    times = {"encode_batch": 0.0, "encode_batch_fast": 0.0}
    tokens = size = 0
    names = sorted(os.listdir(corpus))
    for name in names[:max(1, round(len(names) * fraction))]:
        texts = pq.read_table(os.path.join(corpus, name)).column("content").to_pylist()
        size += sum(len(t.encode("utf-8")) for t in texts)
        for i in range(0, len(texts), 512):  # batches of about prepare-data's size
            chunk = texts[i:i + 512]
            start = time.perf_counter()
            tokens += sum(len(e.ids) for e in backend.encode_batch(chunk, add_special_tokens=False))
            times["encode_batch"] += time.perf_counter() - start
            start = time.perf_counter()
            backend.encode_batch_fast(chunk, add_special_tokens=False)
            times["encode_batch_fast"] += time.perf_counter() - start
    return {"bytes": size, "tokens": tokens, **{k: round(v, 1) for k, v in times.items()},
            **{f"{k}_mb_per_s": round(size / v / 1e6, 3) for k, v in times.items()}}


def run_prepare(corpus: str, tokenizer: str, store: str) -> dict:
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "starcoder_jax.cli", "prepare-data", "--data",
           os.path.join(corpus, "*.parquet"), "--tokenizer", tokenizer, "--out", store, "--quiet"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(rss_kb / 1024, 1), **summary}


def read_batches(store: str, tokenizer: str, workers: int, steps: int) -> dict:
    from starcoder_jax.tokenizer import load_tokenizer
    from starcoder_jax.training.data import DataConfig, PackedSequences, ParallelRows
    from starcoder_jax.training.store import TokenStore

    config = DataConfig(seq_len=2048, fim_rate=0.5)
    source = PackedSequences(TokenStore(store).split(held_out=False), load_tokenizer(tokenizer), config,
                             batch_size=8, seed=0)
    if workers:
        source = ParallelRows(source, workers)
        source.batch(0)  # workers started and warm
    start = time.perf_counter()
    for k in range(1, steps + 1):  # consecutive steps, as training asks (workers compute the next ahead)
        source.batch(k)
    seconds = time.perf_counter() - start
    if workers:
        source.close()
    return {"workers": workers, "steps": steps, "tokens_per_s": round(steps * 8 * 2049 / seconds)}


def read_slices(store: str, steps: int) -> dict:
    """The memmap part alone: the token slices of the same rows, without FIM."""
    from starcoder_jax.training.store import TokenStore

    docs = TokenStore(store).split(held_out=False)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    n = 0
    for _ in range(steps * 8):
        i = int(rng.integers(len(docs.lengths)))
        n += int(np.asarray(docs.tokens(i)).astype(np.int32).sum() >= 0)
    return {"random_document_reads_per_s": round(steps * 8 / (time.perf_counter() - start))}


def grain_overhead(store: str, n: int = 20000) -> dict:
    """Reading n random documents' tokens: our index arithmetic over the memmap, and the
    same reads through a grain MapDataset (shuffled by grain), per document."""
    try:
        import grain
    except ImportError:
        return {"grain": "not installed"}
    from starcoder_jax.training.store import TokenStore

    docs = TokenStore(store).split(held_out=False)

    class Documents:  # grain's random-access source protocol
        def __len__(self):
            return len(docs.lengths)

        def __getitem__(self, i):
            return np.asarray(docs.tokens(i))

    order = np.random.default_rng(0).permutation(len(docs.lengths))
    reads = [int(order[k % len(order)]) for k in range(n)]
    start = time.perf_counter()
    for i in reads:
        np.asarray(docs.tokens(i))
    direct = (time.perf_counter() - start) / n
    dataset = grain.MapDataset.source(Documents()).shuffle(seed=0).repeat(None)
    iterator = iter(dataset.to_iter_dataset())
    for _ in range(100):  # started
        next(iterator)
    start = time.perf_counter()
    for _ in range(n):
        next(iterator)
    through_grain = (time.perf_counter() - start) / n
    return {"direct_us_per_document": round(direct * 1e6, 2), "grain_us_per_document": round(through_grain * 1e6, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="a tokenizer.json or its folder")
    parser.add_argument("--work", default="/tmp/store-bench", help="scratch folder (deleted unless --keep)")
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=20, help="batches read per measurement")
    parser.add_argument("--baseline-fraction", type=float, default=1.0,
                        help="share of the shards the encode_batch baseline encodes (a rate: bytes/s)")
    parser.add_argument("--skip-read", action="store_true", help="measure prepare-data only")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--skip-prepare", action="store_true", help="reuse --work's corpus and store")
    args = parser.parse_args()
    tokenizer_file = args.tokenizer if args.tokenizer.endswith(".json") else \
        os.path.join(args.tokenizer, "tokenizer.json")
    corpus, store = os.path.join(args.work, "corpus"), os.path.join(args.work, "store")
    report = {"load_average_start": os.getloadavg()}
    try:
        if not args.skip_prepare:
            start = time.perf_counter()
            docs, size = generate(corpus, args.gigabytes)
            report["corpus"] = {"documents": docs, "bytes": size, "seconds": round(time.perf_counter() - start)}
            print(json.dumps(report), flush=True)
            report["prepare_data"] = run_prepare(corpus, args.tokenizer, store)
            print(json.dumps(report), flush=True)
            report["prepare_data"]["mb_per_s"] = round(size / report["prepare_data"]["wall_s"] / 1e6, 3)
            report["tokenizers"] = baseline(corpus, tokenizer_file, args.baseline_fraction)
            for key in ("encode_batch", "encode_batch_fast"):
                ratio = report["prepare_data"]["mb_per_s"] / report["tokenizers"][f"{key}_mb_per_s"]
                report[f"prepare_data_vs_{key}"] = round(ratio, 3)
            print(json.dumps(report), flush=True)
        if not args.skip_read:
            report["memmap"] = read_slices(store, args.steps)
            report["grain"] = grain_overhead(store)
            report["read"] = [read_batches(store, args.tokenizer, w, args.steps) for w in (0, 1, 2)]
        report["load_average_end"] = os.getloadavg()
        print(json.dumps(report), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

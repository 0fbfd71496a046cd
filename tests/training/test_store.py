"""The token store: prepare-data's counts, resume and errors; store batches == in-memory
batches == the epoch-at-once definition; two processes read disjoint rows; store-fed runs
resume exactly."""

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import yaml
from builders import CORPUS, REPO_ROOT, finish_process, free_port
from test_train import corpus_dir, losses, run_cli, wait_for_step, write_config  # noqa: F401 (a fixture)
from tokenizers import Tokenizer as HFTokenizer

from starcoder_jax.inference.fim import FIMTokens, FIMTransform
from starcoder_jax.tokenizer import load_tokenizer
from starcoder_jax.training import train
from starcoder_jax.training.config import load_config
from starcoder_jax.training.data import (
    PackedDataset,
    PackedSequences,
    collect_documents,
    eval_sequences,
    split_documents,
)
from starcoder_jax.training.store import SourceSpec, StoreError, TokenStore, prepare_store

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "store_worker.py")




def epoch_at_once(docs, tokenizer, config, seed, e, shuffle=True, fim=True):
    """The data.py definition as first written: the whole epoch packed at once, then shuffled."""
    transform = FIMTransform(tokenizer, config.fim_rate if fim else 0.0, config.fim_spm_rate,
                             mask_pad=config.mask_fim_pad)
    order = np.random.default_rng([seed, e]).permutation(len(docs)) if shuffle else np.arange(len(docs))
    ids, mask = [], []
    for i in order:
        a, m = transform(docs[i], np.random.default_rng([seed, e, int(i)]))
        ids += [a, [tokenizer.eos_id]]
        mask += [m, [True]]
    width = config.seq_len + 1
    usable = sum(len(d) + 1 for d in docs) // width * width
    ids = np.concatenate(ids)[:usable].reshape(-1, width).astype(np.int32)
    mask = np.concatenate(mask)[:usable].reshape(-1, width).astype(bool)
    if shuffle:
        rows = np.random.default_rng([seed, e, 1]).permutation(len(ids))
        ids, mask = ids[rows], mask[rows]
    return ids, mask


def test_store_batches_equal_the_in_memory_pipeline_bit_for_bit(tmp_path):
    cfg = load_config(os.path.join(REPO_ROOT, "configs/finetune/tiny-test.yaml"))
    tokenizer = load_tokenizer(cfg.tokenizer)
    train_docs, held_docs = split_documents(collect_documents(cfg.data), cfg.data.eval_fraction)
    manifest = prepare_store(SourceSpec(paths=cfg.data.paths), tokenizer, str(tmp_path / "store"),
                             eval_fraction=cfg.data.eval_fraction, progress=False)
    assert manifest["documents"] == {"total": 5, "train": len(train_docs), "held_out": len(held_docs)}
    store = TokenStore(str(tmp_path / "store"))
    b = cfg.train.batch_size
    memory = PackedDataset(train_docs, tokenizer, cfg.data, batch_size=b, seed=7)
    stored = PackedSequences(store.split(held_out=False), tokenizer, cfg.data, batch_size=b, seed=7)
    assert stored.sequences_per_epoch == memory.sequences_per_epoch > 2 * b
    assert stored.fim.local is not None  # cut near the cuts only; epoch_at_once re-encodes whole parts
    epochs = [epoch_at_once(memory.docs.doc_ids, tokenizer, cfg.data, 7, e) for e in (0, 1)]
    n = memory.sequences_per_epoch
    for step in range(2 * n // b):  # two epochs, batches across the epoch boundary included
        want = [np.stack([epochs[k // n][i][k % n] for k in range(step * b, step * b + b)]) for i in (0, 1)]
        for got in (memory.batch(step), stored.batch(step)):
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
    assert (np.concatenate([e[0] for e in epochs]) == FIMTokens.from_tokenizer(tokenizer).prefix).any()  # FIM ran
    held = [PackedSequences(docs, tokenizer, cfg.data, batch_size=b, shuffle=False, fim=False)
            for docs in (PackedDataset(held_docs, tokenizer, cfg.data, batch_size=b).docs,
                         store.split(held_out=True))]
    want = epoch_at_once([np.asarray(d) for d in held[0].docs.doc_ids], tokenizer, cfg.data, 0, 0, False, False)
    for h in held:
        ids, mask = eval_sequences(h, 16)
        np.testing.assert_array_equal(ids, want[0][:16])
        np.testing.assert_array_equal(mask, want[1][:16])


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory):
    """Source files, JSONL (plain and gzip) and Parquet, with one bad row of each kind."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("mixed")
    texts = {}
    (root / "src").mkdir()
    for i in range(6):
        texts[f"src/f{i}.py"] = f"# file {i}\n" + "\n".join(CORPUS[i:] + CORPUS[:i])
        (root / texts_key(i)).write_text(texts[f"src/f{i}.py"])
    (root / "src" / "binary.py").write_bytes(b"\xff\xfe\x00 not utf-8")
    (root / "src" / "blank.py").write_text("  \n\n")
    lines = [json.dumps({"content": CORPUS[i % 7] * (i + 1), "id": i}) for i in range(8)]
    lines.insert(3, "{not json")
    lines.insert(5, json.dumps({"text": "no content field"}))
    (root / "a.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps({"content": f"x = {i}\n" + CORPUS[i]}) for i in range(5)) + "\n")
    values = [CORPUS[i % 7] + f"# row {i}\n" for i in range(20)]
    values[4] = None
    pq.write_table(pa.table({"content": values, "size": list(range(20))}), root / "c.parquet", row_group_size=7)
    return root


def texts_key(i):
    return f"src/f{i}.py"


def expected_texts(root):
    """What the corpus holds, read with the standard library and pyarrow."""
    import pyarrow.parquet as pq

    out = [(root / texts_key(i)).read_text() for i in range(6)]
    for line in (root / "a.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "content" in record:
            out.append(record["content"])
    with gzip.open(root / "b.jsonl.gz", "rt") as f:
        out += [json.loads(line)["content"] for line in f]
    out += [v for v in pq.read_table(root / "c.parquet").column("content").to_pylist() if v is not None]
    return out


def test_manifest_counts_equal_tokenizers_own_encoding(tmp_path, mixed_corpus, tokenizer_dir):
    root = mixed_corpus
    paths = (str(root / "src"), str(root / "*.jsonl*"), str(root / "c.parquet"))
    tokenizer = load_tokenizer(tokenizer_dir)
    manifest = prepare_store(SourceSpec(paths=paths), tokenizer, str(tmp_path / "s"), eval_fraction=0.25,
                             progress=False, batch_bytes=300)  # many small batches
    backend = HFTokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    encoded = [backend.encode(t, add_special_tokens=False).ids for t in expected_texts(root)]
    assert manifest["documents"]["total"] == len(encoded) == 6 + 8 + 5 + 19
    assert manifest["tokens"]["total"] == sum(len(e) + 1 for e in encoded)  # + one <|endoftext|> each
    assert manifest["skipped"] == {"undecodable": 1, "bad_json": 1, "missing_field": 2, "empty": 1}
    assert manifest["documents"]["held_out"] > 0 and manifest["dtype"] == "uint16"
    for split in ("documents", "tokens"):
        assert manifest[split]["train"] + manifest[split]["held_out"] == manifest[split]["total"]
    store = TokenStore(str(tmp_path / "s"))
    np.testing.assert_array_equal(np.asarray(store.tokens), np.concatenate(encoded))
    assert manifest["tokens"]["held_out"] == int((store.split(held_out=True).lengths + 1).sum())

    with pytest.raises(StoreError, match=r"a\.jsonl:4: not a JSON object"):
        prepare_store(SourceSpec(paths=(str(root / "a.jsonl"),)), tokenizer, str(tmp_path / "f"),
                      on_error="fail", progress=False)
    with pytest.raises(StoreError, match=r"c\.parquet:5: column 'content' is None"):
        prepare_store(SourceSpec(paths=(str(root / "c.parquet"),)), tokenizer, str(tmp_path / "f"),
                      on_error="fail", progress=False)
    with pytest.raises(StoreError, match=r"binary\.py: not UTF-8 text \(byte 0\)"):
        prepare_store(SourceSpec(paths=(str(root / "src"),)), tokenizer, str(tmp_path / "f"),
                      on_error="fail", progress=False)
    assert not os.path.exists(tmp_path / "f")  # nothing half-written


def test_interrupted_prepare_resumes_or_refuses_to_mix(tmp_path, mixed_corpus, tokenizer_dir):
    paths = (str(mixed_corpus / "a.jsonl"), str(mixed_corpus / "c.parquet"), str(mixed_corpus / "src"))
    tokenizer = load_tokenizer(tokenizer_dir)
    whole = prepare_store(SourceSpec(paths=paths), tokenizer, str(tmp_path / "whole"), eval_fraction=0.2,
                          progress=False, batch_bytes=200)
    out = str(tmp_path / "resumed")
    prepare_store(SourceSpec(paths=paths), tokenizer, out, eval_fraction=0.2, progress=False, batch_bytes=200,
                  stop_after_batches=3)
    assert not os.path.exists(out) and os.path.isdir(out + ".partial")
    with open(out + ".partial/tokens.bin", "ab") as f:  # what a kill during a batch's write leaves
        f.write(b"\x01\x02\x03")
    with pytest.raises(StoreError, match="no manifest.json.*did not finish"):
        TokenStore(out)
    with pytest.raises(StoreError, match=r"other settings \(eval_fraction differ\)"):
        prepare_store(SourceSpec(paths=paths), tokenizer, out, eval_fraction=0.3, progress=False)
    resumed = prepare_store(SourceSpec(paths=paths), tokenizer, out, eval_fraction=0.2, progress=False,
                            batch_bytes=200)
    assert resumed == whole
    for name in ("tokens.bin", "offsets.npy", "held_out.npy"):
        with open(os.path.join(out, name), "rb") as a, open(tmp_path / "whole" / name, "rb") as b:
            assert a.read() == b.read(), name
    assert sorted(os.listdir(out)) == ["held_out.npy", "manifest.json", "offsets.npy", "tokens.bin"]
    with pytest.raises(StoreError, match="already exists"):
        prepare_store(SourceSpec(paths=paths), tokenizer, out, progress=False)


def test_store_errors(tmp_path, mixed_corpus, tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.py").write_text("\n")
    with pytest.raises(StoreError, match=r"hold no non-empty documents \(1 files read; rows skipped: 1 empty\)"):
        prepare_store(SourceSpec(paths=(str(tmp_path / "empty"),)), tokenizer, str(tmp_path / "e"), progress=False)
    assert not os.path.exists(tmp_path / "e") and not os.path.exists(tmp_path / "e.partial")

    store = str(tmp_path / "s")
    prepare_store(SourceSpec(paths=(str(mixed_corpus / "src"),)), tokenizer, store, eval_fraction=0.2,
                  progress=False)
    # another tokenizer: refused before the model is built or anything trains
    config = write_config(tmp_path / "c.yaml", "unused", "pystdlib-9m", str(tmp_path / "run"),
                          **{"data.paths": [], "data.store": store})
    with pytest.raises(StoreError, match="tokenized with .*tokenizer.json .* but the run's tokenizer"):
        train.run(train.load_config(config, []), progress=False)
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")

    with open(os.path.join(store, "tokens.bin"), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(store, "tokens.bin")) - 2)
    with pytest.raises(StoreError, match="tokens.bin holds .* bytes but the manifest's .* tokens need"):
        TokenStore(store)
    with pytest.raises(StoreError, match="not a token store"):
        TokenStore(str(tmp_path))


@pytest.mark.multidevice
def test_two_processes_read_disjoint_rows_whose_union_is_the_batch(tmp_path, corpus_dir, tokenizer_dir):  # noqa: F811
    from starcoder_jax.training.data import DataConfig

    store = str(tmp_path / "store")
    prepare_store(SourceSpec(paths=(corpus_dir,)), load_tokenizer(tokenizer_dir), store, progress=False)
    port, out = free_port(), str(tmp_path / "rows")
    flags = " --xla_force_host_platform_device_count=2"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + flags)
    procs = [subprocess.Popen(
        [sys.executable, "-u", WORKER, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
         "--process-id", str(i), "--mode", "rows", "--store", store, "--tokenizer", tokenizer_dir, "--out", out],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    for i, proc in enumerate(procs):
        code, stdout, stderr = finish_process(proc, 180)
        assert code == 0, f"process {i} exited {code}:\n{stdout[-2000:]}\n{stderr[-4000:]}"
    got = [np.load(f"{out}.{i}.npz") for i in (0, 1)]
    source = PackedSequences(TokenStore(store).split(held_out=False), load_tokenizer(tokenizer_dir),
                             DataConfig(seq_len=32, fim_rate=0.5), batch_size=8, seed=3)
    assert got[0]["asked"].shape == (50, 4)  # each process computed 4 of the 8 rows, once
    for step in range(50):
        ids, _ = source.batch(step)
        rows = [g["asked"][step] for g in got]
        assert not set(rows[0]) & set(rows[1]) and sorted({*rows[0], *rows[1]}) == list(range(8))
        for g, r in zip(got, rows):
            np.testing.assert_array_equal(g["values"][step], ids[r])
            np.testing.assert_array_equal(g["gathered"][step], ids.reshape(2, 4, 33))


@pytest.mark.slow
def test_store_fed_run_resumes_exactly_after_kill_9(tmp_path, corpus_dir, tokenizer_dir):  # noqa: F811
    """A store-fed fine-tune killed twice gives the losses of an uninterrupted run fed from the
    source files: the same batches, and the same resume."""
    straight = str(tmp_path / "straight")
    train.run(train.load_config(write_config(tmp_path / "a.yaml", corpus_dir, tokenizer_dir, straight,
                                             **{"train.steps": 8}), []), progress=False)
    reference = losses(straight)
    store = str(tmp_path / "store")
    prepare_store(SourceSpec(paths=(corpus_dir,)), load_tokenizer(tokenizer_dir), store, eval_fraction=0.1,
                  progress=False)
    killed = str(tmp_path / "killed")
    config = write_config(tmp_path / "b.yaml", corpus_dir, tokenizer_dir, killed,
                          **{"data.paths": [], "data.store": store, "train.steps": 8})
    proc = run_cli(config, wait=False)
    wait_for_step(killed, 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_cli(config)
    assert losses(killed) == reference


def eval_losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["eval_loss"]) for r in map(json.loads, f) if "eval_loss" in r]


def _train(config, processes, stop_after=None):
    """The worker's fine-tune of `config` on a data=4 mesh: 1 process of 4 CPU devices or
    2 processes of 2, joined by jax.distributed (gloo on loopback)."""
    flags = f" --xla_force_host_platform_device_count={4 // processes}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + flags)
    port = free_port()
    extra = ["--stop-after", str(stop_after)] if stop_after else []
    procs = [subprocess.Popen(
        [sys.executable, "-u", WORKER, "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
         "--process-id", str(i), "--mode", "train", "--config", config, *extra],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(processes)]
    for i, proc in enumerate(procs):
        code, stdout, stderr = finish_process(proc, 240)
        assert code == 0, f"process {i} of {processes} exited {code}:\n{stdout[-2000:]}\n{stderr[-4000:]}"


@pytest.mark.slow
@pytest.mark.multidevice
def test_a_run_checkpointed_with_2_processes_resumes_with_1_and_back(tmp_path, corpus_dir, tokenizer_dir):  # noqa: F811
    """The same 4 devices as one process or two: a run saved at step 3 by one count and
    resumed by the other takes the uninterrupted run's batches (same losses), and the
    held-out loss at steps 3 and 6 is the same whatever the number of processes."""
    store = str(tmp_path / "store")
    prepare_store(SourceSpec(paths=(corpus_dir,)), load_tokenizer(tokenizer_dir), store, eval_fraction=0.2,
                  progress=False)
    configs = {}
    for name in ("straight", "two_then_one"):
        configs[name] = write_config(
            tmp_path / f"{name}.yaml", corpus_dir, tokenizer_dir, str(tmp_path / name),
            **{"data.paths": [], "data.store": store, "train.steps": 6,
               "train.save_every": 3, "train.eval_every": 3, "train.mesh": "data=4",
               "train.async_checkpoints": False})
    _train(configs["straight"], 1)
    _train(configs["two_then_one"], 2, stop_after=3)
    _train(configs["two_then_one"], 1)
    # one process's step-3 checkpoint: the straight run's, without the steps after it
    shutil.copytree(tmp_path / "straight", tmp_path / "one_then_two")
    shutil.rmtree(tmp_path / "one_then_two" / "checkpoints" / "6")
    with open(configs["straight"]) as f:
        raw = yaml.safe_load(f)
    raw["train"]["output_dir"] = str(tmp_path / "one_then_two")
    with open(tmp_path / "one_then_two.yaml", "w") as f:
        yaml.safe_dump(raw, f)
    _train(str(tmp_path / "one_then_two.yaml"), 2)
    reference = losses(str(tmp_path / "straight"))
    assert [s for s, _ in reference] == list(range(1, 7))
    for name in ("two_then_one", "one_then_two"):
        got = losses(str(tmp_path / name))
        assert [s for s, _ in got] == list(range(1, 7))
        # gloo's reductions may add in another order than one process's: equal to float32 rounding
        np.testing.assert_allclose([x for _, x in got], [x for _, x in reference], rtol=2e-6)
        assert [s for s, _ in eval_losses(str(tmp_path / name))] == [3, 6]
        np.testing.assert_allclose([x for _, x in eval_losses(str(tmp_path / name))],
                                   [x for _, x in eval_losses(str(tmp_path / "straight"))], rtol=2e-6)


def test_loader_workers_give_the_same_batches(tmp_path, corpus_dir, tokenizer_dir):  # noqa: F811
    from starcoder_jax.training.data import DataConfig, ParallelRows

    store = str(tmp_path / "store")
    prepare_store(SourceSpec(paths=(corpus_dir,)), load_tokenizer(tokenizer_dir), store, progress=False)
    source = PackedSequences(TokenStore(store).split(held_out=False), load_tokenizer(tokenizer_dir),
                             DataConfig(seq_len=32), batch_size=4, seed=1)
    parallel = ParallelRows(source, 2)
    try:
        for step in (0, 1, 2, 7, 3):  # in order (computed ahead), then out of order
            for got, want in zip(parallel.batch(step), source.batch(step)):
                np.testing.assert_array_equal(got, want)
        for got, want in zip(parallel.rows(5, [3, 0]), source.rows(5, [3, 0])):
            np.testing.assert_array_equal(got, want)
    finally:
        parallel.close()


def test_the_store_example_config_reads_a_store():
    cfg = load_config(os.path.join(REPO_ROOT, "configs/finetune/starcoderbase-1b-store.yaml"))
    assert cfg.data.store.endswith("stores/python") and not cfg.data.paths and cfg.data.loader_workers == 2
    with pytest.raises(ValueError, match="data.store and data.paths are both set"):
        train.parse_config({"data": {"store": "s", "paths": ["p"]}})

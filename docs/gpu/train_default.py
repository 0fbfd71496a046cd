"""Trains the default model (configs/pycode-27m.yaml) from scratch in a fixed
wall-clock budget, from the corpus archive recipes/pycode builds. Written for
one lent GPU; the same script rehearses on a CPU with a smaller model.

    python recipes/pycode/build_corpus.py --fetch --tar      # runs/pycode-corpus.tar.xz
    python docs/gpu/train_default.py 2>&1 | tee $OUT/log.txt  # on the GPU machine

1. Unpacks the corpus and writes its token store (prepare-data, one worker per core).
2. Calibrates: the config's first --calibration steps (`finetune --stop-after`),
   inside the learning-rate warmup, so they are the same steps whatever the
   run's length.
3. Resumes that run with as many steps as the rest of --budget allows at the
   measured rate, so the cosine schedule ends when the time does; SIGTERM at
   the deadline if it runs late (the loop saves and exports on SIGTERM).

The run exports the model every train.export_every steps. Its weights
(bfloat16 shards of at most 15 MiB) and config.json are copied to OUT/model
whenever a new export is whole, next to OUT/metrics.jsonl and OUT/log.txt: at
most 8 files, so a run cut short still returns its newest weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from starcoder_jax.training.train import load_config  # noqa: E402

START = time.monotonic()


def log(message: str) -> None:
    print(f"=== {message} (t = {time.monotonic() - START:.0f} s, {time.strftime('%H:%M:%S')})", flush=True)


def sj(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "starcoder_jax.cli", *args], env=env)


def check(proc: subprocess.Popen, what: str) -> None:
    if proc.wait() != 0:
        raise SystemExit(f"{what} failed (exit {proc.returncode})")


class Publisher(threading.Thread):
    """Copies each whole export (weights and config) from the run's export folder
    to OUT/model, and the run's metrics.jsonl to OUT, every `every` seconds."""

    def __init__(self, export: str, metrics: str, out: str, every: float = 10.0):
        super().__init__(daemon=True)
        self.export, self.metrics, self.out, self.every = export, metrics, out, every
        self.published, self.stop = None, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.publish()

    def publish(self) -> None:
        if os.path.isfile(self.metrics):
            shutil.copy(self.metrics, os.path.join(self.out, "metrics.jsonl"))
        record = os.path.join(self.export, "export.json")
        try:
            before = open(record).read()
        except OSError:
            return
        if before == self.published:
            return
        stage = os.path.join(os.path.dirname(self.export), "publish")
        shutil.rmtree(stage, ignore_errors=True)
        os.makedirs(stage)
        try:
            for name in os.listdir(self.export):
                if name == "config.json" or name.startswith("model") and ".safetensors" in name:
                    shutil.copy(os.path.join(self.export, name), stage)
            same = open(record).read() == before
        except OSError:  # the export was swapped while it was read
            return
        if not same:
            return
        target = os.path.join(self.out, "model")
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(stage, target)
        self.published = before
        print(f"published export {json.loads(before)['step']} to {target}", flush=True)


def unpack(archive: str, work: str) -> str:
    """Extracts the corpus archive into work/corpus; returns the folder holding stdlib/ and packages/."""
    target = os.path.join(work, "corpus")
    shutil.rmtree(target, ignore_errors=True)
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    for root, dirs, _ in os.walk(target):
        if "stdlib" in dirs and "packages" in dirs:
            return root
    raise SystemExit(f"{archive} holds no stdlib/ and packages/ folders")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "gpu-out"), help="what comes back (default $OUT)")
    p.add_argument("--budget", type=float, default=500, help="seconds for the whole script")
    p.add_argument("--config", default=os.path.join(REPO, "configs", "pycode-27m.yaml"))
    p.add_argument("--corpus", default=os.path.join(REPO, "runs", "pycode-corpus.tar.xz"))
    p.add_argument("--store", help="an existing token store (skips unpacking and prepare-data)")
    p.add_argument("--work", default="/tmp/pycode-train", help="scratch folder (corpus, store, run)")
    p.add_argument("--calibration", type=int, default=30, help="steps timed before the run is sized")
    p.add_argument("--reserve", type=float, default=30, help="seconds kept for the last export and exit")
    p.add_argument("--max-steps", type=int, help="at most this many steps (a rehearsal)")
    p.add_argument("overrides", nargs="*", help="section.key=value for both runs (e.g. a smaller model)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    run_dir, export = os.path.join(args.work, "run"), os.path.join(args.work, "export")
    for stale in (run_dir, export):
        shutil.rmtree(stale, ignore_errors=True)

    log("environment")  # in a child process: this one never holds the accelerator
    probe = "import jax; d = jax.devices(); print(jax.__version__); print(len(d), 'x', d[0].device_kind)"
    version, device = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                     check=True).stdout.split("\n")[:2]
    print(f"jax {version}, {device}", flush=True)
    cfg = load_config(args.config, args.overrides)
    if not args.calibration < cfg.optim.warmup_steps <= cfg.train.steps:
        raise SystemExit(f"need --calibration ({args.calibration}) < optim.warmup_steps ({cfg.optim.warmup_steps}) "
                         f"<= train.steps ({cfg.train.steps}): the calibration's steps (in the warmup) must "
                         "be those of the sized run")
    store = args.store
    if store is None:
        log(f"unpacking {args.corpus}")
        root = unpack(args.corpus, args.work)
        store = os.path.join(args.work, "store")
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(store + ".partial", ignore_errors=True)
        log("token store")
        check(sj("prepare-data", "--data", os.path.join(root, "stdlib"), os.path.join(root, "packages"),
                 "--tokenizer", cfg.tokenizer, "--out", store, "--eval-fraction", "0.05",
                 "--workers", str(os.cpu_count()), "--quiet"), "prepare-data")
    manifest = json.load(open(os.path.join(store, "manifest.json")))
    print({k: v for k, v in manifest.items() if isinstance(v, (int, float, str))}, flush=True)

    options = ["--config", args.config, "--output-dir", run_dir]
    overrides = [f"data.store={store}", f"train.export_dir={export}", *args.overrides]
    publisher = Publisher(export, os.path.join(run_dir, "metrics.jsonl"), args.out)
    publisher.start()

    log(f"calibration: {args.calibration} steps")
    t0 = time.monotonic()
    # the config's own train.steps (>= warmup): the first steps are the same in the sized run
    check(sj("finetune", *options, "--stop-after", str(args.calibration), *overrides, "train.log_every=5",
             "train.eval_every=1000000", "train.export_every=0"), "the calibration run")
    calibration_s = time.monotonic() - t0
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    rates = [r["tokens_per_second"] for r in records[1:]] or [records[-1]["tokens_per_second"]]
    rate = statistics.median_high(rates)  # the first record holds the compile
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    steady_s = args.calibration * tokens_per_step / rate
    startup_s = calibration_s - steady_s  # start, compile and the first steps' overhead, paid again
    left = args.budget - (time.monotonic() - START) - startup_s - args.reserve
    steps = args.calibration + max(0, int(left * rate / tokens_per_step))
    if args.max_steps:
        steps = min(steps, args.max_steps)
    if steps < cfg.optim.warmup_steps:  # a shorter run would warm up faster than the calibration did
        print(f"the budget allows {steps} steps, fewer than the warmup; running {cfg.optim.warmup_steps} "
              "(the deadline may cut them)", flush=True)
        steps = cfg.optim.warmup_steps
    print(f"calibration: {rate:,.0f} tokens/s, {tokens_per_step} tokens a step, start-up {startup_s:.0f} s; "
          f"{left:.0f} s of training left: {steps} steps ({steps * tokens_per_step / 1e6:.1f}M tokens)", flush=True)

    log(f"training to step {steps}")
    proc = sj("finetune", *options, "--steps", str(steps), *overrides)
    deadline = START + args.budget - args.reserve / 2
    while proc.poll() is None:
        if time.monotonic() > deadline:
            log("deadline: SIGTERM (the loop saves and exports)")
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            break
        time.sleep(1)
    publisher.stop.set()
    publisher.join()
    publisher.publish()
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    last = records[-1]
    summary = {"steps": last["step"], "tokens": last["step"] * tokens_per_step, "loss": last["loss"],
               "eval_loss": next((r["eval_loss"] for r in reversed(records) if "eval_loss" in r), None),
               "wall_s": round(time.monotonic() - START), "calibration_tokens_per_s": round(rate),
               "exit": proc.returncode, "device": device, "jax": version}
    print(json.dumps(summary), flush=True)
    log("done")


if __name__ == "__main__":
    main()

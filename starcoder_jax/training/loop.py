"""The training loop of a prepared run (state.prepare): steps, logging, held-out
evaluation, checkpoints, SIGTERM and non-finite losses.

The loop takes its batches from a `data.DataSource` by step number, so a
resumed run continues the uninterrupted run's batches and dropout keys.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from starcoder_jax.training.state import Setup, TrainingError, TrainState

EXPORT_RECORD = "export.json"  # what export_model writes beside the weights: the step, the run


class Metrics:
    """metrics.jsonl (truncated to the resumed step) + TensorBoard events, written by
    process 0 only (every process of a multi-host run computes the same records)."""

    def __init__(self, out_dir: str, start_step: int):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if jax.process_index() != 0:
            self.path = os.devnull
        kept = []
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(kept)
        self.file = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if self.path == os.devnull:
            return
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=start_step + 1)
        except ImportError:  # optional: metrics.jsonl always has everything
            pass

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


@dataclasses.dataclass
class LoopResult:
    step: int  # the last step done
    state: TrainState
    last: dict  # the last metrics record ({} when nothing was logged)
    eval_loss: float | None  # the last held-out loss (nats per token)
    terminated: bool  # ended by SIGTERM (after saving)


class Loop:
    """Runs a Setup's steps until train.steps, a SIGTERM, or `stop_after` steps."""

    def __init__(self, setup: Setup, *, progress: bool | None = None):
        self.setup, self.loop = setup, setup.cfg.train
        self.state, self.step = setup.state, setup.start_step
        self.progress = progress
        self.last, self.eval_loss = {}, None
        self.tokens_per_step = self.loop.batch_size * setup.cfg.data.seq_len  # grad_accum splits the batch
        self.window_start, self.window_tokens = 0.0, 0  # tokens/s since the last record

    def run(self, stop_after: int | None = None) -> LoopResult:
        loop, checkpoints = self.loop, self.setup.checkpoints
        terminated = []
        previous = signal.signal(signal.SIGTERM, lambda *_: terminated.append(True))
        metrics = Metrics(self.setup.out_dir, self.step)
        bar = tqdm(total=loop.steps, initial=self.step, desc="finetune", unit="step",
                   disable=(not self.progress) if self.progress is not None else None)
        ran, self.window_start = 0, time.perf_counter()
        try:
            while self.step < loop.steps:
                if terminated:
                    self._save_now()
                    if loop.export_every:
                        self._export()
                    bar.write(f"SIGTERM: saved step {self.step} to {checkpoints.directory}; "
                              "run the same command to resume")
                    break
                out = self._train_step()
                ran += 1
                if not bool(out["finite"]):
                    self._non_finite(out, bar)
                stopping = stop_after is not None and ran >= stop_after
                if self.step % loop.log_every == 0 or self.step == loop.steps or stopping:
                    metrics.log(self._record(out))
                    bar.set_postfix(loss=f"{self.last['loss']:.3f}", tok_s=f"{self.last['tokens_per_second']:.0f}")
                bar.update()
                if self.step % loop.save_every == 0 or self.step == loop.steps:
                    checkpoints.save(self.step, self.state.checkpoint(), self.setup.meta(self.step))
                if loop.export_every and (self.step % loop.export_every == 0 or self.step == loop.steps):
                    self._export()
                if stopping and self.step < loop.steps:
                    self._save_now()  # a later call resumes here
                    break
        finally:
            signal.signal(signal.SIGTERM, previous)
            bar.close()
            metrics.close()
            checkpoints.close()
        return LoopResult(self.step, self.state, self.last, self.eval_loss, bool(terminated))

    def _train_step(self) -> dict:
        """One optimizer step on the batch of `self.step`; returns its metrics (device arrays)."""
        loop, placement, state = self.loop, self.setup.placement, self.state
        shape = (loop.grad_accum, loop.batch_size // loop.grad_accum, self.setup.cfg.data.seq_len + 1)  # [A, b, T + 1]
        ids, mask = placement.source_batch(self.setup.train_data, self.step, shape)
        with placement.context():
            params, opt_state, out = self.setup.train_step(state.params, state.opt_state, state.rest, ids, mask,
                                                           jnp.int32(self.step))
        self.state = dataclasses.replace(state, params=params, opt_state=opt_state)
        self.step += 1
        self.window_tokens += self.tokens_per_step
        return out

    def _non_finite(self, out: dict, bar) -> None:
        if self.loop.nan_policy == "stop":
            raise TrainingError(
                f"the loss became {float(out['loss'])} at step {self.step} (grad norm "
                f"{float(out['grad_norm'])}); stopped without saving. The last good checkpoint is "
                f"step {self.setup.checkpoints.latest_step()}; lower optim.learning_rate or set "
                "train.nan_policy=skip")
        bar.write(f"step {self.step}: non-finite loss, update skipped")

    def _record(self, out: dict) -> dict:
        """The metrics record of this step (with the held-out loss on eval steps)."""
        elapsed = time.perf_counter() - self.window_start
        step = self.step
        self.last = {"step": step, "loss": float(out["loss"]), "grad_norm": float(out["grad_norm"]),
                     "learning_rate": float(self.setup.schedule(step - 1)),
                     "tokens_per_second": self.window_tokens / elapsed, "finite": bool(out["finite"])}
        self.window_start, self.window_tokens = time.perf_counter(), 0
        if step % self.loop.eval_every == 0 or step == self.loop.steps:
            self.eval_loss = self._evaluate()
            if self.eval_loss is not None:
                self.last["eval_loss"] = self.eval_loss
                self.last["eval_perplexity"] = math.exp(min(self.eval_loss, 50))
        return self.last

    def _evaluate(self) -> float | None:
        """Mean next-token loss (nats) over the held-out sequences; None without any."""
        if self.setup.eval_data is None:
            return None
        ids, mask = self.setup.eval_data
        b, state, place = self.loop.batch_size, self.state, self.setup.placement
        total, count = 0.0, 0.0
        for i in range(0, len(ids), b):
            # every chunk b rows (the last padded with rows the mask leaves out), split over
            # the mesh as training's rows are: every process passes the same held-out rows
            chunk_ids, chunk_mask = _rows(ids[i:i + b], b), _rows(mask[i:i + b], b)
            s, c = self.setup.eval_step(state.params, state.rest, place.batch(chunk_ids, 0),
                                        place.batch(chunk_mask, 0))
            total, count = total + float(s), count + float(c)
        return total / max(count, 1)

    def _export(self) -> None:
        """Writes the model of this step to train.export_dir (process 0 only)."""
        if jax.process_index() != 0:
            return
        loop = self.loop
        export_model(self.state.model(), self.setup.cfg, loop.export_dir, dtype=loop.export_dtype,
                     max_shard_bytes=int(loop.export_max_shard_mb * 2**20), step=self.step)

    def _save_now(self) -> None:
        """Saves the current step (unless it is saved already) and waits for the write."""
        checkpoints = self.setup.checkpoints
        checkpoints.wait()
        if checkpoints.latest_step() != self.step:
            checkpoints.save(self.step, self.state.checkpoint(), self.setup.meta(self.step), wait=True)


def export_model(model, cfg, out_dir: str, *, dtype: str | None = None,
                 max_shard_bytes: int = 5 * 2**30, step: int | None = None) -> str:
    """Writes a run's model to out_dir as an HF directory with the run's tokenizer
    files (a LoRA run: the base with its adapters merged, model.lora.merge_lora),
    replacing what out_dir held. The new directory is written beside out_dir and
    moved into place, so out_dir holds one whole export at any time. step: the
    training step, recorded in out_dir/export.json (EXPORT_RECORD), which also
    marks the folder as one an export may replace."""
    from starcoder_jax.model.lora import merge_lora
    from starcoder_jax.model.weights import save_hf

    out_dir = check_export_dir(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.new-", dir=parent)
    try:
        save_hf(merge_lora(model) if cfg.lora is not None else model, tmp, dtype=dtype,
                max_shard_bytes=max_shard_bytes, tokenizer_from=tokenizer_dir(cfg.tokenizer), progress=False)
        with open(os.path.join(tmp, EXPORT_RECORD), "w", encoding="utf-8") as f:
            json.dump({"step": step, "output_dir": os.path.abspath(cfg.train.output_dir)}, f)
        old = None
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.replace(out_dir, os.path.join(old, "export"))
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def check_export_dir(out_dir: str) -> str:
    """out_dir as an absolute path, refused when an export may not replace it: a
    file, or a folder with files that no export wrote (no EXPORT_RECORD)."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"export directory {out_dir} is a file")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, EXPORT_RECORD)):
        raise ValueError(f"export directory {out_dir} holds files that are not a training export (no "
                         f"{EXPORT_RECORD}); an export replaces the whole folder: choose another one")
    return out_dir


def tokenizer_dir(name: str) -> str:
    """The folder holding a run's tokenizer files (copied next to exported models)."""
    if os.path.isdir(name):
        return name
    if os.path.isfile(name):
        return os.path.dirname(os.path.abspath(name))
    from starcoder_jax.model.pretrained import resolve_model_dir

    return resolve_model_dir(name)


def _rows(x: np.ndarray, n: int) -> np.ndarray:
    """x [r, ...] with zero rows appended up to n rows."""
    if len(x) == n:
        return x
    return np.concatenate([x, np.zeros((n - len(x), *x.shape[1:]), x.dtype)])

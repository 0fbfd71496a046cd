"""Fine-tuning (or training from scratch) with optax, checkpointed by orbax.

One run = one output directory. Running the same command again resumes from
the newest checkpoint there; because the data order and the dropout keys are
pure functions of (seed, step), a resumed run reproduces the uninterrupted
one bit for bit on the same machine.

`run(cfg)` is the whole run; its parts: config (the YAML file), data (the
batch sources), step (optimizer, train and eval steps), state (building a run:
model, mesh, trainable split, resume), loop (steps, logs, eval, checkpoints).
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from starcoder_jax.training.config import (
    FinetuneConfig,
    LoopConfig,
    ModelSection,
    OptimConfig,
    load_config,
    parse_config,
)
from starcoder_jax.training.loop import Loop, check_export_dir, export_model
from starcoder_jax.training.state import TrainingError, build_model, load_run_model, prepare

__all__ = ["FinetuneConfig", "LoopConfig", "ModelSection", "OptimConfig", "TrainingError", "build_model",
           "load_config", "load_run_model", "parse_config", "run", "summarize"]


def run(cfg: FinetuneConfig, *, progress: bool | None = None, export_hf: str | None = None,
        export_peft: str | None = None, stop_after: int | None = None) -> dict:
    """Trains until cfg.train.steps (or a SIGTERM, or `stop_after` steps in this call).

    Returns a summary dict (final step, last loss, eval loss, output dir, the
    model, whether a SIGTERM ended it). export_hf: a folder to write the
    finished model to in HF format (with the tokenizer), once train.steps are
    done; a LoRA run writes its merged model (model.lora.merge_lora).
    export_peft: a folder to write a LoRA run's adapters to as a PEFT directory.
    """
    if export_peft and cfg.lora is None:
        raise ValueError("export_peft (--export-peft) needs a LoRA run: add a lora: section to the config")
    if export_hf and cfg.lora is not None and cfg.model.quantize is not None:
        raise ValueError(f"export_hf (--export-hf) of a LoRA run on a {cfg.model.quantize} base would merge the "
                         f"adapters into {cfg.model.quantize} weights; export the adapters (--export-peft) "
                         "and merge them into the float base with `starcoder-jax convert merge-lora`")
    for folder in (export_hf, cfg.train.export_dir if cfg.train.export_every else None):
        if folder:  # refused now rather than after the training
            check_export_dir(folder)
    setup = prepare(cfg, progress=progress)
    with open(os.path.join(setup.out_dir, "config.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    result = Loop(setup, progress=progress).run(stop_after)
    model = result.state.model()
    done = result.step >= cfg.train.steps
    if export_hf and done:
        export_model(model, cfg, export_hf)
    if export_peft and done:
        from starcoder_jax.model.peft import save_peft

        save_peft(model, export_peft)
    return {"step": result.step, "loss": result.last.get("loss"), "eval_loss": result.eval_loss,
            "output_dir": setup.out_dir, "model": model, "terminated": result.terminated}


def summarize(result: dict) -> dict[str, Any]:
    """The JSON-able part of `run`'s result (the summary line `finetune` prints)."""
    return {k: v for k, v in result.items() if k != "model"}

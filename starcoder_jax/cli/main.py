"""`starcoder-jax` command line: thin subcommands over the library."""

from __future__ import annotations

import argparse
import json
import sys

from starcoder_jax.cli import bench, common, infill, plan
from starcoder_jax.cli import data as data_command
from starcoder_jax.cli import eval as eval_command
from starcoder_jax.cli import serve as serve_command
from starcoder_jax.config import KV_CACHE_MODES, QUANTIZATION_MODES

# ---- convert ----

def cmd_convert(args) -> int:
    from starcoder_jax.model import weights
    from starcoder_jax.model.pretrained import resolve_model_dir

    if (args.direction == "merge-lora") != (args.out is not None):
        raise ValueError("convert merge-lora takes BASE ADAPTER OUT; hf-to-jax and jax-to-hf take SRC DST")
    src = resolve_model_dir(args.src)
    if args.direction == "merge-lora":
        from starcoder_jax.model.lora import merge_lora

        if args.quantize:
            raise ValueError("convert merge-lora writes a float HF directory; --quantize does not apply")
        merged = merge_lora(common.load_model(args, name=src, progress=True, adapter=args.dst))
        weights.save_hf(merged, args.out, tokenizer_from=src, progress=True,
                        max_shard_bytes=int(args.max_shard_gb * 2**30))
        print(f"wrote {args.out}")
        return 0
    model = common.load_model(args, name=src, progress=True)
    if args.direction == "hf-to-jax":
        weights.save_orbax(model, args.dst, tokenizer_from=src)
    else:
        weights.save_hf(model, args.dst, tokenizer_from=src, progress=True,
                        max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"wrote {args.dst}")
    return 0


# ---- generate ----

def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        source = sys.stdin if args.prompts_file == "-" else open(args.prompts_file, encoding="utf-8")
        with source:
            if args.prompts_file.endswith(".jsonl"):
                prompts += [json.loads(line)["prompt"] for line in source if line.strip()]
            else:
                prompts.append(source.read())
    if not prompts:
        raise SystemExit("error: give at least one PROMPT, or --prompts-file FILE (- for stdin)")
    return prompts


def cmd_generate(args) -> int:
    from starcoder_jax.inference.generate import generate

    prompts = _read_prompts(args)
    model, tokenizer = common.load_model_and_tokenizer(args)
    kwargs = dict(tokenizer=tokenizer, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                  stop=tuple(args.stop), seed=args.seed, mesh=args.mesh, kv_cache=args.kv_cache,
                  draft=common.load_draft(args, model, tokenizer), num_draft_tokens=args.num_draft_tokens)
    if args.json:
        for r, prompt in zip(generate(model, prompts, **kwargs), prompts):
            print(json.dumps({"prompt": prompt, "prompt_ids": r.prompt_ids, "ids": r.ids,
                              "text": r.text, "finish_reason": r.finish_reason}))
        return 0
    if len(prompts) == 1:
        _write(prompts[0])
        generate(model, prompts, on_event=lambda event: _write(event.text), **kwargs)
        _write("\n")
        return 0
    # Several prompts run as one batch (one prefill, one decode loop) and are printed after it,
    # each under its header: streamed, their pieces would interleave on the terminal.
    for i, (prompt, r) in enumerate(zip(prompts, generate(model, prompts, **kwargs))):
        print(f"--- prompt {i + 1} ---")
        _write(prompt + r.text + "\n")
    return 0


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# ---- finetune ----

def cmd_finetune(args) -> int:
    from starcoder_jax.training import train

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    if args.mesh:
        overrides.append(f"train.mesh={args.mesh}")
    cfg = train.load_config(args.config, overrides)
    try:
        result = train.run(cfg, progress=True, export_hf=args.export_hf, export_peft=args.export_peft,
                           stop_after=args.stop_after)
    except train.TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    summary = train.summarize(result)
    print(json.dumps(summary))
    if args.export_hf and not result["terminated"]:
        print(f"exported the model to {args.export_hf}")
    if args.export_peft and not result["terminated"]:
        print(f"exported the LoRA adapters to {args.export_peft} (PEFT format)")
    return 0


# ---- train-tokenizer ----

def cmd_train_tokenizer(args) -> int:
    from starcoder_jax.tokenizer import train_tokenizer
    from starcoder_jax.training.data import DataConfig, collect_documents, split_documents

    config = DataConfig(paths=tuple(args.data), extensions=tuple(args.extensions.split(",")),
                        eval_fraction=args.eval_fraction)
    train_docs, held = split_documents(collect_documents(config), args.eval_fraction)
    print(f"training on {len(train_docs)} documents ({len(held)} held out)")
    tok = train_tokenizer((text for _, text in train_docs), args.out, vocab_size=args.vocab_size,
                          progress=True)
    print(f"wrote {args.out}/tokenizer.json ({tok.vocab_size} tokens)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="starcoder-jax", description="StarCoder-family models (GPTBigCode, StarCoder2) in JAX / Flax NNX")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert checkpoints between HF safetensors and orbax; merge a LoRA adapter",
                       description="hf-to-jax SRC DST, jax-to-hf SRC DST, or merge-lora BASE ADAPTER OUT "
                                   "(BASE with the PEFT adapter ADAPTER merged in, written as an HF directory)")
    p.add_argument("direction", choices=("hf-to-jax", "jax-to-hf", "merge-lora"))
    p.add_argument("src", help="source model directory (or hub id for hf-to-jax); merge-lora: the base model")
    p.add_argument("dst", help="output directory; merge-lora: the PEFT adapter directory")
    p.add_argument("out", nargs="?", help="merge-lora: the output directory")
    p.add_argument("--dtype", default="float32", choices=common.DTYPES)
    p.add_argument("--quantize", choices=QUANTIZATION_MODES, default=None,
                   help="hf-to-jax: store the matmul weights in this weight-only format, "
                        "so loading the directory needs no quantization step")
    p.add_argument("--max-shard-gb", type=float, default=5.0,
                   help="largest safetensors shard written by jax-to-hf (GiB)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="generate text (one prompt streams to the terminal; several run as one batch)")
    common.add_model_args(p)
    p.add_argument("prompt", nargs="*", help="prompt text(s)")
    p.add_argument("--prompts-file", help="read a prompt from a file (- for stdin); "
                                          "a .jsonl file gives one prompt per line ({'prompt': ...})")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    p.add_argument("--mesh", help="device mesh, e.g. data=2,tensor=4 (default: one device)")
    common.add_draft_args(p)
    p.add_argument("--kv-cache", choices=KV_CACHE_MODES, default=None,
                   help="int8: keys and values as int8 with a scale per token (long contexts)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("finetune", help="fine-tune (or train from scratch) from a YAML config",
                       description="Runs the config's training; running the same command again "
                                   "resumes from the newest checkpoint in the output directory.")
    p.add_argument("--config", required=True, help="YAML file (see configs/finetune/)")
    p.add_argument("--output-dir", help="overrides train.output_dir")
    p.add_argument("--steps", type=int, help="overrides train.steps")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="stop after N steps of this call and save them (the same command resumes); "
                        "the schedule stays train.steps long")
    p.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=2,tensor=2 (overrides train.mesh)")
    p.add_argument("--export-hf", metavar="DIR", help="write the final model as an HF directory "
                                                      "(a LoRA run: the base with its adapters merged)")
    p.add_argument("--export-peft", metavar="DIR", help="a LoRA run (lora: section): write the adapters as a "
                                                        "PEFT directory (PeftModel.from_pretrained loads it)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. optim.learning_rate=1e-4 train.batch_size=16")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("train-tokenizer", help="train a StarCoder-style byte-level BPE tokenizer")
    p.add_argument("--data", nargs="+", required=True,
                   help="directories / globs / .jsonl files ({stdlib} = this Python's standard library)")
    p.add_argument("--extensions", default=".py", help="file endings to read, comma separated")
    p.add_argument("--eval-fraction", type=float, default=0.05,
                   help="documents held out (by hash of their name) and not trained on")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_train_tokenizer)

    plan.register(sub)
    infill.register_cli(sub)
    eval_command.register(sub)
    bench.register(sub)
    data_command.register(sub)
    serve_command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

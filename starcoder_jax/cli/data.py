"""`starcoder-jax prepare-data`: source files, JSONL or Parquet -> a token store (training.store)."""

from __future__ import annotations

import argparse
import json

from starcoder_jax.training.store import FORMATS


def cmd_prepare_data(args) -> int:
    from starcoder_jax.tokenizer import load_tokenizer
    from starcoder_jax.training.store import SourceSpec, prepare_store

    spec = SourceSpec(paths=tuple(args.data), format=args.format, text_field=args.text_field,
                      extensions=tuple(e if e.startswith(".") else "." + e for e in args.extensions.split(",")),
                      max_document_chars=args.max_document_chars)
    manifest = prepare_store(spec, load_tokenizer(args.tokenizer), args.out, eval_fraction=args.eval_fraction,
                             on_error=args.on_error, workers=args.workers,
                             batch_bytes=int(args.batch_mb * 2**20), progress=not args.quiet)
    print(json.dumps({"out": args.out, "documents": manifest["documents"], "tokens": manifest["tokens"],
                      "skipped": manifest["skipped"]}))
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Adds `starcoder-jax prepare-data` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "prepare-data", help="tokenize a corpus once into a memory-mapped token store (data.store)",
        description="Streams documents from files, JSONL or Parquet, tokenizes them in parallel batches and "
                    "writes a token store (tokens, document offsets, held-out split, manifest.json) that "
                    "fine-tuning reads with data.store. An interrupted run resumes when run again with the "
                    "same arguments; the store directory appears only when complete.")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH_OR_GLOB",
                   help="directories, globs, files, .jsonl(.gz) or .parquet files "
                        "({stdlib} = this Python's standard library)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json, a model directory or a hub id")
    p.add_argument("--out", required=True, metavar="STORE", help="the store directory to write (must not exist)")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="auto: by file name (.jsonl, .jsonl.gz, .parquet; anything else is one document)")
    p.add_argument("--text-field", default="content", help="the JSONL field / Parquet column holding the text")
    p.add_argument("--extensions", default=".py", help="file endings read from directories (files format), "
                                                       "comma separated")
    p.add_argument("--eval-fraction", type=float, default=0.0,
                   help="share of documents held out, by a hash of their name (data.is_held_out)")
    p.add_argument("--max-document-chars", type=int, default=200_000, help="longer documents are cut")
    p.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                   help="an undecodable file, bad JSON line or missing field: skip it (counted in the "
                        "manifest) or stop with an error naming the file and row")
    p.add_argument("--workers", type=int, default=None, help="tokenizer threads (default: every core)")
    p.add_argument("--batch-mb", type=float, default=4.0, help="text per tokenizer batch (MiB)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare_data)
    return p

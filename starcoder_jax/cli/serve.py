"""`starcoder-jax serve`: an OpenAI-compatible completion server (starcoder_jax.serve)."""

from __future__ import annotations

import argparse
import os
import sys

from starcoder_jax.cli import common
from starcoder_jax.config import KV_CACHE_MODES
from starcoder_jax.inference.fim import MODES


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="serve completions over HTTP (OpenAI /v1/completions, llama.cpp /infill)",
        description="Serves /v1/completions (OpenAI's fields; `suffix` for fill-in-the-middle; streaming), "
                    "/infill (llama.cpp's), /v1/models, /health and /metrics. Requests share --slots rows "
                    "of one KV cache (continuous batching). SIGTERM lets the live requests finish, then exits.")
    common.add_model_args(p)
    p.add_argument("--slots", type=int, default=8, help="requests generated together (rows of the KV cache)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="positions per request, prompt and completion (default: the model's)")
    p.add_argument("--kv-cache", choices=KV_CACHE_MODES, default=None,
                   help="int8: keys and values as int8 with a scale per token")
    p.add_argument("--mesh", help="device mesh, e.g. data=2,tensor=4 (default: one device)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429s")
    p.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (413 above)")
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help="prefill every prompt whole (default: a prompt extending a free slot's cached tokens "
                        "prefills only what is new)")
    common.add_draft_args(p)
    p.add_argument("--fim-mode", choices=MODES, default="psm", help="FIM layout of `suffix` requests")
    p.add_argument("--served-model-name", default=None,
                   help="the `model` clients name (default: the model directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-warmup", action="store_true", help="do not compile the decode step before listening")
    p.add_argument("--verbose", action="store_true", help="log every HTTP request")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from starcoder_jax.serve.engine import Engine
    from starcoder_jax.serve.server import Server

    if args.slots < 1:
        raise ValueError(f"--slots must be >= 1, got {args.slots}")
    model, tokenizer = common.load_model_and_tokenizer(args)
    name = args.served_model_name or os.path.basename(os.path.normpath(common.model_name(args.model)))
    engine = Engine(model, tokenizer, slots=args.slots, max_seq_len=args.max_seq_len, kv_cache=args.kv_cache,
                    max_queue=args.max_queue, mesh=args.mesh, prefix_reuse=not args.no_prefix_reuse,
                    draft=common.load_draft(args, model, tokenizer), num_draft_tokens=args.num_draft_tokens)
    if not args.no_warmup:
        print("compiling the decode step ...", file=sys.stderr, flush=True)
        engine.warmup()
    server = Server(engine, tokenizer, model_name=name, host=args.host, port=args.port, max_body=args.max_body,
                    fim_mode=args.fim_mode, verbose=args.verbose)
    server.drain_on_sigterm()
    print(f"serving {name} at {server.url} ({engine.slots} slots, {engine.max_seq_len} positions)",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.httpd.server_close()
        engine.close()
    print("drained, stopped", file=sys.stderr, flush=True)
    return 0

"""Completion server throughput and time to first token, against one-at-a-time `sj.generate`.

Starts the server in this process on loopback, then for each client count
(--clients) runs that many client threads, each sending its share of the
same greedy requests (streamed over HTTP, token-id prompts cut from this
Python's standard library, tokenized by the shipped tokenizer), and
measures generated tokens per second of wall time and each request's time
to first token. The same requests then run one after another through
`sj.generate` on the same model. A last part measures prefix reuse: a
prompt, then the same prompt with a few more tokens (the editor typing
case), time to first token of the second with reuse on and off.

    python docs/bench_serve.py                                  # the shipped model
    python docs/bench_serve.py --preset starcoderbase-1b --layers 4 --quantize int8
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import threading
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

if not (len(sys.argv) == 3 and sys.argv[1] == "--client-of"):  # the client process needs none of it
    import starcoder_jax as sj
    from starcoder_jax.config import preset
    from starcoder_jax.model.modules import init_model
    from starcoder_jax.model.pretrained import DEFAULT_MODEL, resolve_model_dir
    from starcoder_jax.serve.engine import Engine
    from starcoder_jax.serve.server import Server
    from starcoder_jax.tokenizer import load_tokenizer


def prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """n token-id prompts of `length` tokens from the standard library's sources."""
    import glob
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
    out = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            ids = tokenizer.encode(f.read())
        for start in range(0, len(ids) - length, 4 * length):
            out.append(ids[start:start + length])
            if len(out) == n:
                return out
    raise SystemExit("not enough source text for the prompts")


def stream(server: Server, ids: list[int], max_tokens: int) -> tuple[float, int]:
    """(seconds to the first token, completion tokens) of one streamed greedy request."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=600)
    body = json.dumps({"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise SystemExit(f"the server answered {response.status}: {response.read()[:300]!r}")
    first, tokens = None, 0
    while True:
        line = response.readline()
        if not line:
            break
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
            first = time.perf_counter() - start
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    conn.close()
    return (first if first is not None else time.perf_counter() - start), tokens


def run_clients(server: Server, work: list[list[int]], clients: int, max_tokens: int) -> dict:
    """The clients run in a process of their own (as editors would), so that their Python
    does not share the server's interpreter lock."""
    import subprocess
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"host": server.host, "port": server.port, "work": work, "clients": clients,
                   "max_tokens": max_tokens}, f)
    done = subprocess.run([sys.executable, __file__, "--client-of", f.name], capture_output=True, text=True,
                          check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    os.unlink(f.name)
    return json.loads(done.stdout.strip().splitlines()[-1])


class _Endpoint:
    def __init__(self, host, port):
        self.host, self.port = host, port


def client_process(path: str) -> None:
    with open(path) as f:
        job = json.load(f)
    print(json.dumps(_run_clients(_Endpoint(job["host"], job["port"]), job["work"], job["clients"],
                                  job["max_tokens"])))


def _run_clients(server, work: list[list[int]], clients: int, max_tokens: int) -> dict:
    ttft, tokens = [], []
    lock = threading.Lock()

    def client(share):
        for ids in share:
            t, n = stream(server, ids, max_tokens)
            with lock:
                ttft.append(t)
                tokens.append(n)

    shares = [work[i::clients] for i in range(clients)]
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(s,)) for s in shares]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"clients": clients, "requests": len(work), "tokens": sum(tokens), "wall_s": wall,
            "tok_s": sum(tokens) / wall, "ttft_median_s": statistics.median(ttft), "ttft_max_s": max(ttft)}


def run_sequential(model, tokenizer, work, max_tokens: int) -> dict:
    sj.generate(model, [work[0]], tokenizer=tokenizer, max_new_tokens=max_tokens)  # compile
    tokens, start = 0, time.perf_counter()
    for ids in work:
        tokens += len(sj.generate(model, [ids], tokenizer=tokenizer, max_new_tokens=max_tokens)[0].ids)
    wall = time.perf_counter() - start
    return {"requests": len(work), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "per_request_s": wall / len(work)}


def prefix_reuse(model, tokenizer, args, base: list[int], repeats: int) -> dict:
    out = {}
    for reuse in (True, False):
        engine = Engine(model, tokenizer, slots=1, max_seq_len=args.max_seq_len, kv_cache=args.kv_cache,
                        prefix_reuse=reuse)
        engine.warmup()
        server = Server(engine, tokenizer, model_name="bench", port=0)
        server.start()
        times = []
        for r in range(repeats + 1):
            stream(server, base, 1)  # the slot now holds `base`
            t, _ = stream(server, base + base[-8 + r % 4:][:8], 1)  # a few more tokens typed
            if r:  # the first pair compiles
                times.append(t)
        server.stop()
        out["on" if reuse else "off"] = statistics.median(times)
    return out


def main(argv=None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--client-of":
        client_process(sys.argv[2])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a model directory (default: the shipped model)")
    p.add_argument("--preset", default=None, help="random weights of a preset instead (e.g. starcoderbase-1b)")
    p.add_argument("--layers", type=int, default=None, help="with --preset: this many layers")
    p.add_argument("--quantize", default=None, choices=("int8", "int4", "nf4"))
    p.add_argument("--kv-cache", default=None, choices=("int8",))
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests", type=int, default=32, help="requests per client count")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--parts", default="served,sequential,reuse",
                   help="which measurements to run, of served, sequential, reuse")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    tokenizer = load_tokenizer(resolve_model_dir(DEFAULT_MODEL))
    if args.preset:
        overrides = {"n_layer": args.layers} if args.layers else {}
        model = init_model(preset(args.preset, **overrides))
        if args.quantize:
            model.quantize_(args.quantize)
        name = args.preset + (f" ({args.layers} layers)" if args.layers else "")
    else:
        path = resolve_model_dir(args.model or DEFAULT_MODEL)
        model = sj.load_pretrained(path, quantize=args.quantize)
        tokenizer = load_tokenizer(path)
        name = os.path.basename(path.rstrip("/"))
    name += f", {args.quantize}" if args.quantize else ""
    work = prompts(tokenizer, args.requests, args.prompt_tokens)
    print(f"model: {name}; {len(work)} requests of {args.prompt_tokens} prompt tokens, greedy, "
          f"max_tokens {args.max_tokens}; {args.slots} slots x {args.max_seq_len} positions", flush=True)
    parts = set(args.parts.split(","))
    served, seq, reuse = [], None, None
    if "served" in parts:
        engine = Engine(model, tokenizer, slots=args.slots, max_seq_len=args.max_seq_len, kv_cache=args.kv_cache,
                        max_queue=4 * args.requests)
        engine.warmup()
        server = Server(engine, tokenizer, model_name="bench", port=0)
        server.start()
        run_clients(server, work[:min(len(work), args.slots)], min(len(work), args.slots), 4)  # prompt buckets
        for clients in (int(c) for c in args.clients.split(",")):
            row = run_clients(server, work, clients, args.max_tokens)
            served.append(row)
            print(f"server, {clients:2d} clients: {row['tok_s']:8.1f} tok/s  ttft median "
                  f"{row['ttft_median_s']:.3f} s (max {row['ttft_max_s']:.3f})  {row['tokens']} tokens in "
                  f"{row['wall_s']:.1f} s", flush=True)
        server.stop()
    if "sequential" in parts:
        seq = run_sequential(model, tokenizer, work, args.max_tokens)
        print(f"sj.generate one after another: {seq['tok_s']:8.1f} tok/s  {seq['per_request_s']:.3f} s a request "
              f"({seq['tokens']} tokens)", flush=True)
        for row in served:
            print(f"  {row['clients']:2d} clients / one at a time: {row['tok_s'] / seq['tok_s']:.2f}x", flush=True)
    if "reuse" in parts:
        n = min(2 * args.prompt_tokens, args.max_seq_len - 16)
        base = (work[0] + work[1])[:n]
        reuse = prefix_reuse(model, tokenizer, args, base, 5)
        print(f"prefix reuse, time to first token of a {n}+8-token prompt extending the slot's {n}: "
              f"on {reuse['on']:.3f} s, off {reuse['off']:.3f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": name, "served": served, "sequential": seq, "prefix_reuse": reuse}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

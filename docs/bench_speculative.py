"""Speculative decoding against plain decoding, side by side in one run (batch 1, greedy).

Parts (--parts, comma separated):
  lookup  prompt lookup on the shipped model: "edit" prompts (a function from this
          Python's standard library, then the start of the same function again under a
          new name: the model rewrites it) and "fim" prompts (a line cut out of a function
          of a standard-library file, filled in the middle with the shipped tokenizer's FIM
          tokens); plain decoding and k = 2, 4, 8.
  self    self-speculation: the model's own first layers draft. On the shipped model
          (trained) and on a starcoderbase-1b-shaped model with random weights.
  verify  the cost of one verify pass (k + 1 tokens over a 512-token cache) against one
          decode step, k = 0 .. 8, on the starcoderbase-1b shape (float32 and int8).

Each method runs every prompt once to compile, then --repeats times in alternating order;
the figures are medians over the repeats of the summed wall time. ms/token is end to end
(prefill included, the same for every method) divided by generated tokens. Every
speculative output is checked to equal plain greedy output.

    python docs/bench_speculative.py                      # all parts (about 40 minutes on 2 cores)
    python docs/bench_speculative.py --parts lookup --repeats 5
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import platform
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import starcoder_jax as sj  # noqa: E402
from starcoder_jax.inference.fim import infill_generations  # noqa: E402
from starcoder_jax.inference.speculative import first_layers  # noqa: E402
from starcoder_jax.model.kv_cache import KVCache  # noqa: E402


def functions(n: int, min_lines: int = 8, max_lines: int = 30) -> list[tuple[str, str]]:
    """n (file text, function source) pairs from the standard library's modules."""
    out = []
    for path in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and min_lines <= node.end_lineno - node.lineno + 1 <= max_lines:
                out.append((text, ast.get_source_segment(text, node)))
                break
        if len(out) == n:
            return out
    raise SystemExit("not enough functions in the standard library")


def edit_prompts(n: int) -> list[str]:
    """A function, then its first two lines again under a new name: the model goes on rewriting it."""
    prompts = []
    for _, source in functions(n):
        head = source.split("\n")
        name = head[0].split("def ", 1)[1].split("(", 1)[0]
        again = "\n".join(head[:2]).replace(f"def {name}(", f"def {name}_v2(", 1)
        prompts.append(f"{source}\n\n\n{again}\n")
    return prompts


def fim_pairs(n: int, tokenizer, budget: int) -> list[tuple[str, str]]:
    """(prefix, suffix): a line from the middle of a function cut out of its file; the prefix keeps
    its last `budget` tokens' worth of text."""
    pairs = []
    for text, source in functions(n, min_lines=12):
        start = text.index(source)
        lines = source.split("\n")
        cut = start + len("\n".join(lines[:len(lines) // 2])) + 1
        end = text.index("\n", cut) + 1
        prefix, suffix = text[:cut], text[end:]
        while len(tokenizer.encode(prefix)) + min(len(tokenizer.encode(suffix[:2000])), budget // 2) > budget:
            prefix = prefix[len(prefix) // 4:]
        pairs.append((prefix, suffix[:1500]))
    return pairs


def timed(fn, repeats: int, order: list[str]) -> dict[str, float]:
    """Median seconds per method over `repeats` alternating rounds (fn(method) runs one method)."""
    times = {m: [] for m in order}
    for r in range(repeats):
        for m in (order if r % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            fn(m)
            times[m].append(time.perf_counter() - start)
    return {m: statistics.median(t) for m, t in times.items()}


def compare(name: str, methods: dict, run, repeats: int) -> list[dict]:
    """methods: label -> generate keywords; run(kwargs) -> list of Generations. One row per method."""
    results = {m: run(kw) for m, kw in methods.items()}  # compiles; outputs to compare
    plain = [g.ids for g in results["plain"]]
    seconds = timed(lambda m: run(methods[m]), repeats, list(methods))
    rows = []
    for m, gens in results.items():
        tokens = sum(len(g.ids) for g in gens)
        drafted = sum(g.draft_tokens or 0 for g in gens)
        row = {"workload": name, "method": m, "tokens": tokens, "seconds": seconds[m],
               "ms_per_token": 1e3 * seconds[m] / tokens, "speedup": seconds["plain"] / seconds[m],
               "acceptance": sum(g.accepted_tokens or 0 for g in gens) / drafted if drafted else None,
               "tokens_per_round": None, "identical": [g.ids for g in gens] == plain}
        if drafted:
            k = methods[m]["num_draft_tokens"]
            rounds = drafted / k
            row["tokens_per_round"] = (tokens - len(gens)) / rounds  # the first token comes from prefill
        rows.append(row)
        accepted = "-" if row["acceptance"] is None else f"{row['acceptance']:.2f}"
        print(f"{name:>14} {m:>22}: {row['ms_per_token']:7.2f} ms/token  {row['speedup']:5.2f}x  "
              f"acceptance {accepted}  identical {row['identical']}", flush=True)
    return rows


def shipped():
    from starcoder_jax.model.pretrained import DEFAULT_MODEL, resolve_model_dir

    path = resolve_model_dir(DEFAULT_MODEL)
    return sj.load_pretrained(path), sj.load_tokenizer(path)


def part_lookup(args) -> list[dict]:
    model, tok = shipped()
    methods = {"plain": {}} | {f"prompt-lookup k={k}": {"draft": "prompt-lookup", "num_draft_tokens": k}
                               for k in (2, 4, 8)}
    edits = edit_prompts(args.prompts)
    rows = compare("edit", methods, lambda kw: [
        sj.generate(model, [p], tokenizer=tok, max_new_tokens=args.max_new, **kw)[0] for p in edits], args.repeats)
    pairs = fim_pairs(args.prompts, tok, model.config.n_positions - args.max_new)
    rows += compare("fim", methods, lambda kw: [
        infill_generations(model, tok, [pair], max_new_tokens=args.max_new, **kw)[0] for pair in pairs],
        args.repeats)
    return rows


def part_self(args) -> list[dict]:
    model, tok = shipped()
    edits = edit_prompts(args.prompts)
    methods = {"plain": {}}
    for layers in (2, 3):
        draft = first_layers(model, layers)
        methods |= {f"self {layers}/{model.config.n_layer} k={k}": {"draft": draft, "num_draft_tokens": k}
                    for k in (2, 4)}
    rows = compare("shipped edit", methods, lambda kw: [
        sj.generate(model, [p], tokenizer=tok, max_new_tokens=args.max_new, **kw)[0] for p in edits], args.repeats)
    config = sj.preset("starcoderbase-1b")
    big = sj.init_model(config)
    rng = np.random.default_rng(0)
    ids = [rng.integers(100, config.vocab_size, 256).tolist() for _ in range(2)]
    methods = {"plain": {}}
    for layers in (2, 6):
        draft = first_layers(big, layers)
        methods |= {f"self {layers}/24 k={k}": {"draft": draft, "num_draft_tokens": k} for k in (2, 4)}
    rows += compare("1b random", methods, lambda kw: [
        sj.generate(big, [p], max_new_tokens=args.max_new_big, ignore_eos=True, **kw)[0] for p in ids],
        args.repeats)
    return rows


def part_verify(args) -> list[dict]:
    """One forward of T = k + 1 tokens at position 512 of a cache, against T = 1."""
    rows = []
    for quantize in (None, "int8"):
        model = sj.init_model(sj.preset("starcoderbase-1b"))
        if quantize:
            model.quantize_(quantize)
        graphdef, params = nnx.split(model.adapt_to_backend_(decode=True))

        @jax.jit
        def step(params, ids, cache, graphdef=graphdef):
            m = nnx.merge(graphdef, params)
            positions = 512 + jnp.arange(ids.shape[1], dtype=jnp.int32)[None]
            hidden, cache = m.hidden(ids, positions, cache)
            return m.logits(hidden), cache

        base = None
        for k in range(9):
            cache = KVCache.init(model.config, 1, 1024)
            ids = jnp.ones((1, k + 1), jnp.int32)
            jax.block_until_ready(step(params, ids, cache))
            times = []
            for _ in range(args.repeats * 3):
                start = time.perf_counter()
                jax.block_until_ready(step(params, ids, cache))
                times.append(time.perf_counter() - start)
            ms = 1e3 * statistics.median(times)
            base = base or ms
            rows.append({"weights": quantize or "float32", "k": k, "ms": ms, "relative": ms / base})
            print(f"verify {quantize or 'float32':>7} k={k}: {ms:7.2f} ms ({ms / base:.2f}x one decode step)",
                  flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="lookup,self,verify")
    p.add_argument("--prompts", type=int, default=8, help="prompts per workload")
    p.add_argument("--max-new", type=int, default=64, help="new tokens at most (shipped model)")
    p.add_argument("--max-new-big", type=int, default=32, help="new tokens (starcoderbase-1b shape)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}")
    out = {}
    for part in args.parts.split(","):
        out[part] = {"lookup": part_lookup, "self": part_self, "verify": part_verify}[part](args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

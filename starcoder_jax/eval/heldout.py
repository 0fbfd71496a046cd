"""Quality of a model on held-out source files: bits per byte, parse rate, FIM exact match.

`starcoder-jax eval heldout --model M --data DIR` measures, on the documents
that `data.split_documents` holds out (the split training never sees):

- bits per byte: the model's negative log-likelihood of every token of the
  held-out files, in bits, divided by the UTF-8 bytes those tokens spell.
  Files are cut into windows of n_positions - 1 tokens, each preceded by
  <|endoftext|> (the separator the model saw between training documents),
  so every scored token has at least that context.
- parse rate: for functions with a docstring, the header and docstring
  (dedented) are the prompt (those that leave room for the completion in
  the model's positions); the greedy completion of up to 128 tokens, cut at BigCode's stop
  sequences ("\\nclass", "\\ndef", "\\n#", "\\n@", "\\nprint", "\\nif"), must
  make `ast.parse(prompt + completion)` succeed and give the function at
  least one statement after its docstring.
- FIM single-line exact match: a held-out line is removed (its leading
  indentation stays in the prefix) and infilled (PSM, greedy) from the rest of
  the file; the first line of the generated middle must equal the removed
  text exactly, after stripping whitespace at both ends.

The samples are chosen by a seeded generator, so two models see the same ones.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from starcoder_jax.inference.fim import encode_literal, infill_batch
from starcoder_jax.inference.generate import generate
from starcoder_jax.training.data import DataConfig, collect_documents, split_documents
from starcoder_jax.training.losses import token_nll_sum

PARSE_STOPS = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif")


@dataclasses.dataclass
class HeldoutReport:
    documents: int
    tokens: int
    bytes: int
    bits_per_byte: float
    parse_rate: float
    parse_samples: int
    fim_exact_match: float
    fim_samples: int

    def table(self) -> str:
        return "\n".join([
            f"held-out documents      {self.documents}",
            f"tokens / bytes scored   {self.tokens:,} / {self.bytes:,}",
            f"bits per byte           {self.bits_per_byte:.3f}",
            f"parse rate              {100 * self.parse_rate:.1f}% of {self.parse_samples}",
            f"FIM single-line EM      {100 * self.fim_exact_match:.1f}% of {self.fim_samples}",
        ])


def bits_per_byte(model, tokenizer, texts, *, batch_size: int = 8, progress=None) -> tuple[float, int, int]:
    """(bits per byte, tokens scored, bytes scored) over `texts`."""
    window = model.config.n_positions - 1
    eos = tokenizer.eos_id
    rows, nbytes = [], 0
    for text in texts:
        ids = encode_literal(tokenizer, text)
        for start in range(0, len(ids), window):
            chunk = ids[start:start + window]
            rows.append([eos] + chunk)
            nbytes += len(tokenizer.decode(chunk).encode("utf-8"))
    graphdef, params = nnx.split(model)
    score = jax.jit(_nll_sum, static_argnums=0)
    total, count = 0.0, 0
    for i in tqdm(range(0, len(rows), batch_size), desc="bits per byte", disable=not progress):
        batch = rows[i:i + batch_size]
        width = window + 1
        ids = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width), bool)
        for r, row in enumerate(batch):
            ids[r, :len(row)] = row
            mask[r, 1:len(row)] = True
        total += float(score(graphdef, params, jnp.asarray(ids), jnp.asarray(mask)))
        count += int(mask.sum())
    return total / math.log(2) / max(nbytes, 1), count, nbytes


def _nll_sum(graphdef, params, ids, mask):
    return token_nll_sum(nnx.merge(graphdef, params), ids, mask)


def function_prompts(texts, rng: np.random.Generator, limit: int) -> list[str]:
    """Dedented `def ...:` headers with their docstrings, from functions that have one."""
    found = []
    for text in texts:
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.body:
                continue
            doc = node.body[0]
            if not (isinstance(doc, ast.Expr) and isinstance(getattr(doc, "value", None), ast.Constant)
                    and isinstance(doc.value.value, str)) or len(node.body) < 2:
                continue
            start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
            header = textwrap.dedent("".join(lines[start:doc.end_lineno]))
            if len(header) < 4000:
                found.append(header)
    order = rng.permutation(len(found))[:limit]
    return [found[i] for i in sorted(order)]


def parses(prompt: str, completion: str) -> bool:
    """Prompt + completion (cut at the stops) is valid Python and the function got a
    body beyond its docstring (a bare docstring would parse on its own)."""
    cut = min([i for i in (completion.find(s) for s in PARSE_STOPS) if i >= 0], default=len(completion))
    try:
        tree = ast.parse(prompt + completion[:cut])
    except (SyntaxError, ValueError):
        return False
    functions = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return bool(functions) and len(functions[0].body) >= 2


_INTERESTING = re.compile(r"[A-Za-z0-9_]")


def fim_lines(texts, rng: np.random.Generator, limit: int) -> list[tuple[str, str, str]]:
    """(prefix, middle, suffix) with middle = one stripped code line of a held-out file."""
    candidates = []
    for t, text in enumerate(texts):
        offset = 0
        for line in text.splitlines(keepends=True):
            body = line.strip()
            if 8 <= len(body) <= 100 and not body.startswith("#") and _INTERESTING.search(body):
                indent = len(line) - len(line.lstrip())
                candidates.append((t, offset + indent, offset + indent + len(line.rstrip()) - indent))
            offset += len(line)
    order = rng.permutation(len(candidates))[:limit]
    out = []
    for i in sorted(order):
        t, start, end = candidates[i]
        text = texts[t]
        out.append((text[:start], text[start:end], text[end:]))
    return out


def evaluate(model, tokenizer, texts, *, parse_samples: int = 100, fim_samples: int = 200,
             seed: int = 0, batch_size: int = 16, progress=None) -> HeldoutReport:
    rng = np.random.default_rng(seed)
    bpb, tokens, nbytes = bits_per_byte(model, tokenizer, texts, progress=progress)

    max_new = min(128, model.config.n_positions // 2)
    fits = [p for p in function_prompts(texts, rng, 4 * parse_samples)
            if len(tokenizer.encode(p)) + max_new <= model.config.n_positions]
    prompts = fits[:parse_samples]
    ok = 0
    for i in tqdm(range(0, len(prompts), batch_size), desc="parse", disable=not progress):
        part = prompts[i:i + batch_size]
        results = generate(model, part, tokenizer=tokenizer, max_new_tokens=max_new, stop=PARSE_STOPS)
        ok += sum(parses(p, r.text) for p, r in zip(part, results))

    cases = fim_lines(texts, rng, fim_samples)
    hits = 0
    for i in tqdm(range(0, len(cases), batch_size), desc="fim", disable=not progress):
        part = cases[i:i + batch_size]
        middles = infill_batch(model, tokenizer, [(p, s) for p, _, s in part], max_new_tokens=48)
        hits += sum(m.split("\n")[0].strip() == want.strip() for m, (_, want, _) in zip(middles, part))
    return HeldoutReport(
        documents=len(texts), tokens=tokens, bytes=nbytes, bits_per_byte=bpb,
        parse_rate=ok / max(len(prompts), 1), parse_samples=len(prompts),
        fim_exact_match=hits / max(len(cases), 1), fim_samples=len(cases))


def heldout_texts(paths, extensions: str = ".py", eval_fraction: float = 0.05) -> list[str]:
    """The texts of the documents `data.split_documents` holds out of the training data.

    paths: what the training read (directories, globs, .jsonl; "{stdlib}" is this
    Python's standard library); extensions: comma-separated file endings.
    """
    config = DataConfig(paths=tuple(paths), extensions=tuple(extensions.split(",")), eval_fraction=eval_fraction)
    _, held = split_documents(collect_documents(config), eval_fraction)
    if not held:
        raise ValueError(f"no held-out documents at eval_fraction={eval_fraction}: raise --eval-fraction")
    return [text for _, text in held]

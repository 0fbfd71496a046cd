"""`starcoder-jax infill`: the command line over `starcoder_jax.inference.fim`.

The main parser calls `register_cli(subparsers)`; the handler `run_infill`
takes the parsed arguments and returns the exit code (2 for bad input, with
a one-line message on stderr instead of a traceback).
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from starcoder_jax.cli import common
from starcoder_jax.inference.fim import MODES

_CURSOR = re.compile(r"^(\d+):(\d+)$")


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit code 2."""


def register_cli(subparsers) -> argparse.ArgumentParser:
    """Adds the `infill` subcommand to `subparsers` (from ArgumentParser.add_subparsers)."""
    p = subparsers.add_parser(
        "infill", help="fill in the middle between a prefix and a suffix",
        description="Writes the code between a prefix and a suffix, given as text "
                    "(--prefix/--suffix) or as a file and a cursor position (--file/--cursor). "
                    "Prints the middle followed by a newline; --json prints the exact text and ids.",
    )
    common.add_model_args(p)
    p.add_argument("--prefix", default=None, help="the text before the cursor")
    p.add_argument("--suffix", default=None, help="the text after the cursor")
    p.add_argument("--file", default=None, metavar="PATH", help="a UTF-8 source file to infill")
    p.add_argument("--cursor", default=None, metavar="LINE:COL",
                   help="where in --file the middle goes: 1-based line and 1-based column "
                        "(in characters; LINE:1 is the line start, one past the last character its end)")
    p.add_argument("--mode", choices=MODES, default="psm", help="prompt layout (default: psm)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 keeps all tokens")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    common.add_draft_args(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: prompt_ids, ids, text, finish_reason")
    p.set_defaults(func=run_infill)
    return p


def run_infill(args: argparse.Namespace) -> int:
    """The `infill` handler: returns the process exit code."""
    try:
        prefix, suffix = _prefix_suffix(args)
        if args.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be >= 1; got {args.max_new_tokens}")
        model, tokenizer = common.load_model_and_tokenizer(args)
        from starcoder_jax.inference.fim import infill_generations

        gen = infill_generations(model, tokenizer, [(prefix, suffix)], mode=args.mode,
                                 max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                 draft=common.load_draft(args, model, tokenizer),
                                 num_draft_tokens=args.num_draft_tokens)[0]
    except (UsageError, ValueError, FileNotFoundError) as err:
        print(f"starcoder-jax infill: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"prompt_ids": [int(i) for i in gen.prompt_ids], "ids": [int(i) for i in gen.ids],
                          "text": gen.text, "finish_reason": gen.finish_reason}, ensure_ascii=False))
    else:
        print(gen.text)
    return 0


def _prefix_suffix(args: argparse.Namespace) -> tuple[str, str]:
    text_given = args.prefix is not None or args.suffix is not None
    if args.file is None and args.cursor is None:
        if not text_given:
            raise UsageError("give --prefix/--suffix, or --file with --cursor")
        return args.prefix or "", args.suffix or ""
    if text_given:
        raise UsageError("--prefix/--suffix and --file/--cursor exclude each other; give one pair")
    if args.file is None or args.cursor is None:
        raise UsageError("--file and --cursor go together; got only "
                         + ("--file" if args.cursor is None else "--cursor"))
    text = read_utf8(args.file)
    offset = cursor_offset(text, args.cursor, source=args.file)
    return text[:offset], text[offset:]


def read_utf8(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UsageError(f"--file {path}: no such file") from None
    except OSError as err:
        raise UsageError(f"--file {path}: cannot read it ({err.strerror or err})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"--file {path}: not UTF-8 text (byte offset {err.start}: {err.reason})") from None


def cursor_offset(text: str, cursor: str, *, source: str = "the file") -> int:
    """The character offset of a 1-based LINE:COL cursor in `text`.

    Lines are split at "\\n" (a "\\r" before it counts as part of the line
    ending); column COL is before the COL-th character of the line, and one
    past its last character is its end. After a final newline there is one
    more, empty, line.
    """
    match = _CURSOR.match(cursor.strip())
    if not match:
        raise UsageError(f"--cursor must be LINE:COL with 1-based numbers, e.g. 12:5; got {cursor!r}")
    line, col = int(match[1]), int(match[2])
    if line < 1 or col < 1:
        raise UsageError(f"--cursor line and column start at 1; got {cursor!r}")
    lines = text.split("\n")
    if line > len(lines):
        raise UsageError(f"--cursor {cursor} is outside {source}: it has lines 1..{len(lines)}")
    width = len(lines[line - 1].removesuffix("\r"))
    if col > width + 1:
        raise UsageError(f"--cursor {cursor} is outside line {line} of {source}: "
                         f"it has {width} characters, so columns 1..{width + 1}")
    return sum(len(s) + 1 for s in lines[:line - 1]) + col - 1

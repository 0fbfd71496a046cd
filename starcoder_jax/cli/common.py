"""What the subcommands share: the model flags and the one loader of a model and its tokenizer."""

from __future__ import annotations

import argparse

from starcoder_jax.config import ATTENTION_IMPLS, MATMUL_IMPLS, QUANTIZATION_MODES
from starcoder_jax.model.pretrained import DEFAULT_MODEL  # the small model shipped in the package

DTYPES = ("float32", "bfloat16", "float16")


def add_model_args(parser, *, model_help: str | None = None, dtypes: tuple[str, ...] = DTYPES,
                   dtype_default: str | None = "float32", dtype_help: str | None = None,
                   quantize: dict | None = None) -> None:
    """Adds --model, --dtype, --quantize, --attention-impl, --matmul-impl and --adapter to a parser (or group).

    model_help, dtype_help: the flags' help where a command means something else
    by them (bench: random weights without --model). quantize: add_argument
    keywords replacing --quantize's defaults (bench takes a list of variants).
    """
    default = f" (default: {DEFAULT_MODEL})" if DEFAULT_MODEL else ""
    parser.add_argument("--model", default=None,
                        help=model_help or f"model directory (HF or converted orbax) or hub id{default}")
    parser.add_argument("--dtype", default=dtype_default, choices=dtypes,
                        help=dtype_help or "parameter and compute dtype (float32 is the fast one on CPU)")
    parser.add_argument("--quantize", **{
        "choices": QUANTIZATION_MODES, "default": None,
        "help": "weight-only matmul weights: int8 (per-output-channel scales), int4 (groups of 64 "
                "inputs) or nf4 (QLoRA's NormalFloat); a quantized orbax directory needs no flag", **(quantize or {})})
    parser.add_argument("--attention-impl", default="auto", choices=ATTENTION_IMPLS,
                        help="which attention kernel runs (default auto: chosen per backend and phase)")
    parser.add_argument("--matmul-impl", default="auto", choices=MATMUL_IMPLS,
                        help="which projection kernel runs (default auto: chosen per backend)")
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="a PEFT LoRA adapter directory (or hub id) for the model, applied on load")


def model_name(given: str | None) -> str:
    """The model a command runs: --model, else the shipped default model."""
    if given:
        return given
    if DEFAULT_MODEL:
        return DEFAULT_MODEL
    raise ValueError("--model is required (a model directory or a hub id); there is no default model")


def load_model(args: argparse.Namespace, *, name: str | None = None, **overrides):
    """The model named by `name` (default: --model, else the shipped model), loaded with the
    command's --dtype, --quantize, --attention-impl, --matmul-impl and --adapter.

    A flag a command does not declare takes load_pretrained's default;
    overrides (any load_pretrained keyword) replace what the flags say.
    """
    from starcoder_jax.model.pretrained import load_pretrained

    kwargs = {"dtype": getattr(args, "dtype", None) or "float32", "quantize": getattr(args, "quantize", None),
              "attention_impl": getattr(args, "attention_impl", "auto"),
              "matmul_impl": getattr(args, "matmul_impl", "auto"), "adapter": getattr(args, "adapter", None)}
    return load_pretrained(_model_dir(args, name), **(kwargs | overrides))


def load_model_and_tokenizer(args: argparse.Namespace, *, name: str | None = None, **overrides):
    """(model, tokenizer): `load_model(args, name=name, **overrides)` and the tokenizer of the
    model's directory."""
    from starcoder_jax.tokenizer import load_tokenizer

    path = _model_dir(args, name)
    return load_model(args, name=path, **overrides), load_tokenizer(path)


def _model_dir(args: argparse.Namespace, name: str | None) -> str:
    from starcoder_jax.model.pretrained import resolve_model_dir

    return resolve_model_dir(name or model_name(getattr(args, "model", None)))


def add_draft_args(parser) -> None:
    """Adds --draft and --num-draft-tokens (speculative decoding) to a parser."""
    parser.add_argument("--draft", default=None, metavar="MODEL|prompt-lookup|self:N",
                        help="speculative decoding: a draft model sharing the tokenizer (directory or hub id), "
                             "prompt-lookup (drafts copied from earlier text), or self:N (the model's own "
                             "first N layers); greedy output is unchanged")
    parser.add_argument("--num-draft-tokens", type=int, default=None, metavar="K",
                        help="tokens drafted and checked per step (default 4; needs --draft)")


def load_draft(args: argparse.Namespace, model, tokenizer):
    """What --draft names, for generate(draft=...): None, "prompt-lookup", the model's first layers,
    or a draft model loaded with the command's --dtype, --quantize and kernel flags (no adapter),
    whose tokenizer must be the model's."""
    from starcoder_jax.inference import speculative

    draft = getattr(args, "draft", None)
    if draft is None or draft == speculative.PROMPT_LOOKUP:
        return draft
    if draft.startswith("self:"):
        layers = draft[len("self:"):]
        if not layers.isdigit():
            raise ValueError(f"--draft self:N takes a layer count, got {draft!r}")
        return speculative.first_layers(model, int(layers))
    from starcoder_jax.tokenizer import load_tokenizer

    path = _model_dir(args, draft)
    theirs = load_tokenizer(path)
    if theirs.backend.get_vocab(with_added_tokens=True) != tokenizer.backend.get_vocab(with_added_tokens=True):
        raise ValueError(f"--draft {draft}: its tokenizer differs from the model's; a draft must share it")
    return load_model(args, name=path, adapter=None)

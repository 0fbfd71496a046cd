"""Requests and responses of the two completion APIs the server speaks.

- OpenAI's legacy completions (`POST /v1/completions`): the fields its
  clients send, checked as OpenAI checks them (an unknown field is refused),
  `suffix` for fill-in-the-middle, responses and stream chunks in its shape.
  A few fields vLLM also accepts extend it: `top_k`, `min_p`,
  `repetition_penalty`, and `fim_mode` ("psm" or "spm").
- llama.cpp's `POST /infill`: `input_prefix`, `input_suffix`, `input_extra`
  (files of context), `prompt` (text after the middle token) and the
  sampling options of its `/completion`, with its defaults; unknown fields
  are ignored, as llama.cpp does.

Parsing turns a JSON body into engine Requests, or raises ApiError with the
HTTP status and an OpenAI-style error body.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
import uuid
from collections.abc import Sequence

from starcoder_jax.inference.fim import MODES, build_prompt, encode_literal, infill_stop_ids
from starcoder_jax.inference.sampling import SamplingParams
from starcoder_jax.serve.engine import TOP_LOGPROBS, Event, Request
from starcoder_jax.tokenizer import Tokenizer

MAX_STOP_STRINGS = 4  # OpenAI's limit for `stop`
MAX_N = 16  # choices per prompt at most
FILE_SEP = "<file_sep>"


class ApiError(Exception):
    """An error the client caused (4xx) or that the server reports (5xx), as OpenAI shapes it."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def _number(body: dict, name: str, default, lo: float, hi: float, *, integer: bool = False,
            lo_open: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise _bad(f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if value < lo or value > hi or (lo_open and value == lo):
        left = "(" if lo_open else "["
        raise _bad(f"'{name}' must be in {left}{lo}, {hi}], got {value!r}", name)
    return value


def _stops(value, name: str = "stop", limit: int | None = MAX_STOP_STRINGS) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _bad(f"'{name}' must be a string or a list of strings", name)
    if limit is not None and len(value) > limit:
        raise _bad(f"'{name}' holds at most {limit} sequences, got {len(value)}", name)
    return tuple(s for s in value if s)


@dataclasses.dataclass
class Completion:
    """A parsed /v1/completions call: its engine requests, one per (prompt, choice)."""

    requests: list[Request]
    prompt_tokens: int  # each prompt counted once, whatever n is
    stream: bool
    include_usage: bool
    logprobs: int | None
    id: str = dataclasses.field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


# OpenAI's fields for /v1/completions, and the extensions accepted beside them
OPENAI_FIELDS = {"model", "prompt", "suffix", "max_tokens", "temperature", "top_p", "n", "stream",
                 "stream_options", "logprobs", "echo", "stop", "presence_penalty", "frequency_penalty",
                 "best_of", "logit_bias", "user", "seed"}
EXTENSIONS = {"top_k", "min_p", "repetition_penalty", "fim_mode"}


def parse_completion(body: dict, tokenizer: Tokenizer, *, model_name: str, fim_mode: str = "psm") -> Completion:
    unknown = sorted(set(body) - OPENAI_FIELDS - EXTENSIONS)
    if unknown:
        raise _bad(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    if body.get("model") not in (None, model_name):
        raise ApiError(404, f"The model '{body['model']}' does not exist; this server serves '{model_name}'",
                       param="model", code="model_not_found")
    if "prompt" not in body:
        raise _bad("'prompt' is required", "prompt")
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise _bad("'suffix' must be a string", "suffix")
    prompts, texts = _prompts(body["prompt"], tokenizer, allow_empty=suffix is not None)
    mode = body.get("fim_mode", fim_mode)
    if mode not in MODES:
        raise _bad(f"'fim_mode' must be one of {', '.join(MODES)}, got {mode!r}", "fim_mode")
    max_tokens = _number(body, "max_tokens", 16, 1, 1 << 30, integer=True)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = _number(body, "top_k", 0, 0, 1 << 30, integer=True)
    min_p = _number(body, "min_p", 0.0, 0.0, 0.999999)
    penalty = _number(body, "repetition_penalty", 1.0, 0.0, 100.0, lo_open=True)
    n = _number(body, "n", 1, 1, MAX_N, integer=True)
    best_of = _number(body, "best_of", n, 1, MAX_N, integer=True)
    if best_of != n:
        raise _bad("'best_of' other than n is not supported", "best_of")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0:
            raise _bad(f"'{name}' is not supported; use 'repetition_penalty'", name)
    if body.get("logit_bias"):
        raise _bad("'logit_bias' is not supported", "logit_bias")
    if body.get("echo", False) is not False:
        raise _bad("'echo' is not supported (only false)", "echo")
    logprobs = body.get("logprobs")
    if logprobs is not None:
        logprobs = _number(body, "logprobs", None, 0, TOP_LOGPROBS, integer=True)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise _bad("'stream_options' takes only include_usage", "stream_options")
    if options and not stream:
        raise _bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad("'seed' must be an integer", "seed")
    stop = _stops(body.get("stop"))
    sampling = _sampling(temperature, top_k, top_p, min_p, penalty)
    ends = (tokenizer.eos_id,)
    if suffix is not None:
        prompts = [build_prompt(tokenizer, t if t is not None else tokenizer.decode(p), suffix, mode)
                   for p, t in zip(prompts, texts)]
        ends = tuple(infill_stop_ids(tokenizer))
    base_seed = secrets.randbelow(1 << 31) if seed is None else seed
    requests = []
    for i, ids in enumerate(prompts):
        for j in range(n):
            requests.append(Request(ids, max_tokens, sampling, seed=_seed(base_seed, i * n + j), stop=stop,
                                    stop_ids=ends, logprobs=logprobs, index=i * n + j))
    return Completion(requests, sum(len(p) for p in prompts), stream,
                      bool(options.get("include_usage", False)), logprobs)


def _sampling(temperature, top_k, top_p, min_p, penalty) -> SamplingParams:
    try:
        return SamplingParams(float(temperature), int(top_k), float(top_p), float(min_p), float(penalty))
    except ValueError as err:
        raise _bad(str(err)) from None


def _seed(base: int, index: int) -> int:
    """Choice `index`'s seed: a distinct int32 per choice, the first one `base` itself."""
    return (int(base) + index * 0x9E3779B1) % (1 << 31)


def _prompts(value, tokenizer: Tokenizer, *, allow_empty: bool = False) -> tuple[list[list[int]], list[str | None]]:
    """OpenAI's prompt forms: a string, a list of strings, a list of ids, a list of lists of ids.
    Returns the ids of each prompt and its text (None where ids were given)."""
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _bad("'prompt' must be a string, a list of strings, or token ids", "prompt")
    out, texts = [], []
    for p in value:
        texts.append(p if isinstance(p, str) else None)
        if isinstance(p, str):
            ids = tokenizer.encode(p)
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            ids = list(p)
        else:
            raise _bad("'prompt' must be a string, a list of strings, or token ids", "prompt")
        if not ids and not allow_empty:  # (a FIM prefix may be empty: the special tokens remain)
            raise _bad("'prompt' is empty; give at least one token", "prompt")
        out.append(ids)
    return out, texts


def completion_body(c: Completion, results: Sequence[tuple[str, list[Event]]], *, model_name: str,
                    tokenizer: Tokenizer) -> dict:
    """The response of a finished non-streamed completion. results: per request, its text and events."""
    choices, completion_tokens = [], 0
    for request, (text, events) in zip(c.requests, results):
        last = events[-1]
        completion_tokens += last.completion_tokens
        choices.append({"text": text, "index": request.index, "finish_reason": last.finish_reason,
                        "logprobs": _logprobs(events, tokenizer) if c.logprobs is not None else None})
    return {"id": c.id, "object": "text_completion", "created": c.created, "model": model_name,
            "choices": choices, "usage": _usage(c, completion_tokens)}


def _usage(c: Completion, completion_tokens: int) -> dict:
    cached = sum(r.cached_tokens for r in c.requests)
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": c.prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _logprobs(events: Sequence[Event], tokenizer: Tokenizer, offset: int = 0) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    for e in events:
        for tid, lp, top in zip(e.ids, e.logprobs, e.top):
            piece = tokenizer.decode([tid])
            tokens.append(piece)
            token_lps.append(lp)
            tops.append({tokenizer.decode([a]): b for a, b in top})
            offsets.append(offset)
            offset += len(piece)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def completion_chunk(c: Completion, request: Request, event: Event, *, model_name: str,
                     tokenizer: Tokenizer) -> dict:
    """One server-sent chunk of a streamed completion."""
    choice = {"text": event.text, "index": request.index,
              "finish_reason": event.finish_reason if event.finished else None,
              "logprobs": _logprobs([event], tokenizer) if c.logprobs is not None else None}
    chunk = {"id": c.id, "object": "text_completion", "created": c.created, "model": model_name,
             "choices": [choice]}
    if c.include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(c: Completion, completion_tokens: int, *, model_name: str) -> dict:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    return {"id": c.id, "object": "text_completion", "created": c.created, "model": model_name,
            "choices": [], "usage": _usage(c, completion_tokens)}


# ---------------------------------------------------------------------------- llama.cpp's /infill

@dataclasses.dataclass
class Infill:
    request: Request
    stream: bool
    n_probs: int


def parse_infill(body: dict, tokenizer: Tokenizer, *, max_seq_len: int, fim_mode: str = "psm") -> Infill:
    def text(name: str) -> str:
        value = body.get(name, "")
        if value is None:
            return ""
        if not isinstance(value, str):
            raise _bad(f"'{name}' must be a string", name)
        return value

    prefix, suffix, after = text("input_prefix"), text("input_suffix"), text("prompt")
    extra = body.get("input_extra") or []
    if not isinstance(extra, list) or not all(
            isinstance(c, dict) and isinstance(c.get("text", ""), str) and isinstance(c.get("filename", ""), str)
            for c in extra):
        raise _bad("'input_extra' must be a list of {\"filename\": string, \"text\": string}", "input_extra")
    mode = body.get("fim_mode", fim_mode)
    if mode not in MODES:
        raise _bad(f"'fim_mode' must be one of {', '.join(MODES)}, got {mode!r}", "fim_mode")
    ids = _extra_context(extra, tokenizer) + build_prompt(tokenizer, prefix, suffix, mode)
    ids += encode_literal(tokenizer, after) if after else []
    n_predict = _number(body, "n_predict", -1, -1, 1 << 30, integer=True)
    room = max_seq_len - len(ids)
    if n_predict in (-1, 0):  # llama.cpp: -1 is "until the context is full"
        n_predict = max(room, 1)
    temperature = _number(body, "temperature", 0.8, 0.0, 100.0)
    top_k = _number(body, "top_k", 40, 0, 1 << 30, integer=True)
    top_p = _number(body, "top_p", 0.95, 0.0, 1.0, lo_open=True)
    min_p = _number(body, "min_p", 0.05, 0.0, 0.999999)
    penalty = _number(body, "repeat_penalty", 1.0, 0.0, 100.0, lo_open=True)
    n_probs = _number(body, "n_probs", 0, 0, TOP_LOGPROBS, integer=True)
    seed = _number(body, "seed", -1, -1, (1 << 32) - 1, integer=True)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream")
    seed = secrets.randbelow(1 << 31) if seed == -1 else seed % (1 << 31)
    request = Request(ids, n_predict, _sampling(temperature, top_k, top_p, min_p, penalty), seed=seed,
                      stop=_stops(body.get("stop"), limit=None), stop_ids=tuple(infill_stop_ids(tokenizer)),
                      logprobs=n_probs or None)
    return Infill(request, stream, n_probs)


def _extra_context(chunks: list[dict], tokenizer: Tokenizer) -> list[int]:
    """Files of context before the FIM prefix: `<file_sep>{filename}\\n{text}` each where the
    vocabulary has <file_sep> (StarCoder2's repository format), else their texts one after another."""
    if not chunks:
        return []
    sep = tokenizer.token_id(FILE_SEP)
    ids: list[int] = []
    for c in chunks:
        name, body = c.get("filename", ""), c.get("text", "")
        if sep is not None:
            ids += [sep] + encode_literal(tokenizer, f"{name}\n{body}")
        else:
            ids += encode_literal(tokenizer, body)
    if sep is not None:
        ids.append(sep)  # the file being edited follows
    return ids


def infill_body(infill: Infill, text: str, events: Sequence[Event], *, model_name: str, tokenizer: Tokenizer,
                elapsed: dict[str, float], stop_word: str = "") -> dict:
    last = events[-1]
    stop_type = {"length": "limit"}.get(last.finish_reason, "word" if stop_word else "eos")
    body = {"index": 0, "content": text, "tokens": [t for e in events for t in e.ids], "stop": True,
            "model": model_name, "tokens_predicted": last.completion_tokens,
            "tokens_evaluated": last.prompt_tokens, "tokens_cached": last.cached_tokens,
            "stop_type": stop_type, "stopping_word": stop_word, "truncated": False,
            "timings": {"prompt_n": last.prompt_tokens - last.cached_tokens,
                        "prompt_ms": 1000 * elapsed.get("first", 0.0),
                        "predicted_n": last.completion_tokens,
                        "predicted_ms": 1000 * elapsed.get("rest", 0.0),
                        "predicted_per_second": (last.completion_tokens / elapsed["rest"]
                                                 if elapsed.get("rest") else 0.0)}}
    if infill.n_probs:
        body["completion_probabilities"] = _llama_probs(events, tokenizer)
    return body


def infill_chunk(infill: Infill, event: Event, *, tokenizer: Tokenizer) -> dict:
    chunk = {"index": 0, "content": event.text, "tokens": list(event.ids), "stop": False}
    if infill.n_probs:
        chunk["completion_probabilities"] = _llama_probs([event], tokenizer)
    return chunk


def _llama_probs(events: Sequence[Event], tokenizer: Tokenizer) -> list[dict]:
    out = []
    for e in events:
        for tid, lp, top in zip(e.ids, e.logprobs, e.top):
            out.append({"id": tid, "token": tokenizer.decode([tid]), "logprob": lp,
                        "top_logprobs": [{"id": a, "token": tokenizer.decode([a]), "logprob": b} for a, b in top]})
    return out

"""Small models and tokenizers the tests make for themselves (no downloads)."""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile

import numpy as np

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
LIBRARY_DEFAULT = object()  # an argument left to the library's own default

STARCODER_SPECIAL_TOKENS = [
    "<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>",
    "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>",
    "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>",
    "<empty_output>", "<commit_before>", "<commit_msg>", "<commit_after>", "<reponame>",
]

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    ("class Stack:\n    def __init__(self):\n        self.items = []\n\n"
     "    def push(self, x):\n        self.items.append(x)\n"),
    "import os\nimport sys\n\nfor i in range(10):\n    print(i * 2, os.path.join('a', str(i)))\n",
    "function greet(name) {\n  return `Hello, ${name}!`;\n}\nconsole.log(greet('world'));\n",
    "#include <stdio.h>\nint main(void) {\n    printf(\"%d\\n\", 42);\n    return 0;\n}\n",
    "SELECT id, name FROM users WHERE age > 30 ORDER BY name;\n",
]


def builds_with_torch(fixture_function):
    """Marks a fixture whose value transformers makes (so torch): every test that
    uses it, directly or through another fixture, is marked torch (conftest)."""
    fixture_function.builds_with_torch = True
    return fixture_function


def make_tokenizer(out_dir: str, vocab_size: int = 512, *, specials=STARCODER_SPECIAL_TOKENS) -> str:
    """A StarCoder-style byte-level BPE trained on CORPUS (the library's own
    `train_tokenizer`), with `specials` at ids 0.. (StarCoder's 19 by default)."""
    from starcoder_jax.tokenizer import train_tokenizer

    train_tokenizer(CORPUS * 20, out_dir, vocab_size=vocab_size, special_tokens=specials)
    return out_dir


_BUILT: dict[tuple[str, str], str] = {}  # (builder, its arguments) -> this process's pristine first build


def _built_once(build):
    """A builder that builds each distinct model once a process and copies that
    pristine build into every later out_dir: the builds are seeded, so a copy is
    what a rebuild would give, without drawing every weight with torch again."""
    @functools.wraps(build)
    def builder(out_dir: str, **kwargs) -> str:
        key = (build.__name__, json.dumps(kwargs, sort_keys=True))
        if key not in _BUILT:
            pristine = tempfile.mkdtemp(prefix="starcoder-jax-test-model-")
            atexit.register(shutil.rmtree, pristine, ignore_errors=True)
            build(pristine, **kwargs)
            _BUILT[key] = pristine
        shutil.copytree(_BUILT[key], out_dir, dirs_exist_ok=True)
        return out_dir

    return builder


@_built_once
def make_hf_model(out_dir: str, *, seed: int = 0, weight_std: float = 0.2, **config) -> str:
    """Saves a random-weight transformers GPTBigCodeForCausalLM with save_pretrained.

    Weights are drawn wider than the default init (and LayerNorm / biases
    randomised too) so that every parameter visibly moves the logits.
    """
    import torch
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    defaults = dict(vocab_size=512, n_positions=512, n_embd=64, n_layer=2, n_head=4, n_inner=None,
                    multi_query=True, activation_function="gelu_pytorch_tanh",
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    defaults.update(config)
    torch.manual_seed(seed)
    model = GPTBigCodeForCausalLM(GPTBigCodeConfig(**defaults)).eval()
    is_norm = lambda name: name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))  # noqa: E731
    return _save_randomized(model, out_dir, seed, weight_std, is_norm)


def _save_randomized(model, out_dir: str, seed: int, weight_std: float, is_norm) -> str:
    """Draws every parameter of a transformers model (LayerNorm scales, where is_norm(name),
    around 1; biases normal(0.2); the rest normal(weight_std)) and saves it to out_dir."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_norm(name):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(weight_std * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out_dir)
    return out_dir


@_built_once
def make_hf_starcoder2(out_dir: str, *, seed: int = 0, weight_std: float = 0.2, **config) -> str:
    """Saves a random-weight transformers Starcoder2ForCausalLM with save_pretrained
    (default: 4 query heads over 2 K/V heads, a window of 8, rope_theta 10000),
    weights drawn as in make_hf_model."""
    import torch
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    defaults = dict(vocab_size=512, max_position_embeddings=512, hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, sliding_window=8,
                    hidden_act="gelu_pytorch_tanh", use_bias=True, norm_epsilon=1e-5,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                    bos_token_id=0, eos_token_id=0)
    defaults.update(config)
    torch.manual_seed(seed)
    model = Starcoder2ForCausalLM(Starcoder2Config(**defaults)).eval()
    is_norm = lambda name: "layernorm.weight" in name or name.endswith("norm.weight")  # noqa: E731
    return _save_randomized(model, out_dir, seed, weight_std, is_norm)


def hf_model(model_dir: str):
    """The transformers model of an HF directory (either architecture), in float32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    # float32 whatever the checkpoint's dtype (transformers would otherwise compute in it)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_logits(model_dir: str, ids) -> np.ndarray:
    import torch

    model = hf_model(model_dir)
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


def mean_next_token_loss(model, ids, mask=None, chunk=LIBRARY_DEFAULT):
    """Mean next-token cross-entropy (nats per target, float32 scalar) of ids [B, T]:
    the library's token_nll_sum over the targets where mask[:, 1:] (mask [B, T], 1 / True:
    a real token; None: all real) divided by their count, as transformers' loss with
    labels -100 on the padding. chunk: tokens per piece of the LM head (losses.chunked_nll;
    None: whole logits; default: the library's)."""
    import jax.numpy as jnp

    from starcoder_jax.training.losses import token_nll_sum

    mask = jnp.ones_like(ids) if mask is None else jnp.asarray(mask)
    chunking = {} if chunk is LIBRARY_DEFAULT else {"chunk": chunk}
    return token_nll_sum(model, ids, mask, **chunking) / jnp.maximum(jnp.sum(mask[:, 1:]), 1).astype(jnp.float32)


def params_loss(params, graphdef, ids, mask=None, chunk=LIBRARY_DEFAULT):
    """mean_next_token_loss as a function of the params of `nnx.split(model)`, for jax.grad."""
    from flax import nnx

    return mean_next_token_loss(nnx.merge(graphdef, params), ids, mask, chunk)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finish_process(proc, timeout):
    """(returncode, stdout, stderr) of a subprocess.Popen; fails the test if it outlives timeout."""
    import subprocess

    import pytest

    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"worker still running after {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
    return proc.returncode, out, err


@functools.lru_cache(maxsize=1)
def _heldout_texts():
    import starcoder_jax as sj
    from starcoder_jax.model.pretrained import DEFAULT_MODEL
    from starcoder_jax.training.data import DataConfig, collect_documents, split_documents

    _, held = split_documents(collect_documents(DataConfig(paths=("{stdlib}",), extensions=(".py",))), 0.05)
    return sj.load_tokenizer(DEFAULT_MODEL), [text for _, text in held][:6]


def default_model_bits_per_byte(quantize: str | None = None) -> tuple[float, int, int]:
    """(bits per byte, tokens, bytes) of the shipped model, loaded with `quantize`, on six
    held-out standard-library files: the quantized formats' quality check."""
    import starcoder_jax as sj
    from starcoder_jax.eval.heldout import bits_per_byte
    from starcoder_jax.model.pretrained import DEFAULT_MODEL

    tokenizer, texts = _heldout_texts()
    return bits_per_byte(sj.load_pretrained(DEFAULT_MODEL, quantize=quantize), tokenizer, texts)

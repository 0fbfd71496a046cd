"""Held-out quality measures used for the shipped model's card."""

import math

import jax
import jax.numpy as jnp
import numpy as np

import starcoder_jax as sj
from starcoder_jax.eval import heldout

TEXTS = [
    'import os\n\n\ndef join(a, b):\n    """Join two paths."""\n    return os.path.join(a, b)\n\n\n'
    'class Box:\n    def size(self):\n        """The size."""\n        return 3\n',
    'x = [1, 2, 3]\nfor item in x:\n    print(item * 2)\n',
]


def test_parses_requires_a_body():
    prompt = 'def f(x):\n    """doc"""\n'
    assert not heldout.parses(prompt, "")  # the docstring alone parses: not a completion
    assert heldout.parses(prompt, "    return x\n")
    assert not heldout.parses(prompt, "    return (\n")
    assert heldout.parses(prompt, "    y = x\n    return y\ndef g():\n    pass")  # cut at \ndef


def test_function_prompts_are_dedented_headers_with_docstrings():
    prompts = heldout.function_prompts(TEXTS, np.random.default_rng(0), 10)
    assert sorted(prompts) == sorted(['def join(a, b):\n    """Join two paths."""\n',
                                      'def size(self):\n    """The size."""\n'])


def test_fim_lines_rejoin_to_the_file():
    cases = heldout.fim_lines(TEXTS, np.random.default_rng(0), 50)
    assert cases
    for prefix, middle, suffix in cases:
        assert prefix + middle + suffix in TEXTS
        assert middle == middle.strip() and "\n" not in middle


def test_bits_per_byte_matches_a_direct_computation(tiny_model_dir):
    model, tok = sj.load_pretrained(tiny_model_dir), sj.load_tokenizer(tiny_model_dir)
    bpb, tokens, nbytes = heldout.bits_per_byte(model, tok, TEXTS[:1])
    ids = tok.encode(TEXTS[0])
    row = jnp.asarray([[tok.eos_id] + ids], jnp.int32)
    logp = jax.nn.log_softmax(model(row[:, :-1]), axis=-1)[0]
    nll = -float(jnp.sum(logp[jnp.arange(len(ids)), jnp.asarray(ids)]))
    assert tokens == len(ids) and nbytes == len(TEXTS[0].encode())
    assert math.isclose(bpb, nll / math.log(2) / nbytes, rel_tol=1e-5)

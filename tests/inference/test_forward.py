"""sj.forward: model(ids) compiled once per length bucket, and README's first snippet uses it."""

import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from builders import REPO_ROOT

import starcoder_jax as sj
from starcoder_jax.inference import forward as forward_mod


def _compiled(caplog, fn) -> list[str]:
    """What XLA compiled while fn ran (jax's compile log)."""
    caplog.clear()
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        fn()
    return [r.getMessage()[:120] for r in caplog.records if r.getMessage().startswith("Compiling ")]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return sj.load_pretrained(tiny_model_dir)


def test_length_buckets():
    assert [forward_mod.length_bucket(t, 512) for t in (0, 1, 16, 17, 100, 300, 512)] == \
        [16, 16, 16, 32, 128, 512, 512]
    assert forward_mod.length_bucket(100, 64) == 64


@pytest.mark.parametrize("t", [1, 3, 16, 37])
def test_forward_equals_the_module_call(model, t):
    ids = jnp.asarray(np.random.default_rng(t).integers(0, 512, (2, t)), jnp.int32)
    np.testing.assert_allclose(np.asarray(sj.forward(model, ids)), np.asarray(model(ids)), atol=1e-5, rtol=0)
    positions = jnp.asarray([list(range(5, 5 + t)), list(range(t))])
    np.testing.assert_allclose(np.asarray(sj.forward(model, ids, positions)), np.asarray(model(ids, positions)),
                               atol=1e-5, rtol=0)


def test_a_length_in_the_same_bucket_compiles_nothing_and_new_weights_are_seen(model, caplog):
    ids = jnp.asarray([[5, 6, 7, 8, 9]])
    sj.forward(model, ids)
    assert _compiled(caplog, lambda: sj.forward(model, ids)) == []
    # another length of the same bucket runs the same program (only the slice of its logits is new)
    other = _compiled(caplog, lambda: sj.forward(model, jnp.asarray([[1, 2, 3, 4, 5, 6, 7]])))
    assert not [m for m in other if "jit(_forward)" in m], other
    before = np.asarray(sj.forward(model, ids))
    model.ln_f.bias[...] = model.ln_f.bias[...] + 1.0
    try:
        np.testing.assert_allclose(np.asarray(sj.forward(model, ids)), np.asarray(model(ids)), atol=1e-5, rtol=0)
        assert not np.allclose(np.asarray(sj.forward(model, ids)), before)
    finally:
        model.ln_f.bias[...] = model.ln_f.bias[...] - 1.0


def test_bad_input_is_refused(model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sj.forward(model, jnp.asarray([[1, 600]]))
    with pytest.raises(ValueError, match="positions must be"):
        sj.forward(model, jnp.asarray([[1, 2]]), jnp.asarray([[0, 1, 2]]))


def test_readme_first_snippet_runs_compiled(tiny_model_dir, caplog):
    """README's first Python block up to its logits line, on a tiny model: a
    second call of the same shape compiles nothing."""
    readme = open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read()
    block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    lines = block.splitlines()
    upto = next(i for i, line in enumerate(lines) if line.startswith("logits ="))
    code = "\n".join(lines[:upto + 1]).replace('"pystdlib-9m"', repr(tiny_model_dir))
    scope: dict = {}
    exec(code, scope)
    assert scope["logits"].shape[:2] == (1, 3)
    assert _compiled(caplog, lambda: exec(lines[upto], scope)) == []

"""On a GPU: what the `auto` forms resolve to there, and the GPU-only int8 form in a model.

Marked `gpu`: skipped on other backends (tests/conftest.py); `docs/gpu/check.sh`
runs them on a lent GPU. The forms themselves are tested on every backend in
test_attention.py, test_matmul.py and test_int8.py (each forced by name).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starcoder_jax.config import StarCoderConfig
from starcoder_jax.model.modules import init_model
from starcoder_jax.ops import attention, int8, matmul

pytestmark = pytest.mark.gpu


def test_auto_forms_on_a_gpu():
    """cuDNN for own keys, the reference for decode; matmuls the reference."""
    assert attention.resolve("auto", own_keys=True, t=512) == "cudnn"
    assert attention.resolve("auto", own_keys=False, t=1) == "xla"
    assert matmul.resolve("auto") == "xla"
    assert matmul._int8_form("xla", rows=1) == "reduce" and matmul._int8_form("xla", rows=8) == "dot"


def test_one_row_int8_projection_on_a_gpu_equals_the_dequantized_product():
    """`project` with impl auto on one row takes the GPU multiply-reduce form; it equals
    the float product of the dequantized weight to float32 round-off (both round
    the activations to bfloat16)."""
    config = StarCoderConfig(vocab_size=256, n_positions=32, n_embd=64, n_layer=1, n_head=4)
    w = init_model(config, seed=1).quantize_("int8").blocks[0].mlp.fc.kernel[...]
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 64)), jnp.float32)
    want = np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32) @ int8.dequantize(w))
    got = np.asarray(jax.jit(lambda x: matmul.project(x, w, 1, impl="auto"))(x))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("padding", ["right", "left"])
def test_cudnn_attention_equals_the_reference_in_bfloat16(padding):
    """Forced cudnn on bfloat16 own keys (16 heads of 128 on one kv head): its
    output and gradients are the reference's within bfloat16 rounding; a
    left-padded batch takes the chunked branch on device (lax.cond)."""
    rng = np.random.default_rng(0)
    b, t = 2, 300
    q = jnp.asarray(rng.standard_normal((b, t, 16, 128)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((b, t, 1, 128)), jnp.bfloat16) for _ in range(2))
    steps = np.arange(t)
    second = np.where(steps < t - 50, steps, -1) if padding == "right" else steps - 50
    pos = jnp.asarray(np.stack([steps, second]), jnp.int32)
    weights = jnp.asarray(rng.standard_normal(q.shape), jnp.bfloat16)

    def run(form):
        def loss(q, k, v):
            out = attention.attention(q, k, v, pos, pos, impl=form, own_keys=True, scale=128 ** -0.5)
            return jnp.sum((out * weights).astype(jnp.float32)), out
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, want), want_grads = run("xla")
    (_, got), got_grads = run("cudnn")
    for g, w in zip((got, *got_grads), (want, *want_grads)):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        np.testing.assert_allclose(g, w, rtol=0, atol=3e-2 * np.abs(w).max())

"""Training memory at 8192 tokens, from XLA's compiled memory analysis (compile only).

The configuration: starcoderbase-1b width (D 2048, 16 heads of 128, multi-query,
F 8192), 8192 positions, batch 1, T = 8192, float32, the default remat
("elementwise": GELU and LayerNorm recomputed); the gradient of
a loss over the logits. With the reference attention (the [B, N, T, T] scores)
one layer needed 16.5 GiB of temporaries and each further layer 13.4 GiB. The
bounds: one layer at vocab 1024 <= 1.5 GiB (measured 1.39), each further layer
<= 1.0 GiB (0.95: the activations a layer keeps, chiefly its fc output
[T, F], 256 MiB), vocab 49152 with the chunked loss <= 2.0 GiB (1.96; the
whole logits there take 5.6).
"""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from starcoder_jax.config import StarCoderConfig
from starcoder_jax.model.modules import abstract_model
from starcoder_jax.training.losses import token_nll_sum

GIB = 2**30
T = 8192


def grad_temp_bytes(vocab: int, layers: int, impl: str, *, chunked_loss: bool) -> int:
    config = StarCoderConfig(vocab_size=vocab, n_positions=T, n_embd=2048, n_layer=layers, n_head=16,
                             multi_query=True, attention_impl=impl)
    graphdef, params = nnx.split(abstract_model(config))
    if chunked_loss:  # the training loss: the LM head and softmax in pieces (training.losses)
        ids = jax.ShapeDtypeStruct((1, T + 1), jnp.int32)

        def loss(params, ids):
            return token_nll_sum(nnx.merge(graphdef, params), ids, jnp.ones(ids.shape, bool)) / T
    else:  # the whole [B, T, V] logits
        ids = jax.ShapeDtypeStruct((1, T), jnp.int32)

        def loss(params, ids):
            return jnp.mean(jax.nn.logsumexp(nnx.merge(graphdef, params)(ids), axis=-1))

    compiled = jax.jit(jax.grad(loss)).lower(params, ids).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("impl", ["auto", "chunked"])
def test_a_layer_at_8192_tokens_fits_in_a_bounded_temp(impl):
    one = grad_temp_bytes(1024, 1, impl, chunked_loss=False)
    two = grad_temp_bytes(1024, 2, impl, chunked_loss=False)
    assert one <= 1.5 * GIB, one / GIB
    assert two - one <= 1.0 * GIB, (two - one) / GIB


def test_the_chunked_loss_keeps_a_large_vocabulary_out_of_the_temp():
    chunked = grad_temp_bytes(49152, 1, "chunked", chunked_loss=True)
    assert chunked <= 2.0 * GIB, chunked / GIB

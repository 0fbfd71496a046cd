"""ops.remat.recompute: every form gives autodiff's gradients, and the "cond" form
keeps only the arguments on XLA:CPU, where jax.checkpoint's rerun is merged away."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starcoder_jax.ops import remat

T, D, F = 512, 128, 512


def block(w, x, positions, key):
    h = jnp.tanh(x @ w[0] + positions[:, None] * 1e-3)
    h = jnp.where(jax.random.bernoulli(key, 0.9, h.shape), h, 0.0)  # integer and key arguments too
    return x + jnp.tanh(h * 1.5 + 1) @ w[1]


def stack_loss(f, layers):
    def loss(ws, x, positions, key):
        for i, w in enumerate(ws):
            x = f(w, x, positions, jax.random.fold_in(key, i))
        return jnp.sum(x ** 2)
    return loss


@pytest.mark.parametrize("impl", ["jax", "cond", "auto"])
def test_every_form_gives_autodiffs_gradients(impl):
    rng = np.random.default_rng(0)
    ws = [(jnp.asarray(rng.normal(0, 0.05, (D, F)), jnp.float32), jnp.asarray(rng.normal(0, 0.05, (F, D)), jnp.float32))
          for _ in range(3)]
    x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
    positions, key = jnp.arange(T), jax.random.key(1)
    want = jax.jit(jax.grad(stack_loss(block, 3), argnums=(0, 1)))(ws, x, positions, key)
    got = jax.jit(jax.grad(stack_loss(remat.recompute(block, impl=impl), 3), argnums=(0, 1)))(ws, x, positions, key)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)  # float32 sums, rerun apart


def test_resolve():
    assert remat.resolve("auto") == ("cond" if jax.default_backend() == "cpu" else "jax")
    with pytest.raises(ValueError, match="recompute impl must be one of"):
        remat.resolve("offload")


def plain_block(w, x, positions, key):
    """`block` without dropout: random bits drawn inside a block can be hoisted out
    of the rerun by XLA:CPU, which then keeps them (measured: 85 MiB per block here)."""
    h = jnp.tanh(x @ w[0] + positions[:, None] * 1e-3)
    return x + jnp.tanh(h * 1.5 + 1) @ w[1]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the merge this form avoids is XLA:CPU's")
def test_on_xla_cpu_only_the_cond_form_keeps_just_the_arguments():
    """Compiled temporaries of the grad of 1 and 4 blocks (T 4096, D 1024, F 4096,
    float32): without recomputation each further block keeps two [T, F]
    activations (64 MiB each); jax.checkpoint keeps the same on XLA:CPU; the
    cond form keeps about the block's input [T, D] (16 MiB; measured 5)."""
    t, d, f = 4096, 1024, 4096

    def temp(fn, layers):
        ws = [(jax.ShapeDtypeStruct((d, f), jnp.float32), jax.ShapeDtypeStruct((f, d), jnp.float32))] * layers
        args = (ws, jax.ShapeDtypeStruct((t, d), jnp.float32), jax.ShapeDtypeStruct((t,), jnp.int32),
                jax.eval_shape(lambda: jax.random.key(0)))
        compiled = jax.jit(jax.grad(stack_loss(fn, layers))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    growth = {name: (temp(fn, 4) - temp(fn, 1)) / 3 / 2**20
              for name, fn in (("none", plain_block), ("jax", remat.recompute(plain_block, impl="jax")),
                               ("cond", remat.recompute(plain_block, impl="cond")))}
    assert growth["none"] >= 100 and growth["jax"] >= 100, growth
    assert growth["cond"] <= 32, growth

"""ops.remat.recompute: every form gives autodiff's gradients, and the "cond" form
keeps only the arguments on XLA:CPU, where jax.checkpoint's rerun was merged away
(before jaxlib 0.11.1) and where kernel conversions are hoisted to the start."""

import jax
import jax.numpy as jnp
import jaxlib
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


# XLA:CPU merged jax.checkpoint's rerun with the forward pass in straight-line
# code up to jaxlib 0.11.0 and honours it from 0.11.1 (measured on 0.10.2, 0.11.0,
# 0.11.1, 0.11.2 and 0.12.1 with the test below: 128 MiB a block, then 0).
CHECKPOINT_HONOURED_ON_CPU = tuple(int(p) for p in jaxlib.__version__.split(".")[:3]) >= (0, 11, 1)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the merge this form avoids is XLA:CPU's")
def test_on_xla_cpu_the_cond_form_keeps_just_the_arguments():
    """Compiled temporaries of the grad of 1 and 4 blocks (T 4096, D 1024, F 4096,
    float32): without recomputation each further block keeps two [T, F]
    activations (64 MiB each); the cond form keeps about the block's input
    [T, D] (16 MiB; measured 5). jax.checkpoint keeps as much as no
    recomputation before jaxlib 0.11.1, and nothing from it on."""
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
    assert growth["none"] >= 100, growth
    assert growth["cond"] <= 32, growth
    if CHECKPOINT_HONOURED_ON_CPU:
        assert growth["jax"] <= 32, growth
    else:
        assert growth["jax"] >= 100, growth


def int8_block(w, x):
    """A block whose frozen kernels are int8 and converted to bfloat16 where they are used."""
    (q1, s1), (q2, s2) = w
    h = jnp.tanh(jnp.dot(x.astype(jnp.bfloat16), q1.astype(jnp.bfloat16), preferred_element_type=jnp.float32) * s1)
    return x + jnp.dot(h.astype(jnp.bfloat16), q2.astype(jnp.bfloat16), preferred_element_type=jnp.float32) * s2


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the schedule this form avoids is XLA:CPU's")
def test_on_xla_cpu_the_cond_form_converts_each_blocks_kernels_when_it_runs():
    """Compiled temporaries of the gradient (for x) of 1 and 4 blocks with frozen int8
    kernels (T 256, D 2048, F 8192): XLA:CPU schedules the conversions of every
    block's kernels, which depend on parameters only, at the start of the program,
    so each further block kept converted kernels to its turn (measured 31 MiB a
    block, a [D, F] bfloat16 kernel being 32); the cond form runs each block's
    forward inside a conditional too, and keeps about the block's input (2 MiB;
    measured 2.0). jax.checkpoint does not prevent the early conversions on
    any jaxlib measured (192 MiB a block on 0.10.2, 31 on 0.11.2 and 0.12.1),
    which is why "auto" stays "cond" on XLA:CPU even where XLA:CPU honours
    jax.checkpoint's rerun."""
    t, d, f = 256, 2048, 8192

    def growth(impl):
        """MiB of temporaries each block past the first adds (1 and 4 blocks compiled)."""
        return (temp(4, impl) - temp(1, impl)) / 3 / 2**20

    def temp(layers, impl):
        w = ((jax.ShapeDtypeStruct((d, f), jnp.int8), jax.ShapeDtypeStruct((f,), jnp.float32)),
             (jax.ShapeDtypeStruct((f, d), jnp.int8), jax.ShapeDtypeStruct((d,), jnp.float32)))
        fn = remat.recompute(int8_block, impl=impl)

        def loss(ws, x):
            for w in ws:
                x = fn(w, x)
            return jnp.sum(x ** 2)

        compiled = jax.jit(jax.grad(loss, argnums=1)).lower([w] * layers, jax.ShapeDtypeStruct((t, d), jnp.float32))
        return compiled.compile().memory_analysis().temp_size_in_bytes

    cond = growth("cond")
    assert cond <= 8, cond
    checkpoint = growth("jax")
    assert checkpoint >= 16, checkpoint

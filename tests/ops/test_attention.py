"""The attention entry point: every form equals the reference, "auto" picks per phase and backend."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starcoder_jax.config import ATTENTION_IMPLS, StarCoderConfig
from starcoder_jax.ops.attention import FORMS, attention, query_block, resolve

N_HEAD, HEAD_DIM = 6, 8
SCALE = HEAD_DIM ** -0.5


def _qkv(multi_query, b, t, s, seed=0):
    """Random q [b, t, 6, 8] and k, v [b, s, K, 8] (K = 1, or 6 heads)."""
    rng = np.random.default_rng(seed)
    kv = 1 if multi_query else N_HEAD
    q = jnp.asarray(rng.standard_normal((b, t, N_HEAD, HEAD_DIM)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, s, kv, HEAD_DIM)), jnp.float32) for _ in range(2))
    return q, k, v


def _positions(case, t):
    """(q_positions [3, T], k_positions [3, S], own_keys) for three rows: one
    unpadded, one left-padded (negative positions), one right-padded (-1)."""
    pad = max(1, t // 3) if t > 1 else 0
    steps = np.arange(t)
    right = np.where(steps < t - pad, steps, -1)
    if case == "own_keys":  # training / a prefill: S = T, the queries' own keys
        q_pos = np.stack([steps + 3, steps - pad, right])
        return q_pos, q_pos, True
    # a cache read: S = T + 7 slots, keys beyond each query's position are in the cache but hidden
    s = t + 7
    k_pos = np.tile(np.arange(s), (3, 1))
    k_pos[1, :3] = -1  # a left-padded cache row
    q_pos = np.stack([steps + 3, steps + 5, np.where(right >= 0, right + 2, -1)])
    return q_pos, k_pos, False


def _attend(form, q, k, v, q_pos, k_pos, own_keys, block=64, **kwargs):
    return attention(q, k, v, jnp.asarray(q_pos, jnp.int32), jnp.asarray(k_pos, jnp.int32), impl=form,
                     own_keys=own_keys, scale=SCALE, block=block, **kwargs)


def _value_and_grads(form, q, k, v, q_pos, k_pos, own_keys, block):
    weights = jnp.asarray(np.random.default_rng(9).standard_normal(q.shape), jnp.float32)

    def loss(q, k, v):
        out = _attend(form, q, k, v, q_pos, k_pos, own_keys, block)
        return jnp.sum(out * weights), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _numpy_attention(q, k, v, q_pos, k_pos):
    """The definition, one query at a time: softmax over the keys with 0 <= k_pos <= q_pos."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, n, _ = q.shape
    g = n // k.shape[2]
    out = np.zeros(q.shape)
    for row in range(b):
        for i in range(t):
            seen = (k_pos[row] >= 0) & (k_pos[row] <= q_pos[row, i])
            if not seen.any():
                continue
            for head in range(n):
                scores = k[row, seen, head // g] @ q[row, i, head] * SCALE
                p = np.exp(scores - scores.max())
                out[row, i, head] = (p / p.sum()) @ v[row, seen, head // g]
    return out


def test_forms_are_the_config_names():
    assert set(FORMS) == set(ATTENTION_IMPLS) - {"auto"} and "xla" in FORMS


@pytest.mark.parametrize("multi_query", [True, False])
@pytest.mark.parametrize("case", ["own_keys", "cache"])
def test_reference_is_the_definition(multi_query, case):
    """The reference form against a loop over queries: padded keys and keys
    after a query's position are hidden, a query that sees nothing gets 0."""
    q_pos, k_pos, own_keys = _positions(case, 9)
    q, k, v = _qkv(multi_query, 3, 9, k_pos.shape[1])
    got = np.asarray(_attend("xla", q, k, v, q_pos, k_pos, own_keys))
    np.testing.assert_allclose(got, _numpy_attention(q, k, v, q_pos, k_pos), rtol=0, atol=1e-5)
    assert (q_pos < 0).any() and np.all(got[q_pos < 0] == 0)


@pytest.mark.parametrize("case", ["own_keys", "cache"])
@pytest.mark.parametrize("t", [1, 5, 64, 65, 130])
@pytest.mark.parametrize("multi_query", [True, False])
def test_each_form_equals_the_reference(case, t, multi_query):
    """Forced on this machine, every form gives the reference's output (1e-5)
    and gradients for q, k, v (1e-4), padded rows included; the blocked form
    (own keys only: forced on a cache read it is the reference) with blocks of
    64 and of 32 (whole blocks, a shorter last one)."""
    q_pos, k_pos, own_keys = _positions(case, t)
    q, k, v = _qkv(multi_query, 3, t, k_pos.shape[1], seed=t)
    want, want_grads = _value_and_grads("xla", q, k, v, q_pos, k_pos, own_keys, 64)
    runs = [("cpu_key_major", 64)] + ([("cpu_blocked", 64), ("cpu_blocked", 32)] if own_keys else [])
    for form, block in runs:
        got, got_grads = _value_and_grads(form, q, k, v, q_pos, k_pos, own_keys, block)
        assert got.shape == want.shape == q.shape and np.isfinite(np.asarray(got)).all()
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5, err_msg=form)
        for g_got, g_want in zip(got_grads, want_grads):
            assert np.isfinite(np.asarray(g_got)).all()
            np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), rtol=0, atol=1e-4, err_msg=form)


def test_query_block_size():
    assert query_block(130) == 64 and query_block(130, 8) == 9  # 16 blocks at most
    assert query_block(8192) == 512 and query_block(40, 8) == 8


@pytest.mark.parametrize("form", FORMS)
def test_dropout_drops_probabilities(form):
    """With a key, each form drops probabilities at the rate, scaled by 1 / (1 - rate):
    one draw differs from no dropout, the mean of many equals it."""
    q_pos, k_pos, own_keys = _positions("own_keys", 12)
    q, k, v = _qkv(True, 3, 12, 12)
    plain = np.asarray(_attend(form, q, k, v, q_pos, k_pos, own_keys, block=4))

    def dropped(key):
        return _attend(form, q, k, v, q_pos, k_pos, own_keys, block=4, dropout_rate=0.5, dropout_key=key)

    draws = np.asarray(jax.jit(jax.vmap(dropped))(jax.random.split(jax.random.key(0), 300)))
    assert np.isfinite(draws).all() and np.abs(draws[0] - plain).max() > 0.1
    error = np.abs(draws.mean(0) - plain)  # the mean of 300 draws: about 0.06 |v| from the limit
    assert error.mean() < 0.05 and error.max() < 0.5, (error.mean(), error.max())
    no_key = _attend(form, q, k, v, q_pos, k_pos, own_keys, block=4, dropout_rate=0.5)
    np.testing.assert_array_equal(np.asarray(no_key), plain)


def test_auto_resolution_per_phase_and_mesh():
    """On XLA:CPU without a mesh: blocks for a training step or a prefill from
    position 0, key-major for decode and cache reads; under a mesh (and off
    the CPU) the reference."""
    on_cpu = jax.default_backend() == "cpu"
    assert resolve("auto", own_keys=True, t=512) == ("cpu_blocked" if on_cpu else "xla")
    assert resolve("auto", own_keys=True, t=1) == ("cpu_key_major" if on_cpu else "xla")
    assert resolve("auto", own_keys=False, t=1) == ("cpu_key_major" if on_cpu else "xla")
    assert resolve("auto", own_keys=False, t=8) == ("cpu_key_major" if on_cpu else "xla")
    with jax.set_mesh(jax.make_mesh((1,), ("data",))):
        assert {resolve("auto", own, t) for own in (True, False) for t in (1, 512)} == {"xla"}


def test_forced_forms_resolve_to_themselves_where_they_serve():
    """A forced name runs everywhere it can, whatever the backend or mesh; the
    blocked form cannot read a cache, where the reference runs instead."""
    for own_keys in (True, False):
        for t in (1, 512):
            assert resolve("xla", own_keys, t) == "xla"
            assert resolve("cpu_key_major", own_keys, t) == "cpu_key_major"
            assert resolve("cpu_blocked", own_keys, t) == ("cpu_blocked" if own_keys else "xla")
    with jax.set_mesh(jax.make_mesh((1,), ("data",))):
        assert resolve("cpu_blocked", True, 512) == "cpu_blocked"
    with pytest.raises(ValueError, match="attention impl must be one of auto, xla.*got 'flash'"):
        resolve("flash", True, 8)


def test_bad_arguments_are_named():
    q, k, v = _qkv(True, 1, 4, 6)
    pos4, pos6 = jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 6), jnp.int32)
    with pytest.raises(ValueError, match=r"own_keys needs one key per query \(S = T = 4\), got S = 6"):
        attention(q, k, v, pos4, pos6, impl="auto", own_keys=True, scale=1.0)
    with pytest.raises(ValueError, match=r"k_positions \[B, S\] = \(1, 6\), got \(1, 4\) and \(1, 4\)"):
        attention(q, k, v, pos4, pos4, impl="xla", own_keys=False, scale=1.0)
    with pytest.raises(ValueError, match="dropout_rate must be in"):
        attention(q, k, v, pos4, pos6, impl="xla", own_keys=False, scale=1.0, dropout_rate=1.0)


# --- the model: which form its jitted programs contain ---

def _forms_in(lowered) -> set[str]:
    """The attention forms in a lowered program (each runs under the name scope attention_<form>)."""
    return set(re.findall(r"attention_(xla|cpu_blocked|cpu_key_major)", lowered.as_text(debug_info=True)))


def _tiny_model(attention_impl="auto"):
    from starcoder_jax.model.modules import init_model

    config = StarCoderConfig(vocab_size=40, n_positions=40, n_embd=24, n_layer=1, n_head=3,
                             attention_impl=attention_impl)
    return config, init_model(config)


def test_auto_form_per_use_in_the_model():
    """On XLA:CPU a training step's forward and backward and a prefill run the
    blocked form, the decode loop the key-major one: the key-major form's
    backward pass is slow, and it once became every CPU forward's attention
    unnoticed."""
    from flax import nnx

    from starcoder_jax.bench import decode_consts, prefilled
    from starcoder_jax.inference.generate import decode_loop, prefill
    from starcoder_jax.model.kv_cache import KVCache

    if jax.default_backend() != "cpu":
        pytest.skip("the CPU forms")
    config, model = _tiny_model()
    graphdef, params = nnx.split(model)
    ids = jnp.asarray([[1, 2, 3, 4, 5, 6]], jnp.int32)

    def train_loss(params):
        return jnp.sum(nnx.merge(graphdef, params)(ids))

    assert _forms_in(jax.jit(jax.grad(train_loss)).lower(params)) == {"cpu_blocked"}
    consts = decode_consts(config, 1, 4)
    lowered = prefill.lower(graphdef, params, ids, jnp.full((1,), 6, jnp.int32), KVCache.init(config, 1, 16),
                            consts, out_len_like=jnp.zeros((16,), jnp.int8), active=jnp.ones((1,), bool))
    assert _forms_in(lowered) == {"cpu_blocked"}
    state = prefilled(graphdef, params, config, ids, 16, consts)
    assert _forms_in(decode_loop.lower(graphdef, params, state, jnp.int32(2), consts)) == {"cpu_key_major"}


@pytest.mark.parametrize("form", FORMS)
def test_forced_form_is_what_the_model_traces(form):
    """config.attention_impl reaches the attention: a forward pass runs the
    forced form, and so does a cache read unless it is the blocked form."""
    from flax import nnx

    from starcoder_jax.model.kv_cache import KVCache

    config, model = _tiny_model(form)
    graphdef, params = nnx.split(model)
    ids = jnp.asarray([[1, 2, 3, 4, 5, 6]], jnp.int32)
    assert _forms_in(jax.jit(lambda p: nnx.merge(graphdef, p)(ids)).lower(params)) == {form}

    def decode(params, cache):
        return nnx.merge(graphdef, params).hidden(ids[:, :1], jnp.asarray([[6]], jnp.int32), cache)[0]

    lowered = jax.jit(decode).lower(params, KVCache.init(config, 1, 16))
    assert _forms_in(lowered) == {"xla" if form == "cpu_blocked" else form}

"""The attention entry point: every form equals the reference, "auto" picks per phase and backend."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starcoder_jax.config import ATTENTION_IMPLS, StarCoderConfig
from starcoder_jax.ops import attention as attention_module
from starcoder_jax.ops.attention import FORMS, LONG, QUADRATIC, attention, query_block, resolve

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


def _value_and_grads(form, q, k, v, q_pos, k_pos, own_keys, block=64, **kwargs):
    weights = jnp.asarray(np.random.default_rng(9).standard_normal(q.shape), q.dtype)

    def loss(q, k, v):
        out = _attend(form, q, k, v, q_pos, k_pos, own_keys, block, **kwargs)
        return jnp.sum(out * weights), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _numpy_attention(q, k, v, q_pos, k_pos, q_seg=None, k_seg=None):
    """The definition, one query at a time: softmax over the keys with 0 <= k_pos <= q_pos
    (and of the query's segment)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, n, _ = q.shape
    g = n // k.shape[2]
    out = np.zeros(q.shape)
    for row in range(b):
        for i in range(t):
            seen = (k_pos[row] >= 0) & (k_pos[row] <= q_pos[row, i])
            if q_seg is not None:
                seen &= k_seg[row] == q_seg[row, i]
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


def _assert_like_reference(runs, q, k, v, q_pos, k_pos, own_keys, **kwargs):
    """Each (form, options) of `runs` gives the reference's output (1e-5) and
    gradients for q, k, v (1e-4); float32."""
    want, want_grads = _value_and_grads("xla", q, k, v, q_pos, k_pos, own_keys, **kwargs)
    for form, options in runs:
        got, got_grads = _value_and_grads(form, q, k, v, q_pos, k_pos, own_keys, **options, **kwargs)
        name = f"{form} {options}"
        assert got.shape == want.shape == q.shape and np.isfinite(np.asarray(got)).all()
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5, err_msg=name)
        for g_got, g_want in zip(got_grads, want_grads):
            assert np.isfinite(np.asarray(g_got)).all()
            np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), rtol=0, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("case", ["own_keys", "cache"])
@pytest.mark.parametrize("t", [1, 5, 63, 64, 65, 130])
@pytest.mark.parametrize("multi_query", [True, False])
def test_each_form_equals_the_reference(case, t, multi_query):
    """Forced on this machine, every form gives the reference's output (1e-5)
    and gradients for q, k, v (1e-4), padded rows included; the blocked form
    (own keys only: forced on a cache read it is the reference) with blocks of
    64 and of 32 (whole blocks, a shorter last one); the chunked form with
    blocks of 16 queries by 32 keys (key blocks skipped per query block,
    padded last blocks, a cache read over several key blocks)."""
    q_pos, k_pos, own_keys = _positions(case, t)
    q, k, v = _qkv(multi_query, 3, t, k_pos.shape[1], seed=t)
    runs = [("cpu_key_major", {}), ("chunked", {"chunk": (16, 32)})]
    if own_keys:
        runs += [("cpu_blocked", {"block": 64}), ("cpu_blocked", {"block": 32})]
    _assert_like_reference(runs, q, k, v, q_pos, k_pos, own_keys)


@pytest.mark.parametrize("t", [1000, 2048])
def test_chunked_equals_the_reference_on_long_rows(t):
    """Own keys at 1000 and 2048 tokens (two heads of 8 on one kv head, one
    row plus a left-padded one): the chunked form's default blocks, many of
    them skipped."""
    rng = np.random.default_rng(t)
    q = jnp.asarray(rng.standard_normal((2, t, 2, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, t, 1, 8)), jnp.float32) for _ in range(2))
    pos = np.stack([np.arange(t), np.arange(t) - 37])
    _assert_like_reference([("chunked", {})], q, k, v, pos, pos, True)


def _segments(q_pos, k_pos, own_keys):
    """Segment ids for the rows of `_positions`: two documents per row, split at a third of the keys."""
    s = k_pos.shape[1]
    k_seg = np.where(np.arange(s) < s // 3, 4, 7)[None].repeat(3, 0)
    if own_keys:
        return k_seg, k_seg
    # a cache read: queries from the middle of the second document, the first row's from the first
    q_seg = np.full(q_pos.shape, 7)
    q_seg[0] = 4
    return q_seg, k_seg


@pytest.mark.parametrize("case,multi_query", [pytest.param("own_keys", False, marks=pytest.mark.slow), ("cache", True)])
def test_segment_ids_hide_other_documents_in_every_form(case, multi_query):
    """With segment ids the reference equals the definition (a key of another
    segment is hidden) and every form equals the reference, padding included."""
    q_pos, k_pos, own_keys = _positions(case, 40)
    q, k, v = _qkv(multi_query, 3, 40, k_pos.shape[1], seed=3)
    q_seg, k_seg = _segments(q_pos, k_pos, own_keys)
    segments = {"q_segments": jnp.asarray(q_seg, jnp.int32), "k_segments": jnp.asarray(k_seg, jnp.int32)}
    got = np.asarray(_attend("xla", q, k, v, q_pos, k_pos, own_keys, **segments))
    want = _numpy_attention(q, k, v, q_pos, k_pos, q_seg, k_seg)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.abs(got - _numpy_attention(q, k, v, q_pos, k_pos)).max() > 0.1  # the segments matter
    runs = [("cpu_key_major", {}), ("chunked", {"chunk": (16, 16)})]
    if own_keys:
        runs += [("cpu_blocked", {"block": 16})]
    _assert_like_reference(runs, q, k, v, q_pos, k_pos, own_keys, **segments)


def test_segment_ids_go_in_pairs():
    q, k, v = _qkv(True, 1, 4, 4)
    pos = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="q_segments and k_segments go together"):
        attention(q, k, v, pos, pos, impl="xla", own_keys=True, scale=1.0, q_segments=pos)
    with pytest.raises(ValueError, match=r"q_segments must be \[B, T\] = \(1, 4\)"):
        attention(q, k, v, pos, pos, impl="chunked", own_keys=True, scale=1.0, q_segments=pos[:, :2],
                  k_segments=pos)


@pytest.mark.parametrize("multi_query", [True, False])
def test_splash_in_interpret_mode_equals_the_reference(multi_query):
    """The splash kernel (Pallas interpret mode on CPU: slow, about 5 s a run)
    on own keys with left- and right-padded rows and two segments per row:
    the multi-query kernel per kv head (K = 1) and the multi-head one (K = N)."""
    q_pos, k_pos, _ = _positions("own_keys", 130)
    q, k, v = _qkv(multi_query, 3, 130, 130, seed=5)
    q_seg, k_seg = _segments(q_pos, k_pos, True)
    segments = {"q_segments": jnp.asarray(q_seg, jnp.int32), "k_segments": jnp.asarray(k_seg, jnp.int32)}
    _assert_like_reference([("splash", {"interpret": True})], q, k, v, q_pos, k_pos, True, **segments)


def test_a_query_that_sees_no_key_gets_zeros_and_passes_no_gradient():
    """Chunked, a cache read: row 0's queries sit before every cached key,
    row 1's are padding; both get 0 and no gradient reaches their q."""
    q, k, v = _qkv(True, 2, 5, 9)
    q_pos = np.array([[0, 1, 2, 3, 4], [-1, -1, -1, -1, -1]])
    k_pos = np.tile(np.arange(9) + 5, (2, 1))
    out, (dq, dk, dv) = _value_and_grads("chunked", q, k, v, q_pos, k_pos, False, chunk=(2, 4))
    assert not np.asarray(out).any() and not np.asarray(dq).any()
    assert not np.asarray(dk).any() and not np.asarray(dv).any()


@pytest.mark.parametrize("form", ["chunked"])
def test_bfloat16_inputs(form):
    """bfloat16 q, k, v: output and gradients in bfloat16, within bfloat16
    rounding (3e-2) of the float32 reference's."""
    q_pos, k_pos, own_keys = _positions("own_keys", 70)
    q, k, v = _qkv(True, 3, 70, 70, seed=2)
    want, want_grads = _value_and_grads("xla", q, k, v, q_pos, k_pos, own_keys)
    half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    got, got_grads = _value_and_grads(form, *half, q_pos, k_pos, own_keys, chunk=(32, 32))
    assert got.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in got_grads)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=0, atol=3e-2)
    for g_got, g_want in zip(got_grads, want_grads):
        scale = np.abs(np.asarray(g_want)).max()
        np.testing.assert_allclose(np.asarray(g_got, np.float32), np.asarray(g_want), rtol=0, atol=3e-2 * scale)


def test_chunked_backward_with_dropout_is_the_derivative_of_its_forward():
    """With dropout the chunked form's written backward equals JAX's
    derivative of its own forward pass (the same masks, drawn per block from
    the key): on a cache read, whose key loop JAX can differentiate."""
    from starcoder_jax.ops.attention import _Blocks, _flash, _flash_forward

    rng = np.random.default_rng(1)
    qb = jnp.asarray(rng.standard_normal((2, 2, 1, 8 * 3, 8)), jnp.float32)  # 2 blocks of 8 queries, G = 3
    kb, vb = (jnp.asarray(rng.standard_normal((3, 2, 1, 4, 8)), jnp.float32) for _ in range(2))
    qp = jnp.asarray(np.arange(16).reshape(2, 1, 8).repeat(2, 1) - np.array([0, 5])[None, :, None], jnp.int32)
    kp = jnp.asarray(np.arange(12).reshape(3, 1, 4).repeat(2, 1), jnp.int32)
    spec = _Blocks(scale=0.3, rate=0.4, own_keys=False, g=3, bq=8, bk=4)
    weights = jnp.asarray(rng.standard_normal(qb.shape), jnp.float32)
    key = jax.random.key(3)

    def written(q, k, v):
        return jnp.sum(_flash(spec, q, k, v, qp, kp, None, None, key) * weights)

    def derived(q, k, v):
        return jnp.sum(_flash_forward(spec, q, k, v, qp, kp, None, None, key)[0] * weights)

    got, want = (jax.jit(jax.grad(f, argnums=(0, 1, 2)))(qb, kb, vb) for f in (written, derived))
    for g_got, g_want in zip(got, want):
        np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), rtol=0, atol=1e-5)


def test_chunked_grad_memory_at_8192_tokens():
    """XLA's compiled memory of jax.grad of the attention alone at T = 8192, H =
    128, 16 query heads on 1 kv head, batch 1, float32 (compile only): the
    chunked form needs about 166 MiB of temporaries (q itself is 64 MiB), the
    reference about 20 GiB (its [16, 8192, 8192] scores and probabilities)."""
    t = 8192
    q = jax.ShapeDtypeStruct((1, t, 16, 128), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, t, 1, 128), jnp.float32)
    pos = jax.ShapeDtypeStruct((1, t), jnp.int32)

    def temp_bytes(form):
        def loss(q, k, v, p):
            return jnp.sum(attention(q, k, v, p, p, impl=form, own_keys=True, scale=128 ** -0.5))

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, pos).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    chunked, reference = temp_bytes("chunked"), temp_bytes("xla")
    assert chunked < 512 * 2**20 and chunked * 20 < reference, (chunked, reference)


def test_query_block_size():
    assert query_block(130) == 64 and query_block(130, 8) == 9  # 16 blocks at most
    assert query_block(8192) == 512 and query_block(40, 8) == 8


@pytest.mark.parametrize("form", [f if f == "xla" else pytest.param(f, marks=pytest.mark.slow)
                                  for f in FORMS if f not in ("cudnn", "splash")])
def test_dropout_drops_probabilities(form):
    """With a key, each form drops probabilities at the rate, scaled by 1 / (1 - rate):
    one draw differs from no dropout, the mean of many equals it. (cudnn and
    splash have no dropout: they run chunked, with a warning where forced.)"""
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


def _backend(monkeypatch, name, cudnn=True):
    """The attention module's probes answer as if the program were compiled for `name`
    ("cpu", "gpu" or "tpu"), with or without the cuDNN library."""
    monkeypatch.setattr(attention_module, "on_gpu", lambda: name == "gpu")
    monkeypatch.setattr(attention_module, "on_tpu", lambda: name == "tpu")
    monkeypatch.setattr(attention_module, "cudnn_available", lambda: cudnn)
    monkeypatch.setattr(attention_module, "cpu_without_mesh",
                        lambda: name == "cpu" and jax.sharding.get_abstract_mesh().empty)


def test_auto_per_backend_and_phase(monkeypatch):
    """auto on each backend (probes forced): the fast CPU forms below LONG
    tokens, chunked from there; cuDNN / splash for own keys on a GPU / TPU;
    the reference for decode off the CPU."""
    _backend(monkeypatch, "cpu")
    assert [resolve("auto", True, t) for t in (1, 512, LONG - 1, LONG, 8192)] == [
        "cpu_key_major", "cpu_blocked", "cpu_blocked", "chunked", "chunked"]
    assert [resolve("auto", False, t) for t in (1, 64, LONG)] == ["cpu_key_major", "cpu_key_major", "chunked"]
    _backend(monkeypatch, "gpu")
    assert [resolve("auto", True, t) for t in (1, 512, 8192)] == ["xla", "cudnn", "cudnn"]
    assert [resolve("auto", False, t) for t in (1, 64, LONG)] == ["xla", "xla", "chunked"]
    _backend(monkeypatch, "gpu", cudnn=False)  # no cuDNN library: the best form that compiles
    assert [resolve("auto", True, t) for t in (1, 512, 8192)] == ["xla", "xla", "chunked"]
    _backend(monkeypatch, "tpu")
    assert [resolve("auto", True, t) for t in (1, 512, 8192)] == ["xla", "splash", "splash"]
    assert [resolve("auto", False, t) for t in (1, LONG)] == ["xla", "chunked"]
    with jax.set_mesh(jax.make_mesh((1,), ("data",))):  # splash runs under a mesh by shard_map
        assert [resolve("auto", True, t) for t in (512, 8192)] == ["splash", "splash"]


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
def test_auto_is_never_quadratic_on_long_rows(monkeypatch, backend):
    """From LONG tokens on, training or a prefill (own keys or a cache read)
    never gets a form whose memory grows as T^2, with or without a mesh."""
    _backend(monkeypatch, backend)
    for t in (LONG, LONG + 1, 8192):
        assert {resolve("auto", own, t) for own in (True, False)}.isdisjoint(QUADRATIC)
        with jax.set_mesh(jax.make_mesh((1,), ("data",))):
            assert {resolve("auto", own, t) for own in (True, False)}.isdisjoint(QUADRATIC)


def test_cudnn_falls_back_to_chunked_off_a_gpu_with_one_warning():
    """Forced cudnn on the CPU: one warning (per process and reason) naming
    the fallback, and the chunked form's result; under auto no warning."""
    if jax.default_backend() == "gpu":
        pytest.skip("off a GPU only")
    q_pos, k_pos, own_keys = _positions("own_keys", 9)
    q, k, v = _qkv(True, 3, 9, 9)
    attention_module._WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _attend("cudnn", q, k, v, q_pos, k_pos, own_keys)
        second = _attend("cudnn", q, k, v, q_pos, k_pos, own_keys)
    assert [str(w.message) for w in caught] == [
        f"attention impl 'cudnn' cannot serve this call: it runs on a GPU only (the program is "
        f"compiled for {jax.default_backend()}); running 'chunked'"]
    for got in (first, second):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(_attend("chunked", q, k, v, q_pos, k_pos, True)))


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
    return set(re.findall(r"attention_(xla|cpu_blocked|cpu_key_major|chunked|cudnn|splash)",
                          lowered.as_text(debug_info=True)))


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
    # the kernels fall back to chunked off their platform (CPU here), and on any cache read
    kernel = form in ("cudnn", "splash")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        forward = _forms_in(jax.jit(lambda p: nnx.merge(graphdef, p)(ids)).lower(params))
    assert forward == ({"chunked"} if kernel and jax.default_backend() == "cpu" else {form})

    def decode(params, cache):
        return nnx.merge(graphdef, params).hidden(ids[:, :1], jnp.asarray([[6]], jnp.int32), cache)[0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowered = jax.jit(decode).lower(params, KVCache.init(config, 1, 16))
    assert _forms_in(lowered) == {"xla" if form == "cpu_blocked" else "chunked" if kernel else form}


@pytest.mark.parametrize("form", ["auto", "chunked"])
def test_segment_ids_keep_packed_documents_apart_in_the_model(form):
    """Two documents packed in one row, segment ids apart and positions
    restarting at 0 for the second: each gets the logits it gets alone (1e-5)."""
    config, model = _tiny_model(form)
    rng = np.random.default_rng(6)
    first, second = rng.integers(0, 40, (1, 7)), rng.integers(0, 40, (1, 9))
    ids = jnp.asarray(np.concatenate([first, second], axis=1), jnp.int32)
    positions = jnp.asarray(np.concatenate([np.arange(7), np.arange(9)])[None], jnp.int32)
    segment_ids = jnp.asarray(np.repeat([0, 1], [7, 9])[None], jnp.int32)
    packed = np.asarray(model(ids, positions, segment_ids=segment_ids))
    for doc, got in ((first, packed[:, :7]), (second, packed[:, 7:])):
        np.testing.assert_allclose(got, np.asarray(model(jnp.asarray(doc, jnp.int32))), rtol=0, atol=1e-5)
    unsegmented = np.asarray(model(ids, positions))
    assert np.abs(unsegmented[:, 7:] - packed[:, 7:]).max() > 1e-3  # without the ids the documents mix


def test_segment_ids_with_a_cache_are_refused():
    from starcoder_jax.model.kv_cache import KVCache

    config, model = _tiny_model()
    ids = jnp.asarray([[1, 2, 3]], jnp.int32)
    with pytest.raises(ValueError, match="segment_ids are for training and evaluation without a cache"):
        model.hidden(ids, jnp.asarray([[0, 1, 2]], jnp.int32), KVCache.init(config, 1, 8),
                     segment_ids=jnp.zeros((1, 3), jnp.int32))


# --- grouped K/V heads and a sliding window (StarCoder2) ---

def _grouped_qkv(b, t, s, kv=2, seed=0):
    """Random q [b, t, 6, 8] over k, v [b, s, kv, 8]: 3 query heads per kv head for kv=2."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, N_HEAD, HEAD_DIM)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, s, kv, HEAD_DIM)), jnp.float32) for _ in range(2))
    return q, k, v


def _numpy_window(q, k, v, q_pos, k_pos, window):
    """The definition with a window: what _numpy_attention computes over the keys
    fewer than `window` positions back (keys further back get position -1: hidden)."""
    out = np.zeros(q.shape)
    for row in range(q.shape[0]):
        for i in range(q.shape[1]):
            near = np.where(k_pos[row] > q_pos[row, i] - window, k_pos[row], -1)
            out[row, i:i + 1] = _numpy_attention(q[row:row + 1, i:i + 1], k[row:row + 1], v[row:row + 1],
                                                 q_pos[row:row + 1, i:i + 1], near[None])
    return out


@pytest.mark.parametrize("case", [pytest.param("own_keys", marks=pytest.mark.slow), "cache"])
@pytest.mark.parametrize("t,window", [(130, 37)])
def test_grouped_heads_and_window_in_every_form(case, t, window):
    """6 query heads over 2 kv heads with a window: the reference is the definition,
    and every CPU form gives its output and gradients (the chunked form skipping key
    blocks before the window in its forward and query blocks after it in its backward,
    the blocked one starting each block at its window)."""
    q_pos, k_pos, own_keys = _positions(case, t)
    q, k, v = _grouped_qkv(3, t, k_pos.shape[1], seed=t)
    got = np.asarray(_attend("xla", q, k, v, q_pos, k_pos, own_keys, window=window))
    np.testing.assert_allclose(got, _numpy_window(q, k, v, q_pos, k_pos, window), rtol=0, atol=1e-5)
    wide = np.asarray(_attend("xla", q, k, v, q_pos, k_pos, own_keys))
    assert t < window or np.abs(got - wide).max() > 1e-2  # the window hides keys the check can see
    runs = [("cpu_key_major", {}), ("chunked", {"chunk": (16, 32)}), ("chunked", {"chunk": (32, 16)})]
    if own_keys:
        runs += [("cpu_blocked", {"block": 32})]
    _assert_like_reference(runs, q, k, v, q_pos, k_pos, own_keys, window=window)


def test_chunked_window_skips_blocks():
    """The block spans of a window: query block 3 (queries 48..63, window 20) reads key
    blocks 1..3 of 16 (keys from 29), and key block 1 (keys 16..31) is read by query
    blocks 1..3 (its last key's window ends at query 50)."""
    spec = attention_module._Blocks(1.0, 0.0, True, 1, 16, 16, 20)
    assert [int(x) for x in attention_module._key_span(spec, 3, 8)] == [1, 4]
    assert [int(x) for x in attention_module._query_span(spec, 1, 8)] == [1, 4]


def test_cudnn_call_with_a_window_equals_the_reference():
    """The cudnn form's call of jax.nn.dot_product_attention (grouped heads, a local
    window of window - 1 keys, right padding as lengths), run by its XLA implementation
    on this machine, gives the reference's output."""
    q_pos = np.stack([np.arange(40), np.where(np.arange(40) < 29, np.arange(40), -1)])
    q, k, v = _grouped_qkv(2, 40, 40, seed=3)
    want = np.asarray(_attend("xla", q, k, v, q_pos, q_pos, True, window=9))
    got = attention_module.fused(q, k, v, jnp.asarray(q_pos >= 0), SCALE, 9, "xla")
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)


def test_splash_with_grouped_heads_and_a_window_equals_the_reference():
    """The splash kernel (interpret mode) with a local mask: 6 query heads over 2 kv
    heads, a window of 37, left- and right-padded rows."""
    q_pos, k_pos, _ = _positions("own_keys", 130)
    q, k, v = _grouped_qkv(3, 130, 130, seed=6)
    _assert_like_reference([("splash", {"interpret": True})], q, k, v, q_pos, k_pos, True, window=37)

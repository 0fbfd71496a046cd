"""The chunked LM head and cross-entropy against the whole logits, and the remat
policies: same losses and gradients, and what each keeps for the backward pass."""

import contextlib
import io
import math
import re

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numerics import assert_close_in_any_order

from starcoder_jax.config import StarCoderConfig
from starcoder_jax.model.modules import DEFAULT_REMAT, REMAT_POLICIES, check_remat, init_model
from starcoder_jax.training import train
from starcoder_jax.training.losses import chunked_nll, target_nll, token_nll_sum

SHAPE = dict(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=4)
# The float32 sums behind one target's logits: in each block the width, the MLP
# (4x the width) and the keys (38), then the vocabulary's softmax.
LOGIT_TERMS = SHAPE["n_layer"] * (5 * SHAPE["n_embd"] + 38) + SHAPE["vocab_size"]
# A loss or a gradient element adds the rows' 2 x 37 targets to that chain.
GRAD_TERMS = 2 * 37 + LOGIT_TERMS


def ids_and_mask(rows=2, length=38, seed=0):
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(0, 256, (rows, length)), jnp.int32)
    mask = jnp.asarray(rng.random((rows, length)) < 0.8)
    return ids, mask


def flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(leaf).ravel() for leaf in jax.tree.leaves(tree)])


# 37 targets: padded / whole pieces
@pytest.mark.parametrize("tie, chunk", [(True, 5), pytest.param(False, 16, marks=pytest.mark.slow)])
def test_chunked_loss_and_gradients_match_the_whole_logits(tie, chunk):
    model = init_model(StarCoderConfig(**SHAPE, tie_word_embeddings=tie), seed=1)
    graphdef, params = nnx.split(model)
    ids, mask = ids_and_mask()

    def loss(p, c):
        return token_nll_sum(nnx.merge(graphdef, p), ids, mask, chunk=c)

    whole, g_whole = jax.jit(jax.value_and_grad(lambda p: loss(p, None)))(params)
    ours, g_ours = jax.jit(jax.value_and_grad(lambda p: loss(p, chunk)))(params)
    assert_close_in_any_order(ours, whole, GRAD_TERMS)
    assert_close_in_any_order(g_ours, g_whole, GRAD_TERMS)
    per_target = target_nll(model, ids, chunk=chunk)
    assert per_target.shape == (2, 37)
    assert_close_in_any_order(per_target, target_nll(model, ids, chunk=None), LOGIT_TERMS)


def head_products(fn, *args) -> int:
    """dot_generals touching the vocabulary axis (256) in fn's program, scan bodies included."""
    def count(jaxpr):
        n = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                shapes = [v.aval.shape for v in (*eqn.invars, *eqn.outvars)]
                n += any(SHAPE["vocab_size"] in shape for shape in shapes)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                n += count(sub) * (eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1)
        return n

    return count(jax.make_jaxpr(fn)(*args).jaxpr)


def test_the_chunked_gradient_takes_three_head_products_per_piece_not_four():
    model = init_model(StarCoderConfig(**SHAPE), seed=1)
    graphdef, params = nnx.split(model)
    ids, mask = ids_and_mask()  # 37 targets: 3 pieces of 16

    def grad(chunk):
        return jax.grad(lambda p: token_nll_sum(nnx.merge(graphdef, p), ids, mask, chunk=chunk))

    assert head_products(grad(None), params) == 3  # logits, their gradient to x and to the table
    assert head_products(grad(16), params) == 3 * 3
    # a frozen head: its gradient is not computed (LoRA trains adapters below it)
    blocks = nnx.All(nnx.Param, lambda path, _: path[0] == "blocks")
    graphdef, trained, frozen = nnx.split(model, blocks, ...)
    frozen_grad = jax.grad(lambda p: token_nll_sum(nnx.merge(graphdef, p, frozen), ids, mask, chunk=16))
    assert head_products(frozen_grad, trained) == 2 * 3
    whole = jax.grad(lambda p: token_nll_sum(nnx.merge(graphdef, p, frozen), ids, mask, chunk=None))
    assert_close_in_any_order(jax.jit(frozen_grad)(trained), jax.jit(whole)(trained), GRAD_TERMS)


@pytest.mark.slow
def test_the_chunked_gradient_in_bfloat16_compute():
    model = init_model(StarCoderConfig(**SHAPE, dtype="bfloat16"), seed=5)
    graphdef, params = nnx.split(model)
    ids, mask = ids_and_mask(seed=6)

    def value_and_grad(chunk):
        fn = jax.value_and_grad(lambda p: token_nll_sum(nnx.merge(graphdef, p), ids, mask, chunk=chunk))
        return jax.jit(fn)(params)

    (whole, g_whole), (ours, g_ours) = value_and_grad(None), value_and_grad(8)
    np.testing.assert_allclose(float(ours), float(whole), rtol=1e-3)
    a, b = flat(g_ours), flat(g_whole)
    assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(b)  # bfloat16 products over other row counts


@pytest.mark.parametrize("tie", [False])  # an int8 lm_head; a tied one is the same ops.matmul.project
def test_chunked_loss_of_an_int8_model_goes_through_its_head(tie):
    model = init_model(StarCoderConfig(**SHAPE, tie_word_embeddings=tie), seed=2).quantize_("int8")
    ids, _ = ids_and_mask(seed=3)
    x, _ = model.hidden(ids, jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape))
    targets = jnp.roll(ids, -1, axis=1)
    whole = chunked_nll(model, x, targets, None)
    assert_close_in_any_order(chunked_nll(model, x, targets, 8), whole, LOGIT_TERMS)
    logp = jax.nn.log_softmax(model(ids), axis=-1)  # model(ids): the inference logits
    assert_close_in_any_order(whole, -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0], LOGIT_TERMS)


def test_loss_chunk_setting_is_checked():
    assert train.parse_config({}).train.loss_chunk == 1024
    assert train.parse_config({"train": {"loss_chunk": 0}}).train.loss_chunk is None
    with pytest.raises(ValueError, match="train.loss_chunk must be a number of tokens"):
        train.parse_config({"train": {"loss_chunk": -4}})
    with pytest.raises(ValueError, match="loss_chunk must be a number of tokens"):
        token_nll_sum(init_model(StarCoderConfig(**SHAPE)), *ids_and_mask(), chunk=2.5)


def test_remat_names_and_the_booleans_of_older_configs():
    assert [train.parse_config({"model": {"remat": r}}).model.remat
            for r in (True, False, "full", "none", "projections", "elementwise")] == [
        "full", "none", "full", "none", "projections", "elementwise"]
    assert train.parse_config({}).model.remat == "elementwise" == DEFAULT_REMAT
    assert check_remat(True) == "full"
    with pytest.raises(ValueError, match=r"model.remat must be one of none, elementwise, projections, full "
                                         r".* got 'fast'"):
        train.parse_config({"model": {"remat": "fast"}})
    model = init_model(StarCoderConfig(**SHAPE))
    model.remat = "some"
    with pytest.raises(ValueError, match="StarCoder.remat must be one of"):
        model(ids_and_mask()[0])


def _grad_fn(model, ids, mask):
    graphdef, params = nnx.split(model)
    return jax.jit(jax.grad(lambda p: token_nll_sum(nnx.merge(graphdef, p), ids, mask, chunk=16))), params


def test_remat_policies_give_the_same_gradients():
    ids, mask = ids_and_mask()
    config = StarCoderConfig(**SHAPE, attention_impl="cpu_blocked")
    grads = {}
    for policy in REMAT_POLICIES:
        model = init_model(config, seed=4)
        model.remat = policy
        fn, params = _grad_fn(model, ids, mask)
        grads[policy] = fn(params)
    for policy in REMAT_POLICIES[1:]:
        # a rerun is a program of its own, whose fusions may sum in another order
        assert_close_in_any_order(grads[policy], grads["none"], GRAD_TERMS, err_msg=policy)


def saved_residuals(policy: str) -> list[str]:
    """What the backward pass of a 2-layer model's loss keeps under a remat policy
    (jax.ad_checkpoint.print_saved_residuals: one line per saved array)."""
    model = init_model(StarCoderConfig(**SHAPE, attention_impl="xla"))
    model.remat = policy
    graphdef, params = nnx.split(model)
    ids, mask = ids_and_mask()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(
            lambda p: token_nll_sum(nnx.merge(graphdef, p), ids, mask, chunk=None), params)
    return out.getvalue().splitlines()


def test_remat_policies_keep_what_they_say():
    """none keeps attention's probabilities and GELU's and LayerNorm's float32
    intermediates (five a GELU); elementwise keeps only their outputs (the next
    product reads them: one a GELU, one a LayerNorm) and recomputes the rest;
    full keeps nothing of a block, nor any projection; projections keeps the
    outputs the backward pass reads: q, k, v and attention out by their name (4
    per block), fc's through GELU's own checkpoint, which keeps its input (1 per
    block; proj's output is never read), and recomputes attention and GELU. A
    model keeps what elementwise keeps unless told otherwise."""
    kept = {policy: saved_residuals(policy) for policy in REMAT_POLICIES}
    layers, norms = SHAPE["n_layer"], 2 * SHAPE["n_layer"] + 1

    def count(policy, place):
        return sum(place in line for line in kept[policy] if "from the argument" not in line)

    inside_blocks = ("attention.py", "MLP.__call__")
    assert any(place in line for line in kept["none"] for place in inside_blocks)
    assert not any(place in line for line in kept["full"] for place in inside_blocks)
    assert not any("attention.py" in line for line in kept["projections"])
    assert sum("MLP.__call__" in line for line in kept["projections"]) == SHAPE["n_layer"]
    assert not any("named 'projection'" in line for line in kept["full"])
    assert sum("named 'projection'" in line for line in kept["projections"]) == 4 * SHAPE["n_layer"]
    assert count("none", "MLP._gelu") >= 4 * layers and count("elementwise", "MLP._gelu") == layers
    assert count("none", "LayerNorm._normalize") >= 3 * norms
    assert count("elementwise", "LayerNorm._normalize") == norms
    model = init_model(StarCoderConfig(**SHAPE, attention_impl="xla"))
    assert model.remat == DEFAULT_REMAT == "elementwise"
    saved = {policy: residual_bytes(lines) for policy, lines in kept.items()}
    assert saved["full"] < saved["projections"] < saved["elementwise"] < saved["none"], saved


def residual_bytes(lines: list[str]) -> int:
    """Bytes of the saved arrays that are not the function's arguments (the params)."""
    size = {"f32": 4, "i32": 4, "bool": 1, "bf16": 2}
    total = 0
    for line in lines:
        found = re.match(r"(\w+)\[([\d,]*)\]", line)
        if found and "from the argument" not in line:
            total += size[found[1]] * math.prod(int(d) for d in found[2].split(",") if d)
    return total


def test_document_segments_of_a_packed_row():
    from starcoder_jax.training.losses import document_segments

    ids = jnp.asarray([[5, 6, 0, 7, 8, 9, 0, 4], [0, 3, 3, 3, 3, 3, 3, 3]])
    segments, positions = document_segments(ids, 0)
    assert segments.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1, 1, 1]]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 0, 1, 2, 3, 4, 5, 6]]


@pytest.mark.parametrize("chunk", [pytest.param(None, marks=pytest.mark.slow), 4])
def test_separated_documents_score_as_if_alone(chunk):
    """data.separate_documents: in a packed row, the second document's targets get
    the log-likelihoods it gets alone (positions from 0), to float32 round-off;
    without the separator, attention reaches across and they differ."""
    eos = 0
    model = init_model(StarCoderConfig(**SHAPE), seed=2)
    rng = np.random.default_rng(3)
    first, second = rng.integers(1, 256, 9).tolist(), rng.integers(1, 256, 12).tolist()
    packed = jnp.asarray([first + [eos] + second + [eos]])
    alone = jnp.asarray([second + [eos]])
    got = target_nll(model, packed, chunk=chunk, separator=eos)[0, len(first) + 1:]
    want = target_nll(model, alone, chunk=chunk, separator=eos)[0]
    assert_close_in_any_order(got, want, LOGIT_TERMS)
    joined = target_nll(model, packed, chunk=chunk)[0, len(first) + 1:]
    assert np.abs(np.asarray(joined) - np.asarray(want)).max() > 1e-2

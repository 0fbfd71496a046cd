"""The train step over a split model: frozen params, weight decay from parameter
metadata, runtime model fields in the fine-tuning config, the shipped configs."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from builders import REPO_ROOT
from flax import nnx

from starcoder_jax.config import StarCoderConfig
from starcoder_jax.model.modules import Derived, init_model
from starcoder_jax.tokenizer import load_tokenizer
from starcoder_jax.training import train
from starcoder_jax.training.state import TrainState, build_model
from starcoder_jax.training.step import (
    decay_mask,
    make_optimizer,
    make_train_step,
    path_name,
    trainable_filter,
)

TINY = dict(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4)


def flat(state) -> dict[str, np.ndarray]:
    """"wte/embedding" -> value, for an nnx.State."""
    return {path_name(p): np.asarray(v.get_value() if isinstance(v, nnx.Variable) else v)
            for p, v in nnx.to_flat_state(state)}


def opt_paths(opt_state) -> set[str]:
    return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(opt_state)}


def batch(seed=0, rows=4, length=17):
    ids = np.random.default_rng(seed).integers(0, TINY["vocab_size"], (1, rows, length)).astype(np.int32)
    return jnp.asarray(ids), jnp.ones(ids.shape, bool)


def test_frozen_params_stay_bit_identical_and_have_no_optimizer_state():
    model = init_model(StarCoderConfig(**TINY, tie_word_embeddings=False), seed=0)
    model.head_copy = Derived(jnp.transpose(model.wte.embedding.get_value()))  # derived, not a Param
    before = flat(nnx.state(model))
    tx, _ = make_optimizer(train.OptimConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant"), 10)
    state = TrainState.create(model, trainable_filter(frozen=("^wte/", "^wpe/")), tx)
    trained = set(flat(state.params))
    assert trained == {k for k in before if not k.startswith(("wte/", "wpe/", "head_copy"))}
    assert set(flat(state.frozen())) == {"wte/embedding", "wpe/embedding"}
    assert set(flat(state.rest)) == {"wte/embedding", "wpe/embedding", "head_copy"}
    paths = opt_paths(state.opt_state)
    assert not [p for p in paths if "wte" in p or "wpe" in p or "head_copy" in p]
    assert len([p for p in paths if "lm_head" in p]) == 2  # Adam's two moments
    saved = state.checkpoint()
    assert set(saved) == {"params", "opt_state", "frozen"}
    assert set(flat(saved["frozen"])) == {"wte/embedding", "wpe/embedding"}  # not the derived copy

    step_fn = make_train_step(state.graphdef, tx, seed=0, dropout=False, skip_nonfinite=False)
    params, opt_state = state.params, state.opt_state
    for i in range(3):
        params, opt_state, out = step_fn(params, opt_state, state.rest, *batch(i), jnp.int32(i))
        assert bool(out["finite"])
    after = flat(nnx.state(TrainState(state.graphdef, params, state.rest, opt_state).model()))
    for name in ("wte/embedding", "wpe/embedding", "head_copy"):
        np.testing.assert_array_equal(after[name], before[name])
    moved = [name for name in trained if not np.array_equal(after[name], before[name])]
    assert sorted(moved) == sorted(trained)
    assert opt_paths(opt_state) == paths


def test_trainable_patterns_pick_params_by_path():
    model = init_model(StarCoderConfig(**TINY), seed=0)
    picked = nnx.state(model, trainable_filter(trainable=(r"^blocks/1/", r"ln_f")))
    assert set(flat(picked)) == {k for k in flat(nnx.state(model)) if k.startswith(("blocks/1/", "ln_f/"))}
    with pytest.raises(ValueError, match="leave no parameter to train"):
        TrainState.create(model, trainable_filter(frozen=(".",)), optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"train.frozen: '\[wte' is not a regular expression"):
        train.parse_config({"train": {"frozen": ["[wte"]}})
    assert train.parse_config({}, ["train.frozen=^wte/"]).train.frozen == ("^wte/",)


@pytest.mark.parametrize("tie", [pytest.param(True, marks=pytest.mark.slow), False])
def test_weight_decay_applies_exactly_to_params_flagged_in_metadata(tie):
    """With zero gradients AdamW's update is the decay alone: -lr * wd * param."""
    model = init_model(StarCoderConfig(**TINY, tie_word_embeddings=tie), seed=0)
    # The flag, not the name, decides: decay one LayerNorm scale too.
    model.blocks[0].ln_1.scale.set_metadata(weight_decay=True)
    params = nnx.state(model, nnx.Param)
    flagged = {path_name(p) for p, v in nnx.to_flat_state(params) if v.get_metadata()["weight_decay"]}
    kernels = {k for k in flat(params) if k.endswith("/kernel") or k == "lm_head"}
    assert flagged == kernels | {"blocks/0/ln_1/scale"}
    assert set(flat(decay_mask(params))) == set(flat(params))
    assert {k for k, v in flat(decay_mask(params)).items() if v} == flagged

    o = train.OptimConfig(learning_rate=0.5, weight_decay=0.1, schedule="constant", warmup_steps=0)
    tx, _ = make_optimizer(o, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = flat(optax.apply_updates(params, updates))
    for name, old in flat(params).items():
        if name in flagged:
            np.testing.assert_allclose(new[name], old * (1 - 0.5 * 0.1), rtol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(new[name], old, err_msg=name)


def test_runtime_fields_reach_a_new_and_a_loaded_model(tiny_model_dir, tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    fields = {"attention_impl": "cpu_key_major", "matmul_impl": "xla"}
    new = build_model(train.parse_config({"model": {"config": {**TINY, "vocab_size": 512, **fields}},
                                          "data": {"seq_len": 16}}), tokenizer)
    loaded = build_model(train.parse_config({"model": {"path": tiny_model_dir, "config": fields}}), tokenizer)
    for model in (new, loaded):
        assert (model.config.attention_impl, model.config.matmul_impl) == ("cpu_key_major", "xla")
    assert loaded.config.n_embd == 64  # the checkpoint's shape
    with pytest.raises(ValueError, match=r"model.config sets n_layer but model.path .* fixes the model's shape"):
        build_model(train.parse_config({"model": {"path": tiny_model_dir, "config": {"n_layer": 3}}}),
                    tokenizer)
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        build_model(train.parse_config({"model": {"path": tiny_model_dir,
                                                  "config": {"attention_impl": "fast"}}}), tokenizer)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "**", "*.yaml"),
                                               recursive=True)))
def test_shipped_configs_load(path):
    cfg = train.load_config(path)
    assert cfg.train.steps >= 1 and cfg.tokenizer

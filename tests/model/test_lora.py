"""LoRA adapters against PEFT 0.21 on tiny random GPTBigCode bases.

Tolerance: logits agree to 1e-4 in float32 (as the model's own parity with
transformers). Every adapter here is nonzero and moves the logits by far
more than that, and PEFT's "Found missing adapter keys" warning (the only
sign that an adapter loaded nothing) must not appear.
"""

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from builders import builds_with_torch, hf_logits, make_hf_model
from flax import nnx
from numerics import assert_close_in_any_order

import starcoder_jax as sj
from starcoder_jax.model.lora import LoRAConfig, add_lora, has_lora, merge_lora
from starcoder_jax.model.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from starcoder_jax.model.weights import CheckpointError

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

SHAPE = dict(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4)
IDS = np.random.default_rng(0).integers(0, 128, (2, 13))
ALL_TARGETS = ("c_attn", "c_proj", "c_fc")


@pytest.fixture(scope="module")
@builds_with_torch
def bases(tmp_path_factory):
    """Tiny random HF bases: multi-query and multi-head."""
    root = tmp_path_factory.mktemp("lora_bases")
    return {mq: make_hf_model(str(root / f"mq_{mq}"), multi_query=mq, **SHAPE) for mq in (True, False)}


def torch_base(path):
    from transformers import GPTBigCodeForCausalLM

    return GPTBigCodeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def peft_logits(base_dir, adapter_dir) -> tuple[np.ndarray, list[str]]:
    """PeftModel.from_pretrained's logits, and the warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(torch_base(base_dir), adapter_dir).eval()
    return torch_logits(model), [str(w.message) for w in caught]


def randomize(model, seed=0, std=0.3):
    """Nonzero random adapters (B starts at zero)."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        var.set_value(jnp.asarray(std * rng.standard_normal(var.get_value().shape), jnp.float32))
    return model


def ours(model) -> np.ndarray:
    """The model's logits of IDS (sj.forward: compiled once per model and shape)."""
    return np.asarray(sj.forward(model, IDS))


@pytest.mark.parametrize("multi_query", [True, False])
def test_peft_loads_our_adapters(bases, tmp_path, multi_query):
    base = bases[multi_query]
    model = randomize(add_lora(sj.load_pretrained(base), LoRAConfig(r=4, lora_alpha=8, target_modules=ALL_TARGETS)))
    out = sj.save_peft(model, str(tmp_path / "adapter"), base_model_name_or_path=base)
    assert sorted(os.listdir(out)) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert json.load(open(os.path.join(out, ADAPTER_CONFIG)))["base_model_name_or_path"] == base
    got, caught = peft_logits(base, out)
    assert not [w for w in caught if "adapter keys" in w], caught
    want = ours(model)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert np.abs(want - torch_logits(torch_base(base))).max() > 0.5  # the adapters did load


def peft_adapter(base_dir, out_dir, seed=0, **config) -> np.ndarray:
    """An adapter made by PEFT (get_peft_model, B randomized, save_pretrained); its logits."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(torch_base(base_dir), peft.LoraConfig(**config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    model.save_pretrained(out_dir)
    return torch_logits(model.eval())


@pytest.mark.parametrize("multi_query,config", [
    (True, dict(r=4, lora_alpha=8, target_modules=["c_attn"])),
    (False, dict(r=4, lora_alpha=8, target_modules=["c_attn"])),
    (True, dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"])),
    (True, dict(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc", "q_attn"], use_rslora=True)),
    (False, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                 rank_pattern={"h.1.mlp.c_proj": 2, "attn.c_attn": 6}, alpha_pattern={"c_fc": 3})),
    (True, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], exclude_modules=["mlp.c_proj"],
                layers_to_transform=[1])),
])
def test_we_load_peft_adapters(bases, tmp_path, multi_query, config):
    base, adapter = bases[multi_query], str(tmp_path / "adapter")
    want = peft_adapter(base, adapter, **config)
    model = sj.load_pretrained(base, adapter=adapter)
    got = ours(model)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert np.abs(got - ours(sj.load_pretrained(base))).max() > 0.5
    if "rank_pattern" in config:  # each pattern reached its module
        assert model.blocks[1].mlp.proj.lora.b.shape[0] == 2 and model.blocks[0].attn.key.lora.b.shape[0] == 6
        assert model.blocks[0].mlp.fc.lora.scale == 3 / 4
    if "exclude_modules" in config:
        assert model.blocks[0].attn.query.lora is None and model.blocks[1].mlp.proj.lora is None
        assert model.blocks[1].attn.out.lora is not None


def test_merge_equals_peft_merge_and_unload(bases, tmp_path):
    from starcoder_jax.cli.main import main

    base, adapter = bases[True], str(tmp_path / "adapter")
    peft_adapter(base, adapter, r=4, lora_alpha=8, target_modules=list(ALL_TARGETS))
    merged_by_peft = peft.PeftModel.from_pretrained(torch_base(base), adapter).merge_and_unload()
    want = torch_logits(merged_by_peft)
    out = str(tmp_path / "merged")
    assert main(["convert", "merge-lora", base, adapter, out]) == 0
    np.testing.assert_allclose(hf_logits(out, IDS), want, rtol=0, atol=1e-4)
    with_adapters = sj.load_pretrained(base, adapter=adapter)
    merged = merge_lora(with_adapters)
    assert not has_lora(merged) and has_lora(with_adapters)  # the argument keeps its adapters
    assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
    np.testing.assert_allclose(ours(merged), want, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="merge_lora"):
        sj.save_hf(with_adapters, str(tmp_path / "unmerged"))


def test_new_adapters_leave_the_logits_as_they_were(bases):
    base = sj.load_pretrained(bases[True])
    ids = jnp.asarray(IDS, jnp.int32)
    want = np.asarray(base(ids))
    model = add_lora(base, LoRAConfig(r=4, lora_alpha=8, target_modules=ALL_TARGETS))
    # Op by op, y + x @ A @ 0 is y exactly (compiled, XLA may fuse the two programs differently).
    np.testing.assert_array_equal(np.asarray(model(ids)), want)
    a = np.asarray(model.blocks[0].mlp.fc.lora.a[...])  # kaiming-uniform, as PEFT: |A| < 1 / sqrt(in)
    assert a.shape == (32, 4) and 0.8 / np.sqrt(32) < np.abs(a).max() < 1 / np.sqrt(32)
    assert model.blocks[0].attn.key.lora.a is None  # c_attn's one A is the query's


@pytest.mark.parametrize("change,message", [
    ({"use_dora": True}, "use_dora"),
    ({"lora_bias": True}, "lora_bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"bias": "all"}, "bias='all'"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ({"target_modules": ["c_attn", "wte"]}, r"target_modules \['c_attn', 'wte'\] .*embedding or LM head"),
    ({"target_modules": ["lm_head"]}, "target_modules .*embedding or LM head"),
    ({"target_modules": ["ln_1"]}, "target_modules .*not a projection"),
    ({"target_modules": ["q_attn"]}, "target_modules .*matches none"),
])
def test_unsupported_peft_features_are_refused_by_name(bases, tmp_path, change, message):
    base, adapter = bases[True], str(tmp_path / "adapter")
    peft_adapter(base, adapter, r=4, lora_alpha=8, target_modules=["c_attn"])
    path = os.path.join(adapter, ADAPTER_CONFIG)
    config = json.load(open(path))
    json.dump({**config, **change}, open(path, "w"))
    with pytest.raises(ValueError, match=message):
        sj.load_pretrained(base, adapter=adapter)


def test_adapter_keys_without_the_peft_prefix_are_reported_and_load_nothing(bases, tmp_path):
    from safetensors.numpy import load_file, save_file

    from starcoder_jax.model.peft import load_peft

    base, adapter = bases[True], str(tmp_path / "adapter")
    peft_adapter(base, adapter, r=4, lora_alpha=8, target_modules=["c_attn"])
    file = os.path.join(adapter, ADAPTER_WEIGHTS)
    tensors = load_file(file)
    save_file({k.removeprefix("base_model.model."): v for k, v in tensors.items()}, file)
    model = sj.load_pretrained(base)
    with pytest.raises(CheckpointError, match=r"8 problems(.|\n)*missing tensor base_model\.model\.transformer"
                                              r"\.h\.0\.attn\.c_attn\.lora_A\.weight(.|\n)*unexpected tensor "
                                              r"transformer\.h\.0\.attn\.c_attn\.lora_A\.weight"):
        load_peft(model, adapter)
    assert not has_lora(model) and not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))


def test_a_failed_export_leaves_nothing(bases, tmp_path, monkeypatch):
    from starcoder_jax.model import peft as ours_peft

    model = randomize(add_lora(sj.load_pretrained(bases[True]), LoRAConfig(r=2)))

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ours_peft, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        sj.save_peft(model, str(tmp_path / "out" / "adapter"))
    assert os.listdir(tmp_path / "out") == []
    with pytest.raises(ValueError, match="no LoRA adapters"):
        sj.save_peft(sj.load_pretrained(bases[True]), str(tmp_path / "none"))


@pytest.mark.parametrize("multi_query", [True, False])
def test_adapter_axes_are_their_kernels_with_the_rank_whole(multi_query):
    from starcoder_jax.parallel.mesh import param_specs

    config = sj.StarCoderConfig(**SHAPE, multi_query=multi_query)
    model = nnx.eval_shape(lambda: add_lora(sj.StarCoder(config, rngs=nnx.Rngs(0)),
                                            LoRAConfig(r=4, target_modules=ALL_TARGETS)))
    specs = param_specs(nnx.state(model), {"data": 1, "fsdp": 2, "tensor": 2})
    P = jax.P
    attn = ("blocks", 0, "attn")
    assert specs[(*attn, "query", "lora", "a")] == P("fsdp", None)
    assert specs[(*attn, "query", "lora", "b")] == P(None, "tensor", None)
    assert specs[(*attn, "key", "lora", "b")] == P(None, None if multi_query else "tensor", None)
    assert specs[(*attn, "out", "lora", "a")] == P("tensor", None, None)
    assert specs[(*attn, "out", "lora", "b")] == P(None, "fsdp")
    assert specs[("blocks", 0, "mlp", "fc", "lora", "b")] == P(None, "tensor")
    rank_axes = [var.get_metadata()["out_sharding"] for _, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))]
    assert len(rank_axes) == 2 * 4 * 2 + 2 * 2 and all("lora_rank" in axes for axes in rank_axes)




@pytest.mark.slow
def test_generation_runs_the_adapters(bases):
    """The prefill and the cached decode loop run the adapters too: each greedy token is
    the argmax of the full forward (checked against PEFT above) over the tokens before
    it, and the base model would have chosen others."""
    model = randomize(add_lora(sj.load_pretrained(bases[True]), LoRAConfig(r=4, target_modules=ALL_TARGETS)))
    base = sj.load_pretrained(bases[True])
    prompts = [[5, 17, 3, 99], [42, 7]]
    base_agrees = []
    for prompt, result in zip(prompts, sj.generate(model, prompts, max_new_tokens=8, temperature=0.0)):
        seq = jnp.asarray([prompt + result.ids], jnp.int32)
        chosen = slice(len(prompt) - 1, seq.shape[1] - 1)
        assert np.argmax(np.asarray(model(seq))[0, chosen], -1).tolist() == result.ids
        base_agrees.append(np.argmax(np.asarray(base(seq))[0, chosen], -1).tolist() == result.ids)
    assert not all(base_agrees)


@pytest.mark.slow
def test_adapter_gradients_are_the_same_under_the_projections_remat():
    """Only the adapters differentiated, the base frozen beside them (another trace level
    than the gradient's): remat "projections" (nnx.remat) gives the gradients of no remat."""
    config = sj.StarCoderConfig(**SHAPE)
    model = randomize(add_lora(sj.init_model(config), LoRAConfig(r=4, target_modules=ALL_TARGETS)))
    ids = jnp.asarray(IDS, jnp.int32)

    def grads(policy):
        model.remat = policy
        graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(ids) ** 2)  # noqa: E731
        return jax.tree.leaves(jax.jit(jax.grad(loss))(params))

    # float32 sums of a gradient element: the 2 x 13 positions, the vocabulary, and
    # in each block the width, the MLP (4x) and the 13 keys
    terms = 2 * 13 + SHAPE["vocab_size"] + SHAPE["n_layer"] * (5 * SHAPE["n_embd"] + 13)
    assert_close_in_any_order(grads("projections"), grads("none"), terms)


def test_adapters_follow_shardings(bases, tmp_path):
    """load_pretrained(shardings=..., adapter=...): the adapters go beside the base, by the rules
    on the mesh of the shardings given, or where the dict names them."""
    from jax.sharding import NamedSharding

    from starcoder_jax.parallel.mesh import mesh_from_spec, param_shardings

    base, adapter = bases[True], str(tmp_path / "adapter")
    model = sj.load_pretrained(base)
    sj.add_lora(model, sj.LoRAConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"]))
    sj.save_peft(model, adapter)
    mesh = mesh_from_spec("fsdp=1")
    shardings = param_shardings(nnx.state(sj.abstract_model(model.config)), mesh)
    loaded = sj.load_pretrained(base, shardings=shardings, adapter=adapter)
    adapters = jax.tree.leaves(nnx.state(loaded, nnx.LoRAParam))
    assert adapters and all(isinstance(a.sharding, NamedSharding) and a.sharding.mesh == mesh for a in adapters)
    path = next(p for p, _ in nnx.to_flat_state(nnx.state(loaded, nnx.LoRAParam)))
    named = NamedSharding(mesh, jax.P(None, None))
    loaded = sj.load_pretrained(base, shardings=shardings | {path: named}, adapter=adapter)
    by_path = dict(nnx.to_flat_state(nnx.state(loaded, nnx.LoRAParam)))
    assert by_path[path].get_value().sharding == named
    np.testing.assert_array_equal(ours(loaded), ours(sj.load_pretrained(base, adapter=adapter)))


def _dots_into(shapes: set, jaxpr) -> int:
    """dot_generals whose result has one of `shapes` (a kernel's cotangent), sub-programs included."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            n += tuple(eqn.outvars[0].aval.shape) in shapes
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _dots_into(shapes, sub)
    return n


@pytest.mark.parametrize("remat", ["full", "projections"])
def test_recomputation_computes_no_cotangent_of_a_frozen_kernel(remat):
    """A LoRA step over a float base: the blocks' backward (rerun under remat) makes no
    x^T dy product for the frozen kernels, only for the adapters and the activations; the
    gradients are those without recomputation."""
    from builders import mean_next_token_loss

    config = sj.StarCoderConfig(vocab_size=96, n_positions=32, n_embd=40, n_head=4, n_layer=2, n_inner=176)
    model = sj.init_model(config, seed=2)
    add_lora(model, LoRAConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]))
    nnx.update(model, jax.tree.map(lambda a: jnp.full_like(a, 0.01), nnx.state(model, nnx.LoRAParam)))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 24)), jnp.int32)
    kernels = {tuple(x.shape) for path, x in nnx.to_flat_state(nnx.state(model, nnx.Param))
               if path[-1] == "kernel"}

    def grads(model, remat, trained):
        model.remat = remat
        graphdef, params, rest = nnx.split(model, trained, ...)
        fn = jax.grad(lambda p: mean_next_token_loss(nnx.merge(graphdef, p, rest), ids))
        return fn, params

    fn, params = grads(model, remat, nnx.LoRAParam)
    assert _dots_into(kernels, jax.make_jaxpr(fn)(params).jaxpr) == 0
    whole, all_params = grads(model, remat, nnx.Any(nnx.Param, nnx.LoRAParam))
    assert _dots_into(kernels, jax.make_jaxpr(whole)(all_params).jaxpr) >= 2 * config.n_layer  # the count sees them
    reference, _ = grads(model, "none", nnx.LoRAParam)
    assert_close_in_any_order(jax.jit(fn)(params), jax.jit(reference)(params), 40)

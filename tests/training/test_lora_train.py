"""LoRA fine-tuning: only the adapters train and are checkpointed, resume is exact,
the adapters export for PEFT (also from an int8 or QLoRA's nf4 base), and the optimizer state is
a small fraction of full fine-tuning's."""

import json
import os
import signal
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from builders import make_hf_model
from flax import nnx
from test_train import corpus_dir, losses, run_cli, wait_for_step, write_config  # noqa: F401 (a fixture)

import starcoder_jax as sj
from starcoder_jax.model.weights import copy_tokenizer_files
from starcoder_jax.training import train
from starcoder_jax.training.state import prepare

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

BASE = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
IDS = np.random.default_rng(1).integers(0, 458, (2, 24))
LORA = {"rank": 4, "alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc"]}


def lora_config(tmp_path, corpus, tokenizer_dir, base_dir, out, name="c.yaml", lora=LORA, quantize=None,
                **changes):
    """A config file (test_train.write_config's) fine-tuning base_dir's model with LoRA
    (on a base quantized to `quantize`, if given)."""
    path = write_config(tmp_path / name, corpus, tokenizer_dir, out,
                        **{"train.steps": 8, "train.save_every": 4, "train.eval_every": 8,
                           "data.eval_fraction": 0.0, "optim.learning_rate": 1e-2, **changes})
    raw = yaml.safe_load(open(path))
    raw["model"] = {"path": base_dir, **({"quantize": quantize} if quantize else {})}
    raw["lora"] = lora
    yaml.safe_dump(raw, open(path, "w"))
    return path


def logits(model) -> np.ndarray:
    """The model's logits of IDS (sj.forward: compiled once per model and shape)."""
    return np.asarray(sj.forward(model, IDS))


def flat(model, which) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, which))}


def frozen_base(model) -> dict:
    """Every array of the base by path: quantized weights in their stored layout, float params."""
    from starcoder_jax.model.weights import stored_state

    state = stored_state(model).filter(nnx.Not(nnx.LoRAParam))
    return {p: np.asarray(a) for p, a in jax.tree_util.tree_leaves_with_path(state)}


def peft_logits(base_dir, adapter_dir):
    from transformers import GPTBigCodeForCausalLM

    base = GPTBigCodeForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    assert not [w for w in caught if "adapter keys" in str(w.message)]
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def test_lora_run_trains_only_the_adapters(tmp_path, corpus_dir, tokenizer_dir, tiny_model_dir):  # noqa: F811
    base = sj.load_pretrained(tiny_model_dir)
    # Before the first step the adapters' B is zero: the base model's very logits.
    fresh = prepare(train.load_config(lora_config(tmp_path, corpus_dir, tokenizer_dir, tiny_model_dir,
                                                  str(tmp_path / "fresh")), []), progress=False)
    np.testing.assert_allclose(logits(fresh.state.model()), logits(base), rtol=0, atol=1e-5)  # float32 round-off
    fresh.checkpoints.close()

    straight, export = str(tmp_path / "straight"), str(tmp_path / "peft")
    cfg = train.load_config(lora_config(tmp_path, corpus_dir, tokenizer_dir, tiny_model_dir, straight), [])
    model = train.run(cfg, progress=False, export_peft=export)["model"]
    history = [loss for _, loss in losses(straight)]
    assert len(history) == 8 and np.mean(history[-3:]) < history[0] - 0.5, history

    # Every base parameter is bit-identical; the adapters moved.
    want = flat(base, nnx.Param)
    got = flat(model, BASE)
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))
    assert all(np.abs(b).max() > 0 for p, b in flat(model, nnx.LoRAParam).items() if p[-1] == "b")

    # Checkpoints hold the adapters and their AdamW state, never the base.
    tree = prepare(cfg, progress=False)
    saved = tree.state.checkpoint()
    tree.checkpoints.close()
    assert set(saved) == {"params", "opt_state"}
    assert all("lora" in p for p, _ in nnx.to_flat_state(saved["params"]))
    with open(os.path.join(straight, "checkpoints", "8", "state", "_METADATA")) as f:
        written = [key for key in json.load(f)["tree_metadata"] if "'value'" in key]  # every array on disk
    assert len(written) == 3 * 2 * 10 and all("'lora'" in key for key in written)  # params, mu, nu

    # The run directory gives the model back: its base from model.path, its adapters from the checkpoint.
    np.testing.assert_array_equal(logits(train.load_run_model(straight)), logits(model))

    # PEFT loads the export on the transformers base and computes our logits.
    np.testing.assert_allclose(peft_logits(tiny_model_dir, export), logits(model), rtol=0, atol=1e-4)

    # Another base under the same output directory is refused.
    other = make_hf_model(str(tmp_path / "other_base"), seed=1, vocab_size=512, n_positions=512)
    copy_tokenizer_files(tokenizer_dir, other)
    cfg_c = train.load_config(lora_config(tmp_path, corpus_dir, tokenizer_dir, other, straight, name="d.yaml",
                                          **{"train.steps": 12}), [])
    with pytest.raises(train.TrainingError, match="different run"):
        train.run(cfg_c, progress=False)


def dequantized_hf_dir(model, out_dir) -> str:
    """A quantized model's weights, dequantized, as a float HF directory (without its adapters)."""
    from starcoder_jax.model.modules import Dense, Quantized, param
    from starcoder_jax.ops.quant import dequantize

    plain = nnx.merge(*nnx.split(model))
    for _, module in nnx.iter_modules(plain):
        if isinstance(module, Dense) and isinstance(module.kernel, Quantized):
            axes = module.kernel.get_metadata()["out_sharding"]
            module.kernel = param(dequantize(module.kernel.get_value()), axes, decay=True)
            module.lora = None
    table = plain.wte.embedding  # a quantized weight standing for the table's transpose [D, V]
    plain.wte.embedding = param(dequantize(table.get_value()).T, table.get_metadata()["out_sharding"][::-1])
    plain.config = plain.config.replace(quantization=None)
    plain.lora_config = None
    return sj.save_hf(plain, out_dir)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_lora_on_a_quantized_base_loads_in_peft_on_the_dequantized_base(tmp_path, corpus_dir,  # noqa: F811
                                                                        tokenizer_dir, tiny_model_dir, mode):
    out, export = str(tmp_path / "run"), str(tmp_path / "peft")
    path = lora_config(tmp_path, corpus_dir, tokenizer_dir, tiny_model_dir, out, **{"train.steps": 2})
    # the "xla" form: the quantized product as one einsum, whose gradient compiles fastest on CPU
    cfg = train.load_config(path, [f"model.quantize={mode}", "model.config.matmul_impl=xla"])
    model = train.run(cfg, progress=False, export_peft=export)["model"]
    assert model.config.quantization == mode and model.blocks[0].mlp.fc.quantized
    assert model.blocks[0].mlp.fc.lora.b[...].dtype == jnp.float32
    # only the adapters trained: the quantized base is bit for bit the one quantized at the start
    fresh = sj.load_pretrained(tiny_model_dir, quantize=mode)
    base, trained = frozen_base(fresh), frozen_base(model)
    assert trained.keys() == base.keys()
    for p, a in base.items():
        np.testing.assert_array_equal(trained[p], a, err_msg=str(p))
    want = logits(model)
    got = peft_logits(dequantized_hf_dir(model, str(tmp_path / "dequantized")), export)
    # tests/ops/test_int8.py, test_int4.py: the products against the dequantized weights in float32
    # agree to 1e-2 of the output scale (int8 rounds the activations to bfloat16).
    assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()
    assert np.abs(want - logits(fresh)).max() > 0.1


def test_lora_config_errors():
    with pytest.raises(ValueError, match="model.quantize: int8 needs a lora: section"):
        train.parse_config({"model": {"quantize": "int8"}})
    with pytest.raises(ValueError, match="model.quantize: nf4 needs a lora: section"):
        train.parse_config({"model": {"quantize": "nf4"}})
    with pytest.raises(ValueError, match="model.quantize must be None or 'int8', 'int4', 'nf4'"):
        train.parse_config({"model": {"quantize": "fp4"}})
    with pytest.raises(ValueError, match="lora.rank must be a positive integer"):
        train.parse_config({"lora": {"rank": 0}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) lora.r; lora has"):
        train.parse_config({"lora": {"r": 8}})
    cfg = train.parse_config({}, ["lora.rank=16", "lora.alpha=32"])
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules) == (16, 32, ("c_attn",))
    assert train.parse_config(cfg.to_dict()).lora == cfg.lora
    assert train.parse_config(train.parse_config({}).to_dict()).lora is None
    with pytest.raises(ValueError, match="needs a LoRA run"):
        train.run(train.parse_config({}), export_peft="x")


def test_rank_and_alpha_patterns_of_the_yaml_reach_the_adapters_and_peft(tmp_path):
    """lora.rank_pattern / lora.alpha_pattern: PEFT's per-module exceptions, through
    config.yaml, into the adapters' ranks and scales, and out to PEFT's config."""
    from starcoder_jax.model.peft import save_peft
    from starcoder_jax.training.state import with_lora

    cfg = train.parse_config({"lora": {"rank": 4, "alpha": 8, "target_modules": ["c_attn", "c_fc"],
                                       "rank_pattern": {"c_fc": 2}, "alpha_pattern": {r"h\.1\.attn\.c_attn": 3}}})
    assert train.parse_config(cfg.to_dict()).lora == cfg.lora  # as config.yaml holds it
    model = with_lora(sj.init_model(sj.StarCoderConfig(vocab_size=64, n_positions=16, n_embd=16, n_layer=2,
                                                       n_head=2)), cfg)
    for block in model.blocks:
        assert block.mlp.fc.lora.a.shape == (16, 2) and block.attn.query.lora.a.shape == (16, 4)
        assert block.mlp.fc.lora.scale == 8 / 2
    assert model.blocks[0].attn.query.lora.scale == 8 / 4 and model.blocks[1].attn.query.lora.scale == 3 / 4
    save_peft(model, str(tmp_path / "adapter"))
    theirs = peft.LoraConfig.from_pretrained(str(tmp_path / "adapter"))
    assert (theirs.r, theirs.lora_alpha, theirs.rank_pattern, theirs.alpha_pattern) == (
        4, 8, {"c_fc": 2}, {r"h\.1\.attn\.c_attn": 3})
    for bad, message in (({"rank_pattern": {"c_fc": 0}}, "must map to a positive integer rank"),
                         ({"alpha_pattern": {"(": 2}}, "is not a regular expression"),
                         ({"rank_pattern": ["c_fc", 2]}, "must be a mapping")):
        with pytest.raises(ValueError, match=f"lora.{next(iter(bad))}"):
            train.parse_config({"lora": bad})
        with pytest.raises(ValueError, match=message):
            train.parse_config({"lora": bad})


def test_lora_optimizer_state_of_starcoderbase_1b_is_under_one_percent_of_full_finetuning():
    """Shapes only (an abstract model): AdamW's state for the trained set."""
    from starcoder_jax.model.lora import LoRAConfig, add_lora
    from starcoder_jax.training.config import OptimConfig
    from starcoder_jax.training.step import make_optimizer, optimizer_state_bytes

    config = sj.preset("starcoderbase-1b")
    lora = LoRAConfig(r=16, lora_alpha=32, target_modules=("c_attn", "c_proj", "c_fc"))
    model = nnx.eval_shape(lambda: add_lora(sj.StarCoder(config, rngs=nnx.Rngs(0)), lora))
    tx, _ = make_optimizer(OptimConfig(), 100)
    full = optimizer_state_bytes(nnx.state(model, BASE), tx)
    adapters = optimizer_state_bytes(nnx.state(model, nnx.LoRAParam), tx)
    n_adapter = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    assert n_adapter == 24 * 16 * ((2048 + 2304) + (2048 + 2048) + (2048 + 8192) + (8192 + 2048))  # 11,108,352
    assert full > 8e9 and adapters < 0.01 * full, (adapters, full)


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_lora_resume_after_kill_9_is_exact(tmp_path, corpus_dir, tokenizer_dir, tiny_model_dir,  # noqa: F811
                                           quantize):
    from starcoder_jax.training.checkpoint import Checkpoints

    steps = {"train.steps": 24, "quantize": quantize}
    straight = str(tmp_path / "straight")
    run_cli(lora_config(tmp_path, corpus_dir, tokenizer_dir, tiny_model_dir, straight, name="a.yaml", **steps))
    killed = str(tmp_path / "killed")
    config = lora_config(tmp_path, corpus_dir, tokenizer_dir, tiny_model_dir, killed, name="b.yaml", **steps)
    proc = run_cli(config, wait=False)
    wait_for_step(killed, 6, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    assert (Checkpoints(os.path.join(killed, "checkpoints")).latest_step() or 0) < 24
    run_cli(config)
    assert losses(killed) == losses(straight)
    a, b = train.load_run_model(killed), train.load_run_model(straight)
    for path, value in flat(a, nnx.LoRAParam).items():
        np.testing.assert_array_equal(flat(b, nnx.LoRAParam)[path], value)

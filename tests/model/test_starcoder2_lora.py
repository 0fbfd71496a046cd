"""StarCoder2 adapters against PEFT 0.21 (q_proj, k_proj, v_proj, o_proj, c_fc, c_proj),
and fine-tuning, int8, FIM and held-out scoring on a tiny random StarCoder2 model.

Tolerance: logits agree to 1e-4 in float32, as for GPTBigCode (test_lora.py).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from builders import builds_with_torch, hf_model, make_hf_starcoder2, mean_next_token_loss
from flax import nnx

import starcoder_jax as sj
from starcoder_jax.model.lora import LoRAConfig, add_lora

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"]
IDS = np.random.default_rng(0).integers(0, 128, (2, 20))  # past the window of 8


@pytest.fixture(scope="module")
@builds_with_torch
def base(tmp_path_factory):
    return make_hf_starcoder2(str(tmp_path_factory.mktemp("sc2_lora")), vocab_size=128, hidden_size=32,
                              intermediate_size=64, max_position_embeddings=64)


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def test_we_load_peft_adapters(base, tmp_path):
    """An adapter made by PEFT (get_peft_model on all six projections, B randomized,
    save_pretrained) loads with PEFT's logits."""
    torch.manual_seed(0)
    model = peft.get_peft_model(hf_model(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    model.save_pretrained(str(tmp_path / "adapter"))
    want = torch_logits(model.eval())
    ours = sj.load_pretrained(base, adapter=str(tmp_path / "adapter"))
    got = np.asarray(sj.forward(ours, IDS))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert np.abs(got - np.asarray(sj.forward(sj.load_pretrained(base), IDS))).max() > 0.5
    attn = ours.blocks[1].attn
    assert all(d.lora.a is not None for d in (attn.query, attn.key, attn.value, attn.out))  # one A each


def test_peft_loads_our_adapters(base, tmp_path):
    model = add_lora(sj.load_pretrained(base), LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    rng = np.random.default_rng(0)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        var.set_value(jnp.asarray(0.3 * rng.standard_normal(var.get_value().shape), jnp.float32))
    out = sj.save_peft(model, str(tmp_path / "adapter"), base_model_name_or_path=base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(hf_model(base), out).eval()
    assert not [w for w in caught if "adapter keys" in str(w.message)]
    want = np.asarray(sj.forward(model, IDS))
    np.testing.assert_allclose(torch_logits(theirs), want, rtol=0, atol=1e-4)
    assert np.abs(want - torch_logits(hf_model(base))).max() > 0.5


def test_gpt_bigcode_targets_name_the_starcoder2_projections(base):
    with pytest.raises(ValueError, match=r"matches none of the projections self_attn.q_proj.*'q_proj'"):
        add_lora(sj.load_pretrained(base), LoRAConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="model.embed_tokens: adapters on the embedding"):
        add_lora(sj.load_pretrained(base), LoRAConfig(target_modules=["embed_tokens"]))


@pytest.mark.slow
def test_lora_fine_tuning_lowers_the_loss(base):
    """A few SGD steps on adapters of all six projections lower the loss of a batch
    past the window; the base weights get no update."""
    model = add_lora(sj.load_pretrained(base), LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    ids = jnp.asarray(IDS, jnp.int32)
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

    @jax.jit
    def step(lora):
        loss, grads = jax.value_and_grad(lambda p: mean_next_token_loss(nnx.merge(graphdef, p, rest), ids))(lora)
        return jax.tree.map(lambda p, g: p - 0.5 * g, lora, grads), loss

    losses = []
    for _ in range(6):
        lora, loss = step(lora)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.slow
def test_int8_fim_and_heldout_scoring(base, tokenizer_dir, tmp_path):
    """int8 weights track the float logits; infill and bits per byte run on a StarCoder2
    model with a StarCoder tokenizer (FIM tokens)."""
    from starcoder_jax.eval.heldout import bits_per_byte
    from starcoder_jax.inference.fim import build_prompt, infill
    from starcoder_jax.tokenizer import load_tokenizer

    model = sj.load_pretrained(base)
    f32 = np.asarray(sj.forward(model, IDS))
    int8 = np.asarray(sj.forward(sj.load_pretrained(base, quantize="int8"), IDS))
    assert np.abs(int8 - f32).max() <= 0.05 * np.abs(f32).max()
    tok = load_tokenizer(tokenizer_dir)
    big = make_hf_starcoder2(str(tmp_path / "big"), vocab_size=tok.vocab_size, max_position_embeddings=128)
    model = sj.load_pretrained(big)
    prompt = build_prompt(tok, "def add(a, b):\n", "\n")
    assert prompt[0] == tok.token_id("<fim_prefix>")
    assert isinstance(infill(model, tok, "def add(a, b):\n", "\n", max_new_tokens=6), str)
    bpb, tokens, _ = bits_per_byte(model, tok, ["def f(x):\n    return x * 2\n"] * 3, batch_size=2)
    assert tokens > 0 and 0 < bpb < 100

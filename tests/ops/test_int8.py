"""Weight-only int8 quantization: the forms, the quantized model, loading, saving, generation.

Tolerances. A weight is off by at most half its channel's scale (max|w| / 254),
so every int8 form, forced by name, is compared with `x @ dequantize(w)` (the
same int8 weights in float32) at 1e-2 of the output scale: int8 products
round the activations to bfloat16. The forms agree with each other to
float32 round-off. Against
the float model, int8 logits of the random test model (weights ~ N(0, 0.2),
logits of order 10) move by at most 3% of the logit range, and at least 90% of
the next-token argmaxes agree; on the trained default model, held-out
perplexity rises by at most 1%.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import starcoder_jax as sj
from starcoder_jax.config import StarCoderConfig
from starcoder_jax.inference.generate import generate
from starcoder_jax.model.modules import abstract_model, init_model
from starcoder_jax.model.weights import save_hf, save_orbax
from starcoder_jax.ops import int8 as quant

RNG = np.random.default_rng(0)


def test_quantize_bounds_every_weight_by_half_a_step():
    w = RNG.standard_normal((48, 5, 8)).astype(np.float32)
    w[:, 2, 3] = 0.0  # an all-zero output channel
    qw = quant.quantize(jnp.asarray(w), 1)
    q, scale = qw.q, qw.scale
    assert q.dtype == jnp.int8 and q.shape == (5, 8, 48) and scale.shape == (5, 8)
    assert qw.shape == w.shape and qw.in_shape == (48,) and qw.out_shape == (5, 8) and qw.blocks == 1
    assert int(jnp.abs(q).max()) == 127
    back = np.asarray(quant.dequantize(qw))
    assert back.shape == w.shape
    err = np.abs(back - w)
    assert (err <= np.asarray(scale)[None] / 2 + 1e-7).all()
    assert float(scale[2, 3]) == 1.0 and (back[:, 2, 3] == 0).all()


def _reference(x, qw):
    """x [..., *in] @ dequantize(qw) in float32: what every int8 form computes."""
    n_in = qw.n_in
    return jnp.tensordot(x, quant.dequantize(qw), axes=(tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))))


@pytest.mark.parametrize("in_shape, out_shape", [((64,), (3, 16)), ((4, 16), (40,)), ((4096,), (32,))])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
@pytest.mark.parametrize("form", quant.INT8_FORMS)
def test_every_int8_form_equals_the_dequantized_product(in_shape, out_shape, rows, form):
    n_in = len(in_shape)
    w = jnp.asarray(RNG.standard_normal((*in_shape, *out_shape)).astype(np.float32))
    qw = quant.quantize(w, n_in)
    x = jnp.asarray(RNG.standard_normal((rows, 1, *in_shape)).astype(np.float32))
    want = _reference(x, qw)
    for layout in (qw, qw.for_cpu()):
        got = jax.jit(lambda x, w: quant.int8_product(x, w, form))(x, layout)
        assert got.shape == (rows, 1, *out_shape)
        # the CPU forms round the activations to bfloat16 (relative 2^-9 each); "dot" keeps float32
        tol = (1e-5 if form == "dot" else 1e-2) * float(jnp.abs(want).max())
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=tol)


@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_int8_forms_agree_to_float32_round_off(rows, dtype):
    """Every form computes the same product of bfloat16 activations; float32 ones stay float32
    in "dot" only (the CPU forms round them to bfloat16)."""
    w = jnp.asarray(RNG.standard_normal((256, 96)).astype(np.float32))
    qw = quant.quantize(w, 1)
    x = jnp.asarray(RNG.standard_normal((rows, 256)).astype(np.float32)).astype(dtype)
    out = {form: np.asarray(jax.jit(lambda x, w, f=form: quant.int8_product(x, w, f))(x, qw))
           for form in quant.INT8_FORMS}
    rounded = np.asarray(quant.int8_product(x.astype(jnp.bfloat16), qw, "dot"))
    for form in quant.INT8_FORMS:
        want = out["dot"] if form == "dot" or dtype == jnp.bfloat16 else rounded
        np.testing.assert_allclose(out[form], want, rtol=0, atol=1e-5 * np.abs(want).max())
    exact = np.asarray(_reference(x.astype(jnp.float32), qw))
    np.testing.assert_allclose(out["dot"], exact if dtype == jnp.float32 else rounded, rtol=0,
                               atol=1e-5 * np.abs(exact).max())


@pytest.mark.parametrize("in_shape, out_shape, blocks", [((4096,), (3, 16), 2), ((6, 1024), (24,), 3)])
def test_cpu_layout_computes_the_same_product(in_shape, out_shape, blocks):
    """A weight with more inputs than one CPU tile is laid out for the CPU in
    input blocks [C, *out, in0 / C, *in_rest]: the same weights (dequantized
    bit for bit, back to the stored layout bit for bit), the same CPU tiles
    in the same order (bit-identical products), and the other forms agree
    with it to float32 round-off."""
    assert quant.cpu_input_blocks(in_shape) == blocks
    rng = np.random.default_rng(11)  # its own draws: the module's RNG stream stays as the tests below expect
    n_in = len(in_shape)
    w = jnp.asarray(rng.standard_normal((*in_shape, *out_shape)).astype(np.float32))
    flat = quant.quantize(w, n_in)
    cpu = flat.for_cpu()
    assert cpu.blocks == blocks and cpu.q.shape == (blocks, *out_shape, in_shape[0] // blocks, *in_shape[1:])
    assert cpu.shape == flat.shape and cpu.for_cpu() is cpu
    np.testing.assert_array_equal(np.asarray(quant.dequantize(cpu)), np.asarray(quant.dequantize(flat)))
    back = cpu.neutral()
    assert back.blocks == 1 and (np.asarray(back.q) == np.asarray(flat.q)).all()
    for rows in (1, 5):
        x = jnp.asarray(rng.standard_normal((rows, *in_shape)).astype(np.float32))
        for form in ("cpu_rows", "cpu_tiles"):
            want = np.asarray(jax.jit(lambda x, w, f=form: quant.int8_product(x, w, f))(x, flat))
            got = np.asarray(jax.jit(lambda x, w, f=form: quant.int8_product(x, w, f))(x, cpu))
            np.testing.assert_array_equal(got, want)
        for form in ("reduce", "dot"):  # "dot" of the bfloat16 activations the CPU forms multiply
            got = np.asarray(quant.int8_product(x.astype(jnp.bfloat16) if form == "dot" else x, cpu, form))
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_int8_product_refuses_mismatched_inputs_and_unknown_forms():
    qw = quant.quantize(jnp.ones((8, 4)), 1)
    with pytest.raises(ValueError, match="input axes"):
        quant.int8_product(jnp.ones((2, 6)), qw, "dot")
    with pytest.raises(ValueError, match="int8 form must be one of"):
        quant.int8_product(jnp.ones((2, 8)), qw, "fused")


def _layout(m):
    _, state = nnx.split(m)
    return sorted((p, tuple(v.get_value().shape), isinstance(v.get_value(), quant.QuantizedWeight),
                   type(v).__name__) for p, v in nnx.to_flat_state(state))


@pytest.mark.parametrize("tie", [True, False])
def test_quantized_model_structure_equals_its_abstract_model(tie):
    config = StarCoderConfig(vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                             tie_word_embeddings=tie)
    float_names = _layout(init_model(config))
    model = init_model(config).quantize_()
    assert model.config.quantization == "int8"
    got = _layout(model)
    assert got == _layout(abstract_model(model.config))
    # the same names and logical shapes as the float model (the int8 table stands for its transpose [D, V])
    def shapes(layout):
        return [(p, shape[::-1] if p == ("wte", "embedding") and is_int8 else shape)
                for p, shape, is_int8, _ in layout]

    assert shapes(got) == shapes(float_names)
    int8 = [p for p, _, is_int8, kind in got if is_int8]
    assert all(kind == "Quantized" for p, _, is_int8, kind in got if is_int8)
    assert len(int8) == 6 * 2 + 1 + (not tie)
    assert ("lm_head",) in int8 or tie
    assert ("wte", "embedding") in int8 and ("wpe", "embedding") not in int8


@pytest.mark.slow
def test_wide_mlp_output_projection_takes_input_blocks_on_the_cpu_form_only(tmp_path):
    """n_inner 4096 > one CPU tile: laid out for the "cpu" form, the MLP
    output projection's int8 kernel is [2, D, 2048]; its abstract model, a
    checkpoint and the "xla" form hold the stored layout [D, 4096]; the
    model computes what the float model computes."""
    config = StarCoderConfig(vocab_size=300, n_positions=32, n_embd=32, n_layer=1, n_head=4, n_inner=4096,
                             matmul_impl="cpu")
    float_model = init_model(config)
    ids = jnp.asarray(np.random.default_rng(12).integers(0, 300, (2, 7)), jnp.int32)
    want = np.asarray(float_model(ids))
    model = float_model.quantize_()
    proj = model.blocks[0].mlp.proj.kernel.get_value()
    assert proj.blocks == 2 and proj.q.shape == (2, 32, 2048)
    fc = model.blocks[0].mlp.fc.kernel.get_value()
    assert fc.blocks == 1 and fc.q.shape == (4096, 32)
    abstract = abstract_model(model.config)
    assert abstract.blocks[0].mlp.proj.kernel.get_value().q.shape == (32, 4096)
    got = np.asarray(model(ids))
    assert np.abs(got - want).max() <= 0.03 * (want.max() - want.min())
    out = save_orbax(model, str(tmp_path / "int8"))
    assert model.blocks[0].mlp.proj.kernel.get_value().blocks == 2  # saving leaves the model as it is
    loaded = sj.load_pretrained(out, matmul_impl="xla")
    assert loaded.blocks[0].mlp.proj.kernel.get_value().q.shape == (32, 4096)
    # the "dot" form keeps the float32 activations the CPU forms round to bfloat16 (2^-9 each);
    # a misread layout would be off by the logits' whole scale
    np.testing.assert_allclose(np.asarray(loaded(ids)), got, rtol=0, atol=1e-2 * np.abs(got).max())
    loaded = sj.load_pretrained(out, matmul_impl="cpu")
    assert loaded.blocks[0].mlp.proj.kernel.get_value().q.shape == (2, 32, 2048)
    np.testing.assert_array_equal(np.asarray(loaded(ids)), got)


def test_decode_loop_converts_no_int8_kernel_outside_its_loop():
    """The compiled decode loop passes every int8 kernel into its loop as it is.

    A kernel the loop converts whole is loop-invariant, and XLA may hoist the
    conversion out: the program then converts every such kernel at each call
    (each token, when streaming) and reads it at four bytes a weight per step.
    """
    from starcoder_jax.bench import decode_consts, prefilled
    from starcoder_jax.inference.generate import decode_loop

    config = StarCoderConfig(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4, matmul_impl="cpu")
    graphdef, params = nnx.split(init_model(config).quantize_())
    consts = decode_consts(config, 1, 8)
    state = prefilled(graphdef, params, config, jnp.ones((1, 4), jnp.int32), 16, consts)
    hlo = decode_loop.lower(graphdef, params, state, jnp.int32(4), consts).compile().as_text()
    entry = hlo[hlo.index("\nENTRY") + 1:].splitlines()
    int8_params = [line.split("=")[0].strip() for line in entry[1:] if " parameter(" in line and "s8[" in line]
    assert len(int8_params) == 6 * 2 + 1  # the int8 kernels and table are parameters of the program
    outside = [line.strip()[:160] for line in entry[1:] if " parameter(" not in line and " tuple(" not in line
               and any(f"{name})" in line or f"{name}," in line for name in int8_params)]
    assert not outside, outside


@pytest.fixture(scope="module")
def float_and_int8(tiny_model_dir):
    return sj.load_pretrained(tiny_model_dir), sj.load_pretrained(tiny_model_dir, quantize="int8")


def test_int8_logits_stay_close_to_float(float_and_int8):
    fmodel, qmodel = float_and_int8
    ids = jnp.asarray(RNG.integers(0, 512, (4, 64)), jnp.int32)
    ref, got = np.asarray(fmodel(ids)), np.asarray(qmodel(ids))
    spread = ref.max() - ref.min()
    assert np.abs(got - ref).max() <= 0.03 * spread
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@pytest.mark.slow
def test_int8_greedy_generation_mostly_equals_float_and_is_self_consistent(float_and_int8):
    fmodel, qmodel = float_and_int8
    rng = np.random.default_rng(0)  # its own draws: the prompts do not depend on the tests before it
    prompts = [rng.integers(1, 512, n).tolist() for n in (3, 17, 30)]
    ref = [r.ids for r in generate(fmodel, prompts, max_new_tokens=24, ignore_eos=True)]
    results = generate(qmodel, prompts, max_new_tokens=24, ignore_eos=True, logprobs=True)
    got = [r.ids for r in results]
    # cached int8 decode agrees with the int8 model's own full forward pass: the
    # log-probabilities of the chosen tokens match (the same products, summed in
    # another order: one row at a time against all rows at once). An
    # activation within round-off of a bfloat16 rounding boundary can round
    # the other way in one of the two (2^-8 relative), and through the cache
    # that moves the positions after it a little: a few positions may differ
    # by up to 1e-2 (a flip early in a sequence moves every position after
    # it), the rest agree to float32 round-off.
    err = []
    for prompt, r in zip(prompts, results):
        seq = jnp.asarray([prompt + r.ids], jnp.int32)
        full = jax.nn.log_softmax(qmodel(seq)[0, len(prompt) - 1:-1], -1)
        want = np.take_along_axis(np.asarray(full), np.asarray(r.ids)[:, None], -1)[:, 0]
        err.extend(np.abs(np.asarray(r.logprobs) - want))
    err = np.asarray(err)
    assert err.max() <= 1e-2 and (err > 1e-4).mean() <= 0.25, (err.max(), (err > 1e-4).mean())
    # a token that differs changes everything after it: count the agreeing prefix
    same_prefix = [next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), len(r)) for r, g in zip(ref, got)]
    assert sum(same_prefix) >= 0.5 * sum(len(r) for r in ref), same_prefix


@pytest.mark.slow
def test_int8_batch_gives_what_each_prompt_gives_alone(float_and_int8):
    _, qmodel = float_and_int8
    prompts = [RNG.integers(1, 512, n).tolist() for n in (4, 11, 23, 9, 30)]
    batched = [r.ids for r in generate(qmodel, prompts, max_new_tokens=16, ignore_eos=True)]
    alone = [generate(qmodel, [p], max_new_tokens=16, ignore_eos=True)[0].ids for p in prompts]
    assert batched == alone


@pytest.mark.slow
def test_quantized_orbax_directory_round_trips_and_loads_without_flag(float_and_int8, tmp_path, tiny_model_dir):
    _, qmodel = float_and_int8
    out = save_orbax(qmodel, str(tmp_path / "int8"), tokenizer_from=tiny_model_dir)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["starcoder_jax_quantization"] == "int8"
    loaded = sj.load_pretrained(out)
    assert loaded.config.quantization == "int8"
    a_leaves = jax.tree_util.tree_leaves_with_path(nnx.split(qmodel)[1])
    b_leaves = jax.tree_util.tree_leaves_with_path(nnx.split(loaded)[1])
    assert [p for p, _ in a_leaves] == [p for p, _ in b_leaves]
    for (p, a), (_, b) in zip(a_leaves, b_leaves):
        assert a.dtype == b.dtype and (np.asarray(a) == np.asarray(b)).all(), p
    ids = jnp.asarray([[5, 6, 7, 8]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(qmodel(ids)))
    assert sj.load_pretrained(out, quantize="int8").config.quantization == "int8"
    with pytest.raises(ValueError, match="export the model before quantizing"):
        save_hf(qmodel, str(tmp_path / "hf"))


def test_bad_quantize_values_are_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="quantize must be None or 'int8', 'int4', 'nf4'"):
        sj.load_pretrained(tiny_model_dir, quantize="int2")
    with pytest.raises(ValueError, match="quantization must be None or 'int8', 'int4', 'nf4'"):
        StarCoderConfig(quantization="fp8")


@pytest.mark.slow
def test_cli_convert_and_generate_with_quantize(tiny_model_dir, tmp_path):
    def cli(*args):
        run = subprocess.run([sys.executable, "-m", "starcoder_jax.cli", *args], capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stdout

    out = str(tmp_path / "q")
    cli("convert", "hf-to-jax", tiny_model_dir, out, "--quantize", "int8")
    assert sj.load_pretrained(out).config.quantization == "int8"
    a = json.loads(cli("generate", "--model", out, "--json", "--max-new-tokens", "6", "def f(x):").splitlines()[-1])
    b = json.loads(cli("generate", "--model", tiny_model_dir, "--quantize", "int8", "--json",
                       "--max-new-tokens", "6", "def f(x):").splitlines()[-1])
    assert a["ids"] == b["ids"] and len(a["ids"]) >= 1


@pytest.mark.slow
def test_int8_default_model_heldout_perplexity_rises_at_most_one_percent():
    from builders import default_model_bits_per_byte

    fbpb, tokens, nbytes = default_model_bits_per_byte()
    qbpb, _, _ = default_model_bits_per_byte("int8")
    assert tokens > 10_000
    # perplexity per token = 2 ** (bits per byte * bytes / tokens)
    ratio = 2 ** ((qbpb - fbpb) * nbytes / tokens)
    assert 1.0 - 1e-3 <= ratio <= 1.01, (fbpb, qbpb, ratio)


# ---------------------------------------------------------------------------
# int8 KV cache
# ---------------------------------------------------------------------------

def test_int8_cache_layout_and_bytes():
    from starcoder_jax.model.kv_cache import KVCache

    config = StarCoderConfig(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    f32, int8 = KVCache.init(config, 3, 40), KVCache.init(config, 3, 40, quantize="int8")
    layer = int8.layer(0)
    assert layer.k.dtype == jnp.int8 and layer.k_scale.shape == (3, 40, 1) and int8.quantized
    # per token and layer: k and v of H int8 values plus one float32 scale each
    assert int8.nbytes() == 2 * 2 * 3 * 40 * (8 + 4) and f32.nbytes() == 2 * 2 * 3 * 40 * 8 * 4
    with pytest.raises(ValueError, match="cache quantize"):
        KVCache.init(config, 1, 8, quantize="int4")


def test_int8_cache_write_then_read_bounds_the_error():
    from starcoder_jax.model.kv_cache import KVCache

    config = StarCoderConfig(vocab_size=64, n_positions=64, n_embd=32, n_layer=1, n_head=4, multi_query=False)
    layer = KVCache.init(config, 2, 16, quantize="int8").layer(0)
    k = jnp.asarray(RNG.standard_normal((2, 5, 4, 8)).astype(np.float32))
    positions = jnp.asarray([[3, 4, 5, 6, 7], [0, 1, 2, 3, 4]])
    layer = layer.write(k, 2 * k, positions)
    back = np.asarray(layer.keys())
    for row, start in enumerate((3, 0)):
        got, want = back[row, start:start + 5], np.asarray(k[row])
        bound = np.abs(want).max(-1, keepdims=True) / 254 + 1e-7  # half a step per token and head
        assert (np.abs(got - want) <= bound).all()
    v_want = 2 * np.asarray(k[1])
    v_bound = np.abs(v_want).max(-1, keepdims=True) / 254 + 1e-7
    assert (np.abs(np.asarray(layer.values())[1, :5] - v_want) <= v_bound).all()


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_int8_cache_generation_stays_close_and_batches_like_alone(float_and_int8, quantize):
    fmodel, qmodel = float_and_int8
    model = qmodel if quantize else fmodel
    rng = np.random.default_rng(0)  # its own draws: the prompts do not depend on the tests before it
    prompts = [rng.integers(1, 512, n).tolist() for n in (5, 18, 33)]
    ref = generate(model, prompts, max_new_tokens=20, ignore_eos=True, logprobs=True)
    got = generate(model, prompts, max_new_tokens=20, ignore_eos=True, logprobs=True, kv_cache="int8")
    alone = [generate(model, [p], max_new_tokens=20, ignore_eos=True, kv_cache="int8")[0].ids for p in prompts]
    assert [g.ids for g in got] == alone
    # While both agree on the tokens, the chosen tokens' log-probabilities stay
    # close. A cached key or value is off by at most half a step (max|x| / 254
    # per token and head), which moves a log-probability of this random model
    # by about 0.01 (median) and by up to 0.07 at worst (measured over 8 prompt
    # seeds, both models). Greedy streams of a random model fork at near-ties,
    # so the comparison runs over each pair's common prefix; the first token
    # comes from the prefill, which attends to unquantized keys.
    errors = []
    for r, g in zip(ref, got):
        n = next((i for i, (a, b) in enumerate(zip(r.ids, g.ids)) if a != b), len(r.ids))
        assert n >= 1 and g.logprobs[0] == pytest.approx(r.logprobs[0], abs=1e-5)
        errors.extend(np.abs(np.asarray(g.logprobs[:n]) - np.asarray(r.logprobs[:n])))
    assert len(errors) >= 20
    assert max(errors) <= 0.1 and np.median(errors) <= 0.015, (max(errors), np.median(errors))
    with pytest.raises(ValueError, match="kv_cache must be"):
        generate(model, prompts, max_new_tokens=2, kv_cache="fp8")

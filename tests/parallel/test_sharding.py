"""Sharding: mesh specs, the rules table, bad meshes, shard-plan, and 8 fake devices == 1 device.

Tests named `test_mesh8_*` need 8 devices, which XLA only fakes when
XLA_FLAGS is set before JAX starts: `test_eight_fake_devices` runs them in a
subprocess (this same file, `-k mesh8`) and the main process skips them.

Tolerances on 8 devices vs 1 (float32): logits 1e-4 absolute; loss 1e-5
relative; gradients, per parameter, max|a - b| <= 5e-5 max|b| + 1e-6 (the
attention projections' gradients cancel heavily, so a different summation
order moves them by up to ~1.3e-5 of their largest entry; a sharding
mistake moves them by O(1)); greedy tokens identical.
"""

import argparse
import io
import json
import math
import os
import socket
import subprocess
import sys
import time
from contextlib import redirect_stdout

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from builders import REPO_ROOT, free_port, mean_next_token_loss, params_loss
from flax import nnx

import starcoder_jax as sj
from starcoder_jax.cli import plan as plan_cli
from starcoder_jax.config import StarCoderConfig, preset
from starcoder_jax.inference.generate import Generator, generate
from starcoder_jax.model.kv_cache import KVCache, cache_sharding
from starcoder_jax.model.modules import abstract_model, init_model
from starcoder_jax.parallel import distributed, rules
from starcoder_jax.parallel import mesh as pm

EIGHT = os.environ.get("STARCODER_JAX_EIGHT_DEVICES") == "1"


def mesh8(test):
    """A test that needs 8 devices: it runs inside test_eight_fake_devices' subprocess."""
    skip = pytest.mark.skipif(not EIGHT, reason="runs inside test_eight_fake_devices' subprocess")
    return pytest.mark.multidevice(skip(test))


P = jax.P
TINY = dict(vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=8, n_inner=256)


def params_of(config):
    """The parameters of config's abstract model, each with its logical axes."""
    return nnx.state(abstract_model(config))


# ---------------------------------------------------------------------------
# Mesh specs
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("spec, n, want", [
    ("data=2,fsdp=2,tensor=2", 8, (2, 2, 2)),
    ("fsdp=-1", 8, (1, 8, 1)),
    (" tensor = 2 , data=-1 ", 8, (4, 1, 2)),
    ("tensor=2", 8, (1, 1, 2)),  # divides 8: uses the first 2 devices
    ("data=1", 1, (1, 1, 1)),
    ("data=-1", 64, (64, 1, 1)),
])
def test_mesh_spec_sizes(spec, n, want):
    assert tuple(pm.parse_mesh_spec(spec, n).values()) == want


@pytest.mark.parametrize("spec, n, message", [
    ("", 8, "mesh spec is empty"),
    ("data2", 8, "'data2' is not AXIS=SIZE"),
    ("model=2", 8, "unknown axis 'model'; the axes are data, fsdp, tensor"),
    ("data=2,data=2", 8, "axis 'data' is given twice"),
    ("data=two", 8, "size of data must be an integer"),
    ("data=0", 8, "size of data must be >= 1 or -1, got 0"),
    ("data=-1,fsdp=-1", 8, "only one axis may be -1"),
    ("data=3,fsdp=-1", 8, "cannot fill fsdp=-1: the other axes use 3 devices, which does not divide the 8"),
    ("data=16", 8, "needs 16 devices but only 8 are available"),
    ("data=3", 8, "uses 3 devices, which does not divide the 8 available"),
])
def test_mesh_spec_errors(spec, n, message):
    with pytest.raises(ValueError, match=message):
        pm.parse_mesh_spec(spec, n)


def test_mesh_from_spec_on_this_machine():
    n = jax.device_count()
    mesh = pm.mesh_from_spec("data=-1")
    assert mesh.axis_names == rules.MESH_AXES
    assert dict(mesh.shape) == {"data": n, "fsdp": 1, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match=f"needs {2 * n} devices but only {n}"):
        pm.mesh_from_spec(f"tensor={2 * n}")


# ---------------------------------------------------------------------------
# The rules
# ---------------------------------------------------------------------------

def test_param_specs_follow_the_rules():
    sizes = {"data": 2, "fsdp": 2, "tensor": 2}
    mqa = StarCoderConfig(**TINY, tie_word_embeddings=False)
    specs = pm.param_specs(params_of(mqa), sizes)
    assert len(specs) == len(jax.tree.leaves(nnx.split(abstract_model(mqa))[1]))
    want = {
        ("wte", "embedding"): P("tensor", "fsdp"),
        ("wpe", "embedding"): P(None, "fsdp"),
        ("lm_head",): P("fsdp", "tensor"),
        ("ln_f", "scale"): P(None),
        ("blocks", 1, "attn", "query", "kernel"): P("fsdp", "tensor", None),
        ("blocks", 1, "attn", "query", "bias"): P("tensor", None),
        # the shared K/V head of a multi-query model is whole on every tensor shard
        ("blocks", 1, "attn", "key", "kernel"): P("fsdp", None, None),
        ("blocks", 1, "attn", "value", "bias"): P(None, None),
        ("blocks", 1, "attn", "out", "kernel"): P("tensor", None, "fsdp"),
        ("blocks", 1, "mlp", "fc", "kernel"): P("fsdp", "tensor"),
        ("blocks", 1, "mlp", "fc", "bias"): P("tensor"),
        ("blocks", 1, "mlp", "proj", "kernel"): P("tensor", "fsdp"),
        ("blocks", 0, "mlp", "proj", "bias"): P(None),
    }
    for path, spec in want.items():
        assert specs[path] == spec, path
    mha = pm.param_specs(params_of(mqa.replace(multi_query=False)), sizes)
    assert mha[("blocks", 0, "attn", "key", "kernel")] == P("fsdp", "tensor", None)
    assert mha[("blocks", 0, "attn", "value", "bias")] == P("tensor", None)
    assert rules.RULES["shared_kv_head"] is None and rules.RULES["kv_heads"] == ("tensor",)


def test_int8_weights_split_like_their_float_weights_in_the_stored_layout():
    """An int8 weight's values q [*out, *in] split like the float weight's
    axes, its scales [*out] like its outputs; a mesh never sees the CPU's
    input-blocked layout (no "in_block" rule), even for a model laid out
    for the CPU before it is placed."""
    from starcoder_jax.config import preset
    from starcoder_jax.model.modules import init_model
    from starcoder_jax.ops.int8 import QuantizedWeight

    assert "in_block" not in rules.RULES
    one_b = preset("starcoderbase-1b", quantization="int8")
    specs = pm.param_specs(params_of(one_b), {"fsdp": 2, "tensor": 8})
    proj = specs[("blocks", 0, "mlp", "proj", "kernel")]  # [F, D] as q [D, F], scale [D]
    assert isinstance(proj, QuantizedWeight) and (proj.q, proj.scale) == (P("fsdp", "tensor"), P("fsdp"))
    query = specs[("blocks", 0, "attn", "query", "kernel")]  # [D, N, H] as q [N, H, D], scale [N, H]
    assert (query.q, query.scale) == (P("tensor", None, "fsdp"), P("tensor", None))
    table = specs[("wte", "embedding")]  # the table [V, D], stored as its transpose's q [V, D], scale [V]
    assert (table.q, table.scale) == (P("tensor", "fsdp"), P("tensor"))
    assert specs[("wpe", "embedding")] == P(None, "fsdp")

    config = StarCoderConfig(**{**TINY, "n_inner": 4096}, quantization="int8", matmul_impl="cpu")
    model = init_model(config)
    model.adapt_to_backend_()
    assert model.blocks[0].mlp.proj.kernel.get_value().blocks == 2  # the CPU layout, [2, D, 2048]
    mesh = pm.mesh_from_spec("fsdp=1", jax.devices()[:1])
    pm.shard_model(model, mesh)
    proj = model.blocks[0].mlp.proj.kernel.get_value()
    assert proj.blocks == 1 and proj.q.shape == (64, 4096)


def test_cache_and_batch_specs():
    sizes = {"data": 2, "fsdp": 2, "tensor": 2}
    mqa = StarCoderConfig(**TINY)
    assert rules.logical_spec(KVCache.logical_axes(mqa), sizes) == P(("data", "fsdp"), None, None, None)
    assert rules.logical_spec(KVCache.logical_axes(mqa.replace(multi_query=False)), sizes) == \
        P(("data", "fsdp"), None, "tensor", None)
    # activations: axes that do not divide a dimension are dropped, longest prefix kept
    assert rules.logical_spec(rules.ACTIVATION, sizes, (8, 5, 64)) == P(("data", "fsdp"), None, None)
    assert rules.logical_spec(rules.ACTIVATION, sizes, (2, 5, 64)) == P("data", None, None)
    assert rules.logical_spec(rules.ACTIVATION, sizes, (1, 5, 64)) == P(None, None, None)
    with pytest.raises(ValueError, match="unknown logical axis 'bogus'"):
        rules.logical_spec(("bogus",), sizes)


@pytest.mark.parametrize("config, sizes, messages", [
    (dict(n_embd=48, n_head=6), {"tensor": 4},
     ["n_head=6 is not divisible by the mesh's tensor=4", "divides 6: [1, 2, 3, 6]"]),
    (dict(n_embd=48, n_head=6, multi_query=False), {"tensor": 4},
     ["n_head=6 is not", "kv heads (= n_head, multi_query=False)=6 is not divisible by the mesh's tensor=4"]),
    (dict(vocab_size=49153), {"tensor": 2},
     ["vocab_size=49153 is not divisible by the mesh's tensor=2", "pad the vocabulary", "vocab_size=49154"]),
    (dict(n_inner=100), {"tensor": 8}, ["mlp width (n_inner)=100 is not divisible by the mesh's tensor=8"]),
    (dict(n_embd=48, n_head=4), {"fsdp": 32}, ["n_embd=48 is not divisible by the mesh's fsdp=32"]),
])
def test_bad_mesh_is_refused_with_its_reason(config, sizes, messages):
    cfg = StarCoderConfig(**{**TINY, **config})
    sizes = {"data": 1, "fsdp": 1, "tensor": 1, **sizes}
    with pytest.raises(rules.ShardingError) as err:
        pm.check_fits(params_of(cfg), sizes)
    for message in messages:
        assert message in str(err.value)
    spec = ",".join(f"{a}={s}" for a, s in sizes.items())
    with pytest.raises(rules.ShardingError):
        sj.shard_plan(cfg, spec, devices=math.prod(sizes.values()))


def test_multi_query_head_needs_no_split():
    """n_head=8 on tensor=8 works for MQA: the single K/V head is never split."""
    pm.check_fits(params_of(StarCoderConfig(**TINY)), {"data": 1, "fsdp": 1, "tensor": 8})


def test_constrain_is_a_no_op_without_a_mesh():
    model = init_model(StarCoderConfig(**{**TINY, "n_layer": 1}))
    ids = jnp.zeros((2, 4), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(4), (2, 4))

    def trace():
        return str(jax.make_jaxpr(lambda i: model.hidden(i, pos)[0])(ids))

    assert "sharding_constraint" not in trace()
    with jax.set_mesh(pm.mesh_from_spec("data=1")):
        assert "sharding_constraint" in trace()


# ---------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------

@pytest.mark.torch
def test_next_token_loss_matches_transformers(tiny_model_dir):
    import torch
    from transformers import GPTBigCodeForCausalLM

    ids = np.random.default_rng(0).integers(1, 512, (3, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ours = float(mean_next_token_loss(sj.load_pretrained(tiny_model_dir), jnp.asarray(ids), jnp.asarray(mask)))
    labels = torch.tensor(np.where(mask == 1, ids, -100), dtype=torch.long)
    hf = GPTBigCodeForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        ref = float(hf(torch.tensor(ids, dtype=torch.long), labels=labels).loss)
    assert ours == pytest.approx(ref, rel=1e-5)
    assert ours > 1.0  # a random model: far from zero, so padding mistakes would show


# ---------------------------------------------------------------------------
# shard-plan
# ---------------------------------------------------------------------------

def _abstract_param_bytes(config):
    leaves = jax.tree.leaves(nnx.split(abstract_model(config))[1])
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)


@pytest.mark.parametrize("dtype, itemsize", [("float32", 4), ("bfloat16", 2)])
def test_shard_plan_of_1b_on_one_device_is_the_model(dtype, itemsize):
    plan = sj.shard_plan("starcoderbase-1b", "data=1", devices=1, dtype=dtype, batch=1, seq=1000)
    config = preset("starcoderbase-1b", param_dtype=dtype, dtype=dtype)
    assert plan["param_count"] == config.param_count() == 1_137_207_296
    assert plan["per_device"]["params"] == _abstract_param_bytes(config) == 1_137_207_296 * itemsize
    # the kv_cache docstring: 2 * 24 layers * 128 * 2 bytes = 12 KiB per token in bfloat16
    assert plan["per_device"]["kv_cache"] == 1000 * 2 * 24 * 128 * itemsize
    assert plan["per_device"]["gradients"] == plan["per_device"]["optimizer"] == 0


def test_shard_plan_training_and_fsdp():
    one = sj.shard_plan("starcoderbase-1b", "data=1", devices=1, dtype="bfloat16",
                        optimizer="adamw", batch=8, seq=2048)["per_device"]
    assert one["gradients"] == one["params"]
    assert one["optimizer"] == one["params"] // 2 * 12  # mu, nu, f32 master per param
    assert one["kv_cache"] == 0
    eight = sj.shard_plan("starcoderbase-1b", "fsdp=8", devices=8, dtype="bfloat16",
                          optimizer="adamw", batch=8, seq=2048)["per_device"]
    # every weight matrix splits its width over fsdp; only [D] vectors are whole
    assert eight["params"] == pytest.approx(one["params"] / 8, rel=0.01)
    assert eight["activations"] == pytest.approx(one["activations"] / 8, rel=1e-6)


def test_shard_plan_on_a_real_tiny_model():
    config = StarCoderConfig(**TINY)
    model = init_model(config)
    plan = sj.shard_plan(config, "data=1", devices=1, batch=3, seq=40)
    real = sum(x.nbytes for x in jax.tree.leaves(nnx.split(model)[1]))
    assert plan["per_device"]["params"] == real
    assert plan["per_device"]["kv_cache"] == KVCache.init(config, 3, 40).nbytes()


def test_shard_plan_of_starcoder2_15b_lists_bytes_per_device(capsys):
    """starcoder2-15b at 16k positions: kv heads (4) split on tensor=4, whole on tensor=8
    (with the reason), and a KV cache of the 4096-slot window, not 16k slots."""
    parser = argparse.ArgumentParser()
    plan_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["shard-plan", "--model", "starcoder2-15b", "--mesh", "fsdp=2,tensor=4",
                              "--devices", "8", "--seq", "16384"])
    with redirect_stdout(io.StringIO()) as out:
        assert args.func(args) == 0
    text = out.getvalue()
    assert "model starcoder2-15b: 15,655,899,136 parameters" in text and "kv_cache" in text
    assert "n_kv_head=4 split over tensor=4" in text and "ring buffer of sliding_window=4096" in text
    split = sj.shard_plan("starcoder2-15b", "fsdp=2,tensor=4", devices=8, seq=16384, dtype="bfloat16")["per_device"]
    whole = sj.shard_plan("starcoder2-15b", "tensor=8", devices=8, seq=16384, dtype="bfloat16")
    assert "not divisible by tensor=8" in whole["notes"][0]
    # 40 layers x (k, v) x 4096 slots x (4 heads / 4) x 128 x bf16, + the ring's int32 positions
    assert split["kv_cache"] == 40 * 2 * 4096 * 128 * 2 + 40 * 4096 * 4
    assert whole["per_device"]["kv_cache"] == 40 * 2 * 4096 * 4 * 128 * 2 + 40 * 4096 * 4


def test_shard_plan_command_for_a_pod(capsys):
    parser = argparse.ArgumentParser()
    plan_cli.register(parser.add_subparsers(dest="command"))
    argv = ["shard-plan", "--model", "starcoderbase", "--mesh", "data=-1,fsdp=8,tensor=4",
            "--devices", "64", "--optimizer", "adamw", "--batch", "64", "--seq", "2048",
            "--device-memory", "80"]
    args = parser.parse_args(argv)
    out = io.StringIO()
    with redirect_stdout(out):
        status = args.func(args)
    text = out.getvalue()
    for word in ("mesh data=2,fsdp=8,tensor=4 over 64 devices", "params", "gradients",
                 "optimizer", "activations", "kv_cache", "total", "per device", "activations: "):
        assert word in text, word
    plan = sj.shard_plan("starcoderbase", "data=-1,fsdp=8,tensor=4", devices=64,
                         optimizer="adamw", batch=64, seq=2048, dtype="bfloat16",
                         device_memory_gb=80)
    assert status == (0 if plan["fits"] else 1)
    assert ("does NOT fit" in text) == (not plan["fits"])
    args = parser.parse_args(argv + ["--json"])
    out = io.StringIO()
    with redirect_stdout(out):
        args.func(args)
    assert json.loads(out.getvalue())["per_device"] == plan["per_device"]


# ---------------------------------------------------------------------------
# distributed.initialize: refusals before any network call
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(coordinator="localhost:1234"), "missing: num_processes, process_id"),
    (dict(coordinator="localhost", num_processes=2, process_id=0), "coordinator must be 'host:port'"),
    (dict(coordinator="localhost:1234", num_processes=2, process_id=2), r"process_id must be in \[0, 2\)"),
    (dict(coordinator="localhost:1234", num_processes=0, process_id=0), "num_processes must be >= 1"),
])
def test_initialize_refuses_incomplete_settings(kwargs, message, monkeypatch):
    for env in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(env, raising=False)
    with pytest.raises(ValueError, match=message):
        distributed.initialize(**kwargs)


def test_initialize_reads_environment(monkeypatch):
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "localhost:1234")
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match="STARCODER_JAX_NUM_PROCESSES .* must be an integer, got 'two'"):
        distributed.initialize()



def test_wait_for_coordinator_is_bounded():
    port = free_port()
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=f"no coordinator accepted connections at 127.0.0.1:{port}"):
        distributed.wait_for_coordinator("127.0.0.1", port, 1)
    assert time.monotonic() - start < 5
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        distributed.wait_for_coordinator("127.0.0.1", server.getsockname()[1], 1)


# ---------------------------------------------------------------------------
# 8 fake CPU devices (in a subprocess)
# ---------------------------------------------------------------------------

MESHES_MQA = ["data=8", "fsdp=8", "tensor=8", "data=2,fsdp=2,tensor=2"]
MESHES_MHA = ["tensor=8", "data=2,fsdp=2,tensor=2"]
# StarCoder2, 8 query heads over 2 kv heads: split on tensor=2, whole on tensor=4
MESHES_SC2 = ["fsdp=8", "data=2,fsdp=2,tensor=2", "data=2,tensor=4"]


@pytest.mark.multidevice
@pytest.mark.slow
def test_eight_fake_devices(tmp_path):
    """Runs every test_mesh8_* test in a process with 8 fake CPU devices."""
    if EIGHT:
        pytest.skip("this is the subprocess")
    from builders import make_hf_model, make_hf_starcoder2

    shape = dict(TINY, n_positions=128, weight_std=0.35, seed=3)
    env = dict(os.environ,
               # optimization level 0: a third less compile time; the references are
               # computed in the same process, with the same flags
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                          " --xla_backend_optimization_level=0"),
               JAX_PLATFORMS="cpu", STARCODER_JAX_EIGHT_DEVICES="1",
               STARCODER_JAX_TEST_MQA=make_hf_model(str(tmp_path / "mqa"), **shape),
               STARCODER_JAX_TEST_MHA=make_hf_model(str(tmp_path / "mha"), multi_query=False, **shape),
               # a window of 8: generation past it runs the ring-buffer cache on the mesh
               STARCODER_JAX_TEST_SC2=make_hf_starcoder2(
                   str(tmp_path / "sc2"), vocab_size=512, max_position_embeddings=128, hidden_size=64,
                   num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, intermediate_size=256,
                   sliding_window=8, weight_std=0.35, seed=3),
               # an MLP wider than one int8 CPU tile: its int8 output projection is input-blocked
               STARCODER_JAX_TEST_WIDE=make_hf_model(str(tmp_path / "wide"), **dict(shape, n_inner=4096,
                                                                                     weight_std=0.05)))
    root = REPO_ROOT
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "mesh8",
         os.path.abspath(__file__)],
        cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1], run.stdout[-2000:]


def _prompts(batch):
    rng = np.random.default_rng(5)
    return [rng.integers(1, 512, 3 + i).tolist() for i in range(batch)]


def _ids_mask(batch=8, length=16):
    ids = np.random.default_rng(1).integers(1, 512, (batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 10:] = 0
    mask[5, 4:] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


def assert_grads_close(got, want):
    """Per parameter: max|got - want| <= 5e-5 * max|want| + 1e-6 (see the module docstring)."""
    got_leaves = jax.tree_util.tree_leaves_with_path(got)
    want_leaves = jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for (path, g), w in zip(got_leaves, want_leaves):
        g, w = np.asarray(g), np.asarray(w)
        err, scale = float(np.abs(g - w).max()), float(np.abs(w).max())
        assert err <= 5e-5 * scale + 1e-6, \
            f"{jax.tree_util.keystr(path)}: max error {err:.3g}, max |grad| {scale:.3g}"


def _logits_loss_grads(params, ids, mask, *, graphdef, mesh=None):
    """Logits [B, T, V], next-token loss and its gradients, in one program (one compile).

    On a mesh the gradients are pinned to the params' shardings (out_shardings),
    and the loss runs the LM head in pieces of 4 tokens (training.losses), against
    whole logits on one device.
    """
    def loss(p):
        model = nnx.merge(graphdef, p)
        return params_loss(p, graphdef, ids, mask, chunk=None if mesh is None else 4), model(ids)

    def step(params, ids, mask):
        (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return logits, value, grads

    out = None
    if mesh is not None:
        out = (jax.NamedSharding(mesh, rules.logical_spec(("batch", None, None), mesh)),
               jax.NamedSharding(mesh, P()), pm.state_shardings(params, mesh))
    return jax.jit(step, out_shardings=out)(params, ids, mask)



@pytest.fixture(scope="module")
def references():
    """Single-device results (device 0, no mesh) per model."""
    assert jax.device_count() == 8
    out = {}
    for kind in ("MQA", "MHA", "SC2"):
        path = os.environ[f"STARCODER_JAX_TEST_{kind}"]
        model = sj.load_pretrained(path)
        ids, mask = _ids_mask()
        graphdef, params = nnx.split(model)
        logits, loss, grads = _logits_loss_grads(params, ids, mask, graphdef=graphdef)
        gens = [g.ids for g in generate(model, _prompts(8), max_new_tokens=8, ignore_eos=True)]
        assert len({t for g in gens for t in g}) > 8  # varied outputs: a meaningful comparison
        out[kind] = dict(path=path, logits=np.asarray(logits), loss=float(loss),
                         grads=jax.tree.map(np.asarray, grads), gens=gens)
    return out


@mesh8
@pytest.mark.parametrize("kind, spec", [("MQA", m) for m in MESHES_MQA] + [("MHA", m) for m in MESHES_MHA]
                         + [("SC2", m) for m in MESHES_SC2])
def test_mesh8_equals_one_device(references, kind, spec):
    ref = references[kind]
    mesh = pm.mesh_from_spec(spec)
    model = sj.load_pretrained(ref["path"], mesh=mesh)
    shardings = pm.param_shardings(nnx.state(model), mesh)
    graphdef, params = nnx.split(model)
    for path, var in nnx.to_flat_state(params):
        assert var.get_value().sharding == shardings[path], path
    ids, mask = _ids_mask()
    with jax.set_mesh(mesh):
        ids = pm.place_batch(ids, mesh)
        mask = pm.place_batch(mask, mesh)
        logits, loss, grads = _logits_loss_grads(params, ids, mask, graphdef=graphdef, mesh=mesh)
    for path, var in nnx.to_flat_state(grads):  # gradients split like their params
        assert var.get_value().sharding == shardings[path], path
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-4, rtol=0)
    assert float(loss) == pytest.approx(ref["loss"], rel=1e-5)
    assert_grads_close(grads, ref["grads"])
    gens = [g.ids for g in generate(model, _prompts(8), max_new_tokens=8, ignore_eos=True, mesh=mesh)]
    assert gens == ref["gens"]


@mesh8
@pytest.mark.parametrize("kind", ["MQA", "MHA"])
def test_mesh8_arrays_are_sharded_as_the_rules_say(references, kind):
    mesh = pm.mesh_from_spec("data=2,fsdp=2,tensor=2")
    model = sj.load_pretrained(references[kind]["path"], mesh=mesh)
    kv = P("fsdp", "tensor", None) if kind == "MHA" else P("fsdp", None, None)
    assert model.wte.embedding.get_value().sharding.spec == P("tensor", "fsdp")
    assert model.blocks[0].attn.query.kernel.get_value().sharding.spec == P("fsdp", "tensor", None)
    assert model.blocks[0].attn.key.kernel.get_value().sharding.spec == kv
    assert model.blocks[1].mlp.fc.kernel.get_value().sharding.spec == P("fsdp", "tensor")
    assert model.blocks[0].attn.query.kernel.get_value().addressable_shards[0].data.shape == (32, 4, 8)

    # activations: the hidden states of a jitted forward come out with rows over data x fsdp
    ids = jnp.zeros((8, 16), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(16), (8, 16))
    with jax.set_mesh(mesh):
        hidden = jax.jit(lambda m, i: m.hidden(i, pos)[0])(model, ids)
    assert hidden.sharding.is_equivalent_to(jax.NamedSharding(mesh, P(("data", "fsdp"))), 3)
    assert hidden.addressable_shards[0].data.shape == (2, 16, 64)

    # the cache the generator carries between prefill and decode
    gen = Generator(model, mesh=mesh)
    seen = []
    call = gen._runner.call
    gen._runner.call = lambda *a, **k: seen.append(call(*a, **k)) or seen[-1]
    gen.run(_prompts(3), max_new_tokens=4, ignore_eos=True)
    cache_spec = P(("data", "fsdp"), None, "tensor" if kind == "MHA" else None, None)
    for state in seen:
        k = state.cache.layers[0].k
        assert k.shape[0] == 4  # 3 prompts padded to the 4 row shards
        assert k.sharding.spec == cache_spec
        assert state.done.sharding.is_fully_replicated
    assert cache_sharding(model.config, mesh).spec == cache_spec


@pytest.fixture(scope="module")
def int8_references():
    """Single-device (no mesh) logits and greedy tokens of the int8-quantized models, in the
    fused product form a mesh runs ("xla"; the CPU forms round activations to bfloat16)."""
    out = {}
    for kind in ("MQA", "MHA", "WIDE"):
        path = os.environ[f"STARCODER_JAX_TEST_{kind}"]
        model = sj.load_pretrained(path, quantize="int8", matmul_impl="xla")
        ids, _ = _ids_mask()
        gens = [g.ids for g in generate(model, _prompts(8), max_new_tokens=8, ignore_eos=True)]
        gens_kv = [g.ids for g in generate(model, _prompts(8), max_new_tokens=8, ignore_eos=True,
                                           kv_cache="int8")]
        out[kind] = dict(path=path, logits=np.asarray(jax.jit(lambda m, i: m(i))(model, ids)), gens=gens,
                         gens_kv=gens_kv)
    return out


@mesh8
@pytest.mark.parametrize("kind, spec", [("MQA", "data=2,fsdp=2,tensor=2"), ("MQA", "tensor=8"),
                                        ("MHA", "data=2,fsdp=2,tensor=2"), ("WIDE", "data=2,fsdp=2,tensor=2"),
                                        ("WIDE", "tensor=8")])
def test_mesh8_int8_equals_one_device(int8_references, kind, spec):
    """int8 weights and scales split by the rules; results equal the one-device int8 model's.

    Both compute with the fused product form (float32 activations times int8
    weights, then the scales), the mesh with its sums split across devices: they
    agree to float32 round-off but for a few positions, bounded by 1e-2 of the
    logit range.
    """
    ref = int8_references[kind]
    mesh = pm.mesh_from_spec(spec)
    model = sj.load_pretrained(ref["path"], mesh=mesh, quantize="int8")
    assert model.config.quantization == "int8"
    shardings = pm.param_shardings(nnx.state(model), mesh)
    for path, var in nnx.to_flat_state(nnx.split(model)[1]):
        value, sharding = var.get_value(), shardings[path]
        assert [a.sharding for a in jax.tree.leaves(value)] == jax.tree.leaves(sharding), path
    if spec == "data=2,fsdp=2,tensor=2":
        query = model.blocks[0].attn.query.kernel.get_value()
        assert query.q.sharding.spec == P("tensor", None, "fsdp")
        assert query.scale.sharding.spec == P("tensor", None)
        table = model.wte.embedding.get_value()
        assert table.q.sharding.spec == P("tensor", "fsdp") and table.scale.sharding.spec == P("tensor")
    if kind == "WIDE":  # q [D, 4096] in the stored layout: the 4096 inputs split over tensor
        proj = model.blocks[0].mlp.proj.kernel.get_value()
        assert proj.blocks == 1 and proj.q.shape == (64, 4096)
        assert proj.q.sharding.spec == P("fsdp", "tensor")
        if spec == "tensor=8":
            assert proj.q.addressable_shards[0].data.shape == (64, 512)
    ids, _ = _ids_mask()
    with jax.set_mesh(mesh):
        ids = pm.place_batch(ids, mesh)
        logits = jax.jit(lambda m, i: m(i))(model, ids)
    err = np.abs(np.asarray(logits) - ref["logits"])
    spread = float(ref["logits"].max() - ref["logits"].min())
    assert err.max() <= 1e-2 * spread and (err > 1e-4).mean() <= 0.02, (err.max(), (err > 1e-4).mean())
    gens = [g.ids for g in generate(model, _prompts(8), max_new_tokens=8, ignore_eos=True, mesh=mesh)]
    assert gens == ref["gens"]
    # an int8 KV cache on the mesh: scales split like the slabs' rows (and heads)
    gens_kv = [g.ids for g in generate(model, _prompts(8), max_new_tokens=8, ignore_eos=True, mesh=mesh,
                                       kv_cache="int8")]
    assert gens_kv == ref["gens_kv"]


@mesh8
def test_mesh8_bad_mesh_is_refused(tmp_path):
    config = StarCoderConfig(**{**TINY, "n_embd": 48, "n_head": 6})
    mesh = pm.mesh_from_spec("data=2,tensor=4")
    with pytest.raises(rules.ShardingError, match="n_head=6 is not divisible by the mesh's tensor=4"):
        pm.param_shardings(params_of(config), mesh)
    with pytest.raises(rules.ShardingError, match="n_head=6"):
        pm.shard_model(init_model(config), mesh)
    with pytest.raises(rules.ShardingError, match="n_head=6"):
        Generator(init_model(config), mesh=mesh)
    sj.save_hf(init_model(config), str(tmp_path))
    with pytest.raises(rules.ShardingError, match="n_head=6"):
        sj.load_pretrained(str(tmp_path), mesh=mesh)


@mesh8
@pytest.mark.parametrize("spec", ["fsdp=8", "data=2,fsdp=2,tensor=2", "tensor=8"])
@pytest.mark.parametrize("multi_query", [True, False, "starcoder2"])
def test_mesh8_shard_plan_matches_real_shards(spec, multi_query):
    config = StarCoderConfig(**TINY, multi_query=multi_query is True)
    if multi_query == "starcoder2":  # 2 kv heads (whole on tensor=8), a ring of 16 slots
        config = config.replace(model_type="starcoder2", n_kv_head=2, sliding_window=16)
    mesh = pm.mesh_from_spec(spec)
    model = pm.shard_model(init_model(config), mesh)
    per_device = {d: 0 for d in jax.devices()}
    for x in jax.tree.leaves(nnx.split(model)[1]):
        for shard in x.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    cache = KVCache.init(config, 8, 64, sharding=cache_sharding(config, mesh))
    cache_bytes = {d: 0 for d in jax.devices()}
    for x in jax.tree.leaves(cache):
        for shard in x.addressable_shards:
            cache_bytes[shard.device] += shard.data.nbytes
    plan = sj.shard_plan(config, spec, batch=8, seq=64)["per_device"]
    assert plan["params"] == max(per_device.values())
    assert plan["kv_cache"] == max(cache_bytes.values())


@mesh8
def test_mesh8_batch_placement():
    mesh = pm.mesh_from_spec("data=2,fsdp=2,tensor=2")
    ids = np.arange(8 * 5).reshape(8, 5)
    batch = pm.place_batch(ids, mesh)
    assert batch.sharding.spec == P(("data", "fsdp"), None)
    assert {shard.data.shape for shard in batch.addressable_shards} == {(2, 5)}
    np.testing.assert_array_equal(np.asarray(batch), ids)
    micro = pm.place_batch(ids.reshape(2, 4, 5), mesh, batch_dim=1)  # [A, b, T]: rows of each micro-batch
    assert micro.sharding.spec == P(None, ("data", "fsdp"), None)
    with pytest.raises(ValueError, match="a batch of 6 rows is not divisible by the 4 row shards"):
        pm.place_batch(ids[:6], mesh)


@mesh8
def test_mesh8_lora_finetune_equals_one_device(tmp_path):
    """LoRA fine-tuning on a (2,2,2) mesh gives the single-device losses; each adapter
    is split like its kernel, with the rank whole."""
    import json

    from builders import CORPUS, make_tokenizer

    from starcoder_jax.training import train

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"f{i}.py").write_text("\n".join(CORPUS[j % len(CORPUS)] for j in range(i, i + 4)))
    raw = {"model": {"config": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}},
           "tokenizer": make_tokenizer(str(tmp_path / "tok")),
           "data": {"paths": [str(corpus)], "seq_len": 32, "eval_fraction": 0.0},
           "optim": {"learning_rate": 1e-2, "warmup_steps": 1},
           "train": {"steps": 4, "batch_size": 8, "save_every": 4, "log_every": 1, "eval_every": 100,
                     "async_checkpoints": False},
           "lora": {"rank": 4, "alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc"]}}

    def run(out, mesh=None):
        raw["train"].update(output_dir=str(out), mesh=mesh)
        result = train.run(train.parse_config(raw), progress=False)
        return result["model"], [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")]

    with jax.default_device(jax.devices()[0]):
        _, reference = run(tmp_path / "one")
    model, got = run(tmp_path / "mesh", "data=2,fsdp=2,tensor=2")
    np.testing.assert_allclose(got, reference, rtol=1e-5)
    query = model.blocks[0].attn.query.lora
    assert query.a[...].sharding.spec == P("fsdp", None)
    assert query.b[...].sharding.spec == P(None, "tensor", None)
    assert model.blocks[0].mlp.proj.lora.a[...].sharding.spec == P("tensor", None)


@mesh8
def test_mesh8_train_step_and_restore_onto_a_mesh(tmp_path):
    """Fine-tuning on a (2,2,2) mesh gives the single-device losses, and a checkpoint
    written on one device restores onto the mesh and continues with the same losses."""
    import json

    import yaml
    from builders import CORPUS, make_tokenizer

    from starcoder_jax.training import train

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"f{i}.py").write_text("\n".join(CORPUS[j % len(CORPUS)] for j in range(i, i + 4)))
    tokenizer = make_tokenizer(str(tmp_path / "tok"))

    def config(out, steps, mesh=None):
        raw = {"model": {"config": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}},
               "tokenizer": tokenizer,
               "data": {"paths": [str(corpus)], "seq_len": 32, "eval_fraction": 0.0},
               "optim": {"learning_rate": 3e-3, "warmup_steps": 2},
               "train": {"steps": 6, "batch_size": 8, "save_every": 3, "log_every": 1, "eval_every": 100,
                         "output_dir": str(out), "async_checkpoints": False, "mesh": mesh}}
        return train.parse_config(yaml.safe_load(yaml.safe_dump(raw)))

    def losses(out):
        return [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")]

    with jax.default_device(jax.devices()[0]):
        train.run(config(tmp_path / "one", 6), progress=False)
    reference = losses(tmp_path / "one")
    result = train.run(config(tmp_path / "mesh", 6, "data=2,fsdp=2,tensor=2"), progress=False)
    np.testing.assert_allclose(losses(tmp_path / "mesh"), reference, rtol=1e-5)
    kernel = result["model"].blocks[0].mlp.fc.kernel[...]
    assert len(kernel.sharding.device_set) == 8 and kernel.sharding.spec != P()

    # 3 steps on one device, then resume the same run directory on the mesh.
    with jax.default_device(jax.devices()[0]):
        train.run(config(tmp_path / "moved", 6), progress=False, stop_after=3)
    train.run(config(tmp_path / "moved", 6, "data=2,fsdp=2,tensor=2"), progress=False)
    np.testing.assert_allclose(losses(tmp_path / "moved"), reference, rtol=1e-5)


@mesh8
@pytest.mark.parametrize("lora", [False, True])
def test_mesh8_a_run_places_what_the_memory_report_compiled(tmp_path, lora):
    """fsdp x tensor: the arrays a run places (params, frozen rest, optimizer state, the batch)
    and the ones its step returns carry exactly the shardings of the program that
    training.memory (the memory report, the compiled plans) lowers for the same run."""
    from builders import CORPUS, make_tokenizer

    from starcoder_jax.training import train
    from starcoder_jax.training.memory import lower_train_step
    from starcoder_jax.training.state import lora_config, prepare

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"f{i}.py").write_text("\n".join(CORPUS[j % len(CORPUS)] for j in range(i, i + 4)))
    raw = {"model": {"config": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}, "remat": "full"},
           "tokenizer": make_tokenizer(str(tmp_path / "tok")),
           "data": {"paths": [str(corpus)], "seq_len": 32, "eval_fraction": 0.0},
           "train": {"steps": 4, "batch_size": 8, "grad_accum": 2, "output_dir": str(tmp_path / "run"),
                     "mesh": "fsdp=4,tensor=2", "async_checkpoints": False}}
    if lora:
        raw["lora"] = {"rank": 4, "alpha": 8, "target_modules": ["c_attn", "c_fc"]}
    cfg = train.parse_config(raw)
    setup = prepare(cfg, progress=False)
    state, loop = setup.state, cfg.train
    lowered = lower_train_step(state.model().config, batch=loop.batch_size, seq_len=cfg.data.seq_len,
                               remat="full", loss_chunk=loop.loss_chunk, grad_accum=loop.grad_accum,
                               mesh=setup.placement.mesh, optim=cfg.optim, steps=loop.steps, seed=loop.seed,
                               lora=lora_config(cfg) if lora else None)
    compiled = lowered.lowered.compile()
    shape = (loop.grad_accum, loop.batch_size // loop.grad_accum, cfg.data.seq_len + 1)
    ids, mask = setup.placement.source_batch(setup.train_data, 0, shape)
    args = (state.params, state.opt_state, state.rest, ids, mask)

    def same(arrays, shardings):
        arrays, shardings = jax.tree.leaves(arrays), jax.tree.leaves(shardings)
        assert len(arrays) == len(shardings) > 0
        for a, s in zip(arrays, shardings):
            assert a.sharding.is_equivalent_to(s, a.ndim), (a.shape, a.sharding, s)

    same(args, compiled.input_shardings[0][:5])
    with setup.placement.context():
        out = setup.train_step(*args, jnp.int32(0))
    same(out[:2], compiled.output_shardings[:2])
    kernel = (state.params if not lora else state.rest)["blocks"][0]["mlp"]["fc"]["kernel"]
    assert kernel.get_value().sharding.spec != P()  # split: the check compares real splits

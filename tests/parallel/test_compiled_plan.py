"""shard-plan --compile: the library's steps compiled for meshes of fake CPU devices.

Tests named `test_plan8_*` need 8 devices: `test_compiled_plans_on_eight_fake_devices`
runs them in a subprocess (this file, `-k plan8`); the main process skips them.

Analytic volumes, per device and step, that the collectives read from the
partitioned HLO must match within 10% (float32 params and compute, batch b
rows of T tokens, L layers, width D, G bytes of gradients = the trained
params' bytes):
- data=8: the gradients are all-reduced over data once: G bytes (an untied
  head; a tied table's two uses are reduced apart by XLA:CPU, which adds
  its bytes once more);
- fsdp=8: every fsdp-split param (those with the width D) is gathered for
  the forward; with full remat each block's are gathered again for the
  backward's rerun (the token tables and the head keep their gathered
  copies), without remat XLA keeps every gathered param for the backward;
  the gradients of split params are reduce-scattered (their bytes), the
  rest (LayerNorms, biases) all-reduced;
- tensor=8 (no remat): heads, MLP and vocabulary split (Megatron's layout):
  each block all-reduces its residual-stream activations [b, T, D] twice in
  the forward (after the attention and MLP output projections) and twice in
  the backward (the input gradients of c_attn and c_fc); the token lookup
  in the vocabulary-split table and the input gradient of the split LM head
  add one each: (4L + 2) b T D 4 bytes.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from builders import REPO_ROOT

from starcoder_jax.compiled import compiled_plan, compiled_plans
from starcoder_jax.config import StarCoderConfig, preset
from starcoder_jax.parallel import hlo
from starcoder_jax.parallel.chips import compiler_installed
from starcoder_jax.parallel.targets import TARGETS, estimate, link_of

EIGHT = os.environ.get("STARCODER_JAX_PLAN_EIGHT") == "1"
CHIP_EXTRAS = compiler_installed("tpu") and compiler_installed("gpu")
TINY = dict(vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=8, n_inner=256)
GIB = 2**30


def plan8(test):
    skip = pytest.mark.skipif(not EIGHT, reason="runs inside test_compiled_plans_on_eight_fake_devices' subprocess")
    return pytest.mark.multidevice(skip(test))


# ---------------------------------------------------------------------------
# HLO text: replica groups in every spelling, trip counts, reduce-scatter as formed on GPU/TPU
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, groups", [
    ("replica_groups={{0,2},{1,3}}", [[0, 2], [1, 3]]),
    ("replica_groups=[2,2]<=[4]", [[0, 1], [2, 3]]),
    ("replica_groups=[2,2]<=[2,2]T(1,0)", [[0, 2], [1, 3]]),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0'}", [[0, 2], [1, 3]]),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=2], device_ids=([2,2]T(1,0)) {'axis_1'}", [[0, 2], [1, 3]]),
    ("source_target_pairs={{0,1},{1,0}}", [[0, 1], [1, 0]]),
])
def test_replica_group_spellings(text, groups):
    assert hlo.replica_groups(text, 4) == groups


def test_groups_name_the_mesh_axes_they_span():
    mesh = {"data": 2, "fsdp": 2, "tensor": 2}  # partition id = 4 data + 2 fsdp + tensor
    assert hlo.group_axes([[0, 1], [2, 3]], mesh) == ("tensor",)
    assert hlo.group_axes([[0, 2], [1, 3]], mesh) == ("fsdp",)
    assert hlo.group_axes([[0, 2, 4, 6]], mesh) == ("data", "fsdp")


LOOP_HLO = """HloModule m, entry_computation_layout={()->f32[8]{0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ar = f32[8]{0} all-reduce(%x), channel_id=1, replica_groups={{0,1}}, use_global_device_ids=true, to_apply=%add
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %ar)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main () -> f32[8] {
  %z = f32[8]{0} constant({...})
  %i = s32[] constant(0)
  %t = (s32[], f32[8]{0}) tuple(%i, %z)
  %w = (s32[], f32[8]{0}) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %g = f32[16]{0} all-gather(%z), channel_id=2, replica_groups={{0,1}}, dimensions={0}, use_global_device_ids=true
  %r = f32[16]{0} all-reduce(%g), channel_id=3, replica_groups={{0,1}}, use_global_device_ids=true, to_apply=%add
  %pid = u32[] partition-id()
  %off = u32[] multiply(%pid, %pid)
  ROOT %ds = f32[8]{0} dynamic-slice(%r, %off), dynamic_slice_sizes={8}
}
"""


def test_collectives_count_loop_trips_and_sliced_all_reduces_as_reduce_scatters():
    found = {c.kind: c for c in hlo.collectives(LOOP_HLO, {"data": 1, "fsdp": 2, "tensor": 1})}
    assert found["all-reduce"].count == 5 and found["all-reduce"].bytes == 5 * 32
    assert found["all-reduce"].mesh_axes == ("fsdp",)
    assert found["all-gather"].count == 1 and found["all-gather"].bytes == 64
    assert found["reduce-scatter"].count == 1 and found["reduce-scatter"].bytes == 64  # the unscattered input


# ---------------------------------------------------------------------------
# Targets and the roofline
# ---------------------------------------------------------------------------

def test_targets_cover_the_accelerators_people_rent():
    for name in ("h100-sxm", "h200", "a100-80gb", "a100-40gb", "tpu-v4", "tpu-v5e", "tpu-v5p"):
        t = TARGETS[name]
        assert t.bf16_flops > 1e14 and t.hbm_bytes > 1e10 and t.hbm_bandwidth > 5e11 and t.source


def test_roofline_estimate_and_links():
    h100 = TARGETS["h100-sxm"]
    mesh = {"data": 2, "fsdp": 8, "tensor": 1}  # 16 GPUs: fsdp inside a node, data across two
    assert link_of(("fsdp",), mesh, h100)[0] == "NVLink 4"
    assert link_of(("data",), mesh, h100)[0] == "InfiniBand NDR"
    colls = [{"kind": "all-reduce", "bytes": 8e9, "mesh_axes": ["data"], "group_size": 2},
             {"kind": "all-gather", "bytes": 4.5e9, "mesh_axes": ["fsdp"], "group_size": 8}]
    e = estimate(flops=989e12, bytes_accessed=3.35e12 / 2, collectives=colls, mesh=mesh, t=h100, peak_bytes=90 * 2**30)
    comm = 8e9 * 2 * (1 / 2) / 50e9 + 4.5e9 * (7 / 8) / 450e9
    assert e["compute_s"] == pytest.approx(1.0) and e["hbm_s"] == pytest.approx(0.5)
    assert e["comm_s"] == pytest.approx(comm)
    assert e["estimated_step_s"] == pytest.approx(max(1.0, comm))
    assert e["no_overlap_step_s"] == pytest.approx(1.0 + comm)
    assert e["fits"] is False


# ---------------------------------------------------------------------------
# One device: every step compiles; the layer extension matches a whole compile
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("step", [pytest.param("train", marks=pytest.mark.slow), "prefill", "decode"])
def test_extending_two_layers_matches_compiling_four(step):
    config = StarCoderConfig(**dict(TINY, n_layer=4))
    kw = dict(step=step, batch=4, seq_len=64, dtype="float32")
    whole = compiled_plan(config, None, **kw)
    scaled = compiled_plan(config, None, layers=2, **kw)
    assert scaled.compiled_layers == [2, 3] and whole.compiled_layers == [4]
    assert scaled.argument_bytes == whole.argument_bytes
    assert scaled.flops == pytest.approx(whole.flops, rel=1e-6)
    assert scaled.temp_bytes == pytest.approx(whole.temp_bytes, rel=0.05)
    assert scaled.params_bytes == whole.params_bytes
    if step == "train":  # float32 AdamW: two moments per trained param, and gradients like them
        assert whole.gradients_bytes == whole.params_bytes
        assert whole.optimizer_bytes == pytest.approx(2 * whole.gradients_bytes, abs=64)  # + step counts
        assert scaled.optimizer_bytes == pytest.approx(whole.optimizer_bytes, abs=64)
    else:
        assert whole.kv_cache_bytes == 4 * 2 * 4 * (64 + (step == "decode")) * config.head_dim * 4


@pytest.mark.parametrize("crossing, compiled", [(1, [[2, 3]]), (4, [[2, 3], [4, 5]]), (7, [[2, 3], [4, 5], [24]])])
def test_depth_search_goes_deeper_in_the_flat_phase_then_compiles_whole(monkeypatch, crossing, compiled):
    """A training peak flat in depth up to `crossing` layers, then 1 MiB a layer: the pair
    (N, N + 1) is extended once one more layer adds at least the floor (0.9 of a layer's
    gradients and kept input), N doubles before that, and a pair that would cost over half
    the whole model's compile gives way to the whole model (24 layers)."""
    import starcoder_jax.compiled as compiled_module

    mib, seen = 2**20, []

    class Fake:
        def __init__(self, layers):
            self.temp = 100 * mib + max(0, layers - crossing) * mib

    def compile_step(config, mesh, **kw):
        seen.append(config.n_layer)
        return Fake(config.n_layer), {"params_bytes": 0, "gradients_bytes": 0, "optimizer_bytes": 0,
                                      "kv_cache_bytes": 0}

    def figures(fake, shape):
        return {"argument_bytes": 0, "output_bytes": 0, "alias_bytes": 0, "temp_bytes": fake.temp,
                "flops": 0.0, "bytes_accessed": 0.0, "collectives": [], "attention_forms": [],
                "kernels": {"launches": 0, "fusions": 0, "fusion_kinds": {}, "custom_calls": {}}}

    monkeypatch.setattr(compiled_module, "compile_step", compile_step)
    monkeypatch.setattr(compiled_module, "_figures", figures)
    monkeypatch.setattr(compiled_module, "_layer_floor", lambda *a, **k: mib)
    monkeypatch.setattr(compiled_module, "_analytic", lambda *a, **k: {
        "params_bytes": 0, "gradients_bytes": 0, "optimizer_bytes": 0, "kv_cache_bytes": 0})
    monkeypatch.setattr(compiled_module, "fingerprint", lambda c: "x")
    monkeypatch.setattr(compiled_module, "output_specs", lambda c: [])
    plan = compiled_plan(StarCoderConfig(**dict(TINY, n_layer=24)), None, step="train", layers=2)
    assert [d for d in seen] == [d for pair in compiled for d in pair]
    assert plan.compiled_layers == compiled[-1]
    assert plan.temp_bytes == 100 * mib + (24 - crossing) * mib


@pytest.mark.slow
def test_lora_on_an_int8_base_trains_only_the_adapters():
    config = StarCoderConfig(**TINY)
    full = compiled_plan(config, None, batch=2, seq_len=64, dtype="float32")
    lora = compiled_plan(config, None, batch=2, seq_len=64, dtype="float32", lora_rank=4, quantize="int8")
    assert lora.lora_rank == 4 and lora.quantize == "int8"
    assert lora.gradients_bytes < full.gradients_bytes / 10
    assert lora.params_bytes < full.params_bytes / 2  # int8 kernels and table
    assert lora.peak_bytes < full.peak_bytes
    with pytest.raises(ValueError, match="LoRA rank"):
        compiled_plan(config, None, quantize="int8")
    with pytest.raises(ValueError, match="layers must be >= 2"):
        compiled_plan(config, None, layers=1)


def test_shard_plan_compile_command_writes_json(tmp_path, capsys):
    from starcoder_jax.cli.main import main

    config = StarCoderConfig(**TINY)
    model_dir = tmp_path / "tiny"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(config.to_hf()))
    out = tmp_path / "plan.json"
    status = main(["shard-plan", "--compile", "--preset", str(model_dir), "--mesh", "data=1", "--step", "prefill",
                   "--seq-len", "32", "--batch", "2", "--target", "h100-sxm", "--compiler", "cpu",
                   "--json", str(out)])
    text = capsys.readouterr().out
    assert status == 0
    assert "ESTIMATE" in text and "data=1,fsdp=1,tensor=1" in text
    plans = json.loads(out.read_text())
    keys = {"mesh", "devices", "argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "peak_bytes",
            "flops", "collectives", "estimated_step_s"}
    assert keys <= set(plans[0]) and plans[0]["collectives"] == [] and plans[0]["flops"] > 0


# ---------------------------------------------------------------------------
# 8 fake devices (in a subprocess)
# ---------------------------------------------------------------------------

@pytest.mark.multidevice
@pytest.mark.slow
def test_compiled_plans_on_eight_fake_devices():
    """Runs every test_plan8_* test in a process with 8 fake CPU devices."""
    if EIGHT:
        pytest.skip("this is the subprocess")
    env = dict(os.environ, JAX_PLATFORMS="cpu", STARCODER_JAX_PLAN_EIGHT="1",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "plan8",
                          os.path.abspath(__file__)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=1200)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    # every plan8 test runs, the chip comparison too where the chip extras are installed
    last = run.stdout.splitlines()[-1]
    assert " passed" in last and ("skipped" not in last or (not CHIP_EXTRAS and "1 skipped" in last)), \
        run.stdout[-2000:]


SHAPES = {
    "tiny": StarCoderConfig(**dict(TINY, tie_word_embeddings=False)),
    "1b-2-layers": preset("starcoderbase-1b", n_layer=2, n_positions=256, tie_word_embeddings=False),
}


def _by_kind(plan, kind, axes):
    return sum(c["bytes"] for c in plan.collectives if c["kind"] == kind and tuple(c["mesh_axes"]) == axes)


def _split_bytes(config):
    """Bytes of the params the fsdp rules split (those with the width D), of the rest, and of
    the blocks' split ones."""
    from flax import nnx

    from starcoder_jax.model.modules import abstract_model
    from starcoder_jax.parallel.mesh import param_axes

    split = rest = blocks = 0
    for path, var in nnx.to_flat_state(nnx.state(abstract_model(config), nnx.Param)):
        nbytes = int(np.prod(var.get_value().shape)) * 4
        if "embed" not in param_axes(path, var):
            rest += nbytes
            continue
        split += nbytes
        blocks += nbytes if path[0] == "blocks" else 0
    return split, rest, blocks


@plan8
@pytest.mark.parametrize("shape", list(SHAPES))
def test_plan8_data_parallel_all_reduces_the_gradients(shape):
    config = SHAPES[shape]
    plan = compiled_plan(config, "data=8", batch=8, seq_len=64, dtype="float32", remat="none")
    grads = plan.gradients_bytes
    assert grads == plan.params_bytes
    assert _by_kind(plan, "all-reduce", ("data",)) == pytest.approx(grads, rel=0.10)
    assert {c["kind"] for c in plan.collectives} == {"all-reduce"}
    if shape == "tiny":  # a tied table: its two uses are reduced apart
        tied = compiled_plan(config.replace(tie_word_embeddings=True), "data=8", batch=8, seq_len=64,
                             dtype="float32", remat="none")
        table = config.vocab_size * config.n_embd * 4
        assert _by_kind(tied, "all-reduce", ("data",)) == pytest.approx(tied.gradients_bytes + table, rel=0.10)


@plan8
@pytest.mark.parametrize("shape", list(SHAPES))
def test_plan8_fsdp_gathers_params_and_reduce_scatters_gradients(shape):
    config = SHAPES[shape]
    split, rest, blocks = _split_bytes(config)
    plan = compiled_plan(config, "fsdp=8", batch=8, seq_len=64, dtype="float32", remat="full")
    # forward: every split param; backward: the blocks' again for their rerun (the tables and
    # the head keep their gathered copies from the forward)
    assert _by_kind(plan, "all-gather", ("fsdp",)) == pytest.approx(split + blocks, rel=0.10)
    assert _by_kind(plan, "reduce-scatter", ("fsdp",)) == pytest.approx(split, rel=0.10)
    assert _by_kind(plan, "all-reduce", ("fsdp",)) == pytest.approx(rest, rel=0.10, abs=4096)
    # without remat XLA keeps each gathered param from the forward for the backward: one gather
    kept = compiled_plan(config, "fsdp=8", batch=8, seq_len=64, dtype="float32", remat="none")
    assert _by_kind(kept, "all-gather", ("fsdp",)) == pytest.approx(split, rel=0.10)
    # memory: the arguments (params, AdamW state, batch) are an eighth of one device's
    one = compiled_plan(config, None, batch=8, seq_len=64, dtype="float32", remat="full")
    assert plan.argument_bytes == pytest.approx(one.argument_bytes / 8, rel=0.15)


@plan8
@pytest.mark.parametrize("shape", list(SHAPES))
def test_plan8_tensor_parallel_all_reduces_the_residual_stream(shape):
    config = SHAPES[shape]
    b, t = 8, 64
    plan = compiled_plan(config, "tensor=8", batch=b, seq_len=t, dtype="float32", remat="none")
    residual = b * t * config.n_embd * 4
    want = (4 * config.n_layer + 2) * residual
    assert _by_kind(plan, "all-reduce", ("tensor",)) == pytest.approx(want, rel=0.10)


@plan8
def test_plan8_a_mesh_that_cannot_shard_the_model_is_refused():
    from starcoder_jax.parallel.rules import ShardingError

    with pytest.raises(ShardingError, match="n_head=6 is not divisible"):
        compiled_plan(StarCoderConfig(**dict(TINY, n_head=6, n_embd=48)), "tensor=8", batch=8, seq_len=32)


@plan8
def test_plan8_the_report_compiles_the_program_a_run_executes(tmp_path):
    """prepare() builds a run's step; the report lowers the same function for the same settings:
    the executed program has the report's fingerprint and output shardings."""
    import jax.numpy as jnp

    from starcoder_jax.compiled import fingerprint, output_specs
    from starcoder_jax.training.config import load_config
    from starcoder_jax.training.memory import lower_train_step
    from starcoder_jax.training.state import prepare

    cfg = load_config(os.path.join(REPO_ROOT, "configs/finetune/tiny-test.yaml"),
                      ["train.mesh=fsdp=8", "train.steps=4", f"train.output_dir={tmp_path / 'run'}",
                       "model.compute_dtype=float32"])
    setup = prepare(cfg, progress=False)
    state, loop = setup.state, cfg.train
    config = state.model().config
    report = lower_train_step(config, batch=loop.batch_size, seq_len=cfg.data.seq_len, remat=cfg.model.remat,
                              loss_chunk=loop.loss_chunk, mesh=setup.placement.mesh, optim=cfg.optim,
                              steps=loop.steps, seed=loop.seed, skip_nonfinite=loop.nan_policy == "skip")
    compiled = report.lowered.compile()
    ids, mask = setup.train_data.batch(0)
    shape = (loop.grad_accum, loop.batch_size // loop.grad_accum, -1)
    ids, mask = setup.placement.batch(ids.reshape(shape)), setup.placement.batch(mask.reshape(shape))
    with setup.placement.context():
        executed = setup.train_step.lower(state.params, state.opt_state, state.rest, ids, mask, jnp.int32(0)).compile()
        outputs = setup.train_step(state.params, state.opt_state, state.rest, ids, mask, jnp.int32(0))
    assert fingerprint(executed) == fingerprint(compiled)
    specs = output_specs(compiled)
    got = [str(x.sharding.spec) for x in jax.tree.leaves(outputs)]
    assert got == specs
    assert any("fsdp" in s for s in specs)
    setup.checkpoints.close()


@plan8
@pytest.mark.skipif(not CHIP_EXTRAS, reason="needs the tpu and cuda extras (libtpu, jax-cuda13-plugin)")
def test_plan8_chips_are_handed_the_fake_device_program():
    """The train step lowered for 8 H100s (XLA:GPU) is the very program lowered for 8 fake
    CPU devices, and compiles to the same output shardings; for a v5e-8 slice the
    shardings are the same too (JAX lowers a mixed-precision dot for TPUs without the
    operand converts it writes for CPUs and GPUs, so that program differs in those ops)."""
    from starcoder_jax.compiled import output_specs, program_fingerprint
    from starcoder_jax.parallel.chips import chips
    from starcoder_jax.parallel.mesh import mesh_from_spec
    from starcoder_jax.training.memory import lower_train_step

    config = StarCoderConfig(**TINY).replace(attention_impl="chunked", matmul_impl="xla", dtype="bfloat16")
    programs = {}
    for name, devices in (("cpu", jax.devices()[:8]), ("gpu", chips("h100-sxm", 8).devices),
                          ("tpu", chips("v5e-8").devices)):
        lowered = lower_train_step(config, batch=8, seq_len=64, remat="none",
                                   mesh=mesh_from_spec("fsdp=4,tensor=2", devices)).lowered
        programs[name] = program_fingerprint(lowered), output_specs(lowered.compile())
    assert programs["gpu"] == programs["cpu"]
    assert programs["tpu"][1] == programs["cpu"][1] and programs["tpu"][0] != programs["cpu"][0]
    assert any("fsdp" in spec for spec in programs["cpu"][1])


@plan8
def test_plan8_a_sweep_sorts_meshes_by_estimated_time():
    plans = compiled_plans(SHAPES["tiny"], ["data=2,fsdp=2,tensor=2", "fsdp=8"], batch=8, seq_len=64,
                           dtype="float32", target_name="tpu-v5p", compiler="cpu", remat="none")
    times = [p["estimated_step_s"] for p in plans]
    assert times == sorted(times) and len(plans) == 2
    assert {p["mesh"] for p in plans} == {"data=1,fsdp=8,tensor=1", "data=2,fsdp=2,tensor=2"}
    assert all(p["estimate"]["fits"] and p["estimate"]["target"] == "tpu-v5p" for p in plans)

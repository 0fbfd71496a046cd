"""Programs compiled on this CPU host for real chips by their own compilers
(parallel.chips): libtpu for TPU slices, XLA:GPU for NVIDIA GPUs.

The tests that compile need the `tpu` or `cuda` extra and skip, saying
which, where it is missing. Each tiny model has heads of 128 (the splash
kernel's and cuDNN's width) and at most 2 layers: a TPU compile of a train
step takes about 10 s here, a GPU one about 3 s.
"""

import jax
import pytest

from starcoder_jax.compiled import compiled_plan
from starcoder_jax.config import StarCoderConfig
from starcoder_jax.ops.backend import cudnn_version
from starcoder_jax.parallel import chips as chips_module
from starcoder_jax.parallel.chips import MissingExtra, chips, compiler_installed, parse, tpu_topology

HAS_TPU = compiler_installed("tpu")
HAS_CUDA = compiler_installed("gpu")
HAS_CUDNN = cudnn_version() is not None
tpu = pytest.mark.skipif(not HAS_TPU, reason="the tpu extra (libtpu) is not installed")
cuda = pytest.mark.skipif(not HAS_CUDA, reason="the cuda extra (jax-cuda13-plugin) is not installed")
cudnn = pytest.mark.skipif(not HAS_CUDNN, reason="the cuda extra's cuDNN library (nvidia-cudnn-cu13) is not installed")

# GPTBigCode with one shared kv head (MQA), and StarCoder2 with grouped heads and a window
# (its MLP width, 4096 inputs to c_proj, is one XLA:CPU would cut into input blocks: the
# chip's program must not take that host layout)
MQA = StarCoderConfig(vocab_size=512, n_positions=512, n_embd=256, n_layer=2, n_head=2, n_inner=1024)
GQA = StarCoderConfig(model_type="starcoder2", vocab_size=512, n_positions=512, n_embd=512, n_layer=2, n_head=4,
                      n_kv_head=2, n_inner=4096, sliding_window=128, use_bias=True, multi_query=False)
TARGETS = [pytest.param("tpu-v5e", "fsdp=2,tensor=2", "splash", "tpu_custom_call", marks=tpu, id="v5e-4"),
           pytest.param("h100-sxm", "fsdp=4,tensor=2", "cudnn", "__cudnn$fmhaSoftmax", marks=[cuda, cudnn],
                        id="h100x8")]


# ---------------------------------------------------------------------------
# Naming targets (no compiler needed)
# ---------------------------------------------------------------------------

def test_slice_names_and_topologies():
    """Cloud TPU slice names count chips (v5e, v6e) or TensorCores (v4, v5p); the usual
    shapes double their smallest side."""
    assert parse("v5e-8") == (parse("tpu-v5e")[0], "2x4")
    assert parse("v5p-128")[1] == "4x4x4"  # 64 chips
    assert parse("v5p-8", "2x2x1")[1] == "2x2x1"
    assert [tpu_topology("v5e", n) for n in (1, 4, 8, 16, 256)] == ["1x1", "2x2", "2x4", "4x4", "16x16"]
    assert [tpu_topology("v5p", n) for n in (4, 8, 16, 32, 64)] == ["2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4"]
    with pytest.raises(ValueError, match="whole number of chips"):
        parse("v5p-9")
    with pytest.raises(ValueError, match="unknown target 'v9z-8'"):
        parse("v9z-8")
    with pytest.raises(ValueError, match="power of two"):
        tpu_topology("v5e", 12)


@pytest.mark.parametrize("name, extra", [("tpu-v5e", "tpu"), ("h100-sxm", "cuda")])
def test_a_missing_compiler_names_its_extra(monkeypatch, name, extra):
    monkeypatch.setattr(chips_module.importlib.util, "find_spec", lambda module: None)
    with pytest.raises(MissingExtra, match=rf"pip install 'starcoder-jax\[{extra}\]'"):
        chips(name, 1)


def test_the_shard_plan_command_refuses_a_missing_extra(monkeypatch, capsys):
    from starcoder_jax.cli.main import main

    monkeypatch.setattr(chips_module.importlib.util, "find_spec", lambda module: None)
    with pytest.raises(SystemExit, match=r"starcoder-jax\[tpu\]"):
        main(["shard-plan", "--compile", "--model", "tiny_starcoder_py", "--mesh", "fsdp=4", "--target", "v5e-4"])


# ---------------------------------------------------------------------------
# The compile-only devices and the forms `auto` picks for them
# ---------------------------------------------------------------------------

@tpu
def test_tpu_slices_give_their_chips():
    found = chips("v5p-16")
    assert len(found.devices) == 8 and found.topology == "v5p:2x2x2" and found.platform == "tpu"
    assert {d.device_kind for d in found.devices} == {"TPU v5"}
    assert len(chips("tpu-v5e", 1).devices) == 1  # one chip: a host of its own
    with pytest.raises(ValueError, match="has 4 chips, the mesh 8"):
        chips("v5e-4", 8)
    with pytest.raises(ValueError, match="one device per TensorCore"):  # v4: see the README's table
        chips("v4-8", 4)
    assert found.compiler()["compiler"].startswith("libtpu ")


@cuda
def test_gpu_devices_are_the_chip_described():
    """XLA:GPU reads the chip from our GpuChip table: its name, SM count and nodes."""
    found = chips("h100-sxm", 16)
    assert len(found.devices) == 16 and found.topology == "2 x 8 GPUs"
    assert {d.device_kind for d in found.devices} == {"NVIDIA H100 80GB HBM3"}
    assert found.devices[0].core_count == 132
    assert len({d.process_index for d in found.devices}) == 2  # one process a node
    assert chips("a100-40gb", 2).devices[0].device_kind == "NVIDIA A100-SXM4-40GB"
    with pytest.raises(ValueError, match="whole nodes"):
        chips("h100-sxm", 12, per_node=8)


def _auto_forms(devices):
    """(attention form for training, for decode, matmul form, remat form) that `auto`
    picks while a program is traced for a mesh of `devices`."""
    from starcoder_jax.ops import attention, matmul, remat
    from starcoder_jax.parallel.mesh import mesh_from_spec

    with jax.set_mesh(mesh_from_spec("data=1", devices[:1])):
        return (attention.resolve("auto", True, 512), attention.resolve("auto", False, 1),
                matmul.resolve("auto"), remat.resolve("auto"))


@pytest.mark.parametrize("target, forms", [
    pytest.param("tpu-v5e", ("splash", "xla", "xla", "jax"), marks=tpu, id="tpu"),
    pytest.param("h100-sxm", ("cudnn", "xla", "xla", "jax"), marks=[cuda, cudnn], id="gpu"),
])
def test_auto_follows_the_platform_compiled_for_not_the_host(target, forms):
    assert jax.default_backend() == "cpu"
    assert _auto_forms(chips(target, 1).devices) == forms
    assert _auto_forms(jax.devices()) == ("xla", "xla", "xla", "cond")  # a CPU mesh: the sharded CPU forms


# ---------------------------------------------------------------------------
# Compiling the library's steps for chips
# ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("step", ["train", "prefill", "decode"])
@pytest.mark.parametrize("target, mesh, kernel_form, custom_call", TARGETS)
def test_each_step_compiles_for_the_chip(target, mesh, kernel_form, custom_call, step):
    """GPTBigCode (MQA) on a 4-chip v5e slice and an 8-GPU H100 node: the train, prefill
    and decode steps compile with the chip's compiler; training and prefill call the
    chip's attention kernel under the mesh (shard_map), decode reads the cache with the
    reference form; every figure is read from that compiler."""
    seq = 256 if step != "decode" else 255
    plan = compiled_plan(MQA, mesh, step=step, batch=4, seq_len=seq, target_name=target)
    assert plan.compiler["platform"] == ("tpu" if target.startswith("tpu") else "gpu")
    assert plan.peak_bytes > plan.argument_bytes > 0 and plan.flops > 0 and plan.estimate["fits"]
    kernels = plan.kernels
    assert kernels["launches"] >= kernels["fusions"] > 0
    if step == "decode":
        assert plan.attention_forms == ["xla"]
        assert not any(k.startswith(("__cudnn", "tpu_custom")) for k in kernels["custom_calls"])
    else:
        assert kernel_form in plan.attention_forms
        assert kernels["custom_calls"].get(custom_call, 0) >= MQA.n_layer
    if step == "train":
        assert any(c["kind"] in ("all-gather", "reduce-scatter") for c in plan.collectives)


@pytest.mark.slow
@pytest.mark.parametrize("target, mesh, kernel_form, custom_call", TARGETS)
def test_starcoder2_window_and_lora_on_int8_compile_for_the_chip(target, mesh, kernel_form, custom_call):
    """StarCoder2 (grouped kv heads split over tensor, a sliding window) trains LoRA
    adapters over an int8 base with the chip's attention kernel, whose window is its own
    local mask."""
    plan = compiled_plan(GQA, mesh, step="train", batch=4, seq_len=256, target_name=target, lora_rank=4,
                         quantize="int8")
    assert kernel_form in plan.attention_forms
    assert plan.kernels["custom_calls"].get(custom_call, 0) >= GQA.n_layer
    assert plan.lora_rank == 4 and plan.quantize == "int8"
    assert plan.gradients_bytes < plan.params_bytes / 10  # only the adapters train


@tpu
def test_a_forced_kernel_that_cannot_serve_its_own_chip_is_an_error():
    """Forced splash traced for a TPU mesh that splits 2 query heads (of one kv head) 4
    ways cannot run the kernel: an error naming why, not a silent fallback to chunked.
    A cache read (decode) is not a call splash serves: it still runs another form."""
    import jax.numpy as jnp

    from starcoder_jax.ops.attention import attention
    from starcoder_jax.parallel.mesh import mesh_from_spec

    q = jax.ShapeDtypeStruct((4, 256, 2, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((4, 256, 1, 128), jnp.bfloat16)
    pos = jax.ShapeDtypeStruct((4, 256), jnp.int32)

    def call(q, k, v, pos, own_keys=True):
        return attention(q, k, v, pos, pos, impl="splash", own_keys=own_keys, scale=0.1)

    from starcoder_jax.ops import attention as attention_module

    attention_module._WARNED.clear()  # the fallback warns once a process and reason
    with jax.set_mesh(mesh_from_spec("tensor=4", chips("v5e-4").devices)):
        with pytest.raises(ValueError, match="'splash' cannot serve this call on tpu: neither its 1 kv heads"):
            jax.eval_shape(call, q, kv, kv, pos)
        with pytest.warns(UserWarning, match="not a cache read"):
            jax.eval_shape(lambda *a: call(*a, own_keys=False), q, kv, kv, pos)


@cuda
@cudnn
def test_forced_cudnn_on_a_float32_model_is_an_error():
    with pytest.raises(ValueError, match="'cudnn' cannot serve this call on gpu: it takes bfloat16 or float16"):
        compiled_plan(MQA, "data=1", step="prefill", batch=1, seq_len=128, dtype="float32", target_name="h100-sxm",
                      attention_impl="cudnn")


@pytest.mark.slow
@cuda
def test_without_cudnn_auto_picks_what_compiles_for_the_gpu(monkeypatch):
    """No cuDNN library: auto runs the chunked form on the GPU and the plan says so."""
    from starcoder_jax.ops import attention

    monkeypatch.setattr(attention, "cudnn_available", lambda: False)
    plan = compiled_plan(MQA, "data=2", step="train", batch=2, seq_len=256, target_name="h100-sxm")
    assert plan.attention_forms == ["xla"]
    assert not any(k.startswith("__cudnn") for k in plan.kernels["custom_calls"])

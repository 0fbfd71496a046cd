"""Two JAX processes on this machine (2 fake CPU devices each, gloo collectives) == one process.

The workers (multihost_worker.py) join through jax.distributed on a free
localhost port, shard the model over a global fsdp=2,tensor=2 mesh (rows of
the batch split across the processes) and compute loss, gradients and a
greedy generation; each exports a PEFT adapter it loaded onto the mesh,
byte for byte one process's export. Tolerances as in test_sharding: loss 1e-5 relative,
gradients per parameter max|a - b| <= 5e-5 max|b| + 1e-6, tokens identical. A worker whose
coordinator never answers must end with an error, not hang.
"""

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from builders import REPO_ROOT, builds_with_torch, finish_process, free_port, params_loss
from flax import nnx

import starcoder_jax as sj
from starcoder_jax.inference.generate import generate

sys.path.insert(0, os.path.dirname(__file__))
import multihost_worker  # noqa: E402

pytestmark = pytest.mark.multidevice
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
ROOT = REPO_ROOT



def _start(process_id, port, *extra, num_processes=2, timeout=60):
    # optimization level 0: compiles faster; tolerances hold across the two settings
    flags = " --xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + flags)
    cmd = [sys.executable, "-u", WORKER, "--coordinator", f"127.0.0.1:{port}",
           "--num-processes", str(num_processes), "--process-id", str(process_id),
           "--timeout", str(timeout), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)



@pytest.fixture(scope="module")
@builds_with_torch
def model_dir(tmp_path_factory):
    from builders import make_hf_model

    return make_hf_model(str(tmp_path_factory.mktemp("multihost")), vocab_size=512, n_positions=64,
                         n_embd=64, n_head=4, n_layer=2, weight_std=0.35, seed=3)


@pytest.mark.slow
def test_two_processes_equal_one(model_dir, tmp_path):
    port = free_port()
    out = str(tmp_path / "result.npz")
    adapter, exported = str(tmp_path / "adapter"), str(tmp_path / "exported")
    tuned = sj.load_pretrained(model_dir)
    sj.add_lora(tuned, sj.LoRAConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "c_proj"]))
    nnx.update(tuned, jax.tree.map(lambda a: jnp.asarray(np.random.default_rng(7).standard_normal(a.shape),
                                                         a.dtype), nnx.state(tuned, nnx.LoRAParam)))
    sj.save_peft(tuned, adapter)  # one process's export
    procs = [_start(i, port, "--model", model_dir, "--out", out, "--adapter", adapter, "--peft-out", exported)
             for i in (0, 1)]
    results = [finish_process(p, 240) for p in procs]
    for i, (code, stdout, stderr) in enumerate(results):
        assert code == 0, f"process {i} exited {code}:\n{stdout[-3000:]}\n{stderr[-5000:]}"

    with open(out + ".json") as f:
        info = json.load(f)
    assert (info["process_count"], info["device_count"], info["local_devices"]) == (2, 4, 2)
    assert info["rows"] == [0, 2]  # process 0 holds only its half of the batch
    infos = [json.loads(r[1].strip().splitlines()[-1]) for r in results]
    assert infos[1]["rows"] == [2, 4]

    model = sj.load_pretrained(model_dir)
    ids, mask = multihost_worker.batch()
    graphdef, params = nnx.split(model)
    loss, grads = jax.jit(jax.value_and_grad(params_loss), static_argnums=1)(
        params, graphdef, jnp.asarray(ids), jnp.asarray(mask))
    for i in infos:
        assert i["loss"] == pytest.approx(float(loss), rel=1e-5)
    got = np.load(out)
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert sorted(got.files) == sorted(jax.tree_util.keystr(p) for p, _ in leaves)
    for path, g in leaves:
        key = jax.tree_util.keystr(path)
        err, scale = float(np.abs(got[key] - np.asarray(g)).max()), float(np.abs(g).max())
        assert err <= 5e-5 * scale + 1e-6, f"{key}: max error {err:.3g}, max |grad| {scale:.3g}"
    ref = [g.ids for g in generate(model, multihost_worker.prompts(), max_new_tokens=8, ignore_eos=True)]
    assert len({t for g in ref for t in g}) > 4
    assert infos[0]["gens"] == infos[1]["gens"] == ref
    # save_peft on the 2-process mesh (adapters split across the processes) == one process's export
    assert infos[0]["adapters_split"] > 0
    assert sorted(os.listdir(exported)) == sorted(os.listdir(adapter))
    for name in os.listdir(adapter):
        with open(os.path.join(adapter, name), "rb") as a, open(os.path.join(exported, name), "rb") as b:
            assert a.read() == b.read(), name


def test_lost_coordinator_ends_in_an_error():
    """Neither a worker whose coordinator is gone nor a coordinator whose peer never comes hangs."""
    start = time.monotonic()
    orphan = _start(1, free_port(), timeout=5)  # nobody listens on that port
    lonely = _start(0, free_port(), timeout=5)  # process 1 never joins
    code, _, err = finish_process(orphan, 60)
    assert code != 0
    assert "no coordinator accepted connections at 127.0.0.1" in err
    code, _, err = finish_process(lonely, 60)
    assert code != 0, err[-2000:]
    assert time.monotonic() - start < 60

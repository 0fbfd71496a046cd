"""One process of a multi-process run on this machine (launched by test_multihost.py).

Each process joins the cluster, builds the global mesh, loads the model
sharded onto it, feeds its own rows of a fixed batch, computes the
next-token loss and its gradients, and runs a greedy generation. Process 0
writes the results (gradients gathered to the host) to --out. With
--adapter, each loads the model with that PEFT adapter on the mesh and
exports it again (save_peft) to --peft-out.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=N and
JAX_PLATFORMS=cpu (CPU collectives go over gloo, JAX's default).
"""

import argparse
import json
import os
import sys

import numpy as np

BATCH, LENGTH = 4, 16


def batch():
    """The global batch every process agrees on: ids [4, 16] and a mask with padding."""
    ids = np.random.default_rng(1).integers(1, 512, (BATCH, LENGTH)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    mask[3, 5:] = 0
    return ids, mask


def prompts():
    rng = np.random.default_rng(5)
    return [rng.integers(1, 512, 3 + 2 * i).tolist() for i in range(4)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--timeout", type=int, default=60)
    parser.add_argument("--model")
    parser.add_argument("--mesh", default="fsdp=2,tensor=2")
    parser.add_argument("--out")
    parser.add_argument("--adapter", help="a PEFT directory: load it on the mesh and export it to --peft-out")
    parser.add_argument("--peft-out")
    args = parser.parse_args(argv)

    from starcoder_jax.parallel import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                           timeout_s=args.timeout)

    import jax
    from builders import params_loss
    from flax import nnx
    from jax.experimental import multihost_utils

    import starcoder_jax as sj
    from starcoder_jax.inference.generate import generate
    from starcoder_jax.parallel.mesh import mesh_from_spec, place_batch, state_shardings

    mesh = mesh_from_spec(args.mesh)
    model = sj.load_pretrained(args.model, mesh=mesh)
    ids, mask = batch()
    ids_g, mask_g = place_batch(ids, mesh), place_batch(mask, mesh)
    # the rows this process holds
    held = sorted((s.index[0].start or 0, s.index[0].stop or BATCH) for s in ids_g.addressable_shards)
    rows = slice(held[0][0], held[-1][1])
    graphdef, params = nnx.split(model)
    out = (jax.NamedSharding(mesh, jax.P()), state_shardings(params, mesh))
    with jax.set_mesh(mesh):
        loss, grads = jax.jit(jax.value_and_grad(params_loss), static_argnums=1,
                              out_shardings=out)(params, graphdef, ids_g, mask_g)
    grads = multihost_utils.process_allgather(grads, tiled=True)
    gens = [g.ids for g in generate(model, prompts(), max_new_tokens=8, ignore_eos=True, mesh=mesh)]
    leaves = {jax.tree_util.keystr(p): np.asarray(g)
              for p, g in jax.tree_util.tree_leaves_with_path(grads)}
    info = dict(process_count=jax.process_count(), device_count=jax.device_count(),
                local_devices=jax.local_device_count(), rows=[rows.start, rows.stop],
                loss=float(loss), gens=gens)  # a scalar is replicated: readable
    if args.adapter:  # every process exports; adapters split across processes are gathered
        tuned = sj.load_pretrained(args.model, mesh=mesh, adapter=args.adapter)
        adapters = jax.tree.leaves(nnx.state(tuned, nnx.LoRAParam))
        info["adapters_split"] = sum(not a.is_fully_addressable for a in adapters)
        sj.save_peft(tuned, args.peft_out)
    print(json.dumps(info), flush=True)
    if args.process_id == 0 and args.out:
        np.savez(args.out, **leaves)
        with open(args.out + ".json", "w") as f:
            json.dump(info, f)
    return 0


if __name__ == "__main__":
    # Run as a script: this checkout's package and tests/builders come before any installed copy.
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:0] = [os.path.dirname(tests_dir), tests_dir]
    sys.exit(main())

"""One process of a multi-process run reading a token store (launched by test_store.py).

--mode rows: joins the cluster, builds a data=4 mesh over both processes' devices
and, for each of --steps steps, places the batch with parallel.mesh.place_rows
(each process computing only its own rows); writes the rows it computed and
their values, and the gathered global batch, to --out (one .npz per process).

--mode train: runs (or resumes) the fine-tune of --config on the global mesh
for --stop-after steps.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=2 and JAX_PLATFORMS=cpu.
"""

import argparse
import os
import sys

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--mode", choices=("rows", "train"), required=True)
    parser.add_argument("--store")
    parser.add_argument("--tokenizer")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--config")
    parser.add_argument("--stop-after", type=int)
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    if args.num_processes > 1:
        from starcoder_jax.parallel import distributed

        distributed.initialize(args.coordinator, args.num_processes, args.process_id, timeout_s=60)
    if args.mode == "train":
        from starcoder_jax.training import train

        result = train.run(train.load_config(args.config, []), progress=False, stop_after=args.stop_after)
        print("step", result["step"], flush=True)
        return 0

    from jax.experimental import multihost_utils

    from starcoder_jax.parallel.mesh import mesh_from_spec, place_rows
    from starcoder_jax.tokenizer import load_tokenizer
    from starcoder_jax.training.data import DataConfig, PackedSequences
    from starcoder_jax.training.store import TokenStore

    store = TokenStore(args.store)
    source = PackedSequences(store.split(held_out=False), load_tokenizer(args.tokenizer),
                             DataConfig(seq_len=32, fim_rate=0.5), batch_size=8, seed=3)
    mesh = mesh_from_spec("data=4")
    asked, values, gathered = [], [], []

    def fetch(step):
        def rows(indices):
            asked.append(np.asarray(indices))
            ids, mask = source.rows(step, indices)
            values.append(ids)
            return ids, mask
        return rows

    for step in range(args.steps):
        ids, mask = place_rows(fetch(step), (2, 4, 33), mesh, batch_dim=1)  # [A, b, T + 1]
        gathered.append(np.asarray(multihost_utils.process_allgather(ids, tiled=True)))
    np.savez(f"{args.out}.{args.process_id}.npz", asked=np.stack(asked), values=np.stack(values),
             gathered=np.stack(gathered))
    return 0


if __name__ == "__main__":
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:0] = [os.path.dirname(tests_dir), tests_dir]
    sys.exit(main())

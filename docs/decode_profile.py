"""Where a decode step's time goes: XLA's own op events, summed by kind.

Runs the library's decode loop (`generate.decode_loop`, the program the
Generator runs) on random weights of a preset under `jax.profiler.trace`,
then reads the trace back with `jax.profiler.ProfileData` and sums the
duration of every XLA op event per kind of op (the op's name without its
numeric suffix: `copy_dot_fusion.12` and `copy_dot_fusion.96` are one kind).

    python docs/decode_profile.py                       # starcoderbase-1b, int8, batch 1
    python docs/decode_profile.py --quantize none --batch 8 --layers 4

Figures are per decode step. On XLA:CPU, events nest (a `while` contains
the ops of its body) and tracing slows each op a little, so the kinds add
up to more than the step; read them as shares, next to the untraced step
time printed first. The trace stays in --trace-dir for TensorBoard/XProf.
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from starcoder_jax.bench import decode_consts, prefilled
from starcoder_jax.config import preset
from starcoder_jax.inference.generate import bucket, decode_loop
from starcoder_jax.model.modules import init_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="starcoderbase-1b")
    p.add_argument("--layers", type=int, help="override the number of layers")
    p.add_argument("--quantize", choices=("none", "int8"), default="int8")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=128, help="prompt tokens before decoding")
    p.add_argument("--steps", type=int, default=8, help="decode steps traced (one call)")
    p.add_argument("--top", type=int, default=25, help="kinds of op listed")
    p.add_argument("--trace-dir", default="/tmp/starcoder-jax-decode-trace")
    args = p.parse_args()

    overrides = {"dtype": "float32", "param_dtype": "float32"}
    if args.layers:
        overrides["n_layer"] = args.layers
    config = preset(args.preset, **overrides)
    model = init_model(config)
    if args.quantize == "int8":
        model.quantize_("int8")
    graphdef, params = nnx.split(model.adapt_to_backend_(decode=True))  # laid out as the Generator runs it
    b, steps = args.batch, args.steps
    max_new = 3 * steps + 1
    consts = decode_consts(config, b, max_new)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, config.vocab_size, (b, args.context)), jnp.int32)
    state = prefilled(graphdef, params, config, ids, bucket(args.context + max_new, 16), consts)

    def run(state):
        return jax.block_until_ready(decode_loop(graphdef, params, state, jnp.int32(steps), consts))

    state = run(state)  # compile
    t0 = time.perf_counter()
    state = run(state)
    untraced = (time.perf_counter() - t0) / steps
    with jax.profiler.trace(args.trace_dir):
        t0 = time.perf_counter()
        state = run(state)
        traced = (time.perf_counter() - t0) / steps
    print(f"{args.preset}{f' ({args.layers} layers)' if args.layers else ''}, {args.quantize}, batch {b}: "
          f"{untraced * 1e3:.1f} ms per step untraced, {traced * 1e3:.1f} traced")

    path = sorted(glob.glob(f"{args.trace_dir}/**/*.xplane.pb", recursive=True))[-1]
    total, count = collections.Counter(), collections.Counter()
    platform = jax.devices()[0].platform
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        # XLA:CPU: the host plane's XLA thread-pool lines; a GPU: its devices' op lines
        if not plane.name.startswith("/host:CPU" if platform == "cpu" else "/device:"):
            continue
        for line in plane.lines:
            if ("XLAEigen" not in line.name) if platform == "cpu" else (line.name != "XLA Ops"):
                continue
            for event in line.events:
                if event.name.startswith(("ThunkExecutor", "end: ")):
                    continue
                kind = re.sub(r"\.\d+$", "", event.name)
                total[kind] += event.duration_ns
                count[kind] += 1
    print(f"{'ms/step':>8s} {'ops/step':>9s} {'us/op':>8s}  kind of op")
    for kind, ns in total.most_common(args.top):
        print(f"{ns / 1e6 / steps:8.3f} {count[kind] / steps:9.1f} {ns / count[kind] / 1e3:8.1f}  {kind}")


if __name__ == "__main__":
    main()

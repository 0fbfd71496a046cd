"""Time formulations of a weight-only int8 matmul against bfloat16 weights.

For each starcoderbase-1b weight shape (O x I, stored output-major like
starcoder_jax.ops.int8) and each row count M, one jitted function applies
`--stack` distinct weights one after the other (like consecutive layers, so
the weights are read from device memory and not from cache); the time per
matrix is the median of `--repeats` calls over `--stack`. Each form's result
is checked against the float32 product of the dequantized weights.

    python docs/gpu/int8_forms.py            # on the device JAX picks
    python docs/gpu/int8_forms.py --small    # a quick run of the script itself
    python docs/gpu/int8_forms.py --forms ours --rows 1   # the library's own projection only

"ours" is `starcoder_jax.ops.matmul.project` with matmul_impl "auto" on the
layout the library gives the weight on this backend (the CPU's input blocks
on a CPU), i.e. whatever form it picks here: the CPU tiles on a CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from starcoder_jax.ops import int8 as quant
from starcoder_jax.ops.matmul import project, resolve

SHAPES = {"c_attn": (2304, 2048), "attn out": (2048, 2048), "mlp c_fc": (8192, 2048), "mlp c_proj": (2048, 8192),
          "lm head": (49152, 2048)}


def forms():
    def bf16(x, w, s):
        return jnp.einsum("MI,OI->MO", x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32)

    def einsum_convert(x, q, s):
        y = jnp.einsum("MI,OI->MO", x.astype(jnp.bfloat16), q.astype(jnp.bfloat16),
                       preferred_element_type=jnp.float32)
        return y * s

    def mixed_dot(x, q, s):
        y = jax.lax.dot_general(x.astype(jnp.bfloat16), q, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
        return y * s

    def reduce_f32(x, q, s):
        y = jnp.sum(x.astype(jnp.bfloat16).astype(jnp.float32)[:, None, :] * q.astype(jnp.float32)[None], axis=-1)
        return y * s

    def bf16_reduce(x, w, s):
        return jnp.sum(x.astype(jnp.bfloat16).astype(jnp.float32)[:, None, :] * w.astype(jnp.float32)[None], axis=-1)

    return {"bf16 weights": bf16, "bf16 multiply+reduce": bf16_reduce, "int8 einsum(convert)": einsum_convert,
            "int8 mixed dot_general": mixed_dot,
            "int8 multiply+reduce": reduce_f32}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--small", action="store_true", help="shapes divided by 16, for a quick run")
    p.add_argument("--rows", default="1,8")
    p.add_argument("--stack", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--forms", default="", help="comma-separated substrings: time only the forms whose name has one")
    args = p.parse_args()
    dev = jax.devices()[0]
    print(f"device: {dev.platform} {dev.device_kind}  jax {jax.__version__}")
    rng = np.random.default_rng(0)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"{'shape':12s} {'M':>3s} {'form':26s} {'us/matrix':>10s} {'GB/s':>8s} {'rel err':>9s}")
    for name, (o, i) in SHAPES.items():
        if args.small:
            o, i = o // 16, i // 16
        w = rng.standard_normal((args.stack, o, i), np.float32) * 0.02
        scale = np.abs(w).max(-1) / 127
        q = np.clip(np.round(w / scale[..., None]), -127, 127).astype(np.int8)
        deq = q.astype(np.float32) * scale[..., None]
        wb = jnp.asarray(deq, jnp.bfloat16)
        qj, sj = jnp.asarray(q), jnp.asarray(scale, jnp.float32)
        # the library's layout: quantize takes [in, out]; same int8 values and scales
        cpu = resolve("auto") == "cpu"
        q_ours = [quant.quantize(jnp.asarray(deq[k].T), 1) for k in range(args.stack)]
        q_ours = [w.for_cpu() if cpu else w for w in q_ours]
        for m in rows:
            x = rng.standard_normal((m, i), np.float32)
            xb = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
            ref = np.stack([xb @ deq[k].T for k in range(args.stack)])
            all_forms = dict(forms(), ours=lambda x, w, _: project(x, w, 1))
            wanted = [w for w in args.forms.split(",") if w]
            for form_name, f in all_forms.items():
                if wanted and not any(w in form_name for w in wanted):
                    continue
                if form_name == "ours":
                    weights, nbytes = q_ours, sum(w.nbytes for w in q_ours)
                else:
                    weights = wb if form_name.startswith("bf16") else qj
                    nbytes = weights.nbytes + (0 if form_name.startswith("bf16") else sj.nbytes)
                    # separate arrays, like the layers' weights (slicing one stacked array would copy)
                    weights = list(weights)

                @jax.jit
                def run(x, weights, sj, f=f):
                    return jnp.stack([f(x, w, s) for w, s in zip(weights, sj)])

                xj = jnp.asarray(x)
                try:
                    out = np.asarray(run(xj, weights, list(sj)))
                except Exception as e:  # a form XLA rejects on this backend
                    print(f"{name:12s} {m:3d} {form_name:26s} failed: {type(e).__name__}: {str(e)[:80]}")
                    continue
                err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    run(xj, weights, list(sj)).block_until_ready()
                    times.append(time.perf_counter() - t0)
                t = statistics.median(times) / args.stack
                print(f"{name:12s} {m:3d} {form_name:26s} {t * 1e6:10.1f} {nbytes / args.stack / t / 1e9:8.0f} "
                      f"{err:9.1e}", flush=True)


if __name__ == "__main__":
    main()

"""Our packed 4-bit weights (ops.int4) against qwix's, for speed and memory.

For each projection shape of starcoderbase-1b (random N(0, 0.02) weights), one
product x @ W at 1 row (decode) and 512 rows (prefill), jitted, median of 20:

- ours: int4 / nf4 through the "cpu" form (XLA:CPU) and the "dot" form;
- qwix: `qwix.quantize(w, jnp.int4 | "nf4", tiled_axes={0: 64})` (symmetric
  absmax, a float32 scale per 64 inputs), multiplied by `qwix.dot_general`;
- our int8 ("cpu_rows" / "cpu_tiles") and the float32 product beside them.

Memory: the bytes the quantized weight holds on the device
(`on_device_size_in_bytes`), and relative reconstruction error.

    python docs/qwix_compare.py   (pip install qwix; JAX_PLATFORMS=cpu)
"""

from __future__ import annotations

import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from starcoder_jax.ops import int4, int8


def median_ms(f, *args, n=20) -> float:
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def device_bytes(tree) -> int:
    return sum(a.addressable_data(0).on_device_size_in_bytes() for a in jax.tree.leaves(tree))


def main() -> None:
    import qwix

    cpu = platform.processor() or platform.machine()
    print(f"jax {jax.__version__}, qwix {getattr(qwix, '__version__', '?')}, {cpu}")
    rng = np.random.default_rng(0)
    rows = (1, 512)
    head = f"{'shape I x O':>14s} {'form':>16s} {'MiB':>7s} {'rel err':>8s}"
    print(head + "".join(f" {f'ms @{m}':>9s}" for m in rows))
    for i, o in ((2048, 2304), (2048, 2048), (2048, 8192), (8192, 2048)):
        w = jnp.asarray(0.02 * rng.standard_normal((i, o)), jnp.float32)
        xs = {m: jnp.asarray(rng.standard_normal((m, i)), jnp.float32) for m in rows}
        norm = float(jnp.linalg.norm(w))
        cases = {"float32": (w, lambda x, w: x @ w, w)}
        q8 = int8.quantize(w, 1)
        cases["ours int8"] = (q8.for_cpu(), lambda x, w: int8.int8_product(
            x, w, "cpu_rows" if x.shape[0] <= 4 else "cpu_tiles"), int8.dequantize(q8))
        for kind in int4.FORMATS:
            q = int4.quantize(w, 1, kind)
            for form in int4.INT4_FORMS:
                cases[f"ours {kind} {form}"] = (q, lambda x, w, f=form: int4.int4_product(x, w, f),
                                                int4.dequantize(q))
        for name, qtype in (("int4", jnp.int4), ("nf4", "nf4")):
            qa = qwix.quantize(w, qtype, tiled_axes={0: 64}, scale_dtype=jnp.float32)
            cases[f"qwix {name}"] = (qa, lambda x, w: qwix.dot_general(x, w, (((1,), (0,)), ((), ()))),
                                     qwix.dequantize(qa))
        for name, (weight, fn, back) in cases.items():
            f = jax.jit(fn)
            err = float(jnp.linalg.norm(back - w)) / norm
            line = f"{f'{i} x {o}':>14s} {name:>16s} {device_bytes(weight) / 2**20:7.2f} {err:8.4f}"
            for m in rows:
                line += f" {median_ms(f, xs[m], weight):9.3f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()

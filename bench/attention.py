"""Flash attention (cmjax.models.attention) against XLA's: correctness on CPU, the TPU compiler's estimates.

Two parts, one markdown report:
  1. CPU, Pallas interpret mode: max |flash − xla| of the value, the JVP (`jax.jvp`) and the gradient of
     ⟨value, w⟩ at a few shapes and dtypes. Interpret mode runs the kernel as ordinary XLA loops: its speed says
     nothing about a chip, so no times are reported for it.
  2. A TPU topology (libtpu; `cmjax.aot.topology_devices`): `jax.jvp` of attention and the value alone, lowered
     and compiled for one chip of the slice, xla vs flash (Mosaic): compile seconds, and the compiler's
     estimates — FLOPs, bytes accessed, `optimal_seconds`, temporary bytes. A Pallas kernel is opaque to XLA's
     cost model: its FLOPs and bytes are the ones the kernel declares (`pl.CostEstimate`, counted from its
     matmuls), not counted by the compiler. Optionally (`--unet`) a tiny ADM UNet with flash attention and
     `jax.jvp` inside, compiled the same way.

    JAX_PLATFORMS=cpu .venv/bin/python bench/attention.py --output=bench/results/attention_tpu_aot.md
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import throughput  # noqa: E402

from cmjax import aot  # noqa: E402
from cmjax.models import attention, unet  # noqa: E402

IMPLS = {"xla": jax.nn.dot_product_attention, "flash": attention.flash_attention}


def _inputs(shape, dtype, count=4, seed=0):
    return tuple(jax.random.normal(k, shape, dtype) for k in jax.random.split(jax.random.key(seed), count))


def correctness_rows(shapes, dtypes):
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            q, k, v, w = _inputs(shape, dtype)
            dq, dk, dv, _ = _inputs(shape, dtype, seed=1)
            results = {}
            for name, fn in IMPLS.items():
                def run(q, k, v, dq, dk, dv, w, fn=fn):
                    value, tangent = jax.jvp(fn, (q, k, v), (dq, dk, dv))
                    grads = jax.grad(lambda q, k, v: jnp.sum((fn(q, k, v) * w).astype(jnp.float32)),
                                     (0, 1, 2))(q, k, v)
                    return value, tangent, grads
                results[name] = jax.jit(run)(q, k, v, dq, dk, dv, w)
            errs = [max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                        for a, b in zip(jax.tree.leaves(f), jax.tree.leaves(x)))
                    for f, x in zip(results["flash"], results["xla"])]
            scale = float(jnp.max(jnp.abs(results["xla"][1].astype(jnp.float32))))
            rows.append((shape, jnp.dtype(dtype).name, *errs, scale))
    return rows


def _compile(fn, specs):
    start = time.perf_counter()
    lowered = jax.jit(fn).lower(*specs)
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    cost = compiled.cost_analysis() or {}
    memory = compiled.memory_analysis()
    return {"compile_s": seconds, "flops": cost.get("flops", float("nan")),
            "bytes": cost.get("bytes accessed", float("nan")), "optimal_s": cost.get("optimal_seconds", float("nan")),
            "temp": getattr(memory, "temp_size_in_bytes", float("nan")),
            "mosaic_kernels": lowered.as_text().count("tpu_custom_call")}


def tpu_rows(topology, batch, length, heads, head_dim, dtype):
    device = aot.topology_devices(topology)[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    spec = jax.ShapeDtypeStruct((batch, length, heads, head_dim), dtype, sharding=sharding)
    rows = []
    for mode in ("value", "jvp", "grad"):
        for name, fn in IMPLS.items():
            if mode == "value":
                f = fn
                specs = [spec] * 3
            elif mode == "grad":  # reverse mode of ⟨O, 1⟩ in float32: the backward alone (O is not needed)
                f = jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32)), (0, 1, 2))
                specs = [spec] * 3
            else:
                def f(q, k, v, dq, dk, dv, fn=fn):
                    return jax.jvp(fn, (q, k, v), (dq, dk, dv))
                specs = [spec] * 6
            rows.append((mode, name, _compile(f, specs)))
    return device.device_kind, rows


def tpu_unet(topology):
    """A digits-sized ADM UNet (8×8, 32 channels, attention at 4×4 and the middle) with flash attention:
    `jax.jvp` along (x, t), as sCM's tangent takes it, lowered and compiled for one chip."""
    device = aot.topology_devices(topology)[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    net = unet.UNet(image_size=8, in_channels=1, out_channels=1, model_channels=32, channel_mult=(1, 2),
                    num_res_blocks=1, attention_resolutions=(4,), num_head_channels=32, num_classes=0,
                    attention_impl="flash")
    x = jax.ShapeDtypeStruct((8, 8, 8, 1), jnp.float32, sharding=sharding)
    t = jax.ShapeDtypeStruct((8,), jnp.float32, sharding=sharding)
    params = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros(x.shape), jnp.zeros(t.shape))["params"])
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), params)

    def step(params, x, t):
        return jax.jvp(lambda x, t: net.apply({"params": params}, x, t), (x, t), (x, jnp.ones_like(t)))

    return _compile(step, [params, x, t])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5p:2x2x2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--unet", action="store_true", help="also compile a tiny UNet's jax.jvp with flash")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    load_before = throughput.load_average()

    lines = ["# Flash attention vs XLA attention: CPU correctness, TPU compiler estimates", "",
             f"- Versions: {throughput.versions()}",
             "- Command: `JAX_PLATFORMS=cpu python bench/attention.py" + (" --unet" if args.unet else "")
             + (f" --output={args.output}" if args.output else "") + "`",
             f"- Machine: 2-core CPU, no accelerator; load before: `{load_before}`", "",
             "## 1. Correctness on CPU (Pallas interpret mode; no timings: interpret mode is not a chip)", "",
             "max |flash − xla| over all elements; blocks 128 (clipped to the 8-rounded length); "
             "the last column is the largest tangent component, for scale.", "",
             "| shape [B, L, H, D] | dtype | value | JVP | grad (q, k, v) | max abs JVP |",
             "|---|---|---:|---:|---:|---:|"]
    shapes = [(2, 64, 2, 32), (1, 200, 2, 64), (1, 100, 1, 16)]
    for shape, dtype, e_value, e_jvp, e_grad, scale in correctness_rows(shapes, [jnp.float32, jnp.bfloat16]):
        lines.append(f"| {list(shape)} | {dtype} | {e_value:.1e} | {e_jvp:.1e} | {e_grad:.1e} | {scale:.2f} |")
    print("\n".join(lines), flush=True)

    dtype = jnp.dtype(args.dtype)
    kind, rows = tpu_rows(args.topology, args.batch, args.length, args.heads, args.head_dim, dtype)
    shape = [args.batch, args.length, args.heads, args.head_dim]
    lines += ["", f"## 2. TPU topology {args.topology} ({kind}), one chip: compiler estimates, not measurements", "",
              f"q, k, v {shape} {dtype.name}; `jax.jit(...).lower(...).compile()` on this CPU machine through libtpu. "
              "FLOPs, bytes and optimal_seconds are `compiled.cost_analysis()` (XLA's TPU cost model); for flash "
              "they are the Pallas kernels' declared `pl.CostEstimate` (the compiler cannot see inside a Mosaic "
              "kernel), so the two columns are counted differently. Temp bytes: `memory_analysis()`.", "",
              "| computation | impl | Mosaic kernels | compile s | GFLOP (est.) | MB accessed (est.) | "
              "optimal_seconds (est.) | temp MiB (est.) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for mode, name, r in rows:
        lines.append(f"| {mode} | {name} | {r['mosaic_kernels']} | {r['compile_s']:.1f} | {r['flops'] / 1e9:.2f} | "
                     f"{r['bytes'] / 1e6:.1f} | {r['optimal_s'] * 1e6:.1f} µs | {r['temp'] / 2**20:.1f} |")
    if args.unet:
        r = tpu_unet(args.topology)
        lines += ["", "Tiny ADM UNet (8×8×1, 32 channels, attention at 4×4 and the middle, batch 8, float32) with "
                  f"`attention_impl=\"flash\"`, `jax.jvp` along (x, t), compiled for one {kind} chip: "
                  f"{r['mosaic_kernels']} Mosaic kernels in the program, compile {r['compile_s']:.1f} s, "
                  f"{r['flops'] / 1e9:.3f} GFLOP (est.), optimal_seconds {r['optimal_s'] * 1e6:.1f} µs (est.), "
                  f"temp {r['temp'] / 2**20:.2f} MiB (est.)."]
    lines += ["", f"- Load after: `{throughput.load_average()}`"]
    text = "\n".join(lines) + "\n"
    print("\n".join(lines[len(lines) - len(rows) - 8:]))
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()

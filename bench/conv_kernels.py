"""One 3×3 convolution's three kernels — forward, input gradient, weight gradient — in XLA and in PyTorch.

The reduced ImageNet-64 ADM step (`bench/profile_step.py`) spends most of its time in convolutions; this times
them alone, at the step's shapes (batch 8, NHWC in JAX, NCHW in PyTorch, float32, 'same' padding), so a slow
kernel can be named. Each number is the best of `--repeats` calls (the least disturbed by other load). The XLA
CPU options of the installed jaxlib that pick convolution kernels can be compared by running it again under
`XLA_FLAGS` (for example `--xla_cpu_use_onednn=true`, `--xla_cpu_use_xnnpack=false`); the flags are printed.

    .venv/bin/python bench/conv_kernels.py
    XLA_FLAGS=--xla_cpu_use_onednn=true .venv/bin/python bench/conv_kernels.py
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import throughput  # noqa: E402
import torch  # noqa: E402  (before anything imports tensorflow)

# (height = width, channels) of the reduced ImageNet-64 ADM's 3×3 convolutions (64 channels, mult 1, 2, 2, 2).
SHAPES = ((64, 64), (32, 128), (16, 128), (8, 128))
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _best_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return 1e3 * best


def jax_kernels(batch, size, channels, repeats):
    key_x, key_w, key_g = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key_x, (batch, size, size, channels))
    w = 0.05 * jax.random.normal(key_w, (3, 3, channels, channels))
    dy = jax.random.normal(key_g, (batch, size, size, channels))

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_DIMENSIONS)

    forward = jax.jit(conv)
    input_grad = jax.jit(lambda x, w, dy: jax.vjp(conv, x, w)[1](dy)[0])
    weight_grad = jax.jit(lambda x, w, dy: jax.vjp(conv, x, w)[1](dy)[1])
    return [_best_ms(lambda: jax.block_until_ready(forward(x, w)), repeats),
            _best_ms(lambda: jax.block_until_ready(input_grad(x, w, dy)), repeats),
            _best_ms(lambda: jax.block_until_ready(weight_grad(x, w, dy)), repeats)]


def torch_kernels(batch, size, channels, repeats):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=generator)
    w = 0.05 * torch.randn(channels, channels, 3, 3, generator=generator)
    dy = torch.randn(batch, channels, size, size, generator=generator)

    def backward(which):
        return torch.ops.aten.convolution_backward(dy, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                   which)

    with torch.no_grad():
        return [_best_ms(lambda: torch.nn.functional.conv2d(x, w, padding=1), repeats),
                _best_ms(lambda: backward([True, False, False]), repeats),
                _best_ms(lambda: backward([False, True, False]), repeats)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", default="")
    args = parser.parse_args()
    lines = ["# 3×3 convolution kernels: XLA vs PyTorch (float32, CPU)", "",
             f"- JAX: {throughput.device_description()}; PyTorch: {torch.get_num_threads()} threads",
             f"- Versions: {throughput.versions()}, torch {torch.__version__}",
             f"- XLA_FLAGS: `{os.environ.get('XLA_FLAGS', '')}`",
             f"- Load before: `{throughput.load_average()}`", "",
             "| shape (N, H, W, C→C) | GFLOP | XLA fwd ms | XLA ∂x ms | XLA ∂W ms | PyTorch fwd ms | PyTorch ∂x ms "
             "| PyTorch ∂W ms | ∂W XLA ÷ PyTorch |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    loads = [throughput.one_minute_load()]
    for size, channels in SHAPES:
        gflop = 2 * args.batch * size * size * 9 * channels * channels / 1e9
        jx = jax_kernels(args.batch, size, channels, args.repeats)
        tt = torch_kernels(args.batch, size, channels, args.repeats)
        loads.append(throughput.one_minute_load())
        row = (f"| {args.batch}, {size}, {size}, {channels}→{channels} | {gflop:.2f} | "
               + " | ".join(f"{v:.1f}" for v in (*jx, *tt)) + f" | {jx[2] / tt[2]:.2f}× |")
        lines.append(row)
        print(row, flush=True)
    lines += ["", f"- Load after: `{throughput.load_average()}`", f"- {throughput.load_verdict(loads)}",
              "- Each entry: the best of the repeats, one call of the compiled kernel (JAX) or the aten op."]
    print("\n".join(lines[-3:]))
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Where the iCT train step's time goes, op by op: cmjax (XLA) and PyTorch (diffusers UNet2DModel) side by side.

The same step as `bench/vs_pytorch.py` (same network, weights, batch and math). cmjax's step is traced with the
JAX profiler; each executed HLO instruction (a "thunk" of XLA:CPU, a kernel elsewhere) is matched to the
optimised HLO of the compiled step and put in a category:

  conv forward / conv input-grad   convolutions with the network's own small windows (an input gradient is a
                                   forward convolution over the output gradient; XLA names both `convolution`)
  conv weight-grad                 convolutions whose window is the activation's spatial size (∂L/∂W)
  matmul                           dot (attention, linear layers, the time embedding)
  reductions                       fusions that reduce (GroupNorm statistics, softmax, losses, sums)
  layout                           transposes and copies (layout changes between ops)
  rng                              random-bit generation (dropout masks, noise)
  elementwise                      the other fusions (activations, the optimizer, EMA, scalings)

For each category: milliseconds per step during which at least one op of it ran (the union of its ops'
intervals over every thread, so concurrent ops are not counted twice) and its share of the summed categories.
PyTorch's side is `torch.profiler`'s self CPU time per aten op, grouped the same way where the names allow
(PyTorch's `convolution_backward` computes the input and weight gradients in one op).

    .venv/bin/python bench/profile_step.py --model imagenet64_adm_small --batch 8 --steps 2
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# vs_pytorch first: it imports torch and diffusers before anything imports TensorFlow (after it, diffusers'
# import segfaults; see its note).
import vs_pytorch  # noqa: E402

# isort: split
import jax  # noqa: E402
import numpy as np  # noqa: E402
import throughput  # noqa: E402
import torch  # noqa: E402

from cmjax.data import pipeline  # noqa: E402

CATEGORIES = ("conv forward / input-grad", "conv weight-grad", "matmul", "reductions", "layout", "rng",
              "elementwise", "other")

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S.*?\s([a-z][\w\-]*)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_WINDOW = re.compile(r"window=\{size=([\dx]+)")


def hlo_categories(hlo_text: str) -> dict[str, str]:
    """Instruction name → category, for every instruction of the optimised HLO module `hlo_text`."""
    computations: dict[str, list[tuple[str, str, str]]] = {}
    current = None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head and "=" not in line.split("{")[0]:
            current = head.group(1)
            computations[current] = []
            continue
        inst = _INSTRUCTION.match(line)
        if inst and current is not None:
            computations[current].append((inst.group(1), inst.group(2), line))

    def inner_lines(name, seen=()):
        """(opcode, line) of every instruction of computation `name` and of the computations it calls."""
        found = []
        for _, opcode, line in computations.get(name, ()):
            found.append((opcode, line))
            for callee in _CALLS.findall(line):
                if callee not in seen:
                    found += inner_lines(callee, (*seen, name))
        return found

    categories = {}
    for comp in computations.values():
        for name, opcode, line in comp:
            categories[name] = _category(opcode, name, line, inner_lines)
    return categories


def _category(opcode, name, line, inner_lines) -> str:
    if opcode == "convolution":
        window = _WINDOW.search(line)
        size = max((int(s) for s in window.group(1).split("x")), default=1) if window else 1
        return "conv weight-grad" if size > 7 else "conv forward / input-grad"
    if opcode == "dot":
        return "matmul"
    if opcode in ("rng-bit-generator", "rng"):
        return "rng"
    if opcode in ("transpose", "copy", "copy-start", "copy-done"):
        return "layout"
    if opcode in ("reduce", "reduce-window"):
        return "reductions"
    if opcode != "fusion":
        return "other"
    inner = [pair for callee in _CALLS.findall(line) for pair in inner_lines(callee)]
    ops = {op for op, _ in inner}
    convolutions = [inner_line for op, inner_line in inner if op == "convolution"]
    if convolutions:
        kinds = {_category("convolution", name, conv, inner_lines) for conv in convolutions}
        return "conv weight-grad" if "conv weight-grad" in kinds else "conv forward / input-grad"
    if "dot" in ops:
        return "matmul"
    if "rng-bit-generator" in ops or ("shift-right-logical" in ops and "xor" in ops):
        return "rng"
    if "reduce" in ops:
        return "reductions"
    if ops <= _DATA_MOVEMENT or "transpose" in name or "copy" in name:
        return "layout"
    return "elementwise"


_DATA_MOVEMENT = {"transpose", "copy", "bitcast", "parameter", "reshape", "broadcast", "slice", "concatenate",
                  "pad", "tuple", "get-tuple-element", "dynamic-slice", "dynamic-update-slice", "constant"}


def _union_ms(intervals) -> float:
    total, end = 0.0, -1.0
    for start, stop in sorted(intervals):
        if start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total / 1e9  # ps → ms


def jax_profile(step: throughput.Step, steps: int) -> tuple[dict[str, float], list[tuple[str, str, float]]]:
    """(category → ms per step, top ops [(name, category, ms per step)]) of `steps` traced steps."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    categories = hlo_categories(step.compiled.as_text())
    step.run(2)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        step.run(steps)
        jax.profiler.stop_trace()
        space = xplane_pb2.XSpace()
        with open(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0], "rb") as f:
            space.ParseFromString(f.read())
    per_op = collections.defaultdict(list)
    for plane in space.planes:
        for line in plane.lines:
            base = line.timestamp_ns * 1000
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if name in categories:
                    start = base + event.offset_ps
                    per_op[name].append((start, start + event.duration_ps))
    by_category = collections.defaultdict(list)
    ops = []
    for name, intervals in per_op.items():
        by_category[categories[name]].extend(intervals)
        ops.append((name, categories[name], _union_ms(intervals) / steps))
    return ({c: _union_ms(v) / steps for c, v in by_category.items()},
            sorted(ops, key=lambda o: -o[2])[:15])


def torch_category(name: str) -> str:
    n = name.lower()
    if "convolution_backward" in n:
        return "conv backward (input + weight)"
    if "conv" in n:
        return "conv forward / input-grad"
    if any(k in n for k in ("addmm", "bmm", "::mm", "matmul", "linear", "baddbmm", "attention")):
        return "matmul"
    if any(k in n for k in ("group_norm", "sum", "mean", "softmax", "norm", "var")):
        return "reductions"
    if any(k in n for k in ("copy", "contiguous", "permute", "transpose", "clone", "cat")):
        return "layout"
    if any(k in n for k in ("rand", "bernoulli", "dropout", "normal")):
        return "rng"
    return "elementwise"


def torch_profile(side, x, labels, steps: int) -> tuple[dict[str, float], list[tuple[str, str, float]]]:
    side.run(x, labels, 2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        side.run(x, labels, steps)
    ops = [(e.key, torch_category(e.key), e.self_cpu_time_total / 1e3 / steps) for e in prof.key_averages()
           if e.self_cpu_time_total > 0 and not e.key.startswith("ProfilerStep")]
    by_category = collections.defaultdict(float)
    for _, category, ms in ops:
        by_category[category] += ms
    return dict(by_category), sorted(ops, key=lambda o: -o[2])[:15]


def _table(title, by_category, ops, wall_ms) -> list[str]:
    total = sum(by_category.values())
    lines = ["", f"### {title}: {wall_ms:.0f} ms per step (wall, untraced)", "",
             "| category | ms per step | share |", "|---|---:|---:|"]
    for category, ms in sorted(by_category.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {category} | {ms:.1f} | {100 * ms / total:.1f} % |")
    lines += ["", "| top ops | category | ms per step |", "|---|---|---:|"]
    lines += [f"| `{name}` | {category} | {ms:.1f} |" for name, category, ms in ops]
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="imagenet64_adm_small", choices=vs_pytorch.UNET_MODELS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="profiled steps (after 2 untraced warm-up steps)")
    parser.add_argument("--dropout", type=float, default=None, help="default: the preset's")
    parser.add_argument("--skip_torch", action="store_true")
    parser.add_argument("--output", default="", help="also write the markdown report to this file")
    args = parser.parse_args()

    config = vs_pytorch.bench_config(args.model, args.batch, "float32", args.dropout)
    lines = [f"# iCT train step, op profile: {args.model}, float32, batch {args.batch}", "",
             f"- JAX device: {throughput.device_description()}; PyTorch: cpu, {torch.get_num_threads()} threads",
             f"- Versions: {throughput.versions()}, torch {torch.__version__}",
             f"- Command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`",
             f"- XLA_FLAGS: `{os.environ.get('XLA_FLAGS', '')}`",
             f"- Load before: `{throughput.load_average()}`"]
    print("\n".join(lines), flush=True)
    loads = [throughput.one_minute_load()]
    step = throughput.Step(config)
    step.run(2)
    jax_wall = 1e3 * step.run(args.steps) / args.steps
    jax_cats, jax_ops = jax_profile(step, args.steps)
    loads.append(throughput.one_minute_load())
    lines += _table("cmjax (XLA)", jax_cats, jax_ops, jax_wall)
    if not args.skip_torch:
        side = vs_pytorch.TorchICT(step.module, step.state.params, config, torch.device("cpu"))
        images = pipeline.to_model_range(step.batch["image"])
        x = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())
        labels = (torch.from_numpy(np.array(step.batch["label"])).long()
                  if config.model.get("num_classes") else None)
        side.run(x, labels, 1)
        start = time.perf_counter()
        side.run(x, labels, args.steps)
        torch_wall = 1e3 * (time.perf_counter() - start) / args.steps
        torch_cats, torch_ops = torch_profile(side, x, labels, args.steps)
        loads.append(throughput.one_minute_load())
        lines += _table("PyTorch (eager)", torch_cats, torch_ops, torch_wall)
    lines += ["", f"- Load after: `{throughput.load_average()}`", f"- {throughput.load_verdict(loads)}"]
    print("\n".join(lines[7:]))
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Compile time of the trainer's step on one CPU device: where it goes, and XLA's defaults against cmjax's.

Each (model, variant) runs in a fresh subprocess (XLA reads its flags once per process; no persistent
compilation cache), which builds the trainer's own step (`cmjax.train_step.make_train_step`, state donated)
and reports: Python tracing to a jaxpr, lowering to StableHLO, XLA's compile (wall and process CPU seconds:
CPU seconds suffer less from other jobs on a shared machine), the op counts before and after XLA's
optimisation, the number of kernels XLA:CPU emits (fusions and other thunks, each its own LLVM module), and
images/s of the compiled step (median of timed windows) with CPU seconds per image. Variants run
interleaved per model, so their ratios share one load.

    nice -n 5 .venv/bin/python bench/compile_time.py --output bench/results/compile_time_cpu.md
    .venv/bin/python bench/compile_time.py --models digits_unet --variants xla_default,cmjax,O0,unsafe_rbg
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

# Models: (throughput.MODELS-style dataset, config.model overrides applied over the named preset or config).
# - mlp: configs/digits.py's residual MLP (the demo's network, 0.92M parameters), 8×8×1.
# - digits_unet: configs/default.py's UNet (755k parameters, 32 channels, (1, 2), attention at 4×4,
#   dropout 0.1), 8×8×1: the network DESIGN §6 timed at 39 s.
# - ncsnpp_small: configs/cifar10_ict.py's NCSN++ (mult (2, 2, 2), 4 BigGAN blocks per level, attention at
#   16, FIR, progressive residual input, Fourier 0.02, dropout 0.3) at nf 32 instead of 128, 32×32×3.
MODELS = ("mlp", "digits_unet", "ncsnpp_small")

# Variants: (XLA compiler options for the step, config overrides). "cmjax" is what the library now passes on
# CPU (`train_step.compiler_options`); the others are the alternatives measured.
VARIANTS = {
    "xla_default": ({}, {}),
    "cmjax": (None, {}),  # filled from cmjax.train_step in the worker
    "O0": ({"xla_backend_optimization_level": 0}, {}),
    "O1": ({"xla_backend_optimization_level": 1}, {}),
    "no_expensive_llvm": ({"xla_llvm_disable_expensive_passes": True}, {}),
    "unsafe_rbg": ({}, {"rng_impl": "unsafe_rbg"}),
    "no_dropout": ({}, {"model.dropout": 0.0}),
}


def model_config(model: str, batch: int):
    import ml_collections
    import throughput

    from configs import common, digits

    if model == "mlp":
        config = throughput.make_config("digits", "ict", batch, "float32")
        config.model = digits.get_config().model
    elif model == "digits_unet":
        config = throughput.make_config("digits", "ict", batch, "float32")
    elif model == "ncsnpp_small":
        net = common.ncsnpp_cifar10(dropout=0.3, fourier_scale=0.02)
        net.nf = 32
        throughput.MODELS["ncsnpp_small"] = ("cifar10", dict(net))
        config = throughput.make_config("ncsnpp_small", "ict", batch, "float32")
    else:
        raise ValueError(f"unknown model {model!r}; models: {MODELS}")
    assert isinstance(config.model, ml_collections.ConfigDict)
    return config


def _count_ops(text: str, pattern: str) -> int:
    return len(re.findall(pattern, text, flags=re.M))


def worker(model: str, variant: str, batch: int, steps: int, repeats: int) -> dict:
    import jax

    jax.config.update("jax_compilation_cache_dir", None)  # every compile is a first compile
    import throughput

    from cmjax import methods, optim, train_step

    durations: dict[str, float] = {}

    def listen(event: str, duration: float, **_):
        if event.startswith("/jax/core/compile/"):
            name = event.rsplit("/", 1)[-1]
            durations[name] = durations.get(name, 0.0) + duration

    jax.monitoring.register_event_duration_secs_listener(listen)
    options, overrides = VARIANTS[variant]
    if options is None:
        options = train_step.compiler_options(jax.devices()) or {}
    config = model_config(model, batch)
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    step = throughput.Step(config, compile_step=False)
    _, learning_rate_fn = optim.make_optimizer(config.optim, config.total_steps)
    step_fn = train_step.make_train_step(config, step.module, methods.objective_from_config(config),
                                         step.optimizer, learning_rate_fn)
    jitted = jax.jit(step_fn, donate_argnums=0, compiler_options=options or None)
    durations.clear()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    lowered = jitted.lower(step.state, step.batch, None)
    lower_wall, lower_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    compiled = lowered.compile()
    compile_wall, compile_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    before = lowered.as_text()
    after = compiled.as_text()
    step.compiled = compiled
    step.teacher_params = None
    step.run(2)  # warm-up
    rates, cpu_per_image = [], []
    for _ in range(repeats):
        cpu0 = time.process_time()
        rates.append(batch * steps / step.run(steps))
        cpu_per_image.append((time.process_time() - cpu0) / (batch * steps))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {
        "model": model, "variant": variant, "options": options, "overrides": overrides,
        "params": step.num_params, "batch": batch,
        "trace_s": durations.get("jaxpr_trace_duration", float("nan")),
        "to_mlir_s": durations.get("jaxpr_to_mlir_module_duration", float("nan")),
        "lower_s": lower_wall, "lower_cpu_s": lower_cpu,
        "compile_s": compile_wall, "compile_cpu_s": compile_cpu,
        "stablehlo_ops": _count_ops(before, r"^\s*(%\S+ = )?\"?(stablehlo|chlo|func\.call|call)"),
        "hlo_ops_after": _count_ops(after, r"^\s*(ROOT )?%\S+ = "),
        "kernels": _count_ops(after.split("\nENTRY")[-1], r"^\s*(ROOT )?%\S+ = \S+ (fusion|convolution|dot|"
                              r"custom-call|reduce-window|reduce|copy|transpose|scatter|rng-bit-generator|while)\("),
        "images_per_s": statistics.median(rates), "cpu_s_per_image": statistics.median(cpu_per_image),
        "flops": float(cost.get("flops", 0.0)) if cost else 0.0,
        "loss": step.last_loss,
    }


def run_worker(model: str, variant: str, args) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join(["--xla_force_host_platform_device_count=1", *flags])
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", model, variant, "--batch", str(args.batch),
           "--steps", str(args.steps), "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    for line in out.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"worker {model}/{variant} failed:\n{out.stderr[-3000:]}")


def row(r: dict, base: dict | None) -> str:
    ratio = (f"{r['compile_s'] / base['compile_s']:.2f}× / {r['compile_cpu_s'] / base['compile_cpu_s']:.2f}×"
             if base else "—")
    speed = f"{r['images_per_s'] / base['images_per_s']:.2f}×" if base else "—"
    return (f"| {r['model']} | {r['variant']} | {r['params']:,} | {r['trace_s']:.1f} | {r['lower_s']:.1f} "
            f"| {r['compile_s']:.1f} | {r['compile_cpu_s']:.1f} | {ratio} | {r['stablehlo_ops']:,} "
            f"| {r['hlo_ops_after']:,} | {r['kernels']:,} | {r['images_per_s']:.1f} | {speed} "
            f"| {1e3 * r['cpu_s_per_image']:.1f} | {r['loss']:.4g} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default="xla_default,cmjax", help=f"comma-separated of {sorted(VARIANTS)}; "
                        "the first is the baseline of the ratios")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed window")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.batch, args.steps, args.repeats)), flush=True)
        return
    import jax
    import throughput

    lines = ["# Compile time of the train step on one CPU device: XLA's defaults against cmjax's", "",
             f"- Device: {jax.devices()[0].device_kind} (host), {os.cpu_count()} cores, one XLA device per worker",
             f"- Versions: {throughput.versions()}",
             f"- Command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`",
             "- The machine is shared by 6 agents' jobs: absolute seconds carry the load of the moment; the ratios "
             "of variants run back to back in one run matter more. CPU seconds (all threads of the worker) "
             "suffer less from the load than wall seconds.",
             f"- Load before: `{throughput.load_average()}`", "",
             "| model | variant | params | trace s | lower s | compile s | compile CPU s | compile ÷ baseline "
             "(wall / CPU) | StableHLO ops | HLO ops after | kernels | images/s | speed ÷ baseline "
             "| CPU ms/image | loss |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    loads, results = [throughput.one_minute_load()], []
    for model in args.models.split(","):
        base = None
        for variant in args.variants.split(","):
            r = run_worker(model, variant, args)
            loads.append(throughput.one_minute_load())
            results.append(r)
            lines.append(row(r, base))
            print(lines[-1], flush=True)
            base = base or r
    options = {r["variant"]: r["options"] for r in results}
    lines += ["", f"- Load after: `{throughput.load_average()}`", f"- {throughput.load_verdict(loads)}",
              f"- Compiler options per variant: `{json.dumps(options)}`; config overrides: "
              f"`{json.dumps({r['variant']: r['overrides'] for r in results})}`",
              f"- Batch {args.batch}, iCT (two network applications and one backward per step), float32, RAdam, "
              "state donated. trace: Python → jaxpr; lower: trace + StableHLO; compile: XLA (HLO passes, LLVM per "
              "kernel); kernels: instructions of the optimised entry computation that XLA:CPU emits as their own "
              "code (fusions, convolutions, dots, reductions, copies, loops)."]
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(lines) + "\n")
    print("\n".join(lines[-4:]))


if __name__ == "__main__":
    main()

"""Train-step throughput of cmjax: images/s, compile time, peak memory, XLA-counted FLOPs and MFU.

The step is the trainer's own (`cmjax.train_step.make_train_step`, jitted with the state donated, as
`train_and_evaluate` does) on one device, fed a fixed random uint8 batch so that only the step is timed.
FLOPs are XLA's cost analysis of the compiled step; MFU = FLOPs / step time / the device's peak dense
bf16 rate (`cmjax.aot.CHIPS`; MFU is left blank on devices the table does not know, e.g. CPUs).

    .venv/bin/python bench/throughput.py --model digits --methods edm,ict,cd --batch 128
    .venv/bin/python bench/throughput.py --model imagenet64_adm --dtype bfloat16 --batch 64   # a GPU / TPU
"""
from __future__ import annotations

import argparse
import copy
import importlib
import os
import platform
import statistics
import subprocess
import sys
import time

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from cmjax import aot, methods, models, optim, sharding, train_state, train_step  # noqa: E402
from cmjax import workdir as workdir_lib  # noqa: E402
from configs import default  # noqa: E402

_ADM_IMAGENET64 = dict(
    name="unet", image_size=64, in_channels=3, out_channels=3, model_channels=192, channel_mult=(1, 2, 3, 4),
    num_res_blocks=3, attention_resolutions=(32, 16, 8), num_head_channels=64, use_scale_shift_norm=True,
    resblock_updown=True, dropout=0.0, num_classes=1000, dtype="float32", remat=False)

# Model presets: (dataset whose image shape the step uses, config.model).
MODELS = {
    # The default config's UNet: 8×8×1, 32 channels, (1, 2), attention at 4×4.
    "digits": ("digits", dict(default.get_config().model)),
    # iCT's CIFAR-10 NCSN++ (dropout 0.3, Fourier scale 0.02): 56M parameters.
    "cifar10_ncsnpp": ("cifar10", dict(name="ncsnpp", dropout=0.3, fourier_scale=0.02, dtype="float32",
                                       remat=False)),
    # The CM ImageNet-64 ADM release: 296M parameters, 1000 classes.
    "imagenet64_adm": ("imagenet64", _ADM_IMAGENET64),
    # ImageNet-64-shaped ADM reduced to fit CPU runs: 64 channels, mult (1, 2, 2, 2), 1 res block, attention
    # at 16 and 8, same block types, scale-shift norm, resblock up/down and 1000 classes.
    "imagenet64_adm_small": ("imagenet64", dict(_ADM_IMAGENET64, model_channels=64, channel_mult=(1, 2, 2, 2),
                                                num_res_blocks=1, attention_resolutions=(16, 8))),
}


def peak_flops(device) -> float | None:
    """The chip's dense bf16 peak from the compile report's table (`cmjax.aot.CHIPS`); None for CPUs."""
    chip = aot.chip_of(device)
    return chip.peak_bf16_flops if chip else None


def device_description() -> str:
    d = jax.devices()[0]
    return f"{d.platform} ({d.device_kind}), {jax.local_device_count()} local device(s), host {platform.machine()}"


def versions() -> str:
    flax_version = importlib.import_module("flax").__version__
    optax_version = importlib.import_module("optax").__version__
    return (f"jax {jax.__version__}, jaxlib {jax.lib.__version__}, flax {flax_version}, optax {optax_version}, "
            f"numpy {np.__version__}, python {platform.python_version()}")


def load_average() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return " ".join(f"{v:.2f}" for v in os.getloadavg())


def one_minute_load() -> float:
    return os.getloadavg()[0]


def load_verdict(loads) -> str:
    """One line on the 1-minute load averages sampled during a run, against the machine's core count.

    A run whose load exceeds the cores had other work competing for them: its rates, and even its ratios
    (frameworks suffer differently from oversubscription), are not what an idle machine gives. Such a run is
    flagged LOADED; a run within the cores is only said to be within them, never "quiet" (the load average
    counts runnable threads, not who else used the caches or memory bandwidth)."""
    cores = os.cpu_count() or 1
    peak = max(loads)
    spread = f"1-minute load {min(loads):.2f}–{peak:.2f} over {len(loads)} samples, {cores} cores"
    if peak > cores:
        return f"**LOADED: {spread}; the load exceeded the core count, so these numbers are not an idle machine's.**"
    return f"{spread}: the load stayed within the core count."


def make_config(model: str, method: str, batch: int, dtype: str, *, optimizer: str = "radam",
                learning_rate: float = 1e-4, ema_rates=(0.9999,), dropout: float | None = None,
                remat: bool = False, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """A trainer config for `model` (a MODELS preset) and `method` (edm | ict | cd) at `batch` and `dtype`."""
    data_name, model_config = MODELS[model]
    config = default.get_config()
    config.data.name = data_name
    config.batch_size = batch
    config.total_steps = 400_000
    config.ema_rates = tuple(ema_rates)
    model_config = copy.deepcopy(model_config)
    model_config.update(overrides or {})
    model_config["dtype"] = dtype
    model_config["remat"] = remat
    if model_config["name"] == "unet":
        model_config["attention_dtype"] = dtype
    if dropout is not None:
        model_config["dropout"] = dropout
    config.model = ml_collections.ConfigDict(model_config)
    config.optim.optimizer = optimizer
    config.optim.learning_rate = learning_rate
    if method == "cd":
        methods.select(config, "cd", num_scales=18, teacher_solver="heun")
    elif method == "ict":
        methods.select(config, "ict", s0=10, s1=1280, p_mean=-1.1, p_std=2.0)
    else:
        methods.select(config, method)
    return config


class Step:
    """The trainer's compiled step for one config on one device, with its state, a batch and its costs."""

    def __init__(self, config, *, donate: bool = True, device=None, compile_step: bool = True):
        device = device or jax.devices()[0]
        self.config = config
        self.mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=[device])
        self.module = models.get(config.model)
        objective = methods.objective_from_config(config)
        optimizer, lr_fn = optim.make_optimizer(config.optim, config.total_steps)
        self.optimizer = optimizer
        abstract, shardings = workdir_lib.abstract_train_state(config, self.module, self.mesh)
        teacher = self.module if config.method.name == "cd" else None
        step_fn = train_step.make_train_step(config, self.module, objective, optimizer, lr_fn, teacher_module=teacher)
        keep_target = methods.get(config.method.name).keeps_target
        self.state = jax.jit(
            lambda key: train_state.create(models.init_params(self.module, config, key), optimizer,
                                           config.ema_rates, keep_target),
            out_shardings=shardings)(jax.random.key(config.seed))
        self.teacher_params = (jax.tree.map(jnp.copy, self.state.params) if teacher is not None else None)
        rng = np.random.default_rng(0)
        shape = (config.batch_size, *models.image_shape(config))
        batch = {"image": rng.integers(0, 256, shape, dtype=np.uint8),
                 "label": rng.integers(0, max(int(config.model.get("num_classes") or 1), 1),
                                       (config.batch_size,), dtype=np.int32)}
        self.batch = jax.device_put(batch, sharding.batch_sharding(self.mesh))
        self.num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(self.state.params))
        if not compile_step:
            return
        jitted = jax.jit(step_fn, donate_argnums=0 if donate else ())
        start = time.perf_counter()
        lowered = jitted.lower(self.state, self.batch, self.teacher_params)
        self.lower_s = time.perf_counter() - start
        start = time.perf_counter()
        self.compiled = lowered.compile()
        self.compile_s = time.perf_counter() - start
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        self.flops = float(cost.get("flops", 0.0)) if cost else 0.0
        self.memory = self.compiled.memory_analysis()

    def peak_memory_bytes(self) -> int | None:
        """Arguments + outputs + temporaries − donated (aliased) buffers, from XLA's memory analysis."""
        m = self.memory
        if m is None:
            return None
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)

    def run(self, steps: int) -> float:
        """Runs `steps` steps; returns the wall seconds (after the last result is ready)."""
        start = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.compiled(self.state, self.batch, self.teacher_params)
        jax.block_until_ready((self.state, metrics))
        self.last_loss = float(metrics["loss"])
        return time.perf_counter() - start


def measure(step: Step, steps: int, repeats: int, warmup: int = 2) -> list[float]:
    """Images/s of `repeats` timed windows of `steps` steps each, after `warmup` untimed steps."""
    step.run(warmup)
    return [step.config.batch_size * steps / step.run(steps) for _ in range(repeats)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits", choices=sorted(MODELS))
    parser.add_argument("--methods", default="edm,ict,cd", help="comma-separated: edm, ict, cd (Heun teacher)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows (the median is reported)")
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--no_donate", action="store_true", help="do not donate the state (to measure donation)")
    parser.add_argument("--output", default="", help="also write the markdown report to this file")
    args = parser.parse_args()

    lines = [f"# Train-step throughput: {args.model}, {args.dtype}, batch {args.batch}", "",
             f"- Device: {device_description()}",
             f"- Versions: {versions()}",
             f"- Command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`",
             f"- Load before: `{load_average()}`"]
    peak = peak_flops(jax.devices()[0])
    lines.append(f"- Peak dense bf16: {peak / 1e12:.0f} TFLOP/s" if peak else
                 "- Peak: unknown for this device kind (MFU not computed)")
    rows = ["", "| method | params | images/s (median) | windows | step ms | compile s | peak memory MiB "
                "| step GFLOPs | achieved TFLOP/s | MFU |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    loads = [one_minute_load()]
    for method in args.methods.split(","):
        config = make_config(args.model, method, args.batch, args.dtype, remat=args.remat)
        step = Step(config, donate=not args.no_donate)
        rates = measure(step, args.steps, args.repeats)
        loads.append(one_minute_load())
        median = statistics.median(rates)
        step_s = args.batch / median
        achieved = step.flops / step_s
        mem = step.peak_memory_bytes()
        mfu = f"{100 * achieved / peak:.1f} %" if peak else "—"
        row = (f"| {method} | {step.num_params:,} | {median:.1f} | {', '.join(f'{r:.1f}' for r in rates)} "
               f"| {1e3 * step_s:.1f} | {step.lower_s + step.compile_s:.1f} "
               f"| {'—' if mem is None else f'{mem / 2**20:.0f}'} | {step.flops / 1e9:.2f} "
               f"| {achieved / 1e12:.3f} | {mfu} |")
        rows.append(row)
        print(row, flush=True)
        del step
    lines += rows
    lines += ["", f"- Load after: `{load_average()}`", f"- {load_verdict(loads)}",
              "- Step GFLOPs: XLA cost analysis of the whole compiled step (loss, backward, optimizer, EMA); "
              "compile s: lower + XLA compile; peak memory: arguments + outputs + temporaries − donated buffers."]
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(lines) + "\n")
    print("\n".join(lines[-3:]))


if __name__ == "__main__":
    main()

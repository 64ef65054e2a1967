"""First compile vs restart: what the persistent compilation cache (`config.compilation_cache_dir`) saves.

Runs the CLI twice on one fresh workdir, as a user's job and its restart would: `--config.total_steps=N`, then
the same command with 2N (it resumes from step N). The cache is the default, WORKDIR/jax_cache. Reports the first
step's seconds (compile included; `train.py` logs it), each process's wall time, and the cache's entries after
each run: a restart that adds no entry loaded every cached executable (train step and samplers) from it.

    .venv/bin/python bench/compile_cache.py --config=configs/digits.py:smoke_unet
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import throughput  # noqa: E402

_FIRST_STEP = re.compile(r"First step ([\d.]+) s")


def _run(args, workdir, steps):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    env["PYTHONPATH"] = ROOT
    command = [sys.executable, "-m", "cmjax.main", f"--config={args.config}", f"--workdir={workdir}",
               f"--config.total_steps={steps}", f"--config.ckpt_every={steps}", f"--config.log_every={steps}",
               f"--config.data.data_dir={args.data_dir}", *args.overrides]
    start = time.perf_counter()
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
    first = _FIRST_STEP.search(out.stderr)
    cache = os.path.join(workdir, "jax_cache")
    entries = set(os.listdir(cache)) if os.path.isdir(cache) else set()
    return float(first.group(1)) if first else float("nan"), wall, entries


def _name(entry: str) -> str:
    """The jitted function's name of a cache entry ("jit_step_fn-<hash>…")."""
    return entry.split("-")[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/digits.py:smoke_unet")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), "cmjax_bench_tfds"))
    parser.add_argument("--output", default="")
    args, args.overrides = parser.parse_known_args()  # the rest: more --config.* overrides
    lines = [f"# Compilation cache: first run vs restart, {args.config}", "",
             f"- Versions: {throughput.versions()}",
             f"- Command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`",
             f"- Load before: `{throughput.load_average()}`"]
    print("\n".join(lines), flush=True)
    loads = [throughput.one_minute_load()]
    with tempfile.TemporaryDirectory() as root:
        workdir = os.path.join(root, "run")
        first = _run(args, workdir, args.steps)
        loads.append(throughput.one_minute_load())
        restart = _run(args, workdir, 2 * args.steps)
        loads.append(throughput.one_minute_load())
    lines += ["", "| run | first step s (compile included) | process wall s | cache entries after |",
              "|---|---:|---:|---:|",
              f"| first (empty cache, steps 0→{args.steps}) | {first[0]:.1f} | {first[1]:.1f} | {len(first[2])} |",
              f"| restart (steps {args.steps}→{2 * args.steps}) | {restart[0]:.1f} | {restart[1]:.1f} "
              f"| {len(restart[2])} |", "",
              f"**Restart ÷ first, first step: {restart[0] / first[0]:.2f}×; process: {restart[1] / first[1]:.2f}×.**",
              "", "Cached by the first run (JAX keeps executables that took ≥ 1 s to compile): "
              + ", ".join(f"`{_name(e)}`" for e in sorted(first[2])) + ". Compiled anew by the restart: "
              + (", ".join(f"`{_name(e)}`" for e in sorted(restart[2] - first[2])) or "nothing") + ".",
              "", f"- Load after: `{throughput.load_average()}`", f"- {throughput.load_verdict(loads)}"]
    print("\n".join(lines[5:]))
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""How good is a digits EDM teacher's probability-flow ODE itself, solved ever more exactly?

A distilled consistency model (CD, sCD) learns the map of the teacher's PF-ODE from noise to data; the teacher's
number in docs/quality.md is its 35-evaluation EDM sampler (Heun, N = 18 from σ_max = 80). When the sampler's
discretisation error happens to help the classifier's score, a student that learned the exact ODE lands below
that number. This script samples finished teacher runs (bench/quality.py's digits_edm / digits_edm_trigflow) with
EDM's Heun sampler over a grid of N and σ_max, on the same 4,096 noises (EMA 0.998) and the same classifier
scores as bench/quality.py, and writes a table:

  XLA_FLAGS=--xla_force_host_platform_device_count=1 JAX_PLATFORMS=cpu \\
      .venv/bin/python bench/teacher_ode_digits.py --workroot=/tmp/tode --out=bench/results/teacher_ode_digits_cpu.md

Train the teachers first: `bench/quality.py --part=digits --digits_methods=edm,edm_trigflow --workroot=/tmp/tode`.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import quality  # noqa: E402  (bench/quality.py: the digits bench's constants)

TEACHERS = ("edm", "edm_trigflow")


def sweep(workdir: str, seed: int, num_steps: list[int], sigma_maxes: list[float], log=print) -> list[dict]:
    """Scores of `workdir`'s EMA teacher sampled by `solvers.edm_sampler` at every (σ_max, N)."""
    from cmjax import evaluate, methods, models, parameterization, sharding, solvers
    from cmjax import workdir as workdir_lib
    from cmjax.metrics import digits as digits_metric

    config = workdir_lib.read_run_config(workdir)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1})
    module, params, config, _ = workdir_lib.load_params(workdir, mesh, ema_rate=quality.DIGITS_EMA, config=config)
    classifier = digits_metric.train_classifier(data_dir=config.data.data_dir)
    reference = digits_metric.reference_images("train", data_dir=config.data.data_dir, dataset=config.data.name)
    shape = (quality.DIGITS_SAMPLES, *models.image_shape(config))
    kind = methods.parameterization_kind(config)
    apply_fn = lambda p, x, t: module.apply({"params": p}, x, t, None, train=False)  # noqa: E731
    denoise = lambda x, s: parameterization.denoise(apply_fn, params, x, s, kind=kind)  # noqa: E731
    rows = []
    for sigma_max in sigma_maxes:
        for n in num_steps:
            start = time.time()
            images, nfe = solvers.edm_sampler(denoise, jax.random.key(seed), shape, n, sigma_max=sigma_max)
            q = digits_metric.sample_quality(classifier, evaluate.to_uint8(np.clip(images, -1, 1)) / 127.5 - 1.0,
                                             reference)
            row = {"sigma_max": sigma_max, "num_steps": n, "evaluations": nfe, "frechet": float(q["frechet"]),
                   "confident": float(q["confident_fraction"]), "class_min": float(min(q["class_fractions"])),
                   "class_max": float(max(q["class_fractions"])), "seconds": time.time() - start}
            log(json.dumps(row))
            rows.append(row)
    return rows


def report(results: dict) -> str:
    lines = ["| teacher | σ_max | N (Heun) | evaluations | Fréchet | confident | classes |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for teacher, rows in results.items():
        for r in rows:
            lines.append(f"| {teacher} | {r['sigma_max']:g} | {r['num_steps']} | {r['evaluations']} | "
                         f"{r['frechet']:.2f} | {100 * r['confident']:.1f} % | "
                         f"{100 * r['class_min']:.1f}–{100 * r['class_max']:.1f} % |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workroot", required=True, help="bench/quality.py's --workroot of the teacher runs")
    parser.add_argument("--teachers", default=",".join(TEACHERS), help="of " + ", ".join(TEACHERS))
    parser.add_argument("--num_steps", default="6,10,18,40,80,160")
    parser.add_argument("--sigma_max", default="80,10")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    results = {}
    for teacher in args.teachers.split(","):
        workdir = os.path.join(args.workroot, f"digits_{teacher}")
        if not os.path.isdir(workdir):
            raise SystemExit(f"error: no teacher run at {workdir!r}; train it with bench/quality.py "
                             f"--part=digits --digits_methods={teacher} --workroot={args.workroot}")
        results[teacher] = sweep(workdir, args.seed, [int(n) for n in args.num_steps.split(",")],
                                 [float(s) for s in args.sigma_max.split(",")])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    text = report(results)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()

"""Quality proofs on CPU: every method (EDM teacher, CD, CT 2023, iCT, ECT) on problems whose answer is known.

  XLA_FLAGS=--xla_force_host_platform_device_count=1 JAX_PLATFORMS=cpu \
      nice -n 5 .venv/bin/python bench/quality.py [--part=2d|digits|all] [--out=bench/results/quality_cpu.md]

2-D (`cmjax/demo_2d.py`): a ring of 8 Gaussians and a 4×4 checkerboard, exact densities. An EDM MLP is
trained first (its 35-evaluation EDM sampler is the teacher's number); CD distils it, ECT starts from its
weights, CT and iCT train from scratch. Every sample set is scored by the sliced Wasserstein distance to
one fresh data set, beside the distance between two fresh data sets (the floor). The 2-step sampler's
middle σ is chosen per problem and method on a grid, with a selection sample and data set separate from
the reported ones; the fixed default σ = 0.8 is reported beside it. One run is one training seed (`--seed`);
runs of several seeds, side by side, are merged (`--merge`) and the bars judged on the means over seeds
(bench/results/quality_cpu.md: seeds 0–3).

Digits (`cmjax/train.py` on `configs/digits.py`, one CPU device): the same five methods through the real
training loop, CD and ECT from the EDM run's workdir, scored by the in-repo digit classifier
(`cmjax/metrics/digits.py`): Fréchet distance in its features and the fraction of confident samples.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from cmjax import demo_2d, toy_problems  # noqa: E402

CONSISTENCY_METHODS = ("cd", "ct", "ict", "ect", "sct", "scd")
MIDDLE_SIGMAS = (0.1, 0.2, 0.4, 0.8, 1.6)  # the 2-step grid searched (openai searched `ts` likewise)
DEFAULT_MIDDLE_SIGMA = 0.8  # configs' sample.two_step_sigma
# Training steps per method in 2-D. CT and iCT learn from scratch without a teacher and need more: iCT's ring
# 1-step distance is 0.058 after 3k steps and 0.028 after 10k (cosine decay; docs/quality.md).
STEPS_2D = {"edm": 3000, "cd": 3000, "ct": 10000, "ict": 10000, "ect": 3000}
# sCT learns from scratch (its ring 1-step distance is 0.062 after 1k steps, tests/test_continuous.py). sCD
# distils an EDM model trained with TrigFlow's time conditioning (`TRIGFLOW_TEACHER`) and starts from its
# weights, as sCM does, for 6k steps with the tangent warm-up at the recipe's fraction of the run
# (`SCD_WARMUP_FRACTION`); what each of these moved is in docs/quality.md ("sCD").
STEPS_2D.update(sct=4000, scd=6000)
# imagenet64_scd's 10k warm-up steps of 600k (FastGen config_scm.py:51, config_scd_in64.py:67). The digits and
# ring runs once used 10k of 14k and a tenth of the run: most of a short run spent below the full tangent.
SCD_WARMUP_FRACTION = 10_000 / 600_000
# sCD's teacher: EDM's objective with the time input t = arctan(σ/σd) (`losses.edm_loss` parameterization_kind
# "trigflow"), the denoiser an sCD student can start from (its openai-style 250·ln σ reading does not train).
TRIGFLOW_TEACHER = (("parameterization_kind", "trigflow"),)

PROBLEMS_2D = {
    "ring": lambda: toy_problems.ring_of_gaussians(num_modes=8, radius=1.0, std=0.1),
    "checkerboard": lambda: toy_problems.Checkerboard(num_squares=4, half_width=1.0),
}


# ----------------------------------------------------------------------------------------------
# 2-D.


def best_middle_sigma(model, problem, num: int, seed: int) -> tuple[float, dict[float, float]]:
    """The grid σ with the lowest 2-step distance on a selection set (its own data and noise)."""
    score = demo_2d.Scorer(problem, jax.random.key(10_000 + seed), num)
    key = jax.random.key(20_000 + seed)
    scores = {s: score(demo_2d.two_step(model, key, num, s)) for s in MIDDLE_SIGMAS}
    return min(scores, key=scores.get), scores


def run_2d(problem_name: str, steps: dict, eval_samples: int, seed: int, log=print,
           methods=CONSISTENCY_METHODS) -> dict:
    """Trains EDM, then CD/CT/iCT/ECT on one 2-D problem (`steps[method]` steps each); returns distances."""
    problem = PROBLEMS_2D[problem_name]()
    base = demo_2d.Demo2DConfig(eval_samples=eval_samples, seed=seed)
    keys = jax.random.split(jax.random.key(seed + 1), 5)
    score = demo_2d.Scorer(problem, keys[0], eval_samples)
    results: dict = {"floor": score.floor()}

    start = time.time()
    edm = demo_2d.train(dataclasses.replace(base, method="edm", steps=steps["edm"]), problem, log=log)
    teacher_samples, nfe = demo_2d.edm_sample(edm.denoiser(), keys[1], eval_samples)
    results["edm"] = {"teacher": score(teacher_samples), "nfe": nfe, "steps": steps["edm"],
                      "seconds": time.time() - start}
    if isinstance(problem, toy_problems.GaussianMixture):  # the exact denoiser through the same sampler
        results["exact_teacher"] = score(demo_2d.edm_sample(problem.denoise, keys[1], eval_samples)[0])

    trigflow_edm = None
    if "scd" in methods:  # sCD's own teacher (TRIGFLOW_TEACHER), trained like the EDM teacher above
        start = time.time()
        trigflow_edm = demo_2d.train(dataclasses.replace(base, method="edm", steps=steps["edm"],
                                                         settings=TRIGFLOW_TEACHER), problem, log=log)
        results["edm_trigflow"] = {"teacher": score(demo_2d.edm_sample(trigflow_edm.denoiser(), keys[1],
                                                                       eval_samples)[0]),
                                   "steps": steps["edm"], "seconds": time.time() - start}
    for method in (m for m in CONSISTENCY_METHODS if m in methods):
        start = time.time()
        settings = (("tangent_warmup_steps", int(steps[method] * SCD_WARMUP_FRACTION)),) if method == "scd" else ()
        config = dataclasses.replace(base, method=method, steps=steps[method], settings=settings)
        teacher = {"cd": edm, "scd": trigflow_edm}.get(method)
        init = {"ect": edm, "scd": trigflow_edm}.get(method)
        model = demo_2d.train(config, problem, log=log,
                              teacher=demo_2d.model_teacher(teacher) if teacher is not None else None,
                              init_params=init.params if init is not None else None)
        chosen, selection = best_middle_sigma(model, problem, eval_samples, seed)
        results[method] = {
            "one_step": score(demo_2d.one_step(model, keys[2], eval_samples)),
            "two_step_default": score(demo_2d.two_step(model, keys[3], eval_samples, DEFAULT_MIDDLE_SIGMA)),
            "two_step_chosen": score(demo_2d.two_step(model, keys[3], eval_samples, chosen)),
            "middle_sigma": chosen, "selection": selection, "steps": steps[method],
            "seconds": time.time() - start,
        }
        log(f"{problem_name} {method}: {json.dumps(results[method])}")
    return results


# ----------------------------------------------------------------------------------------------
# Digits: the real training loop.

# Step counts: iCT is configs/digits.py itself (the `make demo` run, 18k steps); EDM, the teacher, 3k. Each uses
# that config's Adam 1e-3 with cosine decay over its steps, except EDM (constant). CD starts from the teacher (as
# both CM releases) and gets 6k: from a fresh init, or at 3k, it stayed 5–10 points below the teacher
# (docs/quality.md, "Methods against their teacher"). ECT gets iCT's 18k: at 3k and 9k its 1-step stayed below
# the teacher − 8 points.
DIGITS_STEPS = {"edm": 3000, "cd": 6000, "ct": 3000, "ict": 18000, "ect": 18000}
# MeanFlow (configs/digits.py with method meanflow, its ImageNet defaults): its step costs what iCT's does (4.05
# against 4.04 forward passes, bench/results/flops_cpu.md), so iCT's 18k steps are the same CPU budget.
DIGITS_STEPS["meanflow"] = 18000
# sCT's step costs what iCT's does (4.05 forwards, bench/results/flops_cpu.md): iCT's 18k steps; sCD's adds a
# teacher forward (5.05): 14k steps is the same budget. Both with configs/default.py's sCM settings, the
# learned adaptive weight (the MLP's log-variance head) as cifar10_sct.py trains.
DIGITS_STEPS.update(sct=18000, edm_trigflow=3000, scd=14000)  # edm_trigflow: sCD's teacher (TRIGFLOW_TEACHER)
DIGITS_METHODS = tuple(DIGITS_STEPS)
DIGITS_EMA = 0.998  # the evaluation EMA reported (configs/digits.py keeps 0.998 and 0.999)
# 4,096 samples: a class fraction near 14 % has a standard error of 0.5 points (1.1 at 1,024, where one draw of
# the demo model showed the 8 at 16.4 % against 14.3–14.6 % on three 4,096-sample draws; docs/quality.md).
DIGITS_SAMPLES = 4096


def digits_method_config(method: str, steps: int, teacher_workdir: str) -> ml_collections.ConfigDict:
    """configs/digits.py (the iCT recipe) with `config.method` replaced for the other methods."""
    from configs import digits

    config = digits.get_config()
    config.total_steps = steps
    config.mesh.data = 1
    config.eval_every = 0  # the bench scores the final checkpoint itself
    config.sample.metric_samples = 0
    config.ema_rates = (DIGITS_EMA,)
    config.ckpt_every = steps
    config.log_every = 250
    from cmjax import methods

    settings = {
        "edm": {},  # with a constant lr (below), as EDM trains
        # Karras weighting: with uniform weights f stays inaccurate at small σ (2-D evidence, docs/quality.md).
        "cd": {"num_scales": 18, "target_ema": 0.95, "distance": "l2", "weighting": "karras"},
        "ct": {"curriculum": "cm_adaptive", "s0": 2, "s1": 20, "mu0": 0.9, "distance": "l2"},
        "ect": {"stage_steps": max(1, steps // 4), "huber_c": 0.0},
    }
    if method in settings:
        methods.select(config, method, **settings[method])
        if methods.get(method).needs_teacher or methods.get(method).starts_from_teacher:
            config.teacher.workdir = teacher_workdir
    elif method == "meanflow":
        methods.select(config, "meanflow")  # the ImageNet JAX release's defaults (configs/default.py)
    elif method in ("sct", "scd"):
        warmup = {"scd": {"tangent_warmup_steps": int(steps * SCD_WARMUP_FRACTION)}}.get(method, {})
        methods.select(config, method, weighting="adaptive_prior", **warmup)
        config.model.logvar_head = True
        if method == "scd":  # from the TrigFlow-conditioned EDM teacher (`edm_trigflow`), starting from its weights
            config.teacher.workdir = teacher_workdir
            config.teacher.init_student = True
    elif method == "edm_trigflow":
        methods.select(config, "edm", **dict(TRIGFLOW_TEACHER))
    elif method != "ict":
        raise ValueError(f"Unknown method {method!r}.")
    if method in ("edm", "edm_trigflow"):
        # EDM's own recipe: constant lr with an EMA. At 3,000 steps the cosine decay of the iCT config cost the
        # teacher 82 % → 75 % confident and Fréchet 3.7 → 6.0 (2026-11-26, seed 0).
        config.optim.decay = "constant"
    return config


def digits_quality(workdir: str, method: str, seed: int, *, ema_rate: float = DIGITS_EMA,
                   num_samples: int = DIGITS_SAMPLES, require_finished: bool = True) -> dict:
    """1-step and 2-step (teacher: 35-evaluation EDM sampler) quality of a digits run's final EMA model (or, with
    `require_finished=False`, its newest checkpoint); colour digits (`color_digits32`) through the grey mapping."""
    from cmjax import evaluate, methods, models, parameterization, sharding, solvers
    from cmjax import workdir as workdir_lib
    from cmjax.metrics import digits as digits_metric

    config = workdir_lib.read_run_config(workdir)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1})
    module, params, config, step = workdir_lib.load_params(workdir, mesh, ema_rate=ema_rate, config=config)
    if require_finished and step != config.total_steps:
        raise ValueError(f"The run in {workdir!r} stopped at step {step} of {config.total_steps}; "
                         "finish it (rerun without --digits_score_only) before scoring it.")
    classifier = digits_metric.train_classifier(data_dir=config.data.data_dir)
    reference = digits_metric.reference_images("train", data_dir=config.data.data_dir, dataset=config.data.name)
    shape = models.image_shape(config)

    def quality(images):
        q = digits_metric.sample_quality(classifier, evaluate.to_uint8(images) / 127.5 - 1.0, reference)
        fractions = q["class_fractions"]
        return {"frechet": q["frechet"], "confident": q["confident_fraction"],
                "class_min": min(fractions), "class_max": max(fractions)}

    if method in ("edm", "edm_trigflow"):  # the EDM sampler over D, in the teacher's own time conditioning
        apply_fn = lambda p, x, t: module.apply({"params": p}, x, t, None, train=False)  # noqa: E731
        kind = methods.parameterization_kind(config)
        denoise = lambda x, s: parameterization.denoise(apply_fn, params, x, s, kind=kind)  # noqa: E731
        images, nfe = jax.jit(lambda key: solvers.edm_sampler(denoise, key, (num_samples, *shape), 18)[0],
                              )(jax.random.key(seed)), 35
        return {"teacher": quality(np.clip(images, -1, 1)), "nfe": nfe, "steps": step}

    kind = methods.parameterization_kind(config)
    sigma_max = methods.noise_range(config)["sigma_max"]  # where the run's sampling starts
    if kind == parameterization.MEANFLOW:  # MeanFlow samples by time: x = ε − u(ε, 0, 1), and 1 → 0.5 → 0
        def sample_times(times, key):
            return evaluate.generate(module, params, key, mesh=mesh, num_images=num_samples, image_shape=shape,
                                     sigmas=times, parameterization_kind=kind)[0]

        key = jax.random.key(seed)
        two = quality(sample_times([1.0, 0.5], key))
        return {"one_step": quality(sample_times([1.0], key)), "two_step_default": two, "two_step_chosen": two,
                "middle_sigma": "t 0.5", "selection": {}, "steps": step}

    def sample(sigmas, key):
        images, _ = evaluate.generate(module, params, key, mesh=mesh, num_images=num_samples, image_shape=shape,
                                      sigmas=sigmas, sigma_max=sigma_max, parameterization_kind=kind)
        return images

    selection = {s: quality(sample([sigma_max, s], jax.random.key(20_000 + seed)))["frechet"]
                 for s in MIDDLE_SIGMAS}
    chosen = min(selection, key=selection.get)
    key = jax.random.key(seed)
    return {"one_step": quality(sample([sigma_max], key)),
            "two_step_default": quality(sample([sigma_max, DEFAULT_MIDDLE_SIGMA], key)),
            "two_step_chosen": quality(sample([sigma_max, chosen], key)),
            "middle_sigma": chosen, "selection": selection, "steps": step}


def apply_overrides(config: ml_collections.ConfigDict, items) -> ml_collections.ConfigDict:
    """`key=value` items (dotted keys of the config, Python literals: `teacher.init_student=True`,
    `optim.learning_rate=1e-4`, `optim.decay='constant'`) set on `config`; an unknown key is an error."""
    import ast

    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--digits_set {item!r} is not key=value (e.g. optim.learning_rate=1e-4).")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word: a string
        *parents, leaf = key.split(".")
        parent = config
        for name in parents:
            parent = parent.get(name) if isinstance(parent, ml_collections.ConfigDict) else None
        if not isinstance(parent, ml_collections.ConfigDict) or leaf not in parent:
            raise ValueError(f"--digits_set {item!r}: the config has no key {key!r}.")
        parent[leaf] = value
    return config


def run_digits(workroot: str, seed: int, steps: dict, methods=DIGITS_METHODS, log=print,
               score_only: bool = False, overrides=(), teacher_workroot: str = "") -> dict:
    """Trains `methods` on digits (EDM first: CD and ECT use its workdir, an earlier run's when EDM is not among
    them) and scores each; `score_only` scores the finished runs already in `workroot` (no training).
    `overrides` (`key=value` items, `apply_overrides`) change every trained method's config (ablations: run one
    method per call); the teachers are read from `teacher_workroot` (default: `workroot`)."""
    from cmjax import train
    from cmjax.metrics import digits as digits_metric

    unknown = sorted(set(methods) - set(DIGITS_METHODS))
    if unknown:
        raise ValueError(f"Unknown digits method(s) {unknown}; methods: {list(DIGITS_METHODS)}.")
    results = {"samples": DIGITS_SAMPLES}
    classifier = digits_metric.train_classifier()
    results["floor"] = {k: v for k, v in digits_metric.floor(classifier).items()
                        if k in ("frechet", "confident_fraction", "class_fractions")}
    for method in (m for m in DIGITS_METHODS if m in methods):
        workdir = os.path.abspath(os.path.join(workroot, f"digits_{method}"))
        # CD and ECT use the EDM run; sCD the TrigFlow-conditioned one (train edm_trigflow with it or before it).
        teacher_workdir = os.path.abspath(os.path.join(teacher_workroot or workroot,
                                                       "digits_edm_trigflow" if method == "scd" else "digits_edm"))
        start = time.time()
        trained = {}
        if not score_only:
            config = apply_overrides(digits_method_config(method, steps[method], teacher_workdir), overrides)
            train.train_and_evaluate(config, workdir)
            trained = {"train_seconds": time.time() - start}
        if overrides:
            trained["overrides"] = list(overrides)
        results[method] = dict(digits_quality(workdir, method, seed), **trained, seconds=time.time() - start)
        log(f"digits {method}: {json.dumps(results[method])}")
    return results


# ----------------------------------------------------------------------------------------------
# Report.


def _fmt(x, digits=3):
    return f"{x:.{digits}f}"


def _seconds(method_results: dict) -> str:
    """Training seconds of a digits run; "—" when it was only scored (`--digits_score_only`)."""
    return f"{method_results['train_seconds']:.0f}" if "train_seconds" in method_results else "—"


def summarize_2d(by_seed: dict) -> dict:
    """Means over training seeds of one 2-D problem (`by_seed`: seed → `run_2d`'s result), and per-seed ratios.

    One seed's distances move by ±15 % (its own models, data set, noise and projections: the ring's EDM
    teacher scored 0.013–0.019 over four seeds, docs/quality.md), so the bars are judged on the means.
    """
    seeds = sorted(by_seed, key=int)
    runs = [by_seed[s] for s in seeds]

    def mean(get):
        return float(np.mean([get(r) for r in runs]))

    summary = {"seeds": seeds, "floor": mean(lambda r: r["floor"]), "teacher": mean(lambda r: r["edm"]["teacher"]),
               "methods": [m for m in CONSISTENCY_METHODS if all(m in r for r in runs)]}
    for method in summary["methods"]:
        m = {k: mean(lambda r: r[method][k]) for k in ("one_step", "two_step_default", "two_step_chosen", "seconds")}
        m["ratio"] = m["one_step"] / summary["teacher"]
        m["ratio_per_seed"] = [r[method]["one_step"] / r["edm"]["teacher"] for r in runs]
        m["two_beats_one"] = sum(r[method]["two_step_chosen"] < r[method]["one_step"] for r in runs)
        summary[method] = m
    return summary


def checks_2d(by_seed: dict) -> list[str]:
    """The issue's bars per method on the means over seeds: 2-step < 1-step; CD and iCT 1-step within 2× of
    the teacher (mean 1-step distance ÷ mean teacher distance)."""
    s = summarize_2d(by_seed)
    notes = []
    for method in s["methods"]:
        m = s[method]
        bars = [f"2-step < 1-step: {'yes' if m['two_step_chosen'] < m['one_step'] else 'NO'} "
                f"({m['two_beats_one']} of {len(s['seeds'])} seeds)"]
        if method in ("cd", "ict", "sct", "scd"):
            bars.append(f"1-step ≤ 2× teacher: {'yes' if m['ratio'] <= 2 else 'NO'} ({m['ratio']:.2f}× on the "
                        f"means; per seed " + ", ".join(f"{x:.2f}" for x in m["ratio_per_seed"]) + ")")
        notes.append(f"{method}: " + ", ".join(bars))
    return notes


def checks_digits(r: dict) -> list[str]:
    """The issues' bars on digits: 2-step Fréchet < 1-step; iCT (`make demo`'s recipe) 1-step ≥ 80 % confident
    with every class between 5 % and 15 % of the samples."""
    notes = []
    for method in (m for m in CONSISTENCY_METHODS if m in r):
        one, two = r[method]["one_step"], r[method]["two_step_chosen"]
        bars = [f"2-step < 1-step: {'yes' if two['frechet'] < one['frechet'] else 'NO'}"]
        if method == "ict":
            bars.append(f"1-step ≥ 80 % confident: {'yes' if one['confident'] >= 0.8 else 'NO'}")
            balanced = 0.05 <= one["class_min"] and one["class_max"] <= 0.15
            bars.append(f"classes within 5–15 %: {'yes' if balanced else 'NO'}")
        notes.append(f"{method}: " + ", ".join(bars))
    return notes


def markdown(results: dict, commands: list, wall: float, load: tuple) -> str:
    lines = ["# Quality proofs on CPU (`bench/quality.py`)", "",
             "Commands (run side by side, one CPU device each, "
             "`XLA_FLAGS=--xla_force_host_platform_device_count=1 JAX_PLATFORMS=cpu`):", ""]
    lines += [f"    {c}" for c in commands] + [
             "", f"Wall time: {wall / 60:.1f} min (the longest part); load average at the end "
             f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min; the 2 cores were shared with other "
             "jobs).", ""]
    for name in PROBLEMS_2D:
        if name not in results:
            continue
        by_seed = results[name]  # seed → run_2d's result
        s = summarize_2d(by_seed)
        runs = [by_seed[seed] for seed in s["seeds"]]
        trained = s["methods"]  # the consistency methods every seed of this problem trained
        nfe, edm_steps = runs[0]["edm"]["nfe"], runs[0]["edm"]["steps"]
        exact = all("exact_teacher" in r for r in runs)
        lines += [f"## 2-D {name}: sliced Wasserstein distance to {results['eval_samples']} fresh points "
                  f"(lower is better), training seed{'s' * (len(runs) > 1)} {', '.join(map(str, s['seeds']))}", "",
                  "Each seed trains every model afresh and draws its own evaluation data, noise and projections; "
                  "the bars are judged on the means over seeds. 1-step distances per seed (the floor is two "
                  f"fresh data sets; the EDM teacher ({edm_steps} steps) samples with {nfe} evaluations):", "",
                  "| seed | floor | EDM teacher | " + ("exact denoiser, same sampler | " if exact else "")
                  + " | ".join(trained) + " |",
                  "|---|" + "---:|" * (2 + exact + len(trained))]
        for seed, r in zip(s["seeds"], runs):
            lines.append(f"| {seed} | {_fmt(r['floor'])} | {_fmt(r['edm']['teacher'])} | "
                         + (f"{_fmt(r['exact_teacher'])} | " if exact else "")
                         + " | ".join(_fmt(r[m]["one_step"]) for m in trained) + " |")
        if len(runs) > 1:
            exact_mean = float(np.mean([r["exact_teacher"] for r in runs])) if exact else 0.0
            lines.append(f"| **mean** | **{_fmt(s['floor'])}** | **{_fmt(s['teacher'])}** | "
                         + (f"{_fmt(exact_mean)} | " if exact else "")
                         + " | ".join(f"**{_fmt(s[m]['one_step'])}**" for m in trained) + " |")
        if all("edm_trigflow" in r for r in runs):
            per_seed = [r["edm_trigflow"]["teacher"] for r in runs]
            lines += ["", "sCD's teacher, EDM's objective with TrigFlow's time input t = arctan(σ/σd) (the same steps "
                      f"and sampler; sCD starts from its weights): {', '.join(_fmt(v) for v in per_seed)} "
                      f"(mean {_fmt(float(np.mean(per_seed)))})."]
        lines += ["", "Means over the seeds:", "",
                  "| method | steps | 1-step | 2-step, σ_mid = 0.8 | 2-step, chosen σ_mid | chosen σ_mid per seed | "
                  "1-step / teacher | per seed | train s |", "|---|---:|---:|---:|---:|---|---:|---|---:|"]
        for method in trained:
            m = s[method]
            lines.append(f"| {method} | {runs[0][method]['steps']} | {_fmt(m['one_step'])} | "
                         f"{_fmt(m['two_step_default'])} | {_fmt(m['two_step_chosen'])} | "
                         f"{', '.join(str(r[method]['middle_sigma']) for r in runs)} | {m['ratio']:.2f} | "
                         f"{', '.join(f'{x:.2f}' for x in m['ratio_per_seed'])} | {m['seconds']:.0f} |")
        lines += [""] + [f"- {n}" for n in checks_2d(by_seed)] + [""]
        lines += ["2-step selection distances per σ_mid (selection set):", ""]
        for seed, r in zip(s["seeds"], runs):
            lines.append(f"- seed {seed}: " + "; ".join(
                f"{m}: " + ", ".join(f"{sig}→{_fmt(v)}" for sig, v in r[m]["selection"].items())
                for m in trained))
        lines.append("")
    if "digits" in results:
        r = results["digits"]
        f = r["floor"]
        lines += [f"## Digits (real training loop, one CPU device, EMA {DIGITS_EMA}, "
                  f"{r.get('samples', 1024)} samples)", "",
                  "Fréchet distance in the digit classifier's features (lower is better) and the fraction of "
                  "samples classified with p ≥ 0.9; class fractions min–max.", "",
                  "| method | steps | 1-step Fréchet | 1-step confident | 1-step classes | 2-step (σ 0.8) Fréchet | "
                  "2-step (σ 0.8) confident | 2-step chosen σ | 2-step chosen Fréchet | 2-step chosen confident | "
                  "train s |", "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
                  f"| real test images (floor) | — | {_fmt(f['frechet'], 1)} | {f['confident_fraction']:.1%} | "
                  f"{min(f['class_fractions']):.1%}–{max(f['class_fractions']):.1%} | | | | | | |"]
        t = r["edm"]["teacher"] if "edm" in r else None
        lines += [] if t is None else [
            f"| edm teacher ({r['edm']['nfe']} evaluations) | {r['edm']['steps']} | {_fmt(t['frechet'], 1)} | "
            f"{t['confident']:.1%} | {t['class_min']:.1%}–{t['class_max']:.1%} | | | | | | "
            f"{_seconds(r['edm'])} |"]
        if "edm_trigflow" in r:
            t = r["edm_trigflow"]["teacher"]
            lines.append(f"| edm teacher, TrigFlow time input (sCD's; {r['edm_trigflow']['nfe']} evaluations) | "
                         f"{r['edm_trigflow']['steps']} | {_fmt(t['frechet'], 1)} | {t['confident']:.1%} | "
                         f"{t['class_min']:.1%}–{t['class_max']:.1%} | | | | | | {_seconds(r['edm_trigflow'])} |")
        for method in (m for m in (*CONSISTENCY_METHODS, "meanflow") if m in r):
            m = r[method]
            o, d, c = m["one_step"], m["two_step_default"], m["two_step_chosen"]
            label = method + (f" ({', '.join(m['overrides'])})" if m.get("overrides") else "")
            lines.append(f"| {label} | {m['steps']} | {_fmt(o['frechet'], 1)} | {o['confident']:.1%} | "
                         f"{o['class_min']:.1%}–{o['class_max']:.1%} | {_fmt(d['frechet'], 1)} | "
                         f"{d['confident']:.1%} | {m['middle_sigma']} | {_fmt(c['frechet'], 1)} | "
                         f"{c['confident']:.1%} | {_seconds(m)} |")
        lines += [""] + [f"- {n}" for n in checks_digits(r)] + [""]
        lines += ["2-step selection Fréchet per σ_mid (selection sample): "
                  + "; ".join(f"{m}: " + ", ".join(f"{s}→{v:.1f}" for s, v in r[m]["selection"].items())
                              for m in CONSISTENCY_METHODS if m in r), ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("2d", "digits", "all", "conv"), default="all",
                        help="conv: the colour-digits floor and the conv-net runs of --conv_workdirs (no training)")
    parser.add_argument("--conv_workdirs", default="", help="comma-separated runs of configs/digits.py:color_*")
    parser.add_argument("--conv_samples", type=int, default=1024)
    parser.add_argument("--steps_2d", default="",
                        help="override 2-D step counts: one number for every method, or e.g. ict=20000,ct=5000 "
                             "(default: STEPS_2D)")
    parser.add_argument("--eval_samples", type=int, default=16384)
    parser.add_argument("--seed", type=int, default=0,
                        help="training and evaluation seed; run several seeds side by side and --merge them "
                             "(the 2-D bars are judged on the means over the merged seeds)")
    parser.add_argument("--workroot", default="/tmp/cmjax_quality")
    parser.add_argument("--out", default="")
    parser.add_argument("--problems", default=",".join(PROBLEMS_2D))
    parser.add_argument("--methods_2d", default=",".join(CONSISTENCY_METHODS),
                        help="2-D: the consistency methods to train beside the EDM teacher")
    parser.add_argument("--digits_steps", default="",
                        help="override step counts, e.g. edm=600,cd=400 (default: DIGITS_STEPS)")
    parser.add_argument("--digits_methods", default=",".join(DIGITS_METHODS),
                        help="train and score only these (CD and ECT reuse --workroot's EDM run when edm is left out)")
    parser.add_argument("--digits_score_only", action="store_true",
                        help="score the finished digits runs in --workroot again (no training)")
    parser.add_argument("--digits_set", action="append", default=[], metavar="KEY=VALUE",
                        help="set a config key of every digits method trained (repeatable; ablations of one method, "
                             "e.g. --digits_methods=cd --digits_set=teacher.init_student=True)")
    parser.add_argument("--teacher_workroot", default="",
                        help="where the digits teachers' runs are (digits_edm, digits_edm_trigflow); "
                             "default --workroot")
    parser.add_argument("--json", default="", help="also write the raw results here")
    parser.add_argument("--merge", nargs="*", default=[],
                        help="write the report from --json files of parts run side by side (no training)")
    args = parser.parse_args(argv)
    if args.merge:
        return merge_reports(args.merge, args.out)
    if args.part == "conv":
        return conv_report(args.conv_workdirs.split(",") if args.conv_workdirs else [], args.seed,
                           args.conv_samples, args.out, argv)
    start = time.time()
    results: dict = {"eval_samples": args.eval_samples, "seed": args.seed}
    if args.part in ("2d", "all"):
        steps_2d = parse_steps(args.steps_2d, STEPS_2D)
        for name in args.problems.split(","):
            results[name] = run_2d(name, steps_2d, args.eval_samples, args.seed,
                                   methods=args.methods_2d.split(","))
    if args.part in ("digits", "all"):
        results["digits"] = run_digits(args.workroot, args.seed, parse_steps(args.digits_steps, DIGITS_STEPS),
                                       methods=args.digits_methods.split(","), score_only=args.digits_score_only,
                                       overrides=args.digits_set, teacher_workroot=args.teacher_workroot)
    wall = time.time() - start
    command = "nice -n 5 .venv/bin/python bench/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results.update(command=command.strip(), wall=wall, load=os.getloadavg())
    if args.json:  # first: the raw results survive a failure of the report below
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=float)
    report = markdown(_by_seed([results]), [results["command"]], wall, results["load"])
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)


def conv_report(workdirs, seed: int, num_samples: int, out: str, argv) -> None:
    """The `color_digits32` floor (real test images against train, through the grey mapping) and each conv-net
    run's newest checkpoint (every EMA rate), 1-step and 2-step, as a markdown report."""
    from cmjax import workdir as workdir_lib
    from cmjax.metrics import digits as digits_metric

    start, loads = time.time(), [os.getloadavg()[0]]
    classifier = digits_metric.train_classifier()
    lines = ["# Conv nets on colour digits (32×32×3): iCT through `python -m cmjax.main`", "",
             "Scored by the in-repo digit classifier through `cmjax.data.digits.to_digit_input` (luma, 4×4 mean "
             "pooling, ink relative to the border colour); Fréchet distance in its 64-d features against the colour "
             "train split mapped the same way.", "",
             "| images | steps | EMA | 1-step Fréchet / confident / classes | 2-step σ_mid 0.8 "
             "| 2-step, chosen σ_mid |",
             "|---|---:|---|---|---|---|"]

    def cell(q):
        return f"{q['frechet']:.1f} / {q['confident']:.1%} / {q['class_min']:.1%}–{q['class_max']:.1%}"

    for dataset in ("digits", "color_digits32"):
        f = digits_metric.floor(classifier, dataset=dataset)
        fr = f["class_fractions"]
        lines.append(f"| real test images, {dataset} (floor) | — | — | {f['frechet']:.1f} / "
                     f"{f['confident_fraction']:.1%} / {min(fr):.1%}–{max(fr):.1%} | | |")
    for workdir in workdirs:
        config = workdir_lib.read_run_config(workdir)
        for rate in config.ema_rates:
            q = digits_quality(workdir, "ict", seed, ema_rate=float(rate), num_samples=num_samples,
                               require_finished=False)
            loads.append(os.getloadavg()[0])
            lines.append(f"| {config.model.name} ({os.path.basename(workdir.rstrip('/'))}) | {q['steps']} | {rate} "
                         f"| {cell(q['one_step'])} | {cell(q['two_step_default'])} "
                         f"| {cell(q['two_step_chosen'])} (σ {q['middle_sigma']}) |")
            print(lines[-1], flush=True)
    lines += ["", f"- {num_samples} samples per cell, seed {seed}; 2-step σ_mid chosen over {list(MIDDLE_SIGMAS)} "
              "by Fréchet on a separate draw.",
              f"- Command: `nice -n 5 .venv/bin/python bench/quality.py {' '.join(argv or sys.argv[1:])}`; "
              f"{time.time() - start:.0f} s wall; 1-minute load {min(loads):.1f}–{max(loads):.1f} on "
              f"{os.cpu_count()} cores (a machine shared by 6 agents' jobs)."]
    report = "\n".join(lines) + "\n"
    print(report)
    if out:
        with open(out, "w") as f:
            f.write(report)


def parse_steps(spec: str, defaults: dict) -> dict:
    """Step counts per method: `defaults`, all replaced by a bare number, or some by `method=steps` items."""
    if spec.strip().isdigit():
        return {method: int(spec) for method in defaults}
    overrides = dict(item.split("=") for item in spec.split(",") if item)
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown} in {spec!r}; methods: {sorted(defaults)}.")
    return {method: int(overrides.get(method, n)) for method, n in defaults.items()}


def _by_seed(parts: list[dict]) -> dict:
    """The report's input from raw result parts: each 2-D problem as seed → `run_2d`'s result (a part without
    a "seed" ran seed 0, the default), every other key as is (later parts win)."""
    merged = {k: v for part in parts for k, v in part.items() if k not in PROBLEMS_2D}
    for part in parts:
        for name in PROBLEMS_2D:
            if name in part:
                merged.setdefault(name, {})[str(part.get("seed", 0))] = part[name]
    return merged


def merge_reports(paths, out: str) -> None:
    """One report from parts that ran concurrently (other problems, seeds or digits methods): wall time is the
    longest part's."""
    parts = [json.load(open(p)) for p in paths]
    merged = _by_seed(parts)
    # Digits methods may come from several parts (e.g. a rerun of edm, cd, ect, or a --digits_score_only
    # rescoring): later parts win per field, so a rescoring keeps the training run's seconds.
    merged_digits: dict = {}
    for part in parts:
        for k, v in part.get("digits", {}).items():
            merged_digits[k] = {**merged_digits[k], **v} if isinstance(v, dict) and k in merged_digits else v
    if merged_digits:
        merged["digits"] = merged_digits
    report = markdown(merged, [p["command"] for p in parts], max(p["wall"] for p in parts),
                      tuple(max(p["load"][i] for p in parts) for i in range(3)))
    print(report)
    if out:
        with open(out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()

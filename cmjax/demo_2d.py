"""Seconds-long learning proofs on 2-D problems with exactly known densities, for every objective.

`train` runs any objective of `cmjax.losses` (edm, cd, ct, ict, ect, sct, scd, meanflow, fm) on an MLP over 2-D
points drawn fresh every step, as chunks of steps inside one `lax.scan` (tiny networks are dispatch-bound). The
teacher of CD is either the mixture's exact denoiser or a trained EDM MLP; ECT starts from an EDM MLP's
weights. Quality is the sliced Wasserstein distance to fresh data, beside the distance between two fresh
data sets (the noise floor). `bench/quality.py` runs every method this way.

The demo (`make demo-2d`) distils the exact Gaussian-mixture teacher by CD:
  python -m cmjax.demo_2d --workdir=/tmp/demo_2d
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cmjax import losses, methods, models, optim, sampling, solvers, toy_problems
from cmjax import parameterization as pz

# The 2-D recipes of each method: the published settings where they transfer, the curricula sized for
# a few thousand steps (`total_steps` / `stage_steps` are filled in from the run's length).
RECIPES: dict[str, dict[str, Any]] = {
    "edm": {},
    # openai's ImageNet-64/LSUN CD setting (N = 40 there); μ = 0 (CIFAR-10's) learns far slower here.
    # Karras weighting (1/σ² + 1/σd²): with uniform weights the L2 loss of the small-σ pairs is ~c_out²
    # smaller and f stays inaccurate there (docs/quality.md). make demo-2d uses this recipe too.
    "cd": {"num_scales": 18, "target_ema": 0.95, "distance": "l2", "weighting": "karras"},
    # s1 = 150 (CIFAR-10's, for K = 800k) ends at μ = 0.9986: the target lags ~700 of 3k steps and CT
    # does not learn at all (1-step ≈ the data mean); s1 = 20 ends at μ = 0.9895.
    "ct": {"curriculum": "cm_adaptive", "s0": 2, "s1": 20, "mu0": 0.9, "distance": "l2"},
    "ict": {"s0": 10, "s1": 160},
    "ect": {"q": 2.0, "k": 8.0, "b": 1.0, "huber_c": 0.0},
    # sCM's CIFAR-10 time proposal and c = 0.1; the tangent warm-up is a tenth of the run (filled in below).
    "sct": {"p_mean": -1.0, "p_std": 1.4},
    "scd": {"p_mean": -1.0, "p_std": 1.4},
    # MeanFlow: the ImageNet JAX release's defaults (logit-normal (−0.4, 1.0), 75 % r = t, p = 1, c = 0.01).
    "meanflow": {},
    # Flow matching: SiT's defaults (t ~ U(0, 1)); sampled by the EDM Heun sampler over `pz.flow_denoise`.
    "fm": {},
}


@dataclasses.dataclass(frozen=True)
class Demo2DConfig:
    method: str = "cd"
    settings: tuple = ()  # (name, value) pairs overriding RECIPES[method]
    steps: int = 3000
    batch_size: int = 256
    learning_rate: float = 1e-3
    # Adam through `cmjax.optim`; cosine decay to 0 over the run: with a constant rate iCT's ring 1-step
    # distance stalls at 0.036–0.037 (10k and 20k steps), with cosine 10k steps reach 0.028 (docs/quality.md).
    learning_rate_decay: str = "cosine"
    hidden_dim: int = 128
    num_layers: int = 3
    eval_ema: float = 0.999
    log_every: int = 500
    eval_samples: int = 4096
    seed: int = 0

    def objective_settings(self, sigma_data: float) -> dict[str, Any]:
        """RECIPES[method] with this run's overrides, σ_data and curriculum lengths filled in."""
        accepted = losses.objective_settings(self.method)
        data_scale = {"sigma_data": sigma_data} if "sigma_data" in accepted else {}  # MeanFlow's path has none
        settings = dict(RECIPES[self.method], **data_scale, **dict(self.settings))
        if "total_steps" in accepted:
            settings.setdefault("total_steps", self.steps)
        if "stage_steps" in accepted:  # ECT: Δt halves four times over the run
            settings.setdefault("stage_steps", max(1, self.steps // 4))
        if "tangent_warmup_steps" in accepted:  # sCM: r reaches 1 a tenth of the way in (CIFAR-10: 10k of 350k)
            settings.setdefault("tangent_warmup_steps", max(1, self.steps // 10))
        return settings


@dataclasses.dataclass(frozen=True)
class Model2D:
    """A trained 2-D network with its preconditioning: `denoiser()` is D (edm) or f (consistency)."""

    module: Any
    params: Any
    sigma_data: float
    kind: str  # "edm" | "consistency" | "trigflow" | "trigflow_edm" | "meanflow" | "flow"
    sigma_max: float = pz.SIGMA_MAX  # where 1-step and 2-step sampling start: the objective's σ_max

    def apply(self, params, x_in, t_in):
        return self.module.apply({"params": params}, x_in, t_in)

    def average_velocity(self) -> Callable:
        """z, r, t ↦ u(z, r, t) of a MeanFlow model."""
        u = pz.meanflow_network(self.apply)
        return lambda z, r, t: u(self.params, z, r, t)

    def denoiser(self) -> Callable:
        return lambda x, s: pz.denoise(self.apply, self.params, x, s, kind=self.kind,
                                       sigma_data=self.sigma_data)


def exact_teacher(mixture: toy_problems.GaussianMixture, sigma_data: float):
    """(teacher_network, teacher_params) of a mixture's exact denoiser, as a parameterless EDM network."""
    return pz.network_from_denoiser(mixture.denoise, kind="edm", sigma_data=sigma_data), None


def model_teacher(model: Model2D):
    """(teacher_network, teacher_params) of a trained EDM model: its raw network in EDM form, dropout off (a
    TrigFlow-conditioned one read through `parameterization.teacher_time_input`, as the trainer does)."""
    if model.kind not in ("edm", "trigflow"):
        raise ValueError(f"A teacher must be an EDM model (kind edm or trigflow), got a {model.kind!r} one.")
    if model.kind == "edm":
        return model.apply, model.params
    return (lambda p, x_in, t_in, *rng: model.apply(p, x_in, pz.teacher_time_input(t_in, model.kind,
                                                                                   model.sigma_data)),
            model.params)


def make_optimizer(config: Demo2DConfig):
    """Adam (no warmup, no clipping) with `config.learning_rate` and `config.learning_rate_decay`."""
    optim_config = optim.default_config()
    optim_config.update(optimizer="adam", learning_rate=config.learning_rate, decay=config.learning_rate_decay)
    return optim.make_optimizer(optim_config, config.steps)[0]


def train(config: Demo2DConfig, problem, *, teacher=None, init_params=None, log=print) -> Model2D:
    """Trains `config.method` on fresh draws of `problem`; returns the evaluation-EMA model.

    `teacher`: (teacher_network, teacher_params) for CD (`exact_teacher` or `model_teacher`);
    `init_params`: starting weights (ECT starts from the EDM model's). `config.steps` is rounded up to a
    whole number of `log_every` chunks.
    """
    sigma_data = toy_problems.data_std(problem)
    module = models.get({"name": "mlp", "hidden_dim": config.hidden_dim, "num_layers": config.num_layers})
    objective = losses.make_objective(config.method, **config.objective_settings(sigma_data))
    teacher_network, teacher_params = teacher if teacher is not None else (None, None)
    key = jax.random.key(config.seed)
    if init_params is None:
        k = methods.time_inputs(config.method)
        init_params = module.init({"params": key}, jnp.zeros((1, problem.dim)),
                                  jnp.zeros((1,) if k == 1 else (1, k)))["params"]
    optimizer = make_optimizer(config)
    keeps_target = methods.get(config.method).keeps_target
    state = {"params": init_params, "ema": init_params, "opt": optimizer.init(init_params),
             "target": init_params if keeps_target else None}

    def network(p, x_in, t_in, rng):
        return module.apply({"params": p}, x_in, t_in, train=True, rngs={"dropout": rng})

    def ema(old, new, rate):
        return jax.tree.map(lambda o, n: rate * o + (1 - rate) * n, old, new)

    def train_step(state, step, teacher_params):
        data_key, loss_key = jax.random.split(jax.random.fold_in(key, step))
        x = problem.sample(data_key, config.batch_size)
        (loss, metrics), grads = jax.value_and_grad(objective, argnums=1, has_aux=True)(
            network, state["params"], x, loss_key, step, target_params=state["target"],
            teacher_params=teacher_params, teacher_network=teacher_network)
        updates, opt = optimizer.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        target = ema(state["target"], params, metrics["target_ema"]) if keeps_target else None
        return {"params": params, "ema": ema(state["ema"], params, config.eval_ema), "opt": opt,
                "target": target}, loss

    chunk = max(1, min(config.steps, config.log_every))

    @jax.jit
    def train_chunk(state, teacher_params, first_step):
        # The teacher is an argument, never a constant baked into the executable.
        return jax.lax.scan(lambda s, k: train_step(s, k, teacher_params), state,
                            first_step + jnp.arange(chunk))

    start = time.time()
    for first in range(0, config.steps, chunk):
        state, chunk_losses = train_chunk(state, teacher_params, jnp.int32(first))
        log(f"{config.method} step {first + chunk:5d}  loss {float(jnp.mean(chunk_losses)):.5f}  "
            f"({time.time() - start:.1f}s)")
    settings = config.objective_settings(sigma_data)
    kind = methods.parameterization_of(config.method, settings)
    sigma_max = settings.get("sigma_max", pz.SIGMA_MAX)
    return Model2D(module, state["ema"], sigma_data, kind, sigma_max)


# ----------------------------------------------------------------------------------------------
# Samplers and the distance to fresh data.


def one_step(model: Model2D, key, num: int):
    """x = f(σmax·z, σmax), unclipped (2-D data is not confined to [−1, 1]); MeanFlow: x = ε − u(ε, 0, 1)."""
    if model.kind == pz.MEANFLOW:
        return sampling.meanflow_sample(model.average_velocity(), key, (num, 2), [1.0])
    return sampling.one_step_sample(model.denoiser(), key, (num, 2), model.sigma_max, clip=False)


def two_step(model: Model2D, key, num: int, middle_sigma: float, middle_time: float = 0.5):
    """CM Algorithm 1 through [σmax, middle_sigma], unclipped; MeanFlow: jumps 1 → middle_time → 0."""
    if model.kind == pz.MEANFLOW:
        return sampling.meanflow_sample(model.average_velocity(), key, (num, 2), [1.0, middle_time])
    return sampling.multistep_sample(model.denoiser(), key, (num, 2), [model.sigma_max, middle_sigma],
                                     sigma_max=model.sigma_max, clip=False)


def edm_sample(denoise_fn, key, num: int, num_steps: int = 18):
    """The EDM teacher's deterministic sampler: 2N − 1 = 35 evaluations for N = 18."""
    return solvers.edm_sampler(denoise_fn, key, (num, 2), num_steps)


class Scorer:
    """Sliced Wasserstein distance to one fresh data set of `num` points, with fixed projections."""

    def __init__(self, problem, key, num: int):
        data_key, self._floor_key, self._proj_key = jax.random.split(key, 3)
        self.problem, self.num = problem, num
        self.data = problem.sample(data_key, num)

    def __call__(self, samples) -> float:
        return float(toy_problems.sliced_wasserstein(self._proj_key, samples, self.data))

    def floor(self) -> float:
        """The distance between two fresh data sets of the same size."""
        return self(self.problem.sample(self._floor_key, self.num))


def evaluate(model: Model2D, problem, config: Demo2DConfig, *, teacher_denoise=None, middle_sigma=0.8):
    """Distances to fresh data: 1-step, 2-step (via `middle_sigma`), the teacher's EDM sampler, the floor."""
    keys = jax.random.split(jax.random.key(config.seed + 1), 4)
    n = config.eval_samples
    score = Scorer(problem, keys[0], n)
    clouds = {"one_step": one_step(model, keys[1], n), "two_step": two_step(model, keys[2], n, middle_sigma)}
    metrics = {name: score(x) for name, x in clouds.items()}
    if teacher_denoise is not None:
        clouds["teacher"], metrics["teacher_nfe"] = edm_sample(teacher_denoise, keys[3], n)
        metrics["teacher_edm"] = score(clouds["teacher"])
    metrics["data_floor"] = score.floor()
    clouds["data"] = score.data
    return metrics, clouds


def _scatter_png(path, panels: dict, size=256):
    """Writes the sample clouds side by side as a PNG (pillow only)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size * len(panels), size + 20), "white")
    draw = ImageDraw.Draw(image)
    for j, (title, points) in enumerate(panels.items()):
        pts = np.asarray(points)
        xy = np.clip((pts / 1.6 + 1) / 2 * (size - 1), 0, size - 1)
        for px, py in xy:
            draw.point((j * size + px, 20 + size - 1 - py), fill=(30, 60, 200))
        draw.text((j * size + 6, 4), title, fill="black")
    image.save(path)


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="workdirs/demo_2d")
    parser.add_argument("--steps", type=int, default=Demo2DConfig.steps)
    args = parser.parse_args(argv)
    config = Demo2DConfig(method="cd", steps=args.steps)  # RECIPES["cd"]: Karras weighting, μ = 0.95
    mixture = toy_problems.ring_of_gaussians(num_modes=8, radius=1.0, std=0.1)
    teacher = exact_teacher(mixture, toy_problems.data_std(mixture))
    model = train(config, mixture, teacher=teacher)
    metrics, clouds = evaluate(model, mixture, config, teacher_denoise=mixture.denoise)
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    _scatter_png(os.path.join(args.workdir, "samples.png"), clouds)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {args.workdir}/metrics.json and {args.workdir}/samples.png")


if __name__ == "__main__":
    main()

"""A seconds-long learning proof: consistency distillation of an exact Gaussian-mixture teacher in 2-D.

The teacher is the mixture's exact denoiser (`toy_problems.GaussianMixture.denoise`), so its EDM
sampler is as good as 35 evaluations allow; a small MLP distilled from it with the CD objective should
sample in one step almost as well. Quality is the sliced Wasserstein distance to fresh data, beside the
distance between two fresh data sets (the noise floor).

  python -m cmjax.demo_2d --workdir=/tmp/demo_2d
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cmjax import losses, models, sampling, solvers, toy_problems
from cmjax import parameterization as pz


@dataclasses.dataclass(frozen=True)
class Demo2DConfig:
    steps: int = 3000
    batch_size: int = 256
    learning_rate: float = 1e-3
    hidden_dim: int = 128
    num_layers: int = 3
    num_scales: int = 18
    target_ema: float = 0.95  # openai's ImageNet-64/LSUN CD setting; 0 (CIFAR-10's) learns far slower here
    eval_ema: float = 0.999
    log_every: int = 500
    eval_samples: int = 4096
    seed: int = 0


def train_cd(config: Demo2DConfig, mixture: toy_problems.GaussianMixture, log=print):
    """Trains an MLP consistency model by CD from the mixture's exact denoiser; returns EMA params.

    `config.steps` is rounded up to a whole number of `log_every` chunks.
    """
    sigma_data = toy_problems.data_std(mixture)
    module = models.get({"name": "mlp", "hidden_dim": config.hidden_dim, "num_layers": config.num_layers})
    teacher = pz.network_from_denoiser(mixture.denoise, kind="edm", sigma_data=sigma_data)
    objective = losses.make_objective("cd", num_scales=config.num_scales, target_ema=config.target_ema,
                                      distance="l2", sigma_data=sigma_data)
    key = jax.random.key(config.seed)
    params = module.init({"params": key}, jnp.zeros((1, mixture.dim)), jnp.zeros((1,)))["params"]
    optimizer = optax.adam(config.learning_rate)
    state = {"params": params, "target": params, "ema": params, "opt": optimizer.init(params)}

    def network(p, x_in, t_in, rng):
        return module.apply({"params": p}, x_in, t_in, train=True, rngs={"dropout": rng})

    def train_step(state, step):
        step_key = jax.random.fold_in(key, step)
        data_key, loss_key = jax.random.split(step_key)
        x = mixture.sample(data_key, config.batch_size)
        (loss, metrics), grads = jax.value_and_grad(objective, argnums=1, has_aux=True)(
            network, state["params"], x, loss_key, step, target_params=state["target"],
            teacher_params=None, teacher_network=teacher)
        updates, opt = optimizer.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        mu = metrics["target_ema"]
        ema = lambda old, new, rate: jax.tree.map(lambda o, n: rate * o + (1 - rate) * n, old, new)  # noqa: E731
        return {"params": params, "target": ema(state["target"], params, mu),
                "ema": ema(state["ema"], params, config.eval_ema), "opt": opt}, loss

    # Tiny networks are dispatch-bound: run a chunk of steps per compiled call.
    chunk = max(1, min(config.steps, config.log_every))

    @jax.jit
    def train_chunk(state, first_step):
        return jax.lax.scan(train_step, state, first_step + jnp.arange(chunk))

    start = time.time()
    for first in range(0, config.steps, chunk):
        state, chunk_losses = train_chunk(state, jnp.int32(first))
        log(f"step {first + chunk:5d}  loss {float(jnp.mean(chunk_losses)):.5f}  ({time.time() - start:.1f}s)")
    return module, state["ema"], sigma_data


def evaluate(module, params, mixture, sigma_data, config: Demo2DConfig):
    """Sliced Wasserstein distances to fresh data: 1-step, 2-step, the teacher's EDM sampler, and the floor."""
    key = jax.random.key(config.seed + 1)
    n = config.eval_samples
    consistency_fn = lambda x, s: pz.consistency_denoise(  # noqa: E731
        lambda p, xi, ti: module.apply({"params": p}, xi, ti), params, x, s, sigma_data)
    shape = (n, mixture.dim)
    keys = jax.random.split(key, 6)
    one_step = sampling.one_step_sample(consistency_fn, keys[0], shape, clip=False)
    two_step = sampling.multistep_sample(consistency_fn, keys[1], shape, [pz.SIGMA_MAX, 0.8], clip=False)
    teacher, nfe = solvers.edm_sampler(lambda x, s: mixture.denoise(x, s), keys[2], shape, 18)
    fresh, other = mixture.sample(keys[3], n), mixture.sample(keys[4], n)
    swd = lambda a: float(toy_problems.sliced_wasserstein(keys[5], a, fresh))  # noqa: E731
    return {"one_step": swd(one_step), "two_step": swd(two_step), "teacher_edm": swd(teacher),
            "teacher_nfe": nfe, "data_floor": swd(other)}, {"one_step": one_step, "two_step": two_step,
                                                            "teacher": teacher, "data": fresh}


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
    config = Demo2DConfig(steps=args.steps)
    mixture = toy_problems.ring_of_gaussians(num_modes=8, radius=1.0, std=0.1)
    module, params, sigma_data = train_cd(config, mixture)
    metrics, clouds = evaluate(module, params, mixture, sigma_data, config)
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    _scatter_png(os.path.join(args.workdir, "samples.png"), clouds)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {args.workdir}/metrics.json and {args.workdir}/samples.png")


if __name__ == "__main__":
    main()

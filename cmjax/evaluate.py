"""Sampling from a trained consistency model across all devices, sample grids, and quality metrics.

`generate` draws images with the 1-step or the multistep sampler (CM Algorithm 1) as one jitted,
batch-sharded program: every device makes its share, and on several hosts every process runs it and
gets the global array. The periodic evaluation of the training loop and `--mode=sample` use it.
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from cmjax import parameterization, sampling, sharding


def consistency_fn_for(module, params, class_labels, *, sigma_data, sigma_min):
    """x, σ ↦ f_θ(x, σ) for a network in evaluation mode (dropout off)."""
    apply_fn = lambda p, x_in, t_in: module.apply({"params": p}, x_in, t_in, class_labels, train=False)  # noqa: E731
    return lambda x, sigma: parameterization.consistency_denoise(apply_fn, params, x, sigma, sigma_data, sigma_min)


def generate(module, params, key, *, mesh: Mesh, num_images: int, image_shape: Sequence[int],
             sigmas: Sequence[float], num_classes: int = 0, sigma_data=parameterization.SIGMA_DATA,
             sigma_min=parameterization.SIGMA_MIN, sigma_max=parameterization.SIGMA_MAX, parameterization_kind="consistency"):
    """`num_images` samples in [−1, 1] from the multistep sampler at `sigmas` ([σmax] = one step), sharded
    over the mesh's batch axes. Returns (images [N, H, W, C] float32 global array, labels or None)."""
    devices = sharding.batch_device_count(mesh)
    if num_images % devices:
        raise ValueError(f"num_images={num_images} must divide over the {devices} devices of the mesh.")
    shape = (num_images, *image_shape)
    out_sharding = sharding.batch_sharding(mesh)

    @jax.jit
    def _generate(params, key):
        label_key, noise_key = jax.random.split(key)
        labels = jax.random.randint(label_key, (num_images,), 0, num_classes) if num_classes else None
        if parameterization_kind == "edm":  # ECT models are EDM-parameterised (f(x, 0) = x)
            apply_fn = lambda p, x_in, t_in: module.apply({"params": p}, x_in, t_in, labels, train=False)  # noqa: E731
            fn = lambda x, s: parameterization.edm_denoise(apply_fn, params, x, s, sigma_data)  # noqa: E731
        else:
            fn = consistency_fn_for(module, params, labels, sigma_data=sigma_data, sigma_min=sigma_min)
        images = sampling.multistep_sample(fn, noise_key, shape, sigmas, sigma_min, sigma_max, clip=True)
        images = jax.lax.with_sharding_constraint(images, out_sharding)
        return images, labels

    return _generate(params, key)


def to_uint8(images) -> np.ndarray:
    """[−1, 1] floats → uint8 pixels of the whole global array, on every host."""
    if isinstance(images, jax.Array) and not images.is_fully_addressable:
        from jax.experimental import multihost_utils

        images = multihost_utils.process_allgather(images, tiled=True)  # rows of every process, in order
    host = np.asarray(jax.device_get(images), np.float32)
    return np.clip(np.round((host + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images_uint8: np.ndarray, pad: int = 1) -> np.ndarray:
    """Tiles [N, H, W, C] into one near-square [H', W', C] image with `pad` pixels between tiles."""
    n, h, w, c = images_uint8.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images_uint8):
        r, col = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = image
    return grid


def save_png(path: str, grid_uint8: np.ndarray, scale: int = 1) -> None:
    """Writes a grid as PNG (nearest-neighbour upscaled by `scale` so 8×8 digits are visible)."""
    from PIL import Image

    array = grid_uint8[..., 0] if grid_uint8.shape[-1] == 1 else grid_uint8
    image = Image.fromarray(array)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    image.save(path)


def sampler_sigmas(two_step_sigma: float, sigma_max=parameterization.SIGMA_MAX) -> dict[str, list[float]]:
    """The samplers every evaluation reports: one step from σmax, and two steps via `two_step_sigma`."""
    return {"1step": [sigma_max], "2step": [sigma_max, two_step_sigma]}


def as_dict(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metric values as plain Python numbers for JSON."""
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in metrics.items()}


class PeriodicEvaluator:
    """The training loop's evaluation hook: 1-step and 2-step sample grids from each EMA rate as PNG in
    `workdir/samples/` and TensorBoard, plus the digits classifier metrics when training on digits.
    Writes `workdir/samples/metrics_<step>.json`; returns the metrics of the first EMA rate.
    """

    def __init__(self, config, workdir: str, module, mesh: Mesh, writer):
        self.config, self.workdir, self.module, self.mesh, self.writer = config, workdir, module, mesh, writer
        from cmjax import train

        self.image_shape = train.image_shape(config)
        self.num_classes = int(config.model.get("num_classes") or 0)
        self.kind = "edm" if config.method.name in ("edm", "ect") else "consistency"
        self._classifier = None

    def _samples(self, params, num_images, sigmas, seed_offset):
        settings = dict(self.config.method)
        key = jax.random.fold_in(jax.random.key(self.config.seed), 10_000_019 + seed_offset)
        images, _ = generate(self.module, params, key, mesh=self.mesh, num_images=num_images,
                             image_shape=self.image_shape, sigmas=sigmas, num_classes=self.num_classes,
                             sigma_data=settings.get("sigma_data", parameterization.SIGMA_DATA),
                             sigma_min=settings.get("sigma_min", parameterization.SIGMA_MIN),
                             sigma_max=settings.get("sigma_max", parameterization.SIGMA_MAX),
                             parameterization_kind=self.kind)
        return images

    def _digits_quality(self, images):
        from cmjax.metrics import digits as digits_metric

        if self._classifier is None:
            self._classifier = digits_metric.train_classifier(data_dir=self.config.data.data_dir)
            self._reference = digits_metric.reference_images(split="train", data_dir=self.config.data.data_dir)
        return digits_metric.sample_quality(self._classifier, to_uint8(images) / 127.5 - 1.0, self._reference)

    def __call__(self, step: int, state) -> dict[str, Any]:
        from cmjax import train_state

        sample_cfg = self.config.sample
        results: dict[str, Any] = {}
        samplers = sampler_sigmas(sample_cfg.two_step_sigma)
        for rate in self.config.ema_rates:
            params = train_state.ema_params(state, rate)
            for name, sigmas in samplers.items():
                images = self._samples(params, sample_cfg.num_images, sigmas, seed_offset=len(sigmas))
                grid = image_grid(to_uint8(images))
                tag = f"ema{train_state.ema_key(rate)}_{name}"
                if jax.process_index() == 0:
                    save_png(os.path.join(self.workdir, "samples", f"{tag}_{step:08d}.png"), grid, scale=4)
                self.writer.write_images(step, {f"samples/{tag}": grid[None]})
                if self.config.data.name == "digits" and sample_cfg.metric_samples:
                    many = self._samples(params, sample_cfg.metric_samples, sigmas, seed_offset=100 + len(sigmas))
                    quality = self._digits_quality(many)
                    results[f"{tag}/frechet"] = float(quality["frechet"])
                    results[f"{tag}/confident_fraction"] = float(quality["confident_fraction"])
                    results[f"{tag}/min_class_fraction"] = float(np.min(quality["class_fractions"]))
                    results[f"{tag}/max_class_fraction"] = float(np.max(quality["class_fractions"]))
        if results:
            self.writer.write_scalars(step, results)
        if jax.process_index() == 0:
            import json

            os.makedirs(os.path.join(self.workdir, "samples"), exist_ok=True)
            with open(os.path.join(self.workdir, "samples", f"metrics_{step:08d}.json"), "w") as f:
                json.dump(as_dict(results), f, indent=2)
        return results

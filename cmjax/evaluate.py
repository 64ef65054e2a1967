"""Sampling from a trained consistency model across all devices, sample grids, and quality metrics.

`generate` draws images with the 1-step or the multistep sampler (CM Algorithm 1) as one jitted,
batch-sharded program: every device makes its share, and on several hosts every process runs it and
gets the global array. The periodic evaluation of the training loop and `--mode=sample` use it.
A run on a latent dataset samples latents and decodes them to pixels with the dataset's VAE in the same jitted
program (`cmjax.data.latents.LatentDecoder`), before grids, .npz files and metrics.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from cmjax import errors, methods, models, parameterization, sampling, sharding
from cmjax import workdir as workdir_lib


def consistency_fn_for(module, params, class_labels, *, sigma_data, sigma_min):
    """x, σ ↦ f_θ(x, σ) for a network in evaluation mode (dropout off)."""
    apply_fn = lambda p, x_in, t_in: module.apply({"params": p}, x_in, t_in, class_labels, train=False)  # noqa: E731
    return lambda x, sigma: parameterization.consistency_denoise(apply_fn, params, x, sigma, sigma_data, sigma_min)


def denoiser_for(module, params, class_labels, kind: str, *, sigma_data, sigma_min):
    """x, σ ↦ the model's clean-image estimate: f_θ for consistency models, D_θ for EDM-parameterised ones (EDM
    teachers and ECT, where f(x, 0) = x), sCM's TrigFlow f at t = arctan(σ/σd) of x_t = cos t·x for trigflow kinds,
    and a flow-matching velocity read as D at SiT's t = 1/(1 + σ) (kind "flow", `parameterization.flow_denoise`)."""
    if kind in ("edm", *parameterization.TRIGFLOW_KINDS, parameterization.FLOW):
        apply_fn = lambda p, x_in, t_in: module.apply({"params": p}, x_in, t_in, class_labels, train=False)  # noqa: E731
        return lambda x, s: parameterization.denoise(apply_fn, params, x, s, kind=kind, sigma_data=sigma_data)
    return consistency_fn_for(module, params, class_labels, sigma_data=sigma_data, sigma_min=sigma_min)


def average_velocity_for(module, params, class_labels, guidance=None):
    """z, r, t ↦ u_θ(z, r, t) of a MeanFlow network in evaluation mode (dropout off); `guidance` (ω, t_min,
    t_max) conditions an iMF network (`methods.sampler_settings`' "guidance", config.sample.guidance_scale and
    guidance_interval), the same for every sample."""
    apply_fn = lambda p, x_in, t_in: module.apply({"params": p}, x_in, t_in, class_labels, train=False)  # noqa: E731
    u = parameterization.meanflow_network(apply_fn)
    if guidance is None:
        return lambda z, r, t: u(params, z, r, t)

    def guided(z, r, t):
        omega, t_min, t_max = (jnp.full(z.shape[:1], g, jnp.float32) for g in guidance)
        return u(params, z, r, t, guidance=parameterization.imf_guidance_input(omega, t_min, t_max))

    return guided


def _draw(module, params, labels, kind, key, shape, levels, *, sigma_data, sigma_min, sigma_max, clip, renoise,
          guidance=None):
    """One sampler's images: MeanFlow's jumps through the times `levels` (kind "meanflow"; `guidance` for an iMF
    network), else CM Algorithm 1 through the noise levels `levels`."""
    if kind == parameterization.MEANFLOW:
        return sampling.meanflow_sample(average_velocity_for(module, params, labels, guidance), key, shape, levels)
    fn = denoiser_for(module, params, labels, kind, sigma_data=sigma_data, sigma_min=sigma_min)
    return sampling.multistep_sample(fn, key, shape, levels, sigma_min, sigma_max, clip=clip, renoise_kind=renoise)


def generate(module, params, key, *, mesh: Mesh, num_images: int, image_shape: Sequence[int],
             sigmas: Sequence[float], num_classes: int = 0, sigma_data=parameterization.SIGMA_DATA,
             sigma_min=parameterization.SIGMA_MIN, sigma_max=parameterization.SIGMA_MAX,
             parameterization_kind="consistency", renoise="cm", clip=True, guidance=None):
    """`num_images` samples in [−1, 1] from the multistep sampler at `sigmas` ([σmax] = one step), sharded
    over the mesh's batch axes (`renoise`, `clip`: as `sampling.multistep_sample`; a run's own are
    `methods.sampler_settings(config)`); for parameterization_kind "meanflow", `sigmas` are MeanFlow times from 1.
    Returns (images [N, H, W, C] float32 global array, labels or None)."""
    devices = sharding.batch_device_count(mesh)
    if num_images % devices:
        raise errors.ConfigError(f"num_images={num_images} must divide over the {devices} devices of the mesh.")
    shape = (num_images, *image_shape)
    out_sharding = sharding.batch_sharding(mesh)

    @jax.jit
    def _generate(params, key):
        label_key, noise_key = jax.random.split(key)
        labels = jax.random.randint(label_key, (num_images,), 0, num_classes) if num_classes else None
        images = _draw(module, params, labels, parameterization_kind, noise_key, shape, sigmas,
                       sigma_data=sigma_data, sigma_min=sigma_min, sigma_max=sigma_max, clip=clip, renoise=renoise,
                       guidance=guidance)
        images = jax.lax.with_sharding_constraint(images, out_sharding)
        return images, labels

    return _generate(params, key)


QUANTIZE = ("round", "floor")  # config.sample.quantize


def quantize(images, how: str = "round"):
    """[−1, 1] floats → uint8: round((x + 1)·127.5) or, as the CM releases, its truncation (floor); clipped."""
    if how not in QUANTIZE:
        raise errors.ConfigError(f"config.sample.quantize={how!r}; choose one of {list(QUANTIZE)}.")
    scaled = (images + 1.0) * 127.5
    return jnp.clip(jnp.floor(scaled) if how == "floor" else jnp.round(scaled), 0, 255).astype(jnp.uint8)


def to_uint8(images) -> np.ndarray:
    """[−1, 1] floats → uint8 pixels of the whole global array, on every host."""
    if isinstance(images, jax.Array) and not images.is_fully_addressable:
        from jax.experimental import multihost_utils

        images = multihost_utils.process_allgather(images, tiled=True)  # rows of every process, in order
    host = np.asarray(jax.device_get(images), np.float32)
    return np.clip(np.round((host + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images_uint8: np.ndarray, pad: int = 1, cols: int | None = None) -> np.ndarray:
    """Tiles [N, H, W, C] into one [H', W', C] image with `pad` pixels between tiles: `cols` tiles a row (default:
    a near-square grid)."""
    n, h, w, c = images_uint8.shape
    cols = cols or math.ceil(math.sqrt(n))
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


def sampler_levels(config, sigma_max=parameterization.SIGMA_MAX) -> dict[str, list[float]]:
    """The run's 1-step and 2-step samplers: `sampler_sigmas` (noise levels), or for MeanFlow its times
    [1] and [1, config.sample.two_step_time] (x = ε − u(ε, 0, 1); two jumps via t = 0.5 by default, the
    midpoint of Lyy-iiis/imeanflow imf.py `generate`'s linspace(1, 0, num_steps + 1))."""
    from cmjax import methods

    if methods.is_meanflow(config):
        return {"1step": [1.0], "2step": [1.0, float(config.sample.two_step_time)]}
    return sampler_sigmas(config.sample.two_step_sigma, sigma_max)


def as_dict(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metric values as plain Python numbers for JSON."""
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------------------------
# Evaluation at scale. Sample i of a run is a function of (config.seed, i) only: its noise and label come from
# fold_in(key, i), so every process count and device layout makes the same samples. Samples are made in chunks
# of `config.eval.batch_size` over all devices and processes; each chunk's metric inputs (Inception features
# and logits, or digit images) are gathered to every process and saved by process 0, so a preempted evaluation
# resumes at the next chunk. Process 0 computes the metrics and shares them with every process.

EVAL_STREAM = 0x5EED0E7A  # folds the seed into a key stream of its own (training uses fold_in(seed, step))
SEARCH_STREAM = 1  # the 2-step search draws other samples than the reported evaluation


def eval_key(seed: int, stream: int = 0) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), EVAL_STREAM), stream)






def _share_json(result: Any) -> Any:
    """Process 0's JSON-able result on every process (other processes pass anything)."""
    if jax.process_count() == 1:
        return result
    payload = json.dumps(result).encode() if jax.process_index() == 0 else b""
    size = int(sharding.from_process_0(np.int32(len(payload))))
    buffer = np.zeros(size, np.uint8)
    if jax.process_index() == 0:
        buffer[:] = np.frombuffer(payload, np.uint8)
    return json.loads(bytes(sharding.from_process_0(buffer)))


def ternary_search(score, low: int, high: int) -> tuple[int, dict[int, float]]:
    """Minimises `score` over the integers [low, high], assuming it is unimodal: openai's ternary search for the
    best middle time of the 2-step sampler. Returns (best index, every score evaluated)."""
    scores: dict[int, float] = {}

    def f(i: int) -> float:
        if i not in scores:
            scores[i] = float(score(i))
        return scores[i]

    while high - low >= 3:
        third = (high - low) // 3
        m1, m2 = low + third, high - third
        if f(m1) <= f(m2):
            high = m2 - 1
        else:
            low = m1 + 1
    for i in range(low, high + 1):
        f(i)
    return min(scores, key=lambda i: (scores[i], i)), scores


class InceptionMetric:
    """FID, IS (10 splits, unbiased logits) and precision/recall (k = 3) from the FID Inception
    (`cmjax.metrics.inception`), its input path set by config.eval.fid_protocol (named in the eval report)."""

    name, primary = "inception", "fid"

    def __init__(self, config, mesh: Mesh):
        from cmjax.metrics import inception

        self.config, self.mesh = config, mesh
        variables = inception.load_variables(os.path.expanduser(config.eval.inception_weights))
        self.variables = jax.device_put(variables, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        self.protocol = str(config.eval.fid_protocol)
        inception.preprocess(jnp.zeros((1, 1, 1, 3)), 1, self.protocol)  # a bad protocol fails here
        net = inception.FIDInception(int(config.eval.inception_size), self.protocol)
        self._apply = jax.jit(lambda v, x: net.apply(v, x.astype(jnp.float32) / 255.0),
                              out_shardings=sharding.batch_sharding(mesh))
        self._reference, self._ready = None, False

    def outputs(self, images_uint8) -> dict[str, jax.Array]:
        """{"pool": [B, 2048], "logits": [B, 1008]} of uint8 images, sharded like them."""
        return self._apply(self.variables, images_uint8)

    def reference(self) -> dict[str, Any] | None:
        """(μ, Σ, features) of the real images: a published/cached .npz, or one pass over a TFDS split (every
        process reads its share), cached. Process 0 gets them; others get None."""
        from cmjax.data import pipeline
        from cmjax.metrics import digits as digits_metric
        from cmjax.metrics import fid, inception

        if self._ready:  # on every process alike, so no process waits in a collective the others skip
            return self._reference
        self._ready = True
        source = self.config.eval.reference
        if source.endswith(".npz"):  # published statistics; images in it (openai's arr_0) give PR features
            if jax.process_index() == 0:
                self._reference = fid.load_reference(source, features_fn=self._local_features)
            return self._reference
        data = self.config.data
        # Statistics of one protocol never stand in for another's (pytorch_fid keeps the earlier file name).
        network = "inception" if self.protocol == "pytorch_fid" else f"inception-{self.protocol}"
        from cmjax.data import datasets

        # A latent run's reference is its source pixels' (pipeline.eval_images reads those), cached under their name.
        path = fid.reference_cache_path(digits_metric.default_cache_dir(data.data_dir),
                                        datasets.pixel_source(data.name), source,
                                        int(self.config.eval.inception_size), network)
        if bool(sharding.from_process_0(np.bool_(jax.process_index() == 0 and os.path.exists(path)))):
            self._reference = fid.load_reference(path) if jax.process_index() == 0 else None
            return self._reference
        batch = _eval_batch(self.config, self.mesh, None)

        def feature_batches():
            for local in pipeline.eval_images(data, source, batch // jax.process_count()):
                arrays = sharding.host_local_to_global(local, self.mesh)
                out = sharding.gather_to_hosts({"pool": self.outputs(arrays["image"])["pool"], "mask": arrays["mask"]})
                yield out["pool"][out["mask"]]

        stats, kept = fid.accumulate_reference(feature_batches(), inception.FEATURE_DIM)
        if jax.process_index() == 0:
            fid.save_reference(path, stats, kept)
            self._reference = {"mu": stats.mean(), "sigma": stats.covariance(), "features": kept}
        return self._reference

    def _local_features(self, images_uint8: np.ndarray) -> np.ndarray:
        """Pool features of host images on this process's first device (published reference batches)."""
        from cmjax.metrics import inception

        device = jax.local_devices()[0]
        variables = jax.device_put(self.variables, device)
        net = inception.FIDInception(int(self.config.eval.inception_size), self.protocol)
        apply = jax.jit(lambda v, x: net.apply(v, x.astype(jnp.float32) / 255.0)["pool"])
        return np.concatenate([np.asarray(apply(variables, jax.device_put(images_uint8[i:i + 100], device)))
                               for i in range(0, len(images_uint8), 100)])

    def metrics(self, chunks: list[dict[str, np.ndarray]], reference) -> dict[str, float]:
        from cmjax.metrics import fid

        stats = fid.FeatureStatistics(chunks[0]["pool"].shape[1])
        for chunk in chunks:  # float64, in sample order
            stats.update(chunk["pool"])
        result = {"fid": fid.fid_from_statistics(stats, reference["mu"], reference["sigma"])}
        result["inception_score"], result["inception_score_std"] = fid.inception_score(
            np.concatenate([c["logits"] for c in chunks]))
        if reference.get("features") is not None:
            result["precision"], result["recall"] = fid.precision_recall(
                reference["features"], np.concatenate([c["pool"] for c in chunks]))
        return result


class DigitsMetric:
    """The embedded dataset's metric (`cmjax.metrics.digits`): Fréchet distance in a digit classifier's features,
    confident fraction and class balance, against the train split."""

    name, primary = "digits", "frechet"

    def __init__(self, config, mesh: Mesh):
        self.config, self._classifier, self._reference = config, None, None

    def outputs(self, images_uint8) -> dict[str, jax.Array]:
        return {"image": images_uint8}

    def reference(self):
        from cmjax.data import datasets
        from cmjax.metrics import digits as digits_metric

        if self._reference is None and jax.process_index() == 0:
            self._classifier = digits_metric.train_classifier(data_dir=self.config.data.data_dir)
            # The pixels behind a latent dataset (digits_latents: the digits) are what decoded samples match.
            self._reference = digits_metric.reference_images(split="train", data_dir=self.config.data.data_dir,
                                                             dataset=datasets.pixel_source(self.config.data.name))
        return self._reference

    def metrics(self, chunks: list[dict[str, np.ndarray]], reference) -> dict[str, float]:
        from cmjax.metrics import digits as digits_metric

        images = np.concatenate([c["image"] for c in chunks]).astype(np.float32) / 127.5 - 1.0
        quality = digits_metric.sample_quality(self._classifier, images, reference)
        return {"frechet": float(quality["frechet"]), "confident_fraction": float(quality["confident_fraction"]),
                "min_class_fraction": float(np.min(quality["class_fractions"])),
                "max_class_fraction": float(np.max(quality["class_fractions"]))}


METRICS = {"inception": InceptionMetric, "digits": DigitsMetric}


def metric_name(config) -> str:
    """`config.eval.metric`, with "auto": the digit classifier on digits, Inception elsewhere."""
    from cmjax.data import datasets

    name = config.eval.metric
    if name == "auto":
        return "digits" if datasets.pixel_source(config.data.name) in datasets.EMBEDDED else "inception"
    if name not in METRICS:
        raise errors.ConfigError(f"Unknown config.eval.metric {name!r}; use 'auto' or one of {sorted(METRICS)}.")
    return name


def _eval_batch(config, mesh: Mesh, num_samples: int | None) -> int:
    """Global images per chunk: config.eval.batch_size, or fewer when fewer samples are asked for."""
    devices = sharding.batch_device_count(mesh)
    batch = int(config.eval.batch_size)
    if batch % devices:
        raise errors.ConfigError(
            f"config.eval.batch_size={batch} does not divide over the {devices} devices of the mesh; "
            f"choose a multiple of {devices}.")
    if num_samples is not None:
        batch = min(batch, -(-num_samples // devices) * devices)
    return batch


class Evaluator:
    """Samples and scores one model over the mesh; compiled samplers and the metric network are kept between
    calls (periodic evaluation during training reuses them)."""

    def __init__(self, config, module, mesh: Mesh):
        self.config, self.module, self.mesh = config, module, mesh
        self.image_shape = models.image_shape(config)
        self.num_classes = int(config.model.get("num_classes") or 0)
        # How the run's method samples (methods.sampler_settings, which export reads too): its parameterisation
        # and σ range, or its release's (ECT: boundary scalings at σ_min 0.003, x + τ·z, no clipping).
        sampler = methods.sampler_settings(config)
        self.kind, self.renoise, self.clip = sampler["parameterization"], sampler["renoise"], sampler["clip"]
        self.guidance = sampler["guidance"]
        self.sigma_data, self.sigma_min, self.sigma_max = (sampler["sigma_data"], sampler["sigma_min"],
                                                           sampler["sigma_max"])
        self.quantize = str(config.sample.quantize)
        quantize(jnp.zeros(()), self.quantize)  # a bad value fails here, before anything compiles
        from cmjax.data import datasets

        # Latent runs: samples are latents, decoded to pixels before quantising; the [−1, 1] clip of the denoised
        # estimate is a pixel range, not a latent one.
        self.decoder = None
        if datasets.get_spec(config.data.name).is_latent:
            from cmjax.data import latents

            self.decoder = latents.LatentDecoder(config, mesh)
            self.clip = False
        self._samplers: dict[Any, Any] = {}
        self._metrics: dict[str, Any] = {}

    def metric(self, name: str | None = None):
        name = name or metric_name(self.config)
        if name not in self._metrics:
            self._metrics[name] = METRICS[name](self.config, self.mesh)
        return self._metrics[name]

    def sampler(self, sigmas: Sequence[float], batch: int):
        """jit(params, key, start, vae_params) → (uint8 images [batch, H, W, C], labels [batch]): samples start …
        start+batch−1, sample i drawn from fold_in(key, i) alone (its label, then CM Algorithm 1 with its own
        noise); a latent run's decoded by the VAE (`vae_params`; None for pixel runs). Call it via `_run`."""
        cache_key = (tuple(float(s) for s in sigmas), batch)
        if cache_key in self._samplers:
            return self._samplers[cache_key]
        out = sharding.batch_sharding(self.mesh)
        shape, num_classes = (1, *self.image_shape), self.num_classes

        def one(params, key):
            label_key, noise_key = jax.random.split(key)
            label = jax.random.randint(label_key, (1,), 0, num_classes) if num_classes else None
            x = _draw(self.module, params, label, self.kind, noise_key, shape, cache_key[0],
                      sigma_data=self.sigma_data, sigma_min=self.sigma_min, sigma_max=self.sigma_max,
                      clip=self.clip, renoise=self.renoise, guidance=self.guidance)
            return x[0], label[0] if num_classes else jnp.int32(0)

        decoder = self.decoder

        @jax.jit
        def run(params, key, start, vae_params=None):
            indices = jax.lax.with_sharding_constraint(start + jnp.arange(batch), out)
            keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
            images, labels = jax.vmap(one, in_axes=(None, 0))(params, keys)
            if decoder is not None:  # latents → pixels, the whole batch at once, sharded like it
                images = decoder.decode(vae_params, jax.lax.with_sharding_constraint(images, out))
            images = quantize(images, self.quantize)
            return jax.lax.with_sharding_constraint(images, out), jax.lax.with_sharding_constraint(labels, out)

        self._samplers[cache_key] = run
        return run

    def _run(self, sigmas, batch: int, params, key, start):
        """The sampler's (uint8 images, labels) of samples start … start+batch−1."""
        run = self.sampler(sigmas, batch)
        return run(params, key, start) if self.decoder is None else run(params, key, start, self.decoder.params)

    def samples(self, params, sigmas, num_samples: int, key) -> dict[str, np.ndarray]:
        """uint8 images [N, H, W, C] and labels [N] of samples 0 … N−1, on every process."""
        batch = _eval_batch(self.config, self.mesh, num_samples)
        parts = [sharding.gather_to_hosts(dict(zip(("image", "label"), self._run(sigmas, batch, params, key, start))))
                 for start in range(0, num_samples, batch)]
        return {k: np.concatenate([p[k] for p in parts])[:num_samples] for k in ("image", "label")}

    def score(self, params, sigmas, num_samples: int, key, metric, chunk_dir: str | None = None) -> dict[str, float]:
        """The metric of samples 0 … N−1 at `sigmas`, the same on every process. With `chunk_dir`, each chunk's
        metric inputs are saved there (process 0) and chunks already there are not sampled again."""
        reference = metric.reference()
        batch = _eval_batch(self.config, self.mesh, num_samples)
        plan = [(start, min(start + batch, num_samples)) for start in range(0, num_samples, batch)]
        paths = [os.path.join(chunk_dir, f"chunk_{a:09d}_{b:09d}.npz") if chunk_dir else None for a, b in plan]
        done = np.array([jax.process_index() == 0 and p is not None and os.path.exists(p) for p in paths])
        done = np.asarray(sharding.from_process_0(done))
        chunks = []
        for (start, stop), path, is_done in zip(plan, paths, done):
            if is_done:
                if jax.process_index() == 0:
                    with np.load(path) as stored:
                        chunks.append({k: stored[k] for k in stored.files})
                continue
            images, _ = self._run(sigmas, batch, params, key, start)
            chunk = {k: v[: stop - start] for k, v in sharding.gather_to_hosts(metric.outputs(images)).items()}
            if jax.process_index() == 0:
                if path:
                    _save_npz(path, chunk)
                chunks.append(chunk)
        result = metric.metrics(chunks, reference) if jax.process_index() == 0 else None
        return _share_json(result)

    def two_step_search(self, params, num_samples: int, metric, steps: int | None = None) -> dict[str, Any]:
        """openai's ternary search for the 2-step sampler's middle time: ts = [0, i, steps−1] on a `steps`-point
        Karras grid (default config.eval.search_steps), i minimising the metric's primary value (FID) on
        `num_samples` samples."""
        if self.kind == parameterization.MEANFLOW:
            raise errors.ConfigError("config.eval.two_step_search walks a Karras σ grid; a MeanFlow run samples by "
                                     "time: set config.eval.two_step_search=0 and choose config.sample.two_step_time.")
        steps = int(steps or self.config.eval.search_steps)
        sigma_of = lambda i: [float(s) for s in sampling.openai_ts_sigmas(  # noqa: E731
            [0, i, steps - 1], steps, self.sigma_min, self.sigma_max)[:2]]
        key = eval_key(self.config.seed, SEARCH_STREAM)
        best, scores = ternary_search(
            lambda i: self.score(params, sigma_of(i), num_samples, key, metric)[metric.primary], 1, steps - 2)
        return {"best_index": best, "best_sigma": sigma_of(best)[1], f"best_{metric.primary}": scores[best],
                "evaluated": {str(i): v for i, v in sorted(scores.items())}}


def _save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.tmp{os.getpid()}"
    with open(partial, "wb") as f:
        np.savez(f, **arrays)
    os.replace(partial, path)


def _write_json(path: str, payload: dict[str, Any]) -> None:
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)


def _ema_rates(config, ema_rate) -> list:
    return list(config.ema_rates) if ema_rate is None else [ema_rate]


def _rate_tag(rate) -> str:
    from cmjax import train_state

    return "online" if rate in ("online", "params") else f"ema{train_state.ema_key(float(rate))}"


def sample_checkpoint(config, workdir: str, *, step: int | None = None, ema_rate=None, num_samples: int | None = None,
                      output: str | None = None) -> dict[str, Any]:
    """`--mode=sample`: 1-step and 2-step (config.sample.two_step_sigma) samples of a checkpoint as PNG grids and
    one .npz per sampler (uint8 NHWC `images`, `labels`) in `output` (default workdir/samples). Deterministic for
    config.seed; every process calls it."""
    mesh = sharding.make_mesh(config.mesh)
    module, params, _, step = workdir_lib.load_params(workdir, mesh, step=step, ema_rate=ema_rate, config=config)
    evaluator = Evaluator(config, module, mesh)
    output = output or os.path.join(workdir, "samples")
    num_samples = int(num_samples or config.sample.num_images)
    tag = _rate_tag(ema_rate if ema_rate is not None else config.ema_rates[0])
    written: dict[str, Any] = {"step": step}
    for name, sigmas in sampler_levels(config, evaluator.sigma_max).items():
        samples = evaluator.samples(params, sigmas, num_samples, eval_key(config.seed))
        stem = os.path.join(output, f"{tag}_{name}_{step:08d}")
        if jax.process_index() == 0:
            save_png(stem + ".png", image_grid(samples["image"][: config.sample.num_images]), scale=4)
            _save_npz(stem + ".npz", {"images": samples["image"], "labels": samples["label"]})
        written[f"{name}_grid"], written[f"{name}_samples"] = stem + ".png", stem + ".npz"
    return written


def evaluate_checkpoint(config, workdir: str, *, step: int | None = None, ema_rate=None,
                        num_samples: int | None = None, output: str | None = None) -> dict[str, Any]:
    """`--mode=eval`: for each EMA rate (or the one named), N samples (config.eval.num_samples) with the 1-step and
    the 2-step sampler, scored by config.eval.metric (FID/IS/precision/recall, or the digits metric), plus the
    2-step middle-time search when config.eval.two_step_search > 0. Writes `output` (default workdir/eval)
    /metrics_<step>.json and grids; resumes a preempted evaluation from its saved chunks. Every process calls it."""
    import shutil

    mesh = sharding.make_mesh(config.mesh)
    output = output or os.path.join(workdir, "eval")
    num_samples = int(num_samples or config.eval.num_samples)
    evaluator, results, step_used = None, {}, step
    for rate in _ema_rates(config, ema_rate):
        module, params, _, step_used = workdir_lib.load_params(workdir, mesh, step=step, ema_rate=rate, config=config)
        evaluator = evaluator or Evaluator(config, module, mesh)
        metric = evaluator.metric()
        samplers = sampler_levels(config, evaluator.sigma_max)
        if config.eval.two_step_search:
            search = evaluator.two_step_search(params, int(config.eval.two_step_search), metric)
            results.update({f"{_rate_tag(rate)}_2step_search/{k}": v for k, v in search.items()})
            samplers["2step_searched"] = [evaluator.sigma_max, search["best_sigma"]]
        for name, sigmas in samplers.items():
            tag = f"{_rate_tag(rate)}_{name}"
            chunk_dir = os.path.join(output, f"chunks_{step_used:08d}", f"{tag}_{metric.name}_seed{config.seed}")
            scores = evaluator.score(params, sigmas, num_samples, eval_key(config.seed), metric, chunk_dir)
            results.update({f"{tag}/{k}": v for k, v in scores.items()})
            grid = evaluator.samples(params, sigmas, int(config.sample.num_images), eval_key(config.seed))["image"]
            if jax.process_index() == 0:
                save_png(os.path.join(output, f"{tag}_{step_used:08d}.png"), image_grid(grid), scale=4)
    protocol = {"fid_protocol": metric.protocol} if hasattr(metric, "protocol") else {}
    results = {"step": step_used, "num_samples": num_samples, "metric": metric.name, **protocol,
               "quantize": evaluator.quantize, **results}
    _write_json(os.path.join(output, f"metrics_{step_used:08d}.json"), results)
    if jax.process_index() == 0:  # the metrics are written: the per-chunk features are no longer needed
        shutil.rmtree(os.path.join(output, f"chunks_{step_used:08d}"), ignore_errors=True)
    return results


class PeriodicEvaluator:
    """The training loop's evaluation hook: 1-step and 2-step sample grids from each EMA rate as PNG in
    `workdir/samples/` and TensorBoard, the digits classifier metrics when training on digits
    (config.sample.metric_samples samples), and FID/IS/precision/recall on config.eval.fid_during_training
    samples, through the same `Evaluator.score` as `--mode=eval`. Writes `workdir/samples/metrics_<step>.json`.
    """

    def __init__(self, config, workdir: str, module, mesh: Mesh, writer):
        self.config, self.workdir, self.writer = config, workdir, writer
        self.evaluator = Evaluator(config, module, mesh)

    def __call__(self, step: int, state) -> dict[str, Any]:
        from cmjax import train_state
        from cmjax.data import datasets

        config, evaluator = self.config, self.evaluator
        scored = []  # (metric name, samples)
        if datasets.pixel_source(config.data.name) in datasets.EMBEDDED and config.sample.metric_samples:
            scored.append(("digits", int(config.sample.metric_samples)))
        if config.eval.fid_during_training:
            scored.append(("inception", int(config.eval.fid_during_training)))
        results: dict[str, Any] = {}
        for rate in config.ema_rates:
            params = train_state.ema_params(state, rate)
            for name, sigmas in sampler_levels(config, evaluator.sigma_max).items():
                tag = f"{_rate_tag(rate)}_{name}"
                grid = image_grid(evaluator.samples(params, sigmas, config.sample.num_images,
                                                    eval_key(config.seed))["image"])
                if jax.process_index() == 0:
                    save_png(os.path.join(self.workdir, "samples", f"{tag}_{step:08d}.png"), grid, scale=4)
                self.writer.write_images(step, {f"samples/{tag}": grid[None]})
                for metric_name_, count in scored:
                    scores = evaluator.score(params, sigmas, count, eval_key(config.seed),
                                             evaluator.metric(metric_name_))
                    results.update({f"{tag}/{k}": float(v) for k, v in scores.items()})
        if results:
            self.writer.write_scalars(step, results)
        _write_json(os.path.join(self.workdir, "samples", f"metrics_{step:08d}.json"), as_dict(results))
        return results

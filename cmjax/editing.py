"""Zero-shot image editing with a consistency model (Song et al. 2023, "Consistency Models", §6.3, Appendix D
and its Algorithm 4).

Algorithm 4 turns the multistep sampler (Algorithm 1) into an editor. A reference image y, an invertible linear
map A of images and a binary mask Ω over A's outputs (1: generated, 0: taken from y) define the edit; after every
denoising step the kept coefficients of A x are replaced by those of A y:

    y ← A⁻¹[(Ay) ⊙ (1 − Ω)]                                   (line 2)
    x ← f(y + t₁·z, t₁);  x ← A⁻¹[(Ay) ⊙ (1 − Ω) + (Ax) ⊙ Ω]    (lines 3–5)
    for t = t₂ … t_N:  x ← f(x + √(t² − ε²)·z, t);  x ← A⁻¹[…]  (lines 6–9)

Here A is orthogonal (A⁻¹ = Aᵀ, App. D): the identity for inpainting, a per-pixel colour basis whose first vector
is the luma direction for colorization, a per-patch basis whose first vector is the patch mean for
super-resolution. Denoising (f(x, σ)), interpolation between two noises (spherical) and stroke-guided generation
(SDEdit: the strokes noised to t₁, then Algorithm 1) are the paper's other zero-shot uses (App. D).

Everything below `edit_checkpoint` is a pure, batched, jit-able function of arrays and a `denoise_fn(x, σ) → x0`:
the consistency function f_θ with its parameters and class labels bound (`evaluate.denoiser_for`, the samplers'
interface). `edit_checkpoint` is `--mode=edit`: PNG files → one jitted program with the images spread over every
device → result PNGs and an input | condition | result grid.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cmjax import errors, evaluate, methods, models, parameterization, sampling, sharding
from cmjax import workdir as workdir_lib

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]

# ---------------------------------------------------------------------------------------------------------------
# The orthogonal maps A and masks Ω of Algorithm 4.

# ITU-R BT.601 luma weights, the grey level of App. D's colorization: 0.2989 R + 0.5870 G + 0.1140 B.
LUMA = (0.2989, 0.5870, 0.1140)
KINDS = ("pixels", "colour", "patches")
# Float32 matmuls at full precision: TPUs default to bfloat16 passes, which would move the kept coefficients.
_HIGHEST = jax.lax.Precision.HIGHEST


def orthonormal_basis(first: Sequence[float]) -> np.ndarray:
    """An orthogonal matrix Q whose first column is `first`/‖first‖: the QR decomposition of the identity with its
    first column replaced by it, negated if that column came out negative (App. D: "obtained via QR
    decomposition"; openai cm/karras_diffusion.py `iterative_colorization` / `iterative_superres`). Float64."""
    first = np.asarray(first, np.float64)
    if first[0] == 0:
        raise ValueError(f"The first basis vector needs a non-zero first entry, got {first.tolist()}.")
    matrix = np.eye(first.size)
    matrix[:, 0] = first / np.linalg.norm(first)
    q = np.linalg.qr(matrix)[0]
    return -q if q[:, 0].sum() < 0 else q


@functools.cache
def colour_basis() -> np.ndarray:
    """App. D's 3×3 Q: orthogonal, first column ∝ (0.2989, 0.5870, 0.1140); z = x Q per
    pixel, so the first row of A = Qᵀ is the luma direction and z[..., 0] is the (scaled) grey level."""
    return orthonormal_basis(LUMA)


@functools.cache
def patch_basis(factor: int) -> np.ndarray:
    """App. D's p²×p² Q for super-resolution: orthogonal, first column (1/p, …, 1/p), so z[0] = p·(patch mean)."""
    return orthonormal_basis(np.ones(factor * factor))


@functools.partial(jax.tree_util.register_dataclass, data_fields=["omega"], meta_fields=["kind", "factor"])
@dataclasses.dataclass(frozen=True)
class Operator:
    """Algorithm 4's A and Ω. `kind` "pixels": A = I; "colour": z = x·Q per pixel (`colour_basis`);
    "patches": z[b, i, j, k, c] = Σ_m x[b, i·p + m // p, j·p + m % p, c]·Q[m, k] over p×p patches
    (`patch_basis`, p = `factor`). `omega` broadcasts to A x: 1 where x's coefficient is generated, 0 where
    y's is kept. A pytree: `omega` is data (a per-image mask is an argument of the compiled program)."""

    omega: jax.Array
    kind: str = "pixels"
    factor: int = 1


def inpainting(mask) -> Operator:
    """A = I; Ω = `mask` ([B, H, W, 1 or C] or [H, W, 1]; 1 = pixel to generate, 0 = kept) (App. D)."""
    return Operator(jnp.asarray(mask, jnp.float32), "pixels")


def colorization() -> Operator:
    """A = Qᵀ per pixel; Ω = (0, 1, 1): the luma coefficient is kept, the two chroma ones generated (App. D)."""
    return Operator(jnp.asarray([0.0, 1.0, 1.0]), "colour")


def super_resolution(factor: int) -> Operator:
    """A = Qᵀ per p×p patch; Ω = 1 but for k = 0: each patch's mean is kept, the rest generated (App. D)."""
    factor = int(factor)
    if factor < 1:
        raise errors.ConfigError(f"The super-resolution factor must be an integer ≥ 1, got {factor}.")
    return Operator(jnp.asarray((np.arange(factor * factor) > 0)[:, None], jnp.float32), "patches", factor)


def _patches(x, p: int):
    b, h, w, c = x.shape
    if h % p or w % p:
        raise errors.ConfigError(f"Images of {h}×{w} pixels do not split into {p}×{p} patches; choose a "
                                 f"factor that divides both.")
    return x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // p, w // p, p * p, c)


def _unpatches(z, p: int):
    b, hp, wp, _, c = z.shape
    return z.reshape(b, hp, wp, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, hp * p, wp * p, c)


def transform(op: Operator, x):
    """A x."""
    x = jnp.asarray(x, jnp.float32)
    if op.kind == "pixels":
        return x
    if op.kind == "colour":
        if x.shape[-1] != 3:
            raise errors.ConfigError(f"Colorization needs 3-channel images; these have {x.shape[-1]} channel(s).")
        return jnp.einsum("...l,lk->...k", x, jnp.asarray(colour_basis(), jnp.float32), precision=_HIGHEST)
    if op.kind == "patches":
        q = jnp.asarray(patch_basis(op.factor), jnp.float32)
        return jnp.einsum("...mc,mk->...kc", _patches(x, op.factor), q, precision=_HIGHEST)
    raise ValueError(f"Unknown operator kind {op.kind!r}; choose one of {list(KINDS)}.")


def inverse(op: Operator, z):
    """A⁻¹ z = Aᵀ z (A is orthogonal)."""
    if op.kind == "pixels":
        return z
    if op.kind == "colour":
        return jnp.einsum("...k,lk->...l", z, jnp.asarray(colour_basis(), jnp.float32), precision=_HIGHEST)
    if op.kind == "patches":
        q = jnp.asarray(patch_basis(op.factor), jnp.float32)
        return _unpatches(jnp.einsum("...kc,mk->...mc", z, q, precision=_HIGHEST), op.factor)
    raise ValueError(f"Unknown operator kind {op.kind!r}; choose one of {list(KINDS)}.")


def known_part(op: Operator, x):
    """A⁻¹[(Ax) ⊙ (1 − Ω)]: the part of x that the edit keeps (Algorithm 4 line 2 applied to y)."""
    return inverse(op, transform(op, x) * (1.0 - op.omega))


def generated_part(op: Operator, x):
    """A⁻¹[(Ax) ⊙ Ω]: the orthogonal complement of `known_part` (their sum is x)."""
    return inverse(op, transform(op, x) * op.omega)


def replace(op: Operator, y, x):
    """A⁻¹[(Ay) ⊙ (1 − Ω) + (Ax) ⊙ Ω] (Algorithm 4 lines 5 and 9). For A = I: y where Ω = 0, x where Ω = 1,
    bit for bit."""
    if op.kind == "pixels":
        return y * (1.0 - op.omega) + x * op.omega
    return inverse(op, transform(op, y) * (1.0 - op.omega) + transform(op, x) * op.omega)


def downsample(x, factor: int):
    """Means of non-overlapping factor×factor patches: [B, H, W, C] → [B, H/f, W/f, C] (App. D's low-res image)."""
    return _patches(jnp.asarray(x, jnp.float32), int(factor)).mean(axis=-2)


def upsample(x, factor: int):
    """Nearest-neighbour: every low-res pixel repeated over its patch (App. D's "naively up-sampled" y)."""
    return jnp.repeat(jnp.repeat(jnp.asarray(x, jnp.float32), factor, axis=1), factor, axis=2)


# ---------------------------------------------------------------------------------------------------------------
# Algorithm 4 and the tasks.


def _sigma_list(sigmas) -> list[float]:
    sigmas = [float(s) for s in sigmas]
    if not sigmas or any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise errors.ConfigError(f"Editing σ must be a non-empty decreasing list, got {sigmas}.")
    return sigmas


def _normal(key, j: int, shape):
    """Step j's standard-normal noise: from fold_in(key, j), or, for a batch of keys (one per image), image i's
    from fold_in(key[i], j) alone, so an image's edit does not depend on the batch it is in."""
    if jnp.ndim(key) == 0:
        return jax.random.normal(jax.random.fold_in(key, j), shape, jnp.float32)
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, j), shape[1:], jnp.float32))(key)


def _denoised(denoise_fn: DenoiseFn, x, sigma, clip: bool):
    x0 = denoise_fn(x, jnp.full(x.shape[:1], sigma, jnp.float32))
    return jnp.clip(x0, -1.0, 1.0) if clip else x0


def edit(denoise_fn: DenoiseFn, op: Operator | None, y, key, sigmas: Sequence[float], *,
         sigma_min=parameterization.SIGMA_MIN, sigma_max=parameterization.SIGMA_MAX, clip: bool = True,
         renoise_kind: str = "cm", trajectory: bool = False):
    """CM Algorithm 4 over the decreasing `sigmas` (t₁ … t_N; len(sigmas) network evaluations).

    `key`: one key, or one per image ([B]) for per-image noise. `clip` clips each denoised estimate to [−1, 1]
    before the replacement (openai's `iterative_*` editors); `renoise_kind` as `sampling.renoise` (the run's are
    `methods.sampler_settings`). `op=None` is A = I with Ω = 1 and no line 2: x starts from y itself (SDEdit).
    Returns x, or (x, the iterate after every step [N, B, …]) with `trajectory`.
    """
    sigmas = _sigma_list(sigmas)
    y = jnp.asarray(y, jnp.float32)
    if op is not None:
        y = known_part(op, y)  # line 2

    def denoised(x, tau):
        x = _denoised(denoise_fn, x, tau, clip)  # lines 4, 8
        return x if op is None else replace(op, y, x)  # lines 5, 9

    def later_step(x, step):  # lines 6–9; a scan, so a 40-step schedule compiles one network call
        j, tau = step
        x = denoised(sampling.renoise(x, tau, _normal(key, j, y.shape), sigma_min, sigma_max, renoise_kind), tau)
        return x, x if trajectory else None

    x = denoised(y + sigmas[0] * _normal(key, 0, y.shape), sigmas[0])  # lines 3–5
    first = x
    x, later = jax.lax.scan(later_step, x, (jnp.arange(1, len(sigmas)), jnp.asarray(sigmas[1:], jnp.float32)))
    if not trajectory:
        return x
    return x, jnp.concatenate([first[None], later])


def inpaint(denoise_fn: DenoiseFn, images, mask, key, sigmas, **sampler):
    """Inpainting (App. D): A = I, Ω = `mask` (1 = generate); the other pixels are `images`' own."""
    return edit(denoise_fn, inpainting(mask), images, key, sigmas, **sampler)


def grey_to_rgb(images):
    """App. D's grey-scale y: 3 equal channels of the grey level, 0.2989 R + 0.5870 G + 0.1140 B of an RGB image
    or a 1-channel image itself."""
    images = jnp.asarray(images, jnp.float32)
    if images.shape[-1] == 3:
        images = jnp.einsum("...c,c->...", images, jnp.asarray(LUMA, jnp.float32), precision=_HIGHEST)[..., None]
    return jnp.repeat(images, 3, axis=-1)


def colorize(denoise_fn: DenoiseFn, images, key, sigmas, **sampler):
    """Colorization (App. D): `images` grey ([…, 1]) or RGB (made grey), as 3 equal channels y; the luma
    coefficient (A y)[…, 0] is kept, the two chroma coefficients generated."""
    return edit(denoise_fn, colorization(), grey_to_rgb(images), key, sigmas, **sampler)


def super_resolve(denoise_fn: DenoiseFn, low_res, factor: int, key, sigmas, **sampler):
    """Super-resolution by `factor` (App. D): `low_res` [B, H/f, W/f, C], upsampled to y by repetition; every
    f×f patch mean of the result is the low-res pixel."""
    return edit(denoise_fn, super_resolution(factor), upsample(low_res, factor), key, sigmas, **sampler)


def denoise(denoise_fn: DenoiseFn, noisy, sigma, clip: bool = True):
    """Denoising (App. D): f(x, σ) of an image x perturbed by N(0, σ²I), σ ∈ [ε, T]; one evaluation."""
    return _denoised(denoise_fn, jnp.asarray(noisy, jnp.float32), sigma, clip)


def slerp(z1, z2, alpha):
    """Spherical interpolation per image (App. D): sin((1−α)ψ)/sin ψ·z1 + sin(αψ)/sin ψ·z2, with
    ψ = arccos(z1ᵀz2 / (‖z1‖‖z2‖)) over each image's pixels."""
    z1, z2 = jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32)
    axes = tuple(range(1, z1.ndim))
    cos = jnp.sum(z1 * z2, axes) / (jnp.sqrt(jnp.sum(z1**2, axes)) * jnp.sqrt(jnp.sum(z2**2, axes)))
    psi = parameterization.broadcast_per_sample(jnp.arccos(jnp.clip(cos, -1.0, 1.0)), z1)
    parallel = psi < 1e-4  # sin ψ → 0: the linear interpolation, its limit
    safe = jnp.where(parallel, 1.0, psi)
    spherical = (jnp.sin((1.0 - alpha) * safe) * z1 + jnp.sin(alpha * safe) * z2) / jnp.sin(safe)
    return jnp.where(parallel, (1.0 - alpha) * z1 + alpha * z2, spherical)


def interpolate(denoise_fn: DenoiseFn, z1, z2, alphas: Sequence[float], sigma_max=parameterization.SIGMA_MAX,
                clip: bool = True):
    """Interpolation between the one-step samples f(T·z1, T) and f(T·z2, T) (App. D): f(T·slerp(z1, z2, α), T)
    for each α; `z1`, `z2` standard normal [B, …]. Returns [len(alphas), B, …]; α = 0 and 1 are the two samples."""
    frames = []
    for alpha in alphas:
        z = slerp(z1, z2, float(alpha))
        frames.append(_denoised(denoise_fn, sigma_max * z, sigma_max, clip))
    return jnp.stack(frames)


def stroke_guided(denoise_fn: DenoiseFn, strokes, key, sigmas, **sampler):
    """Stroke-guided generation (SDEdit, App. D): Algorithm 4 with A = I and Ω = 1, started from the strokes
    themselves, x = f(y + t₁·z, t₁), then Algorithm 1 down `sigmas` (the paper: t₁ = 5.38, t₂ = 2.24 of
    σmax = 80). A smaller t₁ stays closer to the strokes."""
    return edit(denoise_fn, None, strokes, key, sigmas, **sampler)


# ---------------------------------------------------------------------------------------------------------------
# `--mode=edit`: PNG files in, one program sharded over every device, PNG files out.

TASKS = ("inpaint", "colorize", "superres", "denoise", "interpolate", "stroke")
# The options each task reads (besides labels, step, ema_rate, output); any other one given is an error.
TASK_OPTIONS = {
    "inpaint": ("images", "masks", "ts", "steps"),
    "colorize": ("images", "ts", "steps"),
    "superres": ("images", "ts", "steps", "factor"),
    "denoise": ("images", "sigma", "add_noise"),
    "interpolate": ("frames", "num_samples"),
    "stroke": ("images", "ts", "steps"),
}
DEFAULT_STEPS = 40  # the Karras grid `ts` indexes (App. D: N = 40; openai's --steps)
# Default `ts` on that grid of the run's [σmin, σmax]: App. D's every point (39 evaluations; on the digits model
# more steps edited better, 1 → 39 → 79 steps: bench/results/editing_digits_cpu.md); strokes start lower.
DEFAULT_TS = {"inpaint": tuple(range(40)), "colorize": tuple(range(40)), "superres": tuple(range(40)),
              "stroke": (16, 20, 39)}  # App. D's strokes: t₁ = 5.38, t₂ = 2.24 are indices 16, 20 at σmax = 80
DEFAULT_FACTOR, DEFAULT_FRAMES, DEFAULT_PAIRS = 2, 8, 4
EDIT_STREAM = 0xED17  # the edits' key stream: eval_key(config.seed, EDIT_STREAM), image i from fold_in(·, i)
CONSISTENCY_KINDS = ("consistency", *parameterization.TRIGFLOW_KINDS)


def consistency_sampler(config) -> dict:
    """The run's `methods.sampler_settings`, which must evaluate a consistency function f (cd, ct, ict, ect, sct,
    scd); an EDM denoiser D is not one (Algorithm 4 needs f's one-step jumps)."""
    sampler = methods.sampler_settings(config)
    if sampler["parameterization"] not in CONSISTENCY_KINDS:
        consistency = [m for m in methods.names() if m != "edm" and methods.get(m).parameterization not in (
            parameterization.FLOW, parameterization.MEANFLOW)]
        raise errors.ConfigError(
            f"--mode=edit needs a consistency model; the run's method {config.method.name!r} is sampled as "
            f"{sampler['parameterization']!r} (a denoiser, not a consistency function). Edit a run of one of "
            f"{consistency}.")
    return sampler


def ts_sigmas(ts: Sequence[int], steps: int, sampler: dict) -> list[float]:
    """The σ Algorithm 4 evaluates at for openai-style `ts` on a `steps`-point Karras grid of the run's range:
    ts[:-1]; the last index must be steps − 1 (σmin: the edit ends without noise, its kept part exact)."""
    ts = [int(t) for t in ts]
    if len(ts) < 2 or ts[-1] != steps - 1:
        raise errors.ConfigError(f"--edit_ts={','.join(map(str, ts))}: editing ts increase within [0, {steps - 1}] "
                                 f"and end at {steps - 1} (σmin, no noise left); e.g. 0,20,{steps - 1}.")
    try:
        grid = sampling.openai_ts_sigmas(ts, steps, sampler["sigma_min"], sampler["sigma_max"])
    except ValueError as err:
        raise errors.ConfigError(f"--edit_ts={','.join(map(str, ts))}: {err}") from None
    return [float(s) for s in grid[:-1]]


def read_png(path: str, channels: int) -> np.ndarray:
    """A PNG file as float32 [H, W, channels] in [−1, 1] (grey files are repeated to RGB, RGB ones made grey)."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise errors.MissingFileError(f"No image file {path!r}.")
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), np.float32)
    except (UnidentifiedImageError, OSError) as err:
        raise errors.UserError(f"{path!r} is not a readable image file ({err}); give PNG files.") from None
    return (pixels.reshape(*pixels.shape[:2], channels) / 127.5 - 1.0).astype(np.float32)


def _sized(path: str, image: np.ndarray, sizes: Sequence[tuple[int, int]], what: str) -> np.ndarray:
    if tuple(image.shape[:2]) not in [tuple(s) for s in sizes]:
        wanted = " or ".join(f"{w}×{h}" for h, w in sizes)
        raise errors.ConfigError(f"{what} {path!r} is {image.shape[1]}×{image.shape[0]} pixels; this model "
                                 f"edits {wanted} (width×height).")
    return image


def _as_list(value) -> list:
    if value is None:
        return []
    return [v for v in (value.split(",") if isinstance(value, str) else value) if str(v).strip() != ""]


def _labels(labels, count: int, num_classes: int) -> np.ndarray | None:
    labels = _as_list(labels)
    if not num_classes:
        if labels:
            raise errors.ConfigError("--edit_labels given, but the model is unconditional (config.model."
                                     "num_classes = 0).")
        return None
    try:
        labels = [int(v) for v in labels]
    except ValueError:
        raise errors.ConfigError(f"--edit_labels={','.join(map(str, labels))}: class labels are integers.") from None
    if len(labels) not in (1, count) or any(not 0 <= v < num_classes for v in labels):
        raise errors.ConfigError(f"The model is class-conditional ({num_classes} classes): give --edit_labels, one "
                                 f"label in [0, {num_classes}) for all {count} inputs or one per input; got "
                                 f"{labels or 'none'}.")
    return np.asarray(labels * count if len(labels) == 1 else labels, np.int32)


def edit_batch(module, params, task: str, inputs: dict, labels, key, *, mesh, sampler: dict, image_shape,
               sigmas=(), factor: int = DEFAULT_FACTOR, sigma: float | None = None, add_noise: bool = False,
               alphas: Sequence[float] = (), count: int | None = None) -> dict:
    """`task` over a batch of host inputs ({"image", "mask" or "low_res"}: numpy [B, …]) as one jitted program
    with the images spread over the mesh's batch devices; image i's noise comes from fold_in(key, i) alone.
    Returns host float32 {"result": [B, H, W, C] ([B, frames, …] for interpolate), "condition": what the
    model was given ([B, H, W, C]: the masked image, luma, low-res upsampled, noisy image or strokes)}."""
    count = len(next(iter(inputs.values()))) if inputs else int(count)
    devices = sharding.batch_device_count(mesh)
    padded = -(-count // devices) * devices
    batch_sharding = sharding.batch_sharding(mesh)

    def to_global(x):  # every process holds every input; each device takes its rows
        x = np.concatenate([x, np.repeat(x[-1:], padded - count, axis=0)])
        return jax.make_array_from_callback(x.shape, batch_sharding, lambda index: x[index])

    arrays = {k: to_global(np.asarray(v)) for k, v in inputs.items()}
    labels = None if labels is None else to_global(np.asarray(labels, np.int32))
    kw = dict(sigma_min=sampler["sigma_min"], sigma_max=sampler["sigma_max"], clip=sampler["clip"],
              renoise_kind=sampler["renoise"])

    @jax.jit
    def program(params, arrays, labels, key):
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(padded))
        keys = jax.lax.with_sharding_constraint(keys, batch_sharding)
        fn = evaluate.denoiser_for(module, params, labels, sampler["parameterization"],
                                   sigma_data=sampler["sigma_data"], sigma_min=sampler["sigma_min"])
        if task == "interpolate":
            z1, z2 = (_normal(keys, j, (padded, *image_shape)) for j in (0, 1))
            frames = interpolate(fn, z1, z2, alphas, sampler["sigma_max"], sampler["clip"])
            return {"result": jnp.swapaxes(frames, 0, 1)}
        image = arrays.get("image")
        if task == "inpaint":
            op = inpainting(arrays["mask"])
            result, condition = edit(fn, op, image, keys, sigmas, **kw), known_part(op, image)
        elif task == "colorize":
            condition = grey_to_rgb(image)
            result = colorize(fn, condition, keys, sigmas, **kw)
        elif task == "superres":
            condition = upsample(arrays["low_res"], factor)
            result = super_resolve(fn, arrays["low_res"], factor, keys, sigmas, **kw)
        elif task == "denoise":
            # Noise drawn in the program (stream 2 of each image's key): a noisy PNG would be clipped to [−1, 1].
            condition = image + sigma * _normal(keys, 2, image.shape) if add_noise else image
            result = denoise(fn, condition, sigma, sampler["clip"])
        elif task == "stroke":
            # The grid's middle column: the start y + t₁·z of the edit (the same noise as its line 3).
            condition = image + sigmas[0] * _normal(keys, 0, image.shape)
            result = stroke_guided(fn, image, keys, sigmas, **kw)
        else:
            raise errors.ConfigError(f"Unknown edit task {task!r}; choose one of {list(TASKS)}.")
        return {"result": result, "condition": condition}

    out = program(params, arrays, labels, key)
    return {k: np.asarray(_host(v))[:count] for k, v in out.items()}


def _host(x):
    """Every row of a batch-sharded global array, on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return jax.device_get(x)


def _check_options(task, given: dict) -> None:
    if task not in TASKS:
        given = "--mode=edit needs --edit_task" if task is None else f"--edit_task={task}: unknown task"
        raise errors.ConfigError(f"{given}; choose one of {list(TASKS)}.")
    stray = sorted(name for name, value in given.items()
                   if name not in TASK_OPTIONS[task] and value not in (None, [], (), ""))
    if stray:
        names = ", ".join("--num_samples" if n == "num_samples" else f"--edit_{n}" for n in stray)
        raise errors.ConfigError(f"--edit_task={task} does not take {names}; it takes "
                                 f"{', '.join(f'--edit_{n}' for n in TASK_OPTIONS[task])} and --edit_labels.")


def _read_inputs(task, images, masks, factor: int, shape) -> tuple[dict, list[str]]:
    """Host inputs of the task ({"image", "mask" / "low_res"}) and their file names, every size checked."""
    h, w, c = shape
    paths = _as_list(images)
    if not paths:
        raise errors.ConfigError(f"--edit_task={task} needs --edit_images=A.png[,B.png,...] ({w}×{h} pixels).")
    if task == "colorize" and c != 3:
        raise errors.ConfigError(f"Colorization needs a model of 3-channel (RGB) images; this run's images have "
                                 f"{c} channel(s).")
    if task == "superres" and (factor < 1 or h % factor or w % factor):
        raise errors.ConfigError(f"--edit_factor={factor} does not divide the model's {w}×{h} images.")
    sizes = [(h, w), (h // factor, w // factor)] if task == "superres" else [(h, w)]
    loaded = [_sized(p, read_png(p, c), sizes, "Image") for p in paths]
    if task == "superres":
        # Full-size images are averaged over factor×factor patches (App. D's low-res image); low-res ones used as is.
        low = [np.asarray(downsample(x[None], factor))[0] if x.shape[0] == h else x for x in loaded]
        return {"low_res": np.stack(low), "image": np.stack([upsample(x[None], factor)[0] if x.shape[0] != h
                                                              else x for x in loaded])}, paths
    inputs = {"image": np.stack(loaded)}
    if task == "inpaint":
        mask_paths = _as_list(masks)
        if len(mask_paths) not in (1, len(paths)):
            raise errors.ConfigError(f"--edit_task=inpaint needs --edit_masks: one mask PNG for all {len(paths)} "
                                     f"images or one per image (white = pixels to generate); got {len(mask_paths)}.")
        mask = [(_sized(p, read_png(p, 1), [(h, w)], "Mask") > 0.0).astype(np.float32) for p in mask_paths]
        inputs["mask"] = np.stack(mask * len(paths) if len(mask) == 1 else mask)
    return inputs, paths


def edit_checkpoint(config, workdir: str, *, task: str | None = None, images=None, masks=None, labels=None,
                    ts=None, steps: int | None = None, sigma: float | None = None, factor: int | None = None,
                    frames: int | None = None, add_noise: bool | None = None, step: int | None = None,
                    ema_rate=None, num_samples: int | None = None, output: str | None = None) -> dict:
    """`--mode=edit`: one zero-shot edit (`task` in TASKS) of PNG `images` by a run's checkpoint (`step`,
    `ema_rate`: as `--mode=sample`), written to `output` (default workdir/edit) as one PNG per result and a grid
    `<task>_grid.png` (a row per image: input | condition | result; for interpolate, a row per pair of noises).

    inpaint: `masks` (white = pixels to generate); colorize: grey or RGB images, 3-channel models; superres: images
    at full size (averaged over `factor`×`factor` patches) or at 1/`factor` size; denoise: images with Gaussian
    noise of std `sigma` in [−1, 1] units (`add_noise`: clean images, noised here); interpolate: `num_samples`
    pairs of noises, `frames` images each; stroke: rough images. `ts` (on a `steps`-point grid of the run's
    σ range) is the σ schedule; `labels` the classes of a conditional model. Every process calls it.
    """
    given = dict(images=images, masks=masks, ts=ts, steps=steps, sigma=sigma, factor=factor, frames=frames,
                 add_noise=add_noise or None, num_samples=num_samples)
    _check_options(task, given)
    from cmjax.data import datasets

    if datasets.get_spec(config.data.name).is_latent:
        raise errors.ConfigError(
            f"--mode=edit works on pixels (masks, grey values, patches of the image), and this run samples latents "
            f"(config.data.name={config.data.name!r}): editing in a VAE's latent space is not implemented.")
    sampler = consistency_sampler(config)
    shape = models.image_shape(config)
    factor = int(factor or DEFAULT_FACTOR)
    inputs, names = ({}, []) if task == "interpolate" else _read_inputs(task, images, masks, factor, shape)
    count = len(names) or int(num_samples or len(_as_list(labels)) or DEFAULT_PAIRS)
    label_array = _labels(labels, count, int(config.model.get("num_classes") or 0))
    steps = int(steps or DEFAULT_STEPS)
    sigmas = ts_sigmas(_int_list(ts, "--edit_ts") or DEFAULT_TS[task], steps, sampler) if task in DEFAULT_TS else ()
    if task == "denoise" and (sigma is None or not sampler["sigma_min"] <= float(sigma) <= sampler["sigma_max"]):
        raise errors.ConfigError(f"--edit_task=denoise needs --edit_sigma, the inputs' noise level, within the "
                                 f"run's [{sampler['sigma_min']}, {sampler['sigma_max']}]; got {sigma}.")
    frames = int(frames or DEFAULT_FRAMES)
    if frames < 2:
        raise errors.ConfigError(f"--edit_frames={frames}: interpolation needs at least the 2 endpoints.")

    mesh = sharding.make_mesh(config.mesh)
    module, params, _, step = workdir_lib.load_params(workdir, mesh, step=step, ema_rate=ema_rate, config=config)
    out = edit_batch(module, params, task, inputs, label_array, evaluate.eval_key(config.seed, EDIT_STREAM),
                     mesh=mesh, sampler=sampler, image_shape=shape, sigmas=sigmas, factor=factor,
                     sigma=None if sigma is None else float(sigma), add_noise=bool(add_noise),
                     alphas=np.linspace(0.0, 1.0, frames), count=count)
    output = output or os.path.join(workdir, "edit")
    grid, written = _write(output, task, inputs, out, shape)
    shown = [round(s, 4) for s in sigmas]
    shown = shown if len(shown) <= 6 else f"{len(shown)} from {shown[0]} to {shown[-1]}"
    return {"step": step, "task": task, "sigmas": shown, "grid": grid,
            "results": f"{written} PNG files in {output}"}


def _int_list(value, flag: str) -> list[int]:
    try:
        return [int(v) for v in _as_list(value)]
    except ValueError:
        raise errors.ConfigError(f"{flag}={value}: give integers, e.g. 0,20,39.") from None


def _write(output: str, task: str, inputs: dict, out: dict, shape) -> tuple[str, int]:
    """Result PNGs at the model's size and the grid (process 0); (grid path, number of result files)."""
    results = out["result"]
    if task == "interpolate":
        rows = [list(frames) for frames in results]
    else:
        mask = inputs.get("mask")
        middle = (np.broadcast_to(mask * 2.0 - 1.0, results.shape) if task == "inpaint" else out["condition"])
        rows = [[inputs["image"][i], middle[i], results[i]] for i in range(len(results))]
    flat = results.reshape(-1, *shape)
    grid_path = os.path.join(output, f"{task}_grid.png")
    if jax.process_index() == 0:
        for i, image in enumerate(evaluate.to_uint8(flat)):
            evaluate.save_png(os.path.join(output, f"{task}_{i:03d}.png"), image)
        tiles = evaluate.to_uint8(np.stack([np.broadcast_to(t, shape) for row in rows for t in row]))
        grid = evaluate.image_grid(tiles, cols=len(rows[0]))
        evaluate.save_png(grid_path, grid, scale=max(1, 64 // shape[0]))  # 8×8 digits: 8×
    return grid_path, len(flat)

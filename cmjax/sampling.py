"""Consistency-model samplers: one step, multistep (CM Algorithm 1), openai's `ts` index convention.

`consistency_fn(x, sigma)` is the consistency function f_θ with its parameters bound
(`parameterization.consistency_denoise`). EDM teachers are sampled with `solvers.edm_sampler`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cmjax import schedules
from cmjax.parameterization import SIGMA_MAX, SIGMA_MIN

ConsistencyFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def _denoised(consistency_fn: ConsistencyFn, x, sigma, clip: bool):
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
    x0 = consistency_fn(x, sigma)
    return jnp.clip(x0, -1.0, 1.0) if clip else x0


def one_step_sample(consistency_fn: ConsistencyFn, key, shape, sigma_max=SIGMA_MAX, clip=True):
    """x = f(σmax·z, σmax) (CM Algorithm 1 with a single step)."""
    z = jax.random.normal(key, shape, jnp.float32)
    return _denoised(consistency_fn, sigma_max * z, sigma_max, clip)


RENOISE = ("cm", "plain")


def renoise(x0, next_sigma, noise, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, kind: str = "cm"):
    """kind "cm": x_τ = x0 + √(τ² − σmin²)·z, with τ clipped to [σmin, σmax] (CM Alg. 1 line 5; openai,
    diffusers); "plain": x0 + τ·z (ECT's sampler, locuslab/ect training/ct_training_loop.py:79-97)."""
    if kind == "plain":
        return x0 + jnp.asarray(next_sigma, jnp.float32) * noise
    if kind != "cm":
        raise ValueError(f"Unknown renoise kind {kind!r}; choose one of {list(RENOISE)}.")
    tau = jnp.clip(jnp.asarray(next_sigma, jnp.float32), sigma_min, sigma_max)
    return x0 + jnp.sqrt(tau**2 - sigma_min**2) * noise


def multistep_sample(
    consistency_fn: ConsistencyFn,
    key,
    shape,
    sigmas: Sequence[float],
    sigma_min=SIGMA_MIN,
    sigma_max=SIGMA_MAX,
    clip=True,
    noise: Sequence[jnp.ndarray] | None = None,
    renoise_kind: str = "cm",
):
    """CM Algorithm 1: x = f(σ0·z, σ0); for each later τ: x = f(x + √(τ² − σmin²)·z, τ).

    `sigmas` is decreasing and starts at the first noise level (usually σmax); len(sigmas) network
    evaluations. The noise for step j is drawn from `jax.random.fold_in(key, j)`, or is `noise[j]` when
    standard-normal arrays are given (e.g. the latents and generator draws of a PyTorch pipeline).
    `clip` clips each denoised estimate to [−1, 1]; `renoise_kind` "plain" renoises with x + τ·z (ECT's
    release sampler, with clip=False) instead of CM's √(τ² − σmin²).
    """
    sigmas = [float(s) for s in sigmas]
    if not sigmas or any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"Sampling sigmas must be a non-empty decreasing list, got {sigmas}.")
    x = sigmas[0] * _noise(noise, key, 0, shape)
    x = _denoised(consistency_fn, x, sigmas[0], clip)
    for j, tau in enumerate(sigmas[1:], start=1):
        x_tau = renoise(x, tau, _noise(noise, key, j, shape), sigma_min, sigma_max, renoise_kind)
        x = _denoised(consistency_fn, x_tau, tau, clip)
    return x


def _noise(noise, key, j: int, shape):
    if noise is None:
        return jax.random.normal(jax.random.fold_in(key, j), shape, jnp.float32)
    if len(noise) <= j or tuple(noise[j].shape) != tuple(shape):
        raise ValueError(f"noise[{j}] must be an array of shape {tuple(shape)}, one per sampling step.")
    return jnp.asarray(noise[j], jnp.float32)


def openai_ts_sigmas(
    ts: Sequence[int], steps: int, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=schedules.RHO
) -> np.ndarray:
    """σ for openai's `--ts` indices into a `steps`-point Karras grid counted from σmax.

    openai `stochastic_iterative_sampler`: t = (σmax^{1/ρ} + ts[i]/(steps−1)·(σmin^{1/ρ} − σmax^{1/ρ}))^ρ.
    `--ts 0,22,39 --steps 40` gives [σmax, σ(22), σmin]: two evaluations, the last index only sets
    the (zero) final noise. Same as diffusers' `CMStochasticIterativeScheduler(num_train_timesteps=40)`
    with `timesteps=[22, 0]`: the same indices listed in descending order, σmin appended as the last level.
    """
    ts = np.asarray(ts, np.float64)
    if np.any(ts < 0) or np.any(ts > steps - 1) or np.any(np.diff(ts) <= 0):
        raise ValueError(f"ts must increase within [0, {steps - 1}], got {ts.tolist()}.")
    # Index i from σmax equals index steps−1−i of the ascending grid.
    return schedules.karras_sigma(steps - 1 - ts, steps, sigma_min, sigma_max, rho)


def openai_multistep_sample(
    consistency_fn: ConsistencyFn,
    key,
    shape,
    ts: Sequence[int],
    steps: int,
    sigma_min=SIGMA_MIN,
    sigma_max=SIGMA_MAX,
    rho=schedules.RHO,
    clip=True,
    noise: Sequence[jnp.ndarray] | None = None,
):
    """openai's `stochastic_iterative_sampler`: evaluate at the σ of ts[:-1]; ts[-1] only sets the last
    renoising level, which is σmin (no noise) when ts[-1] = steps − 1. `noise`: as in `multistep_sample`
    (len(ts) arrays; the last one is used only when ts[-1] < steps − 1).
    """
    sigmas = openai_ts_sigmas(ts, steps, sigma_min, sigma_max, rho)
    final = float(np.clip(sigmas[-1], sigma_min, sigma_max))
    x = multistep_sample(consistency_fn, key, shape, sigmas[:-1], sigma_min, sigma_max, clip, noise)
    if final > sigma_min * (1 + 1e-6):  # the grid's last point is σmin up to float64 rounding
        x = renoise(x, final, _noise(noise, key, len(sigmas) - 1, shape), sigma_min, sigma_max)
    return x


# ----------------------------------------------------------------------------------------------
# MeanFlow (Geng et al. 2025): the network is an average velocity, sampled by jumping along it.

AverageVelocityFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]  # u(z, r, t)


def meanflow_times(times: Sequence[float]) -> list[float]:
    """A MeanFlow time grid: `times` decreasing from 1 (pure noise) within (0, 1], with 0 appended as the end."""
    times = [float(t) for t in times]
    if not times or any(a <= b for a, b in zip(times, times[1:])) or times[0] != 1.0 or times[-1] <= 0.0:
        raise ValueError(f"MeanFlow sampling times must decrease from 1.0 within (0, 1], got {times}.")
    return times + [0.0]


def meanflow_sample(u_fn: AverageVelocityFn, key, shape, times: Sequence[float] = (1.0,), noise=None):
    """z = ε ~ N(0, I) at t = times[0]; for each later time r (and finally 0): z ← z − (t − r)·u(z, r, t)
    (MeanFlow Algorithm 2 / eq. 12; Gsunshine/meanflow meanflow.py:102-113, Lyy-iiis/imeanflow imf.py
    `sample_one_step`): [1.0] is 1-step x = ε − u(ε, 0, 1), len(times) evaluations, deterministic. The noise is
    drawn from `jax.random.fold_in(key, 0)` (as `multistep_sample`'s first step), or is `noise[0]`."""
    grid = meanflow_times(times)
    z = _noise(noise, key, 0, shape)
    for t, r in zip(grid[:-1], grid[1:]):
        batch = jnp.full(shape[:1], t, jnp.float32)
        z = z - (t - r) * u_fn(z, jnp.full(shape[:1], r, jnp.float32), batch)
    return z

"""Probability-flow ODE solvers on the EDM denoiser (Karras et al. 2022, Algorithm 1).

The PF-ODE in EDM's σ(t) = t form is dx/dt = (x − D(x, t))/t. `denoise_fn(x, sigma)` is any
denoiser with the parameters already bound (a closure over traced arrays inside jit is fine: those are
arguments of the compiled function, not constants).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from cmjax import schedules
from cmjax.parameterization import SIGMA_MAX, SIGMA_MIN, broadcast_per_sample

DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def _per_sample(sigma, x):
    return jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])


def ode_derivative(denoise_fn: DenoiseFn, x, t):
    """d = (x − D(x, t)) / t."""
    t = _per_sample(t, x)
    return (x - denoise_fn(x, t)) / broadcast_per_sample(t, x)


def euler_step(denoise_fn: DenoiseFn, x, t, t_next):
    """Euler: x' = x + (t' − t)·(x − D(x, t))/t (DESIGN §4; CM's CD-Euler teacher)."""
    t, t_next = _per_sample(t, x), _per_sample(t_next, x)
    return x + broadcast_per_sample(t_next - t, x) * ode_derivative(denoise_fn, x, t)


def heun_step(denoise_fn: DenoiseFn, x, t, t_next):
    """Heun (EDM Alg. 1 lines 5–8): x' = x + (t' − t)·(d + d')/2, d' evaluated at the Euler point.

    Needs t' > 0; use `euler_step` for the last step to t' = 0.
    """
    t, t_next = _per_sample(t, x), _per_sample(t_next, x)
    dt = broadcast_per_sample(t_next - t, x)
    d = ode_derivative(denoise_fn, x, t)
    x_euler = x + dt * d
    d_next = ode_derivative(denoise_fn, x_euler, t_next)
    return x + dt * 0.5 * (d + d_next)


def edm_sampler_evaluations(num_steps: int) -> int:
    """Network evaluations of `edm_sampler`: Heun on N−1 intervals plus the final Euler step, 2N−1."""
    return 2 * num_steps - 1


def edm_sigmas(num_steps: int, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=schedules.RHO):
    """EDM sampling times: the N-point Karras grid descending from σmax to σmin, then 0 (EDM eq. 5)."""
    grid = schedules.karras_sigmas(num_steps, sigma_min, sigma_max, rho)[::-1]
    return jnp.concatenate([grid, jnp.zeros((1,), jnp.float32)])


def integrate_pf_ode(denoise_fn: DenoiseFn, x, sigmas):
    """Heun along a decreasing list of σ values (all > 0): solves the PF-ODE from sigmas[0] to sigmas[-1]."""
    sigmas = jnp.asarray(sigmas, jnp.float32)

    def body(x, pair):
        return heun_step(denoise_fn, x, pair[0], pair[1]), None

    pairs = jnp.stack([sigmas[:-1], sigmas[1:]], axis=1)
    x, _ = jax.lax.scan(body, x, pairs)
    return x


def edm_sampler(
    denoise_fn: DenoiseFn,
    key,
    shape,
    num_steps: int = 18,
    sigma_min=SIGMA_MIN,
    sigma_max=SIGMA_MAX,
    rho=schedules.RHO,
):
    """Deterministic EDM sampler (EDM Alg. 1, S_churn = 0): x_0 = σmax·z, Heun over the N-point grid,
    Euler for the last step to 0. Returns (samples, network_evaluations) with 2N−1 evaluations
    (35 for N = 18).
    """
    sigmas = edm_sigmas(num_steps, sigma_min, sigma_max, rho)
    x = sigmas[0] * jax.random.normal(key, shape, jnp.float32)
    x = integrate_pf_ode(denoise_fn, x, sigmas[:-1])
    x = euler_step(denoise_fn, x, sigmas[-2], sigmas[-1])
    return x, edm_sampler_evaluations(num_steps)

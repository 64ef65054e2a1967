"""Preconditioning: EDM denoiser scalings and the consistency-model boundary scalings.

Karras et al. 2022 (EDM), Table 1: D(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ)).
Song et al. 2023 (CM), Appendix C: the same form with c_skip, c_out shifted by σ_min so that the
consistency function satisfies the boundary condition f(x, σ_min) = x exactly.
All arithmetic is float32 whatever the network's compute dtype.
"""
from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp

SIGMA_DATA = 0.5
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0

# apply_fn(params, x_in_bhwc, time_input_b) -> raw network output F, shaped like x_in_bhwc.
NetworkFn = Callable[[Any, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def edm_scalings(sigma, sigma_data=SIGMA_DATA):
    """EDM Table 1: c_skip = σd²/(σ²+σd²), c_out = σ·σd/√(σ²+σd²), c_in = 1/√(σ²+σd²)."""
    sigma = jnp.asarray(sigma, jnp.float32)
    total = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / total
    c_out = sigma * sigma_data / jnp.sqrt(total)
    c_in = 1.0 / jnp.sqrt(total)
    return c_skip, c_out, c_in


def consistency_scalings(sigma, sigma_data=SIGMA_DATA, sigma_min=SIGMA_MIN):
    """CM Appendix C: c_skip = σd²/((σ−σmin)²+σd²), c_out = σd·(σ−σmin)/√(σ²+σd²), c_in = 1/√(σ²+σd²).

    At σ = σmin: c_skip = 1 and c_out = 0, so f(x, σmin) = x for any network output.
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    shifted = sigma - sigma_min
    c_skip = sigma_data**2 / (shifted**2 + sigma_data**2)
    c_out = sigma_data * shifted / jnp.sqrt(sigma**2 + sigma_data**2)
    c_in = 1.0 / jnp.sqrt(sigma**2 + sigma_data**2)
    return c_skip, c_out, c_in


def edm_noise_conditioning(sigma):
    """EDM Table 1: c_noise = ¼·ln σ."""
    return 0.25 * jnp.log(jnp.asarray(sigma, jnp.float32))


def network_time_input(sigma):
    """The time input openai's ADM/CM networks (and diffusers' UNet2DModel) take: 1000·c_noise = 250·ln σ.

    The released code adds 1e-44 to keep σ = 0 finite; 1e-44 is a float32 denormal that XLA flushes
    to zero, so σ is floored at the smallest normal float32 instead (identical for every σ > 1e-38).
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    return 250.0 * jnp.log(jnp.maximum(sigma, jnp.finfo(jnp.float32).tiny))


def broadcast_per_sample(coeff, x):
    """Broadcasts a per-sample coefficient of shape [B] (or a scalar) against x of shape [B, ...]."""
    coeff = jnp.asarray(coeff, jnp.float32)
    if coeff.ndim == 0:
        return coeff
    return coeff.reshape(coeff.shape + (1,) * (x.ndim - coeff.ndim))


def _precondition(scalings, apply_fn: NetworkFn, params, x, sigma):
    x = jnp.asarray(x, jnp.float32)
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
    c_skip, c_out, c_in = (broadcast_per_sample(c, x) for c in scalings(sigma))
    out = apply_fn(params, c_in * x, network_time_input(sigma))
    return c_skip * x + c_out * jnp.asarray(out, jnp.float32)


def edm_denoise(apply_fn: NetworkFn, params, x, sigma, sigma_data=SIGMA_DATA):
    """The EDM denoiser D_θ(x, σ) = c_skip·x + c_out·F_θ(c_in·x, c_noise) (EDM eq. 7)."""
    return _precondition(lambda s: edm_scalings(s, sigma_data), apply_fn, params, x, sigma)


def consistency_denoise(
    apply_fn: NetworkFn, params, x, sigma, sigma_data=SIGMA_DATA, sigma_min=SIGMA_MIN
):
    """The consistency function f_θ(x, σ) = c_skip·x + c_out·F_θ(c_in·x, c_noise) (CM eq. 5)."""
    return _precondition(
        lambda s: consistency_scalings(s, sigma_data, sigma_min), apply_fn, params, x, sigma
    )


def network_from_denoiser(denoise_fn, *, kind: str, sigma_data=SIGMA_DATA, sigma_min=SIGMA_MIN):
    """Inverts the preconditioning: the raw network F(x_in, time_input) whose `denoise(..., kind)` equals
    `denoise_fn(x, σ)`, F = (D − c_skip·x)/c_out (0 where c_out = 0, i.e. at the boundary σ = σmin).

    Wraps an analytic denoiser (e.g. a Gaussian mixture's exact posterior mean) as a network with no
    parameters, so it can stand in for a trained teacher or model.
    """
    scalings = {"edm": lambda s: edm_scalings(s, sigma_data),
                "consistency": lambda s: consistency_scalings(s, sigma_data, sigma_min)}[kind]

    def network(params, x_in, time_input, *unused_rng):
        del params, unused_rng
        sigma = jnp.exp(jnp.asarray(time_input, jnp.float32) / 250.0)
        c_skip, c_out, c_in = (broadcast_per_sample(c, x_in) for c in scalings(sigma))
        x = x_in / c_in
        safe_c_out = jnp.where(c_out > 0, c_out, 1.0)
        return jnp.where(c_out > 0, (denoise_fn(x, sigma) - c_skip * x) / safe_c_out, 0.0)

    return network


def denoise(
    apply_fn: NetworkFn,
    params,
    x,
    sigma,
    *,
    kind: str,
    sigma_data=SIGMA_DATA,
    sigma_min=SIGMA_MIN,
):
    """Dispatches to `edm_denoise` (kind="edm") or `consistency_denoise` (kind="consistency")."""
    if kind == "edm":
        return edm_denoise(apply_fn, params, x, sigma, sigma_data)
    if kind == "consistency":
        return consistency_denoise(apply_fn, params, x, sigma, sigma_data, sigma_min)
    raise ValueError(f"Unknown parameterization {kind!r}; choose 'edm' or 'consistency'.")

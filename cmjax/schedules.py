"""Noise-level grids, training curricula N(k)/μ(k), noise-level samplers and EMA rates.

Every function that depends on the training step accepts a traced step, so a jitted train step
compiles once for the whole run: grids of a step-dependent size N are evaluated from (i, N) inside
the compiled function (`karras_sigma`), and index samplers work on a fixed-size grid of the largest N
with the unused entries masked (`ict_index_probs_masked`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from cmjax.parameterization import SIGMA_MAX, SIGMA_MIN

RHO = 7.0


def _is_traced(*values) -> bool:
    return any(isinstance(v, jax.core.Tracer) for v in values)


def _xp(*values):
    """jnp for traced or device values; NumPy float64 for host scalars (exact release arithmetic)."""
    return jnp if _is_traced(*values) or any(isinstance(v, jax.Array) for v in values) else np


# ----------------------------------------------------------------------------------------------
# Karras grids (EDM eq. 5; CM §3).


def karras_sigma(index, num_scales, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO):
    """σ_i = (σmin^{1/ρ} + i/(N−1)·(σmax^{1/ρ} − σmin^{1/ρ}))^ρ for a 0-based index i (ascending).

    Both `index` and `num_scales` may be traced: this is how a curriculum of growing N runs in one
    compiled step (float32). Host values are computed in float64, as openai and diffusers do.
    """
    xp = _xp(index, num_scales)
    ftype = np.float64 if xp is np else jnp.float32
    index = xp.asarray(index, ftype)
    num_scales = xp.asarray(num_scales, ftype)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (lo + index / (num_scales - 1.0) * (hi - lo)) ** rho


def karras_sigmas(num_scales: int, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO):
    """The N-point Karras grid, ascending from σmin to σmax (DESIGN §4), float64 math → float32."""
    if num_scales < 2:
        raise ValueError(f"A Karras grid needs at least 2 points, got num_scales={num_scales}.")
    grid = karras_sigma(np.arange(num_scales), num_scales, sigma_min, sigma_max, rho)
    return jnp.asarray(grid, jnp.float32)


# ----------------------------------------------------------------------------------------------
# CM 2023 (Song et al.) curricula.


def cm_adaptive_schedule(step, total_steps, s0=2, s1=150, mu0=0.9, *, paper_form=False):
    """CT adaptive curriculum N(k), μ(k) (CM 2023 Appendix C; openai `create_ema_and_scales_fn`).

    Released-code form (default, used by the published checkpoints):
      m = max(1, ⌈√(k/K·((s1+1)² − s0²) + s0²) − 1⌉),  N(k) = m + 1,  μ(k) = exp(s0·ln μ0 / m).
    Paper form (`paper_form=True`): the same N(k) but μ(k) = exp(s0·ln μ0 / N(k)).
    Returns (num_scales, mu). With a host step the arithmetic is float64 as in the release; traced
    (inside jit) it is float32, whose ceiling differs from float64 at a handful of isolated steps
    (4 of 800k for the CIFAR-10 setting), each off by one grid point for that single step.
    """
    xp = _xp(step)
    ftype = np.float64 if xp is np else jnp.float32
    k = xp.asarray(step, ftype)
    ratio = k / ftype(total_steps)
    m = xp.ceil(xp.sqrt(ratio * ftype((s1 + 1) ** 2 - s0**2) + ftype(s0**2)) - ftype(1.0))
    m = xp.maximum(m, ftype(1.0))
    num_scales = m + 1
    denom = num_scales if paper_form else m
    mu = xp.exp(ftype(s0) * ftype(math.log(mu0)) / denom)
    return num_scales.astype(np.int32), mu.astype(np.float32)


def fixed_schedule(step, num_scales: int, mu: float):
    """Fixed N and target-EMA μ (CD: N = 18 on CIFAR-10, 40 on ImageNet-64 and LSUN)."""
    del step
    return jnp.asarray(num_scales, jnp.int32), jnp.asarray(mu, jnp.float32)


# ----------------------------------------------------------------------------------------------
# iCT (Song & Dhariwal 2023).


def ict_stage_length(total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """K′ = ⌊K / (log2⌊s1/s0⌋ + 1)⌋ (iCT §3.4), at least 1: a run shorter than the number of stages
    spends one step in each (K′ = 0 would divide by zero in N(k))."""
    return max(1, int(math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1))))


def ict_num_scales(step, total_steps, s0=10, s1=1280):
    """iCT exponential curriculum N(k) = min(s0·2^⌊k/K′⌋, s1) + 1 (iCT eq. 6): 11, 21, 41, …, 1281."""
    stage_length = ict_stage_length(total_steps, s0, s1)
    stage = jnp.asarray(step, jnp.int32) // stage_length
    # Clip the exponent first so 2^stage cannot overflow int32 long after s1 is reached.
    max_stage = int(math.ceil(math.log2(s1 / s0)))
    scales = s0 * jnp.left_shift(1, jnp.minimum(stage, max_stage))
    return (jnp.minimum(scales, s1) + 1).astype(jnp.int32)


def ict_index_probs(sigmas, p_mean=-1.1, p_std=2.0):
    """Discrete lognormal over adjacent pairs of an ascending grid (iCT §3.5).

    p(i) ∝ erf((ln σ_{i+1} − Pm)/(√2·Ps)) − erf((ln σ_i − Pm)/(√2·Ps)), i = 0 … N−2.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    cdf = jax.scipy.special.erf((jnp.log(sigmas) - p_mean) / (math.sqrt(2.0) * p_std))
    mass = cdf[1:] - cdf[:-1]
    return mass / jnp.sum(mass)


def ict_index_probs_masked(
    num_scales, max_scales: int, p_mean=-1.1, p_std=2.0, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
    rho=RHO,
):
    """`ict_index_probs` for a traced N on a fixed-size grid of `max_scales` points.

    Entries i ≥ N−1 get probability 0, so one compiled function serves every curriculum stage.
    """
    index = jnp.arange(max_scales)
    grid = karras_sigma(jnp.minimum(index, num_scales - 1), num_scales, sigma_min, sigma_max, rho)
    cdf = jax.scipy.special.erf((jnp.log(grid) - p_mean) / (math.sqrt(2.0) * p_std))
    mass = jnp.where(index[:-1] < num_scales - 1, cdf[1:] - cdf[:-1], 0.0)
    return mass / jnp.sum(mass)


def sample_ict_indices(key, batch_size: int, num_scales, max_scales: int, p_mean=-1.1, p_std=2.0,
                       sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO):
    """Draws pair indices i ∈ [0, N−2] from the discrete lognormal of `ict_index_probs_masked`."""
    probs = ict_index_probs_masked(num_scales, max_scales, p_mean, p_std, sigma_min, sigma_max, rho)
    return jax.random.categorical(key, jnp.log(probs), shape=(batch_size,))


# ----------------------------------------------------------------------------------------------
# ECT (Geng et al. 2024).


def ect_stage(step, stage_steps: int):
    """stage = ⌊iteration / d⌋ (ECT §3; CIFAR-10 d = 25k)."""
    return jnp.asarray(step, jnp.int32) // stage_steps


def ect_r(t, stage, q=2.0, k=8.0, b=1.0):
    """ECT mapping r(t) = max(0, t·(1 − q^{−(stage+1)}·(1 + k·sigmoid(−b·t)))) (ECT eq. 8).

    r < t always; Δt = t − r shrinks by q every stage; r is clamped to 0 (the floor) where the ratio
    turns negative, i.e. for small t early in training, and there the target is the clean image.
    """
    t = jnp.asarray(t, jnp.float32)
    decay = jnp.power(jnp.float32(q), -(jnp.asarray(stage, jnp.float32) + 1.0))
    ratio = 1.0 - decay * (1.0 + k * jax.nn.sigmoid(-b * t))
    return jnp.maximum(t * ratio, 0.0)


def lognormal_sigmas(key, shape, p_mean, p_std):
    """σ = exp(Pm + Ps·n), n ~ N(0, 1) (EDM training distribution; ECT's t sampler)."""
    return jnp.exp(p_mean + p_std * jax.random.normal(key, shape, jnp.float32))


# ----------------------------------------------------------------------------------------------
# EMA.


def ema_rate_from_half_life(half_life_images: float, batch_size: int) -> float:
    """β = 0.5^(B / half-life in images) (EDM §5 'ema_halflife_kimg')."""
    if half_life_images <= 0:
        raise ValueError(f"EMA half-life must be positive, got {half_life_images}.")
    return 0.5 ** (batch_size / half_life_images)


# ----------------------------------------------------------------------------------------------
# MeanFlow (Geng et al. 2025) two-time sampler.

MEANFLOW_TIME_DISTS = ("logit_normal", "uniform")
MEANFLOW_TR_ORDERS = ("sort", "min")


def meanflow_time(key, batch_size: int, dist: str, p_mean: float, p_std: float):
    """t ∈ (0, 1): logit-normal sigmoid(Pm + Ps·n), n ~ N(0, 1), or uniform (Gsunshine/meanflow meanflow.py:138-145)."""
    if dist == "logit_normal":
        return jax.nn.sigmoid(p_mean + p_std * jax.random.normal(key, (batch_size,), jnp.float32))
    if dist == "uniform":
        return jax.random.uniform(key, (batch_size,), jnp.float32)
    raise ValueError(f"Unknown MeanFlow time distribution {dist!r}; choose one of {list(MEANFLOW_TIME_DISTS)}.")


def meanflow_times(key, batch_size: int, *, dist: str = "logit_normal", p_mean_t: float = -0.4, p_std_t: float = 1.0,
                   p_mean_r: float = -0.4, p_std_r: float = 1.0, equal_fraction: float = 0.75, order: str = "sort"):
    """(t, r) with 0 ≤ r ≤ t ≤ 1, each [B]: t and r drawn independently, the first ⌊B·equal_fraction⌋ samples
    get r = t (flow matching). order "sort": t, r = max, min of the two draws, then r = t on that fraction
    (Gsunshine/meanflow meanflow.py:147-157; py-meanflow time_sampler.py:22-39, "v0", the paper's); "min": r = t
    on the fraction, then r = min(t, r), so t keeps its own distribution (py-meanflow time_sampler.py:42-59, "v1").
    The ImageNet JAX code fixes the count of r = t samples as here; the CIFAR-10 PyTorch code draws it per
    sample with the same probability."""
    t_key, r_key = jax.random.split(key)
    t = meanflow_time(t_key, batch_size, dist, p_mean_t, p_std_t)
    r = meanflow_time(r_key, batch_size, dist, p_mean_r, p_std_r)
    equal = jnp.arange(batch_size) < int(batch_size * equal_fraction)
    if order == "sort":
        t, r = jnp.maximum(t, r), jnp.minimum(t, r)
        return t, jnp.where(equal, t, r)
    if order == "min":
        return t, jnp.minimum(t, jnp.where(equal, t, r))
    raise ValueError(f"Unknown MeanFlow (t, r) order {order!r}; choose one of {list(MEANFLOW_TR_ORDERS)}.")


def imf_guidance_scale(key, batch_size: int, *, cfg_max: float = 7.0, cfg_beta: float = 1.0):
    """iMF's per-sample CFG scale ω ∈ [1, 1 + cfg_max] (iMF §5, Lyy-iiis/imeanflow imf.py `sample_cfg_scale`,
    s_max = 7.0, `cfg_beta` 1.0 in configs/default.py): ω = (1 + s_max)^u, u ~ U(0, 1) (log-uniform) for β = 1;
    otherwise the inverse CDF of p(ω) ∝ ω^(−β): ω = (1 + u·((1 + s_max)^(1−β) − 1))^(1/(1−β))."""
    u = jax.random.uniform(key, (batch_size,), jnp.float32)
    log_top = jnp.log1p(jnp.float32(cfg_max))
    if cfg_beta == 1.0:
        return jnp.exp(u * log_top)
    one_minus_beta = 1.0 - float(cfg_beta)
    return jnp.exp(jnp.log1p(u * jnp.expm1(one_minus_beta * log_top)) / one_minus_beta)


def imf_guidance_interval(key, equal):
    """iMF's per-sample guidance interval (t_min, t_max): t_min ~ U(0, 0.5), t_max ~ U(0.5, 1), and [0, 1] for
    the flow-matching samples (`equal`: r = t), which are guided at every t (imf.py `sample_cfg_interval`)."""
    min_key, max_key = jax.random.split(key)
    batch = jnp.shape(equal)
    t_min = jax.random.uniform(min_key, batch, jnp.float32, 0.0, 0.5)
    t_max = jax.random.uniform(max_key, batch, jnp.float32, 0.5, 1.0)
    return jnp.where(equal, 0.0, t_min), jnp.where(equal, 1.0, t_max)


# ----------------------------------------------------------------------------------------------
# Flow matching (SiT, Ma et al. 2024): t = 0 is noise, t = 1 data (parameterization.py, "Flow matching").

FLOW_TIME_DISTS = ("uniform", "logit_normal")


def flow_matching_time(key, batch_size: int, dist: str = "uniform", p_mean: float = 0.0, p_std: float = 1.0,
                       eps: float = 0.0):
    """SiT's training time t ∈ [eps, 1 − eps]. "uniform": t ~ U(eps, 1 − eps), SiT's `Transport.sample`
    (willisma/SiT transport/transport.py:103-113; its Linear velocity model trains on [0, 1], eps = 0:
    transport/__init__.py:53-55 and `check_interval`, transport.py:84-100). "logit_normal" (a cmjax option, SD3's
    and MeanFlow's): the noise fraction 1 − t is `meanflow_time`'s logit-normal sigmoid(Pm + Ps·n), so Pm means
    what it means in a MeanFlow recipe (Pm < 0: nearer the data), mapped onto the same interval."""
    if dist not in FLOW_TIME_DISTS:
        raise ValueError(f"Unknown flow-matching time distribution {dist!r}; choose one of {list(FLOW_TIME_DISTS)}.")
    if dist == "uniform":
        return jax.random.uniform(key, (batch_size,), jnp.float32, eps, 1.0 - eps)
    noise_fraction = meanflow_time(key, batch_size, dist, p_mean, p_std)
    return eps + (1.0 - 2.0 * eps) * (1.0 - noise_fraction)

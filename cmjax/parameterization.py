"""Preconditioning: EDM denoiser scalings and the consistency-model boundary scalings.

Karras et al. 2022 (EDM), Table 1: D(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ)).
Song et al. 2023 (CM), Appendix C: the same form with c_skip, c_out shifted by σ_min so that the
consistency function satisfies the boundary condition f(x, σ_min) = x exactly.
Lu & Song 2024 (sCM, arXiv 2410.11081), TrigFlow: x_t = cos t·x0 + sin t·z, z ~ N(0, σd²I), t ∈ [0, π/2],
f(x_t, t) = cos t·x_t − sin t·σd·F(x_t/σd, c_noise(t)); σ = σd·tan t (the section "TrigFlow" below).
MeanFlow (Geng et al. 2025) and flow matching on SiT's linear interpolant (Ma et al. 2024): the networks are
velocities, read in EDM's σ form for the samplers (the sections "MeanFlow" and "Flow matching" below).
All arithmetic is float32 whatever the network's compute dtype.
"""
from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp

from cmjax import errors

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
                "consistency": lambda s: consistency_scalings(s, sigma_data, sigma_min),
                # TrigFlow's f in σ form has EDM's scalings (`trigflow_denoise`), so the inversion is EDM's;
                # "trigflow" conditions on t = arctan(σ/σd) instead of 250·ln σ.
                "trigflow": lambda s: edm_scalings(s, sigma_data),
                "trigflow_edm": lambda s: edm_scalings(s, sigma_data)}[kind]

    def network(params, x_in, time_input, *unused_rng):
        del params, unused_rng
        time_input = jnp.asarray(time_input, jnp.float32)
        sigma = trigflow_sigma(time_input, sigma_data) if kind == "trigflow" else jnp.exp(time_input / 250.0)
        c_skip, c_out, c_in = (broadcast_per_sample(c, x_in) for c in scalings(sigma))
        x = x_in / c_in
        safe_c_out = jnp.where(c_out > 0, c_out, 1.0)
        return jnp.where(c_out > 0, (denoise_fn(x, sigma) - c_skip * x) / safe_c_out, 0.0)

    return network


# ----------------------------------------------------------------------------------------------
# TrigFlow (sCM, Lu & Song 2024; DESIGN §4).
#
# cmjax's TrigFlow network is the raw network `network(params, x_in, time_input)` read as
#     F_trig(x_in, t) = −network(x_in, c_noise(t)),
# the sign flipped so that F_trig is a *velocity* (F_trig → the PF-ODE velocity (dx_t/dt)/σd for a diffusion
# model). Two time conditionings, the two TrigFlow parameterisation kinds:
#   "trigflow":     time_input = t, fed as is to the network's embedding (sCM's c_noise(t) = t for stable
#                   training; the constant is not confirmed against the paper's appendix). Measured on the 2-D
#                   ring, 2k sCT steps, 1-step sliced W2 (untrained 0.71): time_input = t 0.046, 1000·t 0.69.
#                   cmjax's NCSN++ divides its time input by 1000 before its Fourier features (it expects
#                   1000·c_noise), so there it embeds t/1000: untested at full size.
#   "trigflow_edm": c_noise(t) = 250·ln(σd·tan t), EDM's (network_time_input at σ = σd·tan t), so an EDM run's
#                   network, weights unchanged, IS a TrigFlow model (exact; below). Its time derivative is
#                   250/(sin t·cos t): with cmjax's sinusoidal embeddings the dF/dt term then swamps the tangent
#                   and sCT does not learn on the 2-D ring (1-step distance 0.63 after 2k steps, 0.046 with
#                   "trigflow"; the untrained model 0.71) — sCM §4.1's time-conditioning instability.
# Why "trigflow_edm" is exact: at σ = σd·tan t, σ² + σd² = σd²/cos²t, so EDM's c_skip = cos²t,
# c_out = σd·sin t, c_in = cos t/σd; with x_σ = x_t/cos t, c_in·x_σ = x_t/σd and
# D(x_σ, σ) = cos t·x_t + σd·sin t·network(x_t/σd, ·) = f(x_t, t). For either kind the TrigFlow consistency
# function at t is an EDM-style clean estimate at σ = σd·tan t of x_σ = x_t/cos t (`trigflow_denoise`).
TRIGFLOW_KINDS = ("trigflow", "trigflow_edm")


def trigflow_sigma(t, sigma_data=SIGMA_DATA):
    """σ = σd·tan t (the EDM noise level with the same signal-to-noise ratio as TrigFlow time t)."""
    return sigma_data * jnp.tan(jnp.asarray(t, jnp.float32))


def trigflow_time(sigma, sigma_data=SIGMA_DATA):
    """t = arctan(σ/σd) ∈ [0, π/2) (arctan2, so σ = 0 gives t = 0 exactly)."""
    return jnp.arctan2(jnp.asarray(sigma, jnp.float32), jnp.float32(sigma_data))


def _check_trigflow_kind(kind):
    if kind not in TRIGFLOW_KINDS:
        raise ValueError(f"Unknown TrigFlow parameterization {kind!r}; choose one of {list(TRIGFLOW_KINDS)}.")


def trigflow_time_input(t, sigma_data=SIGMA_DATA, kind="trigflow"):
    """The network time input c_noise(t): t ("trigflow") or 250·ln(σd·tan t) ("trigflow_edm")."""
    _check_trigflow_kind(kind)
    t = jnp.asarray(t, jnp.float32)
    return t if kind == "trigflow" else network_time_input(trigflow_sigma(t, sigma_data))


def trigflow_noisy(x0, z, t):
    """x_t = cos t·x0 + sin t·z (z ~ N(0, σd²I))."""
    t = broadcast_per_sample(t, x0)
    return jnp.cos(t) * x0 + jnp.sin(t) * z


def trigflow_network(network, sigma_data=SIGMA_DATA, kind="trigflow"):
    """F_trig(params, x_in, t, *rng) = −network(params, x_in, c_noise(t), *rng) of a raw network."""

    def trig(params, x_in, t, *rng):
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x_in.shape[:1])
        return -jnp.asarray(network(params, x_in, trigflow_time_input(t, sigma_data, kind), *rng), jnp.float32)

    return trig


def trigflow_network_from_edm(network, sigma_data=SIGMA_DATA):
    """The exact TrigFlow reading of an EDM-convention raw network: F_trig(x_in, t) =
    −network(x_in, 250·ln(σd·tan t)) ("trigflow_edm"). Its inverse is `edm_network_from_trigflow`."""
    return trigflow_network(network, sigma_data, "trigflow_edm")


def edm_network_from_trigflow(trig_network, sigma_data=SIGMA_DATA):
    """The EDM-convention raw network(params, x_in, time_input, *rng) = −F_trig(params, x_in, arctan(σ/σd))
    with σ = exp(time_input/250): the inverse of `trigflow_network_from_edm`."""

    def network(params, x_in, time_input, *rng):
        sigma = jnp.exp(jnp.asarray(time_input, jnp.float32) / 250.0)
        return -jnp.asarray(trig_network(params, x_in, trigflow_time(sigma, sigma_data), *rng), jnp.float32)

    return network


def trigflow_consistency(trig_network, params, x_t, t, *rng, sigma_data=SIGMA_DATA):
    """sCM's TrigFlow consistency function f(x_t, t) = cos t·x_t − sin t·σd·F_trig(x_t/σd, t)."""
    x_t = jnp.asarray(x_t, jnp.float32)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x_t.shape[:1])
    out = trig_network(params, x_t / sigma_data, t, *rng)
    tb = broadcast_per_sample(t, x_t)
    return jnp.cos(tb) * x_t - jnp.sin(tb) * sigma_data * out


def teacher_time_input(edm_time_input, kind: str = "edm", sigma_data=SIGMA_DATA):
    """The time input a teacher of parameterisation `kind` reads at the noise level of an EDM time input
    250·ln σ (`network_time_input`): the same for "edm" and "trigflow_edm", t = arctan(σ/σd) for "trigflow". An
    EDM-objective teacher trained with kind "trigflow" (sCM's TrigFlow diffusion model, c_noise(t) = t) has EDM's
    scalings, so its raw output at that input is what an EDM-form network gives at σ: the distillation
    objectives (CD's ODE steps, sCD's velocity) read every teacher in EDM form through this translation."""
    if kind in ("edm", "trigflow_edm"):
        return edm_time_input
    if kind == "trigflow":
        return trigflow_time(jnp.exp(jnp.asarray(edm_time_input, jnp.float32) / 250.0), sigma_data)
    raise errors.ConfigError(teacher_kind_error(kind))


TEACHER_KINDS = ("edm", *TRIGFLOW_KINDS)  # what the distillation objectives can read as an EDM denoiser


def teacher_kind_error(kind: str) -> str:
    """Why a network of parameterisation `kind` cannot be a CD/sCD teacher, and what to use instead."""
    if kind == FLOW:
        return ("A teacher must be an EDM-form denoiser (parameterisation edm, trigflow or trigflow_edm); this one "
                "is a flow-matching velocity network (method 'fm', parameterisation 'flow', conditioned on SiT's "
                "time t ∈ [0, 1]), which cmjax does not distil: train the teacher with --config.method.name=edm, "
                "or sample the flow itself with solvers.edm_sampler over parameterization.flow_denoise.")
    return (f"A teacher must be an EDM-form denoiser (parameterisation edm, trigflow or trigflow_edm); this one is "
            f"{kind!r}: train the teacher with --config.method.name=edm.")


def trigflow_denoise(apply_fn: NetworkFn, params, x, sigma, sigma_data=SIGMA_DATA, kind="trigflow"):
    """TrigFlow's f as a function of (x_σ, σ), for the samplers: f(cos t·x_σ, t) with t = arctan(σ/σd), where
    x_σ = x0 + σ·ε is the EDM-scaled noisy point (x_σ = x_t/cos t). cos t = σd/√(σ²+σd²) and
    sin t = σ/√(σ²+σd²) are computed from σ, and "trigflow_edm" conditions on 250·ln σ directly (not through
    tan t, which loses ~1e-5 relative precision near t = π/2 in float32): it equals `edm_denoise` (tested)."""
    _check_trigflow_kind(kind)
    x = jnp.asarray(x, jnp.float32)
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
    root = jnp.sqrt(sigma**2 + sigma_data**2)
    cos_t, sin_t = (broadcast_per_sample(c, x) for c in (sigma_data / root, sigma / root))
    x_t = cos_t * x
    time_input = trigflow_time(sigma, sigma_data) if kind == "trigflow" else network_time_input(sigma)
    trig_out = -jnp.asarray(apply_fn(params, x_t / sigma_data, time_input), jnp.float32)
    return cos_t * x_t - sin_t * sigma_data * trig_out


# ----------------------------------------------------------------------------------------------
# MeanFlow (Geng et al. 2025; DESIGN §4): the flow-matching path z_t = (1 − t)·x + t·ε, t ∈ [0, 1], ε ~ N(0, I),
# conditional velocity v = ε − x. The raw network IS the average velocity u_θ(z_t, r, t) = 1/(t − r)·∫_r^t v dτ,
# with no preconditioning, conditioned on two times: its time input is [B, 2] = (t, t − r), each column
# embedded by the network's own time embedding (cmjax.models.layers.embed_times). Both releases condition on
# (t, t − r): the ImageNet DiT embeds t and h = t − r separately and sums them (Gsunshine/meanflow
# models/models_dit.py:218-221), the CIFAR-10 UNet concatenates their positional embeddings
# (Gsunshine/py-meanflow meanflow/models/unet.py:368-374). Both feed t ∈ [0, 1] unscaled, as cmjax does (NCSN++
# embeds time_input/1000: a MeanFlow NCSN++ scales its Fourier features by 1000 instead, configs/cifar10_meanflow.py).
# In the EDM σ form, x_σ = x + σ·ε is the same point as z_t = x_σ/(1 + σ) at t = σ/(1 + σ), so one jump to r = 0,
# x̂ = z_t − t·u(z_t, 0, t), is MeanFlow's clean estimate f(x_σ, σ) (`meanflow_denoise`), exact for every σ.
MEANFLOW = "meanflow"


def meanflow_time_input(r, t, guidance=None):
    """The two-time network input [B, 2]: (t, t − r); with iMF's guidance conditioning [B, 3]
    (`imf_guidance_input`) appended, [B, 5]."""
    r, t = jnp.asarray(r, jnp.float32), jnp.asarray(t, jnp.float32)
    times = jnp.stack([t, t - r], axis=-1)
    return times if guidance is None else jnp.concatenate([times, jnp.asarray(guidance, jnp.float32)], axis=-1)


def imf_guidance_input(omega, t_min, t_max):
    """iMF's guidance conditions [B, 3] = (1 − 1/ω, t_min, t_max) (iMF §5: the network is told the CFG scale ω and
    the guidance interval; Lyy-iiis/imeanflow models/imfDiT.py `_build_sequence` embeds 1 − 1/ω, t_min and t_max,
    each with a timestep embedder of its own). ω = 1 (no guidance) reads 0."""
    omega, t_min, t_max = (jnp.asarray(a, jnp.float32) for a in (omega, t_min, t_max))
    return jnp.stack([1.0 - 1.0 / omega, t_min, t_max], axis=-1)


def meanflow_network(network):
    """u(params, z, r, t, *rng, guidance=None, **kw) = network(params, z, (t, t − r[, guidance]), *rng, **kw) of a
    raw network; `guidance` [B, 3] is iMF's conditioning (`imf_guidance_input`)."""

    def u(params, z, r, t, *rng, guidance=None, **kwargs):
        r = jnp.broadcast_to(jnp.asarray(r, jnp.float32), z.shape[:1])
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), z.shape[:1])
        out = network(params, z, meanflow_time_input(r, t, guidance), *rng, **kwargs)
        if isinstance(out, tuple):  # (u, a head's value): a caller that asked for a head (train_step's network)
            return jnp.asarray(out[0], jnp.float32), out[1]
        return jnp.asarray(out, jnp.float32)

    return u


def meanflow_denoise(apply_fn: NetworkFn, params, x, sigma):
    """MeanFlow's clean estimate as a function of (x_σ, σ): z_t − t·u(z_t, 0, t) with t = σ/(1 + σ),
    z_t = x_σ/(1 + σ) (for the EDM-form samplers; `sampling.meanflow_sample` is MeanFlow's own)."""
    x = jnp.asarray(x, jnp.float32)
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
    t = sigma / (1.0 + sigma)
    z = x / broadcast_per_sample(1.0 + sigma, x)
    u = meanflow_network(apply_fn)(params, z, jnp.zeros_like(t), t)
    return z - broadcast_per_sample(t, x) * u


# ----------------------------------------------------------------------------------------------
# Flow matching on SiT's linear interpolant (Ma et al. 2024, "SiT: Exploring Flow and Diffusion-based Generative
# Models with Scalable Interpolant Transformers"; willisma/SiT @ 947f95b). SiT's time runs the other way from
# MeanFlow's: t = 0 is noise, t = 1 data. Its Linear path (`ICPlan`) has α_t = t (the data coefficient) and
# σ_t = 1 − t (the noise coefficient) (transport/path.py:23-29), so
#     x_t = t·x1 + (1 − t)·x0,  x0 ~ N(0, I) noise, x1 data                    (path.py:114-124 `compute_mu_t`)
#     u_t = dα_t·x1 + dσ_t·x0 = x1 − x0                                       (path.py:126-131 `compute_ut`)
# and the velocity model's output is the ODE drift itself (transport.py `velocity_ode`). The raw network IS the
# velocity v_θ(x_t, t), no preconditioning, its time input t ∈ [0, 1] as is: SiT embeds t unscaled with DiT's
# `TimestepEmbedder` (models.py:38-61, 238).
# In the EDM σ form, x_σ = x1 + σ·ε is the same point as x_t = x_σ/(1 + σ) at t = 1/(1 + σ) (σ = (1 − t)/t),
# and the flow's clean estimate E[x1 | x_t] = x_t + (1 − t)·E[u_t | x_t] (x_t + (1 − t)·(x1 − x0) = x1): with the
# marginal velocity v the EDM PF-ODE dx_σ/dσ = (x_σ − D)/σ is the flow ODE dx_t/dt = v under that change of
# variables (both sides equal x_t − t·v), so every EDM-σ sampler (`solvers.edm_sampler`) solves the flow.
FLOW = "flow"


def flow_time(sigma):
    """SiT's time t = 1/(1 + σ) ∈ (0, 1] of the EDM noise level σ (t = 1 is data, σ = 0)."""
    return 1.0 / (1.0 + jnp.asarray(sigma, jnp.float32))


def flow_sigma(t):
    """The EDM noise level σ = (1 − t)/t of SiT's time t (the inverse of `flow_time`; t = 0 is σ = ∞)."""
    t = jnp.asarray(t, jnp.float32)
    return (1.0 - t) / t


def flow_interpolant(noise, data, t):
    """SiT's Linear path x_t = t·x1 + (1 − t)·x0 (x1 = data, x0 = noise; transport/path.py:114-124)."""
    t = broadcast_per_sample(t, data)
    return t * data + (1.0 - t) * noise


def flow_velocity(noise, data):
    """The conditional velocity u_t = x1 − x0 of the Linear path (transport/path.py:126-131)."""
    return jnp.asarray(data, jnp.float32) - jnp.asarray(noise, jnp.float32)


def flow_denoise(apply_fn: NetworkFn, params, x, sigma):
    """The flow network read as an EDM denoiser of x_σ = x1 + σ·ε: D(x_σ, σ) = x_t + (1 − t)·v_θ(x_t, t) with
    t = 1/(1 + σ), x_t = x_σ/(1 + σ) (the section comment above); D = x_σ exactly at σ = 0."""
    x = jnp.asarray(x, jnp.float32)
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
    t = flow_time(sigma)
    x_t = x * broadcast_per_sample(t, x)
    v = jnp.asarray(apply_fn(params, x_t, t), jnp.float32)
    return x_t + broadcast_per_sample(1.0 - t, x) * v


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
    """Dispatches to `edm_denoise` (kind="edm"), `consistency_denoise` (kind="consistency"),
    `trigflow_denoise` (kind="trigflow" | "trigflow_edm": sCM's f as a function of σ), `meanflow_denoise`
    (kind="meanflow") or `flow_denoise` (kind="flow": SiT's velocity read as D)."""
    if kind == "edm":
        return edm_denoise(apply_fn, params, x, sigma, sigma_data)
    if kind == "consistency":
        return consistency_denoise(apply_fn, params, x, sigma, sigma_data, sigma_min)
    if kind in TRIGFLOW_KINDS:
        return trigflow_denoise(apply_fn, params, x, sigma, sigma_data, kind)
    if kind == MEANFLOW:
        return meanflow_denoise(apply_fn, params, x, sigma)
    if kind == FLOW:
        return flow_denoise(apply_fn, params, x, sigma)
    raise ValueError(f"Unknown parameterization {kind!r}; choose 'edm', 'consistency', 'trigflow', "
                     f"'trigflow_edm', {MEANFLOW!r} or {FLOW!r}.")

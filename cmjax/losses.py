"""Training objectives: edm, cd, ct (2023), ict, ect, sct, scd, meanflow, fm (distances: `cmjax.distances`).

Every objective has the signature
    objective(network, params, x, key, step, *, target_params=None, teacher_params=None,
              teacher_network=None, distance_params=None) -> (loss, metrics)
once its hyper-parameters are bound by `make_objective(name, **settings)`. `distance_params` are the
weights of a distance's network (LPIPS' VGG16), an argument like the teacher's, never a constant.
`network(params, x_in, time_input, dropout_key)` is the raw network F (dropout active);
`teacher_network(params, x_in, time_input)` is the teacher's raw network in evaluation mode. `step` may
be traced: curricula are evaluated inside the compiled function, so the step compiles once for the whole
run. The online and the target evaluations of one consistency step share one dropout key (as in the CM
and iCT releases).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp

from cmjax import distances, errors, jvp, parameterization, schedules, solvers
from cmjax.parameterization import SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, broadcast_per_sample

# ----------------------------------------------------------------------------------------------
# Weightings λ(σ_{n+1}, σ_n): per-sample, shape [B].


def _weighting(name: str, sigma, sigma_prev, sigma_data):
    """uniform: 1; karras: 1/σ² + 1/σd² (openai `get_weightings`); ict and ect: 1/(σ − σ_prev)
    (iCT §3.2 with σ_prev = σ_i; ECT with σ_prev = r)."""
    if name == "uniform":
        return jnp.ones_like(sigma)
    if name == "karras":
        return 1.0 / jnp.square(sigma) + 1.0 / sigma_data**2
    if name in ("ict", "ect"):
        return 1.0 / (sigma - sigma_prev)
    raise errors.ConfigError(f"Unknown weighting {name!r}; choose uniform, karras, ict or ect.")


# ----------------------------------------------------------------------------------------------
# Shared pieces.


def _bind(network, params, dropout_key, kind, sigma_data, sigma_min):
    """The preconditioned model x, σ ↦ D or f with parameters and dropout key bound."""
    apply_fn = lambda p, x_in, t_in: network(p, x_in, t_in, dropout_key)  # noqa: E731
    return lambda x, sigma: parameterization.denoise(
        apply_fn, params, x, sigma, kind=kind, sigma_data=sigma_data, sigma_min=sigma_min
    )


def curriculum(step, *, curriculum: str, total_steps: int, num_scales: int, s0: int, s1: int,
               mu0: float, target_ema: float):
    """(N(k), μ(k)) of a discrete consistency objective: "fixed" (N = num_scales, μ = target_ema),
    "cm_adaptive" (CM 2023 released code) or "ict" (iCT doubling; no target EMA, μ = 0)."""
    if curriculum == "fixed":
        return schedules.fixed_schedule(step, num_scales, target_ema)
    if curriculum == "cm_adaptive":
        return schedules.cm_adaptive_schedule(jnp.asarray(step), total_steps, s0, s1, mu0)
    if curriculum == "ict":
        return schedules.ict_num_scales(step, total_steps, s0, s1), jnp.float32(0.0)
    raise errors.ConfigError(f"Unknown curriculum {curriculum!r}; choose fixed, cm_adaptive or ict.")


def max_num_scales(*, curriculum: str, num_scales: int, s1: int) -> int:
    """The largest N a curriculum reaches: the static size of the masked index grid."""
    return num_scales if curriculum == "fixed" else s1 + 1


# ----------------------------------------------------------------------------------------------
# Objectives.


EDM_KINDS = ("edm", "trigflow")


def edm_loss(network, params, x, key, step, *, sigma_data=SIGMA_DATA, p_mean=-1.2, p_std=1.2,
             parameterization_kind="edm", target_params=None, teacher_params=None, teacher_network=None,
             distance_params=None):
    """EDM denoising score matching (EDM eq. 2, 8): ln σ ~ N(Pm, Ps²), λ(σ)·‖D(x + σn, σ) − x‖²,
    λ = (σ² + σd²)/(σ·σd)². parameterization_kind "edm": the network's time input is 250·ln σ (openai's ADM);
    "trigflow": t = arctan(σ/σd), with the same scalings — sCM's TrigFlow diffusion model (Lu & Song 2024 §2,
    c_noise(t) = t), the teacher an sCD student can start from (`parameterization.teacher_time_input`)."""
    del step, target_params, teacher_params, teacher_network, distance_params
    if parameterization_kind not in EDM_KINDS:
        raise errors.ConfigError(f"Unknown EDM parameterization_kind {parameterization_kind!r}; choose one of "
                                 f"{list(EDM_KINDS)}.")
    sigma_key, noise_key, dropout_key = jax.random.split(key, 3)
    sigma = schedules.lognormal_sigmas(sigma_key, x.shape[:1], p_mean, p_std)
    noise = jax.random.normal(noise_key, x.shape, jnp.float32)
    denoise = _bind(network, params, dropout_key, parameterization_kind, sigma_data, SIGMA_MIN)
    denoised = denoise(x + broadcast_per_sample(sigma, x) * noise, sigma)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    loss = jnp.mean(weight * distances.l2_distance(denoised, x))
    return loss, {"loss": loss, "mean_sigma": jnp.mean(sigma)}


def _discrete_consistency_loss(
    network, params, x, key, step, *, teacher, target_params, total_steps, curriculum_name,
    num_scales, s0, s1, mu0, target_ema, index_distribution, p_mean, p_std, distance, huber_c,
    distance_params, weighting, sigma_min, sigma_max, sigma_data, rho,
):
    """CM 2023 eq. 7/10, iCT: λ·d(f_θ(x + σ_{n+1}z, σ_{n+1}), sg f_θ⁻(x̂_n, σ_n)).

    `teacher(x_next, sigma_next, sigma_n)` produces x̂_n: a teacher ODE step (CD), or None for CT
    where x̂_n = x + σ_n·z with the same z.
    """
    n_scales, mu = curriculum(step, curriculum=curriculum_name, total_steps=total_steps,
                              num_scales=num_scales, s0=s0, s1=s1, mu0=mu0, target_ema=target_ema)
    index_key, noise_key, dropout_key = jax.random.split(key, 3)
    batch = x.shape[0]
    if index_distribution == "uniform":
        index = jax.random.randint(index_key, (batch,), 0, n_scales - 1)
    elif index_distribution == "lognormal":
        grid_size = max_num_scales(curriculum=curriculum_name, num_scales=num_scales, s1=s1)
        index = schedules.sample_ict_indices(index_key, batch, n_scales, grid_size, p_mean, p_std,
                                             sigma_min, sigma_max, rho)
    else:
        raise errors.ConfigError(f"Unknown index_distribution {index_distribution!r}; use uniform or lognormal.")
    sigma_n = schedules.karras_sigma(index, n_scales, sigma_min, sigma_max, rho)
    sigma_next = schedules.karras_sigma(index + 1, n_scales, sigma_min, sigma_max, rho)

    z = jax.random.normal(noise_key, x.shape, jnp.float32)
    x_next = x + broadcast_per_sample(sigma_next, x) * z
    if teacher is None:
        x_hat = x + broadcast_per_sample(sigma_n, x) * z
    else:
        x_hat = jax.lax.stop_gradient(teacher(x_next, sigma_next, sigma_n))

    online = _bind(network, params, dropout_key, "consistency", sigma_data, sigma_min)
    target_params = jax.lax.stop_gradient(params if target_params is None else target_params)
    target = _bind(network, target_params, dropout_key, "consistency", sigma_data, sigma_min)
    distance_fn = distances.get(distance, x.shape[1:], huber_c, params=distance_params)
    per_sample = distance_fn(online(x_next, sigma_next), jax.lax.stop_gradient(target(x_hat, sigma_n)))
    weight = _weighting(weighting, sigma_next, sigma_n, sigma_data)
    loss = jnp.mean(weight * per_sample)
    metrics = {"loss": loss, "num_scales": n_scales, "target_ema": mu,
               "mean_sigma": jnp.mean(sigma_next)}
    return loss, metrics


def cd_loss(network, params, x, key, step, *, target_params=None, teacher_params=None,
            teacher_network=None, distance_params=None, teacher_solver="heun", total_steps=1,
            curriculum="fixed", num_scales=18, s0=2, s1=150, mu0=0.9, target_ema=0.0, distance="l2",
            huber_c=None, weighting="uniform", sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
            sigma_data=SIGMA_DATA, rho=schedules.RHO):
    """Consistency distillation (CM 2023 eq. 7): x̂_n is one Heun (or Euler) step of the EDM teacher
    from σ_{n+1} to σ_n. CIFAR-10: N = 18, μ = 0; ImageNet-64/LSUN: N = 40, μ = 0.95."""
    if teacher_network is None:
        raise errors.ConfigError("method 'cd' needs a teacher: set config.teacher.workdir to an EDM run.")
    steppers = {"heun": solvers.heun_step, "euler": solvers.euler_step}
    if teacher_solver not in steppers:
        raise errors.ConfigError(f"Unknown teacher_solver {teacher_solver!r}; choose {sorted(steppers)}.")
    teacher_denoise = lambda xs, s: parameterization.edm_denoise(  # noqa: E731
        teacher_network, teacher_params, xs, s, sigma_data)
    teacher = lambda xs, s, s_prev: steppers[teacher_solver](teacher_denoise, xs, s, s_prev)  # noqa: E731
    return _discrete_consistency_loss(
        network, params, x, key, step, teacher=teacher, target_params=target_params,
        total_steps=total_steps, curriculum_name=curriculum, num_scales=num_scales, s0=s0, s1=s1,
        mu0=mu0, target_ema=target_ema, index_distribution="uniform", p_mean=-1.1, p_std=2.0,
        distance=distance, huber_c=huber_c, distance_params=distance_params, weighting=weighting,
        sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data, rho=rho)


def ct_loss(network, params, x, key, step, *, target_params=None, teacher_params=None,
            teacher_network=None, distance_params=None, total_steps=800_000, curriculum="cm_adaptive",
            num_scales=18, s0=2, s1=150, mu0=0.9, target_ema=0.0, distance="l2", huber_c=None,
            weighting="uniform", sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, sigma_data=SIGMA_DATA,
            rho=schedules.RHO):
    """Consistency training, CM 2023 (eq. 10): x̂_n = x + σ_n·z, target EMA μ(k) from the adaptive
    curriculum (CIFAR-10: s0 = 2, s1 = 150, μ0 = 0.9, K = 800k)."""
    del teacher_params, teacher_network
    if target_params is None:
        raise errors.ConfigError("method 'ct' keeps a target EMA network: pass target_params.")
    return _discrete_consistency_loss(
        network, params, x, key, step, teacher=None, target_params=target_params,
        total_steps=total_steps, curriculum_name=curriculum, num_scales=num_scales, s0=s0, s1=s1,
        mu0=mu0, target_ema=target_ema, index_distribution="uniform", p_mean=-1.1, p_std=2.0,
        distance=distance, huber_c=huber_c, distance_params=distance_params, weighting=weighting,
        sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data, rho=rho)


def ict_loss(network, params, x, key, step, *, target_params=None, teacher_params=None,
             teacher_network=None, distance_params=None, total_steps=400_000, s0=10, s1=1280,
             p_mean=-1.1, p_std=2.0, distance="pseudo_huber", huber_c=None, weighting="ict",
             sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, sigma_data=SIGMA_DATA, rho=schedules.RHO):
    """Improved consistency training (Song & Dhariwal 2023): target = sg(θ), doubling curriculum,
    lognormal pair indices, λ = 1/(σ_{i+1} − σ_i), pseudo-Huber with c = 0.00054·√d."""
    del target_params, teacher_params, teacher_network
    return _discrete_consistency_loss(
        network, params, x, key, step, teacher=None, target_params=None, total_steps=total_steps,
        curriculum_name="ict", num_scales=s1 + 1, s0=s0, s1=s1, mu0=0.0, target_ema=0.0,
        index_distribution="lognormal", p_mean=p_mean, p_std=p_std, distance=distance,
        huber_c=huber_c, distance_params=distance_params, weighting=weighting, sigma_min=sigma_min,
        sigma_max=sigma_max, sigma_data=sigma_data, rho=rho)


def ect_loss(network, params, x, key, step, *, target_params=None, teacher_params=None,
             teacher_network=None, distance_params=None, p_mean=-1.1, p_std=2.0, q=2.0, k=8.0, b=1.0,
             stage_steps=25_000, huber_c=0.0, parameterization_kind="edm",
             sigma_min=SIGMA_MIN, sigma_data=SIGMA_DATA):
    """Easy consistency tuning (Geng et al. 2024): t = exp(Pm + Ps·n), r = ECT r(t), shared noise,
    w·(√(‖f(x + tε, t) − sg f(x + rε, r)‖² + c²) − c) with w = 1/(t − r); the target is x where r = 0.

    The default EDM parameterisation matches the EDM model ECT starts from (f(x, 0) = x exactly).
    """
    del target_params, teacher_params, teacher_network, distance_params
    t_key, noise_key, dropout_key = jax.random.split(key, 3)
    t = schedules.lognormal_sigmas(t_key, x.shape[:1], p_mean, p_std)
    r = schedules.ect_r(t, schedules.ect_stage(step, stage_steps), q, k, b)
    eps = jax.random.normal(noise_key, x.shape, jnp.float32)
    online = _bind(network, params, dropout_key, parameterization_kind, sigma_data, sigma_min)
    target = _bind(network, jax.lax.stop_gradient(params), dropout_key, parameterization_kind,
                   sigma_data, sigma_min)
    prediction = online(x + broadcast_per_sample(t, x) * eps, t)
    target_value = target(x + broadcast_per_sample(r, x) * eps, r)
    target_value = jnp.where(broadcast_per_sample(r, x) > 0, target_value, x)
    per_sample = distances.pseudo_huber_distance(prediction, jax.lax.stop_gradient(target_value), huber_c)
    loss = jnp.mean(_weighting("ect", t, r, sigma_data) * per_sample)
    return loss, {"loss": loss, "mean_sigma": jnp.mean(t), "mean_r_over_t": jnp.mean(r / t)}


# ----------------------------------------------------------------------------------------------
# Continuous-time consistency models: sCT and sCD (Lu & Song 2024, arXiv 2410.11081; DESIGN §4).


def _scm_loss(network, params, x, key, step, *, velocity, p_mean, p_std, sigma_data, tangent_warmup_steps,
              tangent_norm_c, tangent_norm, weighting, jvp_mode, jvp_fd_step, parameterization_kind):
    """The sCM objective on TrigFlow (`parameterization.trigflow_*`; F below is F_trig, the raw network read
    as TrigFlow with the time conditioning of `parameterization_kind` — "trigflow": c_noise(t) = t,
    "trigflow_edm": EDM's 250·ln(σd·tan t) —, so f(x_t, t) = cos t·x_t − sin t·σd·F(x_t/σd, t)):

      τ ~ N(P_mean, P_std²), t = arctan(e^τ/σd)                        (sCM's lognormal time proposal)
      z ~ N(0, σd²I), x_t = cos t·x0 + sin t·z
      dx_t/dt = `velocity(x0, z, x_t, t)`                                (sCT: cos t·z − sin t·x0; sCD: σd·F_teacher)
      F⁻, cos t·sin t·dF⁻/dt = JVP of sg(F_θ)(x_t/σd, t) at (x_t, t), tangents (cos t·sin t·dx_t/dt, cos t·sin t)
      g = −cos²t·(σd·F⁻ − dx_t/dt) − r·cos t·sin t·(x_t + σd·dF⁻/dt)    (= cos t·df⁻/dt at r = 1)
      g ← g/(‖g‖ + c), c = 0.1                                           (tangent normalisation)
      r = min(1, step/warm-up)                                           (tangent warm-up, traced: one compile)
      loss = mean_batch[ λ(t)·mean_dims (F_θ − F⁻ − g)² ]

    The value of the loss is mean(λ·g²) (F_θ = F⁻ numerically); its gradient −2λ·g·∂F_θ/∂θ/D is sCM's.
    Equations as in DESIGN §4 and FastGen's `sCM.py` (`_scm_pred_to_loss`); the paper's appendix was not read,
    so constants are those of FastGen's `config_scm.py` where the paper could not be confirmed.
    `tangent_norm`: "rms" divides ‖g‖ by √D first (FastGen's default `g_norm_spatial_invariance`), "l2" is the
    plain per-sample norm. `weighting`: "none" (λ = 1), "prior" (λ = 1/σ, σ = σd·tan t, FastGen's
    `prior_weighting_enabled`), or sCM's learned adaptive weight (`scm_adaptive_loss`) without ("adaptive") or
    with ("adaptive_prior", FastGen's default) the prior λ; the adaptive ones read w_φ(t) = −logvar(t) from the
    network's log-variance head (`config.model.logvar_head`), which trains with the network. The online and
    target evaluations share one dropout key.
    """
    t_key, noise_key, dropout_key = jax.random.split(key, 3)
    batch = x.shape[0]
    sigma = jnp.exp(p_mean + p_std * jax.random.normal(t_key, (batch,), jnp.float32))
    t = parameterization.trigflow_time(sigma, sigma_data)
    z = sigma_data * jax.random.normal(noise_key, x.shape, jnp.float32)
    x = jnp.asarray(x, jnp.float32)
    x_t = parameterization.trigflow_noisy(x, z, t)
    dxt_dt = jax.lax.stop_gradient(velocity(x, z, x_t, t))
    tb = broadcast_per_sample(t, x)
    cos_t, sin_t = jnp.cos(tb), jnp.sin(tb)

    if parameterization_kind not in parameterization.TRIGFLOW_KINDS:
        raise errors.ConfigError(f"Unknown sCM parameterization_kind {parameterization_kind!r}; choose one of "
                                 f"{list(parameterization.TRIGFLOW_KINDS)}.")
    if weighting not in SCM_WEIGHTINGS:
        raise errors.ConfigError(f"Unknown sCM weighting {weighting!r}; choose one of {list(SCM_WEIGHTINGS)}.")
    adaptive = weighting.startswith("adaptive")
    trig = parameterization.trigflow_network(network, sigma_data, parameterization_kind)
    if adaptive:  # the same forward pass, its log-variance head read too (F_trig = −network, as `trig` does)
        raw, logvar = network(params, x_t / sigma_data,
                              parameterization.trigflow_time_input(t, sigma_data, parameterization_kind),
                              dropout_key, with_logvar=True)
        online, logvar = -jnp.asarray(raw, jnp.float32), jnp.asarray(logvar, jnp.float32)
    else:
        online = trig(params, x_t / sigma_data, t, dropout_key)
    frozen = jax.lax.stop_gradient(params)
    target_fn = lambda xt, tt: trig(frozen, xt / sigma_data, tt, dropout_key)  # noqa: E731
    cs = jnp.cos(t) * jnp.sin(t)
    f_minus, df_dt_scaled = jvp.value_and_jvp(target_fn, (x_t, t), (broadcast_per_sample(cs, x) * dxt_dt, cs),
                                              mode=jvp_mode, step=jvp_fd_step)
    if tangent_warmup_steps > 0:
        r = jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / float(tangent_warmup_steps))
    else:
        r = jnp.float32(1.0)
    g = (-jnp.square(cos_t) * (sigma_data * f_minus - dxt_dt)
         - r * (cos_t * sin_t * x_t + sigma_data * df_dt_scaled))
    axes = tuple(range(1, x.ndim))
    dim = float(jnp.size(x) // batch)
    g_norm = jnp.sqrt(jnp.sum(jnp.square(g), axis=axes, keepdims=True))
    if tangent_norm == "rms":
        g_norm = g_norm / jnp.sqrt(dim)
    elif tangent_norm != "l2":
        raise errors.ConfigError(f"Unknown tangent_norm {tangent_norm!r}; choose rms or l2.")
    g = jax.lax.stop_gradient(g / (g_norm + tangent_norm_c))
    per_sample = jnp.mean(jnp.square(online - jax.lax.stop_gradient(f_minus) - g), axis=axes)
    weight = 1.0 / sigma if weighting in ("prior", "adaptive_prior") else jnp.ones_like(sigma)
    metrics = {"mean_sigma": jnp.mean(sigma), "tangent_warmup": r, "mean_tangent_norm": jnp.mean(g_norm)}
    if adaptive:
        loss = jnp.mean(scm_adaptive_loss(weight * per_sample, logvar))
        metrics.update(unweighted_loss=jnp.mean(per_sample), mean_logvar=jnp.mean(logvar))
    else:
        loss = jnp.mean(weight * per_sample)
    metrics["loss"] = loss
    return loss, metrics


SCM_WEIGHTINGS = ("none", "prior", "adaptive", "adaptive_prior")


def scm_adaptive_loss(per_sample, logvar):
    """sCM's adaptive weighting (Lu & Song 2024 §4.2): e^{w}/D·‖F_θ − F⁻ − g‖² − w with the learned w = w_φ(t),
    written with logvar = −w as EDM2 and FastGen do (`sCM.py` `_scm_pred_to_loss`: weight/(e^{logvar}·D)·L +
    logvar). `per_sample` is the (prior-weighted) mean over dimensions, ‖·‖²/D, so the loss is
    e^{−logvar}·per_sample + logvar; for a fixed residual its minimum over logvar is at logvar = ln per_sample,
    w = −ln(mean residual²), where the weighted residual is 1: each t's loss normalised by its own scale.
    FastGen divides the mean by D once more (`divide_x_0_spatial_dim`); a learned logvar absorbs the constant
    (its optimum shifts by −ln D, the θ-gradient there is the same)."""
    logvar = jnp.asarray(logvar, jnp.float32)
    return jnp.exp(-logvar) * per_sample + logvar


def sct_loss(network, params, x, key, step, *, target_params=None, teacher_params=None,
             teacher_network=None, distance_params=None, p_mean=-1.0, p_std=1.4, sigma_data=SIGMA_DATA,
             tangent_warmup_steps=10_000, tangent_norm_c=0.1, tangent_norm="rms", weighting="none",
             jvp_mode="exact", jvp_fd_step=jvp.FD_STEP, parameterization_kind="trigflow"):
    """sCT (sCM continuous-time consistency training): dx_t/dt = cos t·z − sin t·x0, the conditional
    velocity of x_t = cos t·x0 + sin t·z. CIFAR-10 (FastGen `config_scm.py`): P_mean −1.0, P_std 1.4,
    warm-up 10k, c = 0.1. See `_scm_loss` for the equations and what is not implemented."""
    del target_params, teacher_params, teacher_network, distance_params
    velocity = lambda x0, z, x_t, t: (  # noqa: E731
        broadcast_per_sample(jnp.cos(t), x0) * z - broadcast_per_sample(jnp.sin(t), x0) * x0)
    return _scm_loss(network, params, x, key, step, velocity=velocity, p_mean=p_mean, p_std=p_std,
                     sigma_data=sigma_data, tangent_warmup_steps=tangent_warmup_steps,
                     tangent_norm_c=tangent_norm_c, tangent_norm=tangent_norm, weighting=weighting,
                     jvp_mode=jvp_mode, jvp_fd_step=jvp_fd_step, parameterization_kind=parameterization_kind)


def scd_loss(network, params, x, key, step, *, target_params=None, teacher_params=None,
             teacher_network=None, distance_params=None, p_mean=-1.0, p_std=1.4, sigma_data=SIGMA_DATA,
             tangent_warmup_steps=10_000, tangent_norm_c=0.1, tangent_norm="rms", weighting="none",
             jvp_mode="exact", jvp_fd_step=jvp.FD_STEP, parameterization_kind="trigflow", guidance_scale=1.0):
    """sCD (sCM continuous-time consistency distillation): dx_t/dt = σd·F_teacher(x_t/σd, t), the EDM
    teacher read as TrigFlow (`parameterization.trigflow_network_from_edm`, exact), i.e. the PF-ODE velocity
    (cos t·x_t − D(x_t/cos t, σd·tan t))/sin t of the teacher's denoiser D. `guidance_scale` s ≠ 1 distils the
    classifier-free-guided teacher (`guided_velocity`): its velocity mixes the conditional and the unconditional
    prediction (the teacher called with the null label, `teacher_network(..., unconditional=True)`); 1 = no
    guidance and no second teacher pass. A student starts from its teacher's weights
    (`config.teacher.init_student`, as sCM and FastGen do; `imagenet64_scd`) when the teacher was trained with
    the student's time conditioning: a "trigflow" student from an EDM teacher of parameterisation "trigflow"
    (time input t). Read through the openai 250·ln σ input ("trigflow_edm") it does not train (docs/quality.md).
    See `_scm_loss`."""
    del target_params, distance_params
    if teacher_network is None:
        raise errors.ConfigError("method 'scd' needs a teacher: set config.teacher.workdir to an EDM run.")
    teacher = parameterization.trigflow_network_from_edm(teacher_network, sigma_data)
    unconditional = parameterization.trigflow_network_from_edm(
        lambda p, x_in, t_in: teacher_network(p, x_in, t_in, unconditional=True), sigma_data)

    def velocity(x0, z, x_t, t):
        del x0, z
        cond = sigma_data * teacher(teacher_params, x_t / sigma_data, t)
        if float(guidance_scale) == 1.0:
            return cond
        return guided_velocity(cond, sigma_data * unconditional(teacher_params, x_t / sigma_data, t), guidance_scale)

    return _scm_loss(network, params, x, key, step, velocity=velocity, p_mean=p_mean, p_std=p_std,
                     sigma_data=sigma_data, tangent_warmup_steps=tangent_warmup_steps,
                     tangent_norm_c=tangent_norm_c, tangent_norm=tangent_norm, weighting=weighting,
                     jvp_mode=jvp_mode, jvp_fd_step=jvp_fd_step, parameterization_kind=parameterization_kind)


def guided_velocity(conditional, unconditional, guidance_scale):
    """Classifier-free guidance (Ho & Salimans 2022) of a teacher's PF-ODE velocity: v_u + s·(v_c − v_u), as
    FastGen's sCD does it (`sCM.py` `_compute_scm_loss`: dxt_dt + (s − 1)·(dxt_dt − neg_dxt_dt), the same mix);
    s = 1 is the conditional velocity, s = 0 the unconditional one."""
    return unconditional + guidance_scale * (conditional - unconditional)
# ----------------------------------------------------------------------------------------------
# MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling") and improved MeanFlow (iMF, Geng,
# Lu et al. 2025, "Improved Mean Flows: On the Challenges of Fastforward Generative Models"). The path, the
# network reading and the σ form are in `parameterization` (MeanFlow section).

MEANFLOW_TANGENTS = ("sample", "predicted")
MEANFLOW_GUIDANCE = ("none", "cfg", "conditioned")


def meanflow_target(u_fn, z, r, t, velocity, *, jvp_mode="exact", jvp_fd_step=jvp.FD_STEP, has_aux=False):
    """(u(z, r, t), u_tgt) with the MeanFlow identity u_tgt = v − (t − r)·(v·∂_z u + ∂_t u) (MeanFlow eq. 8): one
    JVP of `u_fn(z, r, t)` along the tangents (v, 0, 1) for (z, r, t) (`jvp.value_and_jvp`). The value keeps the
    gradient of whatever `u_fn` closes over; u_tgt is stop-gradient, with t − r clipped to [0, 1] as
    Gsunshine/meanflow meanflow.py:235. has_aux: `u_fn` returns (u, aux) and the result is (u, u_tgt, aux)."""
    batch = z.shape[0]
    out = jvp.value_and_jvp(u_fn, (z, r, t), (velocity, jnp.zeros((batch,)), jnp.ones((batch,))),
                            mode=jvp_mode, step=jvp_fd_step, has_aux=has_aux)
    u, du_dt = out[0], out[1]
    gap = broadcast_per_sample(jnp.clip(t - r, 0.0, 1.0), z)
    u_tgt = jax.lax.stop_gradient(velocity - gap * du_dt)
    return (u, u_tgt, out[2]) if has_aux else (u, u_tgt)


def adaptive_weighted(per_sample, norm_eps, norm_p):
    """MeanFlow's adaptive loss weighting sg(1/(‖Δ‖² + c)^p)·‖Δ‖² per sample (MeanFlow §4.1, eq. 22;
    Gsunshine/meanflow meanflow.py:240-246)."""
    return jax.lax.stop_gradient(1.0 / jnp.power(per_sample + norm_eps, norm_p)) * per_sample


def meanflow_loss(network, params, x, key, step, *, target_params=None, teacher_params=None,
                  teacher_network=None, distance_params=None, time_dist="logit_normal", p_mean_t=-0.4,
                  p_std_t=1.0, p_mean_r=-0.4, p_std_r=1.0, equal_fraction=0.75, tr_order="sort", norm_p=1.0,
                  norm_eps=0.01, tangent="sample", guidance="none", omega=1.0, kappa=0.5, t_start=0.0, t_end=1.0,
                  cfg_max=7.0, cfg_beta=1.0, class_dropout=0.1, num_classes=0, velocity_head=False,
                  jvp_mode="exact", jvp_fd_step=jvp.FD_STEP):
    """MeanFlow: z = (1 − t)·x + t·ε, v = ε − x, per-sample ‖u_θ(z, r, t) − sg(u_tgt)‖² summed over pixels and
    weighted by sg(1/(‖Δ‖² + c)^p) (norm_eps c, norm_p p; Gsunshine/meanflow meanflow.py:206-246); (r, t) from
    `schedules.meanflow_times`. Defaults are the ImageNet JAX release's (configs/default.py:52-71): logit-normal
    (−0.4, 1.0) for both times, 75 % of samples with r = t, p = 1, c = 0.01.

    tangent "sample": the JVP runs along the (guided) conditional velocity, as MeanFlow; "predicted": along the
    network's own instantaneous velocity v_θ(z, t) (sg), iMF §4.1 (Lyy-iiis/imeanflow imf.py, `iMeanFlow.forward`:
    the JVP tangent is the predicted v_c). With it the loss is iMF's v-loss ‖u_θ + (t − r)·sg(du_θ/dt) − v_g‖²,
    which equals ‖u_θ − sg(u_tgt)‖² in value and gradient. v_θ is the network's auxiliary v-head where it has one
    (`velocity_head`, config.model's; iMF's design), evaluated at t − r = 0, else u_θ(z, t, t) (the boundary
    condition u(z, t, t) = v). With a v-head the loss adds iMF's auxiliary v-loss: the head's output at the same
    inputs as u, adaptively weighted on its own, ‖v_θ − v_g‖² (imf.py `forward`: loss = loss_u + loss_v).

    Class-conditional models (num_classes > 0, from config.model.num_classes; the network needs the extra "no
    class" label, config.model.null_label): labels are dropped with probability class_dropout, and
      guidance "cfg" folds classifier-free guidance into the target (MeanFlow §4.2, meanflow.py:171-200): inside
        [t_start, t_end], v_g = ω·v + (1 − ω − κ)·u_θ(z, t, t | ∅) + κ·u_θ(z, t, t | c) (sg), outside v_g = v;
      guidance "conditioned" is iMF's guidance as conditioning (iMF §5; imf.py `sample_cfg_scale`,
        `sample_cfg_interval`, `guidance_fn`, `cond_drop`): per sample ω from `schedules.imf_guidance_scale`
        (cfg_max, cfg_beta) and an interval from `schedules.imf_guidance_interval` ([0, 1] for r = t samples);
        w = ω inside the interval, else 1; v_g = v + (1 − 1/w)·(v_θ(z, t | c, w) − v_θ(z, t | ∅, 1)) (sg), and
        the network sees (1 − 1/ω, t_min, t_max) as three more conditioning scalars
        (`parameterization.imf_guidance_input`; the time input is [B, 5]).
    Samples whose label was dropped keep v_g = v.
    """
    del step, target_params, teacher_params, teacher_network, distance_params
    for name, value, choices in (("tangent", tangent, MEANFLOW_TANGENTS), ("guidance", guidance, MEANFLOW_GUIDANCE)):
        if value not in choices:
            raise errors.ConfigError(f"Unknown MeanFlow {name} {value!r}; choose one of {list(choices)}.")
    if not num_classes and guidance != "none":
        raise errors.ConfigError(f"MeanFlow guidance={guidance!r} needs a class-conditional model "
                                 "(config.model.num_classes > 0); use guidance='none'.")
    time_key, noise_key, drop_key, dropout_key = jax.random.split(key, 4)
    scale_key, interval_key = jax.random.split(jax.random.fold_in(key, 5))
    batch = x.shape[0]
    t, r = schedules.meanflow_times(time_key, batch, dist=time_dist, p_mean_t=p_mean_t, p_std_t=p_std_t,
                                    p_mean_r=p_mean_r, p_std_r=p_std_r, equal_fraction=equal_fraction,
                                    order=tr_order)
    eps = jax.random.normal(noise_key, x.shape, jnp.float32)
    tb = broadcast_per_sample(t, x)
    z = (1.0 - tb) * x + tb * eps
    v = eps - x
    u_net = parameterization.meanflow_network(network)
    frozen = jax.lax.stop_gradient(params)
    ones, keep = jnp.ones((batch,), jnp.float32), jnp.zeros((batch,), bool)

    head = {"with_velocity": True} if velocity_head else {}  # the network returns (u, v-head) when asked

    def instantaneous(drop=None, guidance_input=None):
        """v_θ(z, t) (sg, the JVP's dropout key): the v-head at t − r = 0, or u_θ(z, t, t)."""
        kwargs = {} if drop is None else {"label_drop": drop}
        out = u_net(frozen, z, t, t, dropout_key, guidance=guidance_input, **head, **kwargs)
        return out[1] if velocity_head else out

    label_kwargs, v_g, guidance_input, direction = {}, v, None, None
    if num_classes:
        dropped = jax.random.uniform(drop_key, (batch,)) < class_dropout
        if guidance == "cfg":
            inside = (t >= t_start) & (t <= t_end)
            w = broadcast_per_sample(jnp.where(inside, omega, 1.0), x)
            k = broadcast_per_sample(jnp.where(inside, kappa, 0.0), x)
            v_uncond = instantaneous(jnp.ones((batch,), bool))
            v_cond = instantaneous(keep) if kappa else jnp.zeros_like(v)
            v_g = jax.lax.stop_gradient(w * v + (1.0 - w - k) * v_uncond + k * v_cond)
        elif guidance == "conditioned":
            scale = schedules.imf_guidance_scale(scale_key, batch, cfg_max=cfg_max, cfg_beta=cfg_beta)
            t_min, t_max = schedules.imf_guidance_interval(interval_key, r == t)
            w = jnp.where((t >= t_min) & (t <= t_max), scale, 1.0)
            whole = (jnp.zeros_like(t), ones)  # the instantaneous velocity is asked with the interval [0, 1]
            v_cond = instantaneous(keep, parameterization.imf_guidance_input(w, *whole))
            v_uncond = instantaneous(jnp.ones((batch,), bool), parameterization.imf_guidance_input(ones, *whole))
            v_g = jax.lax.stop_gradient(v + broadcast_per_sample(1.0 - 1.0 / w, x) * (v_cond - v_uncond))
            guidance_input = parameterization.imf_guidance_input(scale, t_min, t_max)
            direction = jax.lax.stop_gradient(v_cond)  # the tangent is the conditional prediction (imf.py)
        v_g = jnp.where(broadcast_per_sample(dropped, x), v, v_g)
        label_kwargs = {"label_drop": dropped}
    if tangent == "predicted" and direction is None:
        direction = jax.lax.stop_gradient(instantaneous(label_kwargs.get("label_drop")))
    elif tangent == "sample":
        direction = v_g

    def u_fn(zz, rr, tt):
        return u_net(params, zz, rr, tt, dropout_key, guidance=guidance_input, **head, **label_kwargs)

    u, u_tgt, *aux = meanflow_target(u_fn, z, r, t, direction, jvp_mode=jvp_mode, jvp_fd_step=jvp_fd_step,
                                     has_aux=velocity_head)
    if tangent == "predicted":  # the target velocity stays the conditional one, v_g (iMF's v-loss)
        u_tgt = jax.lax.stop_gradient(u_tgt + (v_g - direction))
    axes = tuple(range(1, x.ndim))
    per_sample = jnp.sum(jnp.square(u - u_tgt), axis=axes)
    loss = jnp.mean(adaptive_weighted(per_sample, norm_eps, norm_p))
    metrics = {"mean_squared_error": jnp.mean(per_sample) / float(jnp.size(x) // batch),
               "mean_t": jnp.mean(t), "mean_gap": jnp.mean(t - r)}
    if velocity_head:  # iMF's auxiliary v-loss on the v-head's output at the same inputs
        per_sample_v = jnp.sum(jnp.square(jnp.asarray(aux[0], jnp.float32) - jax.lax.stop_gradient(v_g)), axis=axes)
        loss = loss + jnp.mean(adaptive_weighted(per_sample_v, norm_eps, norm_p))
        metrics["velocity_mean_squared_error"] = jnp.mean(per_sample_v) / float(jnp.size(x) // batch)
    return loss, {"loss": loss, **metrics}


# ----------------------------------------------------------------------------------------------
# Flow matching: SiT's objective (Ma et al. 2024; willisma/SiT @ 947f95b). The path and the network reading are in
# `parameterization` (section "Flow matching"): t = 0 noise, t = 1 data, the network the velocity v_θ(x_t, t).


def fm_loss(network, params, x, key, step, *, target_params=None, teacher_params=None, teacher_network=None,
            distance_params=None, time_distribution="uniform", p_mean=0.0, p_std=1.0, train_eps=0.0):
    """SiT's training loss for its default Linear path and velocity model (transport/transport.py:116-140
    `training_losses`): t from `schedules.flow_matching_time` (SiT: t ~ U(0, 1)), x0 ~ N(0, I),
    x_t = t·x1 + (1 − t)·x0, u_t = x1 − x0, loss = mean over the batch of mean_pixels (v_θ(x_t, t) − u_t)²
    (`mean_flat`, transport/utils.py:12-16; `.mean()` over the batch, train.py:249-250). No weighting: SiT's
    `loss_weight` only applies to its score and noise models (transport.py:141-157).

    `train_eps`: t ∈ [eps, 1 − eps]. SiT's Linear velocity model trains on all of [0, 1]: `create_transport`
    sets train_eps = 0 for velocity on the Linear and GVP paths (transport/__init__.py:53-55), and
    `check_interval` keeps [0, 1] for a velocity model whatever eps (transport.py:91-95); 1e-3 is SiT's value for
    its score and noise models (transport/__init__.py:48-51). `time_distribution` "logit_normal" (p_mean, p_std)
    is a cmjax option (SD3/MeanFlow style, `schedules.flow_matching_time`); the default "uniform" is SiT's.

    Class labels: SiT drops them for classifier-free guidance inside the network (`LabelEmbedder.token_drop`,
    models.py:75-91, class_dropout_prob 0.1): cmjax's DiT does the same with `config.model.label_dropout` and its
    null row (`config.model.null_label`), in training mode, so the objective passes labels through untouched."""
    del step, target_params, teacher_params, teacher_network, distance_params
    time_key, noise_key, dropout_key = jax.random.split(key, 3)
    try:
        t = schedules.flow_matching_time(time_key, x.shape[0], time_distribution, p_mean, p_std, train_eps)
    except ValueError as err:
        raise errors.ConfigError(f"config.method.fm.time_distribution: {err}") from None
    noise = jax.random.normal(noise_key, x.shape, jnp.float32)
    x_t = parameterization.flow_interpolant(noise, x, t)
    velocity = jnp.asarray(network(params, x_t, t, dropout_key), jnp.float32)
    loss = jnp.mean(jnp.square(velocity - parameterization.flow_velocity(noise, x)))
    return loss, {"loss": loss, "mean_t": jnp.mean(t)}


OBJECTIVES: dict[str, Callable] = {
    "edm": edm_loss, "cd": cd_loss, "ct": ct_loss, "ict": ict_loss, "ect": ect_loss,
    "sct": sct_loss, "scd": scd_loss, "meanflow": meanflow_loss, "fm": fm_loss,
}
_CALL_ARGS = {"target_params", "teacher_params", "teacher_network", "distance_params"}


def objective_settings(name: str) -> dict[str, Any]:
    """The hyper-parameters objective `name` accepts, with their defaults."""
    if name not in OBJECTIVES:
        raise errors.ConfigError(f"Unknown method {name!r}; choose one of {sorted(OBJECTIVES)}.")
    params = inspect.signature(OBJECTIVES[name]).parameters.values()
    return {p.name: p.default for p in params
            if p.kind is p.KEYWORD_ONLY and p.name not in _CALL_ARGS}


def make_objective(name: str, **settings) -> Callable:
    """Binds hyper-parameters (the keys of `config.method` other than its name) to an objective."""
    allowed = objective_settings(name)
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise errors.ConfigError(f"Method {name!r} has no setting(s) {unknown}; it takes {sorted(allowed)}.")
    fn = OBJECTIVES[name]

    def objective(network, params, x, key, step, **call_args):
        return fn(network, params, x, key, step, **settings, **call_args)

    return objective

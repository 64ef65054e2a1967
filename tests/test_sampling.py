import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import CMStochasticIterativeScheduler
from diffusers.schedulers import scheduling_consistency_models as scm

from cmjax import parameterization as pz
from cmjax import sampling, schedules


def _raw_network(params, x_in, time_input, *unused):
    """A fixed nonlinear 'network' so the scalings and clipping matter."""
    return 1.5 * jnp.tanh(3.0 * x_in) + 0.001 * time_input[:, None, None, None]


def _consistency_fn(x, sigma):
    return pz.consistency_denoise(_raw_network, None, x, sigma)


def test_openai_ts_convention():
    sig = sampling.openai_ts_sigmas([0, 22, 39], 40)
    grid = np.asarray(schedules.karras_sigmas(40, 0.002, 80.0, 7.0), np.float64)
    np.testing.assert_allclose(sig, [80.0, grid[39 - 22], 0.002], rtol=1e-7)
    with pytest.raises(ValueError, match="increase"):
        sampling.openai_ts_sigmas([0, 39, 22], 40)


@pytest.mark.parametrize("timesteps", [[22, 0], [38, 30, 17, 0], [5]])
def test_matches_diffusers_cm_scheduler(timesteps, monkeypatch):
    steps = 40
    scheduler = CMStochasticIterativeScheduler(num_train_timesteps=steps, sigma_min=0.002,
                                               sigma_max=80.0, sigma_data=0.5, rho=7.0,
                                               clip_denoised=True)
    scheduler.set_timesteps(timesteps=timesteps)
    # Same σ sequence: diffusers' timesteps [22, 0] are openai's ts (0, 22) reversed, then σmin.
    ts = list(timesteps[::-1]) + [steps - 1]
    ours = sampling.openai_ts_sigmas(ts, steps)
    np.testing.assert_allclose(scheduler.sigmas.numpy(), ours, rtol=1e-6)
    np.testing.assert_allclose(scheduler.timesteps.numpy(), 250 * np.log(ours[:-1]), rtol=1e-6)

    shape = (2, 4, 4, 3)
    rng = np.random.default_rng(0)
    sample_np = (rng.standard_normal(shape) * 80.0).astype(np.float32)
    noises = [rng.standard_normal(shape).astype(np.float32) for _ in timesteps]
    x_ours = jnp.asarray(sample_np)
    x_theirs = torch.from_numpy(sample_np.transpose(0, 3, 1, 2).copy())
    for j, t in enumerate(scheduler.timesteps):
        sigma, next_sigma = float(ours[j]), float(ours[j + 1])
        # diffusers: the pipeline scales the input and passes 250·ln σ; the scheduler applies c_skip/c_out.
        scaled = scheduler.scale_model_input(x_theirs, t)
        model_out = _raw_network(None, jnp.asarray(scaled.numpy().transpose(0, 2, 3, 1)),
                                 jnp.full((2,), float(t)))
        model_out = torch.from_numpy(np.asarray(model_out).transpose(0, 3, 1, 2).copy())
        noise = torch.from_numpy(noises[j].transpose(0, 3, 1, 2).copy())
        monkeypatch.setattr(scm, "randn_tensor", lambda *a, **k: noise)  # feed diffusers our noise
        x_theirs = scheduler.step(model_out, t, x_theirs).prev_sample
        # cmjax: one step of the multistep sampler with the same noise.
        x0 = jnp.clip(_consistency_fn(x_ours, jnp.full((2,), sigma)), -1, 1)
        if len(timesteps) > 1:
            x_ours = sampling.renoise(x0, next_sigma, jnp.asarray(noises[j]))
        else:  # diffusers draws no noise for single-step sampling
            x_ours = x0
        np.testing.assert_allclose(np.asarray(x_ours), x_theirs.numpy().transpose(0, 2, 3, 1),
                                   atol=1e-6, rtol=1e-6)


def test_multistep_sample_equals_its_definition():
    key, shape = jax.random.key(5), (3, 4, 4, 3)
    taus = [80.0, 2.0, 0.5]
    got = sampling.multistep_sample(_consistency_fn, key, shape, taus)
    x = jnp.clip(_consistency_fn(80.0 * jax.random.normal(jax.random.fold_in(key, 0), shape), 80.0), -1, 1)
    for j, tau in enumerate(taus[1:], start=1):
        z = jax.random.normal(jax.random.fold_in(key, j), shape)
        x = jnp.clip(_consistency_fn(x + np.sqrt(tau**2 - 0.002**2) * z, tau), -1, 1)
    np.testing.assert_allclose(got, x, rtol=1e-5, atol=1e-5)
    one = sampling.one_step_sample(_consistency_fn, jax.random.fold_in(key, 0), shape)
    np.testing.assert_allclose(one, sampling.multistep_sample(_consistency_fn, key, shape, [80.0]))
    assert float(jnp.max(jnp.abs(one))) <= 1.0
    # openai's ts form: two evaluations at σmax and σ(22) of the 40-point grid.
    two = sampling.openai_multistep_sample(_consistency_fn, key, shape, [0, 22, 39], 40)
    sig = sampling.openai_ts_sigmas([0, 22, 39], 40)
    np.testing.assert_allclose(two, sampling.multistep_sample(_consistency_fn, key, shape, sig[:-1]),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="decreasing"):
        sampling.multistep_sample(_consistency_fn, key, shape, [1.0, 2.0])


def test_ect_sampler_renoises_with_tau_and_does_not_clip():
    """ECT's release sampler (locuslab/ect training/ct_training_loop.py:79-97): x = f(80·z, 80), then
    x = f(x + τ·z, τ), no clipping between steps, f the boundary-scaled network at σmin = 0.003."""
    key, shape, sigma_min = jax.random.key(7), (3, 4, 4, 3), 0.003
    f = lambda x, s: pz.consistency_denoise(_raw_network, None, x, s, sigma_min=sigma_min)  # noqa: E731
    got = sampling.multistep_sample(f, key, shape, [80.0, 0.821], sigma_min, clip=False, renoise_kind="plain")
    x = f(80.0 * jax.random.normal(jax.random.fold_in(key, 0), shape), jnp.full((3,), 80.0))
    x = f(x + 0.821 * jax.random.normal(jax.random.fold_in(key, 1), shape), jnp.full((3,), 0.821))
    np.testing.assert_allclose(got, x, rtol=1e-6, atol=1e-6)
    assert float(jnp.max(jnp.abs(got))) > 1.0  # not clipped (the raw network reaches ±1.5)
    z = jnp.ones(shape)
    np.testing.assert_allclose(sampling.renoise(x, 0.01, z, sigma_min, kind="plain"), x + 0.01, rtol=1e-6)
    np.testing.assert_allclose(sampling.renoise(x, 0.01, z, sigma_min), x + np.sqrt(0.01**2 - 0.003**2),
                               rtol=1e-6)  # CM Algorithm 1's √(τ² − σmin²), the default
    with pytest.raises(ValueError, match="renoise"):
        sampling.renoise(x, 0.5, x, kind="ect")

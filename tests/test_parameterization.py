import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmjax import parameterization as pz
from cmjax import toy_problems


def test_edm_scalings_match_table_1():
    sigma, sd = 0.5, 0.5
    c_skip, c_out, c_in = pz.edm_scalings(sigma, sd)
    np.testing.assert_allclose(c_skip, 0.5, rtol=1e-6)
    np.testing.assert_allclose(c_out, 0.25 / math.sqrt(0.5), rtol=1e-6)
    np.testing.assert_allclose(c_in, 1 / math.sqrt(0.5), rtol=1e-6)
    # Large σ: the denoiser ignores the input and scales the network by σd.
    c_skip, c_out, _ = pz.edm_scalings(1e4, sd)
    assert c_skip < 1e-8 and abs(c_out - sd) < 1e-6


def test_consistency_scalings_formula():
    sigma, sd, smin = 2.0, 0.5, 0.002
    c_skip, c_out, c_in = pz.consistency_scalings(sigma, sd, smin)
    np.testing.assert_allclose(c_skip, sd**2 / ((sigma - smin) ** 2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(c_out, sd * (sigma - smin) / math.sqrt(sigma**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(c_in, 1 / math.sqrt(sigma**2 + sd**2), rtol=1e-6)


def test_boundary_condition_is_exact_for_any_network():
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3)) * 3.0
    wild = lambda p, x_in, t: 1e3 * jnp.sin(x_in * 17.0) + t[:, None, None, None]  # noqa: E731
    out = pz.consistency_denoise(wild, None, x, pz.SIGMA_MIN)
    assert np.array_equal(np.asarray(out), np.asarray(x))
    c_skip, c_out, _ = pz.consistency_scalings(pz.SIGMA_MIN)
    assert float(c_skip) == 1.0 and float(c_out) == 0.0
    # Away from σmin the network output does matter.
    assert not np.allclose(pz.consistency_denoise(wild, None, x, 0.01), x)


def test_time_input_is_250_log_sigma():
    np.testing.assert_allclose(pz.network_time_input(jnp.array([1.0, math.e, 80.0])),
                               [0.0, 250.0, 250 * math.log(80.0)], rtol=1e-6, atol=1e-4)
    assert np.isfinite(pz.network_time_input(0.0))
    np.testing.assert_allclose(pz.network_time_input(2.0), 1000 * pz.edm_noise_conditioning(2.0),
                               rtol=1e-6)


def test_denoise_feeds_scaled_input_and_time_and_combines():
    seen = {}

    def apply_fn(params, x_in, t):
        seen["x_in"], seen["t"] = x_in, t
        return params * jnp.ones_like(x_in)

    x = jnp.full((2, 3), 2.0)
    sigma = jnp.array([0.5, 4.0])
    out = pz.edm_denoise(apply_fn, 7.0, x, sigma)
    c_skip, c_out, c_in = pz.edm_scalings(sigma)
    np.testing.assert_allclose(seen["x_in"], c_in[:, None] * x, rtol=1e-6)
    np.testing.assert_allclose(seen["t"], 250 * np.log(sigma), rtol=1e-6)
    np.testing.assert_allclose(out, c_skip[:, None] * x + c_out[:, None] * 7.0, rtol=1e-6)
    with pytest.raises(ValueError, match="parameterization"):
        pz.denoise(apply_fn, 7.0, x, sigma, kind="vp")


@pytest.mark.parametrize("kind", ["edm", "consistency"])
def test_network_from_denoiser_round_trips(kind):
    target = lambda x, s: jnp.tanh(x) * (1 + s[:, None])  # noqa: E731
    network = pz.network_from_denoiser(target, kind=kind)
    x = jax.random.normal(jax.random.key(1), (5, 2))
    sigma = jnp.array([0.01, 0.3, 1.0, 10.0, 80.0])
    out = pz.denoise(network, None, x, sigma, kind=kind)
    np.testing.assert_allclose(out, target(x, sigma), rtol=2e-4, atol=2e-5)


# ----------------------------------------------------------------------------------------------
# Flow matching (SiT's linear interpolant, t = 0 noise, t = 1 data).

FLOW_SIGMAS = (0.01, 0.3, 1.0, 5.0, 80.0)


def test_flow_time_and_sigma_convert_both_ways_and_match_sits_interpolant():
    t = jnp.array([0.01, 0.25, 0.5, 0.9, 1.0])
    np.testing.assert_allclose(pz.flow_time(pz.flow_sigma(t)), t, rtol=1e-6)
    assert float(pz.flow_time(0.0)) == 1.0 and float(pz.flow_sigma(0.5)) == 1.0  # σ = 0 is data; t = ½ is σ = 1
    # x_σ = x1 + σ·ε is the same point as SiT's x_t, scaled by 1 + σ.
    data, eps = jax.random.normal(jax.random.key(0), (2, 3, 4, 4, 1))
    sigma = jnp.array([0.1, 1.0, 20.0])
    x_t = pz.flow_interpolant(eps, data, pz.flow_time(sigma))
    np.testing.assert_allclose(x_t, (data + sigma[:, None, None, None] * eps) / (1 + sigma[:, None, None, None]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pz.flow_velocity(eps, data), data - eps)


def test_flow_denoise_of_a_one_point_datasets_velocity_is_that_point():
    """For data = the single point a, the exact velocity is (a − x_t)/(1 − t), and D must return a at every σ."""
    a = jax.random.normal(jax.random.key(1), (1, 4, 4, 2))

    def velocity(params, x_t, t):
        return (a - x_t) / (1 - pz.broadcast_per_sample(t, x_t))

    x = a + jax.random.normal(jax.random.key(2), (len(FLOW_SIGMAS), 4, 4, 2)) * jnp.array(FLOW_SIGMAS)[:, None, None,
                                                                                                         None]
    denoised = pz.denoise(velocity, None, x, jnp.array(FLOW_SIGMAS), kind=pz.FLOW)
    np.testing.assert_allclose(denoised, jnp.broadcast_to(a, x.shape), rtol=1e-4, atol=1e-4)


def test_flow_denoise_of_a_gaussians_velocity_is_the_posterior_mean():
    mean, std = 0.3, 0.5
    velocity = toy_problems.gaussian_flow_velocity(mean, std)  # written in SiT's time, not through D
    x = jax.random.normal(jax.random.key(3), (len(FLOW_SIGMAS), 8)) * 3.0
    sigma = jnp.array(FLOW_SIGMAS)
    posterior = mean + std**2 / (std**2 + sigma[:, None] ** 2) * (x - mean)  # E[x1 | x1 + σε = x]
    np.testing.assert_allclose(pz.flow_denoise(velocity, None, x, sigma), posterior, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pz.denoise(velocity, None, x, sigma, kind="flow"), posterior, rtol=1e-5, atol=1e-5)
    # At σ = 0 the estimate is the input itself, whatever the network says.
    np.testing.assert_allclose(pz.flow_denoise(lambda p, x_t, t: x_t + 7.0, None, x, 0.0), x)


def test_a_flow_network_cannot_be_a_distillation_teacher():
    with pytest.raises(pz.errors.ConfigError, match=r"flow-matching velocity.*method 'fm'.*method.name=edm"):
        pz.teacher_time_input(jnp.zeros(2), "flow")

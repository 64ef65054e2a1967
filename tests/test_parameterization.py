import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmjax import parameterization as pz


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

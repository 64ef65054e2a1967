import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmjax import schedules


def _karras_reference(n, smin=0.002, smax=80.0, rho=7.0):
    return [(smin ** (1 / rho) + (i - 1) / (n - 1) * (smax ** (1 / rho) - smin ** (1 / rho))) ** rho
            for i in range(1, n + 1)]


@pytest.mark.parametrize("n", [2, 18, 40, 1281])
def test_karras_sigmas_match_design_formula(n):
    grid = np.asarray(schedules.karras_sigmas(n))
    np.testing.assert_allclose(grid, _karras_reference(n), rtol=1e-6)
    assert grid[0] == np.float32(0.002) and grid[-1] == np.float32(80.0)
    assert np.all(np.diff(grid) > 0)


def test_karras_sigma_traced_matches_host():
    f = jax.jit(lambda i, n: schedules.karras_sigma(i, n))
    for n in (11, 21, 1281):
        idx = np.arange(n)
        np.testing.assert_allclose(f(idx, n), _karras_reference(n), rtol=2e-5)
    with pytest.raises(ValueError, match="at least 2"):
        schedules.karras_sigmas(1)


def test_ict_curriculum_stage_boundaries():
    total = 800_000
    assert schedules.ict_stage_length(total) == total // 8
    k_prime = total // 8
    expected = [11, 21, 41, 81, 161, 321, 641, 1281]
    for stage, n in enumerate(expected):
        assert int(schedules.ict_num_scales(stage * k_prime, total)) == n
        assert int(schedules.ict_num_scales(stage * k_prime + k_prime - 1, total)) == n
    assert int(schedules.ict_num_scales(total, total)) == 1281
    assert int(schedules.ict_num_scales(10**9, total)) == 1281  # no overflow long after the end
    # Traced step gives the same values.
    steps = jnp.array([0, k_prime - 1, k_prime, 3 * k_prime + 5, total - 1])
    np.testing.assert_array_equal(jax.jit(lambda k: schedules.ict_num_scales(k, total))(steps),
                                  [11, 11, 21, 81, 1281])


def test_cm_adaptive_curriculum_code_form():
    total, s0, s1, mu0 = 800_000, 2, 150, 0.9
    n0, mu_0 = schedules.cm_adaptive_schedule(0, total, s0, s1, mu0)
    n_end, mu_end = schedules.cm_adaptive_schedule(total, total, s0, s1, mu0)
    assert int(n0) == 2 and int(n_end) == 151
    np.testing.assert_allclose(mu_0, 0.81, rtol=1e-6)  # exp(s0·ln μ0 / m) with m = 1
    np.testing.assert_allclose(mu_end, math.exp(2 * math.log(0.9) / 150), rtol=1e-6)
    # The paper's form divides by N(k) instead: μ(0) = exp(2 ln 0.9 / 2) = 0.9.
    _, mu_paper = schedules.cm_adaptive_schedule(0, total, s0, s1, mu0, paper_form=True)
    np.testing.assert_allclose(mu_paper, 0.9, rtol=1e-6)
    # Reference from the released code's formula, float64.
    ks = np.arange(0, total + 1, 997)
    m = np.maximum(np.ceil(np.sqrt(ks / total * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1), 1)
    n_host, mu_host = schedules.cm_adaptive_schedule(ks, total, s0, s1, mu0)
    np.testing.assert_array_equal(n_host, m + 1)
    np.testing.assert_allclose(mu_host, np.exp(s0 * np.log(mu0) / m), rtol=1e-6)
    assert np.all(np.diff(n_host) >= 0) and np.all(np.diff(mu_host) >= 0)
    # Traced (float32) agrees with the float64 release arithmetic on all but isolated steps.
    n_traced, _ = jax.jit(lambda k: schedules.cm_adaptive_schedule(k, total, s0, s1, mu0))(ks)
    assert np.mean(np.asarray(n_traced) == m + 1) > 0.999
    assert np.max(np.abs(np.asarray(n_traced) - (m + 1))) <= 1


def test_ict_index_probs_match_erf_formula():
    sigmas = np.asarray(schedules.karras_sigmas(11), np.float64)
    probs = np.asarray(schedules.ict_index_probs(sigmas, -1.1, 2.0))
    erf = np.vectorize(math.erf)
    cdf = erf((np.log(sigmas) + 1.1) / (math.sqrt(2) * 2.0))
    expected = (cdf[1:] - cdf[:-1]) / (cdf[-1] - cdf[0])
    assert probs.shape == (10,)
    np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-7)
    # Mass concentrates where ln σ ≈ Pm: the pair straddling σ = e^{-1.1} ≈ 0.33 is the mode.
    mode = int(np.argmax(probs))
    assert sigmas[mode] <= 1.0 and sigmas[mode + 1] >= math.exp(-1.1) * 0.5


def test_masked_index_probs_equal_unmasked_and_sampler_respects_mask():
    n, max_n = 21, 1281
    masked = np.asarray(jax.jit(lambda n: schedules.ict_index_probs_masked(n, max_n))(n))
    direct = np.asarray(schedules.ict_index_probs(schedules.karras_sigmas(n)))
    assert masked.shape == (max_n - 1,)
    np.testing.assert_allclose(masked[: n - 1], direct, rtol=1e-4, atol=1e-7)
    assert np.all(masked[n - 1:] == 0.0)
    idx = np.asarray(schedules.sample_ict_indices(jax.random.key(0), 200_000, n, max_n))
    assert idx.min() >= 0 and idx.max() <= n - 2
    freq = np.bincount(idx, minlength=n - 1) / idx.size
    np.testing.assert_allclose(freq, direct, atol=4e-3)


def test_ect_r_mapping():
    t = jnp.geomspace(0.002, 80.0, 200)
    r0 = np.asarray(schedules.ect_r(t, 0))
    r3 = np.asarray(schedules.ect_r(t, 3))
    assert np.all(r0 < np.asarray(t)) and np.all(r3 < np.asarray(t))
    assert np.all(r3 >= r0) and np.any(r3 > r0)
    assert np.all(r0 >= 0)
    # The floor: small t at stage 0 maps to r = 0 (ratio 1 − ½·(1 + 8·sigmoid(−t)) < 0).
    assert float(schedules.ect_r(0.01, 0)) == 0.0 and float(schedules.ect_r(1.0, 0)) == 0.0
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    np.testing.assert_allclose(schedules.ect_r(10.0, 0), 10 * (1 - 0.5 * (1 + 8 * sig(-10))), rtol=1e-6)
    np.testing.assert_allclose(schedules.ect_r(1.0, 3), 1 - (1 / 16) * (1 + 8 * sig(-1)), rtol=1e-6)
    np.testing.assert_array_equal(schedules.ect_stage(jnp.array([0, 24_999, 25_000, 60_000]), 25_000),
                                  [0, 0, 1, 2])


def test_ema_rate_from_half_life():
    beta = schedules.ema_rate_from_half_life(500_000, 512)
    np.testing.assert_allclose(beta ** (500_000 / 512), 0.5, rtol=1e-9)
    with pytest.raises(ValueError, match="half-life"):
        schedules.ema_rate_from_half_life(0, 512)


def test_ict_curriculum_shorter_than_its_stages_spends_one_step_per_stage():
    # K = 3 steps for 5 stages (s1/s0 = 16): K′ would be 0; N(k) must stay a valid grid size.
    assert schedules.ict_stage_length(3, 10, 160) == 1
    assert [int(schedules.ict_num_scales(k, 3, 10, 160)) for k in range(6)] == [11, 21, 41, 81, 161, 161]


def test_flow_matching_time_stays_in_sits_interval():
    key = jax.random.key(0)
    for dist in schedules.FLOW_TIME_DISTS:
        t = schedules.flow_matching_time(key, 4096, dist, -0.4, 1.0, eps=0.1)
        assert float(jnp.min(t)) >= 0.1 and float(jnp.max(t)) <= 0.9, dist
    t = schedules.flow_matching_time(key, 4096)  # SiT's velocity model: U(0, 1)
    assert float(jnp.min(t)) < 0.01 and float(jnp.max(t)) > 0.99
    # logit-normal: the noise fraction 1 − t is MeanFlow's draw, so a negative p_mean leans to the data (t → 1).
    np.testing.assert_allclose(1 - schedules.flow_matching_time(key, 8, "logit_normal", -0.4, 1.0),
                               schedules.meanflow_time(key, 8, "logit_normal", -0.4, 1.0), rtol=1e-6)

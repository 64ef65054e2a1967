import jax
import jax.numpy as jnp
import numpy as np

from cmjax import schedules, solvers, toy_problems

MIXTURE = toy_problems.ring_of_gaussians(num_modes=6, radius=1.0, std=0.15)


def _reference_solution(x, t, t_next, substeps=400):
    grid = np.asarray(schedules.karras_sigmas(substeps, t_next, t, 7.0))[::-1]
    return solvers.integrate_pf_ode(MIXTURE.denoise, x, grid)


def _local_errors(stepper, t, hs):
    x = MIXTURE.sample(jax.random.key(0), 512) + t * jax.random.normal(jax.random.key(1), (512, 2))
    errors = []
    for h in hs:
        exact = _reference_solution(x, t, t - h)
        errors.append(float(jnp.mean(jnp.linalg.norm(stepper(MIXTURE.denoise, x, t, t - h) - exact, axis=1))))
    return np.array(errors)


def test_heun_local_error_is_third_order():
    errors = _local_errors(solvers.heun_step, 1.0, [0.2, 0.1, 0.05])
    ratios = errors[:-1] / errors[1:]
    assert np.all((ratios > 6.0) & (ratios < 10.5)), ratios


def test_euler_local_error_is_second_order():
    errors = _local_errors(solvers.euler_step, 1.0, [0.2, 0.1, 0.05])
    ratios = errors[:-1] / errors[1:]
    assert np.all((ratios > 3.2) & (ratios < 5.0)), ratios


def test_edm_sampler_counts_evaluations_and_reproduces_the_mixture():
    calls = []

    def counting_denoiser(x, sigma):
        jax.debug.callback(lambda: calls.append(1))
        return MIXTURE.denoise(x, sigma)

    samples, nfe = jax.jit(
        lambda k: solvers.edm_sampler(counting_denoiser, k, (20_000, 2), num_steps=18),
    )(jax.random.key(3))
    jax.effects_barrier()
    assert nfe == 35 and len(calls) == 35 == solvers.edm_sampler_evaluations(18)
    cov_error = {}
    for steps in (18, 128):
        samples, _ = jax.jit(lambda k, n=steps: solvers.edm_sampler(MIXTURE.denoise, k, (20_000, 2), n))(
            jax.random.key(3))
        samples = np.asarray(samples, np.float64)
        np.testing.assert_allclose(samples.mean(0), MIXTURE.mean(), atol=0.02)
        cov_error[steps] = np.max(np.abs(np.cov(samples.T) - MIXTURE.covariance()))
        # Each sample lands near a mode: distance to the nearest mean is O(std), never between modes.
        nearest = np.min(np.linalg.norm(samples[:, None] - MIXTURE.means[None], axis=-1), axis=1)
        assert np.quantile(nearest, 0.99) < 4 * 0.15
    # 35 evaluations leave a few-percent discretisation error on this sharp mixture; it vanishes with
    # more steps (down to the 20k-sample noise, ~0.005), which a biased sampler would not show.
    assert cov_error[18] < 0.1 * MIXTURE.covariance()[0, 0], cov_error
    assert cov_error[128] < 0.015, cov_error


def test_edm_sigmas_end_at_zero():
    sig = np.asarray(solvers.edm_sigmas(18))
    assert sig.shape == (19,) and sig[0] == np.float32(80.0) and sig[-1] == 0.0
    assert np.all(np.diff(sig) < 0)


def test_edm_heun_sampler_over_a_flows_velocity_samples_its_gaussian():
    """The EDM Heun sampler over `flow_denoise` of the exact velocity of data N(μ, s²) solves the flow's ODE: its
    samples converge (18 → 40 steps) to the exact ODE map of its noise, μ + s·σmax·z/√(σmax² + s²), with mean μ and
    std s, and equal (same noise) those of the EDM sampler over that Gaussian's own denoiser."""
    from cmjax import parameterization as pz

    mean, std = 0.3, 0.5
    velocity = toy_problems.gaussian_flow_velocity(mean, std)
    flow = lambda x, s: pz.flow_denoise(velocity, None, x, s)  # noqa: E731
    edm = lambda x, s: mean + std**2 / (std**2 + pz.broadcast_per_sample(s, x) ** 2) * (x - mean)  # noqa: E731
    sample = jax.jit(lambda denoise, n: solvers.edm_sampler(denoise, jax.random.key(0), (20_000, 2), n)[0],
                     static_argnums=(0, 1))
    z = jax.random.normal(jax.random.key(0), (20_000, 2))  # the sampler's noise: x = σmax·z
    exact = mean + 80.0 * z * std / np.sqrt(80.0**2 + std**2)
    coarse, fine = (float(jnp.mean(jnp.abs(sample(flow, n) - exact))) for n in (18, 40))
    assert fine < 0.005 and coarse > 4 * fine, (coarse, fine)  # Heun converges to the exact map
    samples = sample(flow, 40)
    np.testing.assert_allclose(np.mean(samples, axis=0), mean, atol=0.01)
    np.testing.assert_allclose(np.std(samples, axis=0), np.std(exact, axis=0), atol=0.005)
    np.testing.assert_allclose(np.std(exact, axis=0), std, atol=0.01)
    np.testing.assert_allclose(samples, sample(edm, 40), atol=1e-4)

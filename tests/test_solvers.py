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

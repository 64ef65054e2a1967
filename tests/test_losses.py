import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmjax import distances, errors, losses, models, schedules, solvers, toy_problems
from cmjax import parameterization as pz

MIXTURE = toy_problems.ring_of_gaussians(num_modes=6, radius=1.0, std=0.2)
TEACHER = pz.network_from_denoiser(MIXTURE.denoise, kind="edm")


def _exact_consistency_function(x, sigma, substeps=96):
    """f*(x, σ): the PF-ODE of the exact mixture denoiser integrated from σ down to σmin."""
    ramp = jnp.linspace(0.0, 1.0, substeps)[:, None]
    lo, hi = pz.SIGMA_MIN ** (1 / 7), sigma[None, :] ** (1 / 7)
    grid = (hi + ramp * (lo - hi)) ** 7  # [substeps, B], decreasing per sample
    return solvers.integrate_pf_ode(MIXTURE.denoise, x, grid)


def _consistency_network(perturbation):
    """f* plus a term that drifts with ln σ: no longer constant along PF-ODE trajectories."""
    exact = pz.network_from_denoiser(_exact_consistency_function, kind="consistency")
    return lambda params, x_in, t, key: exact(params, x_in, t) + perturbation * (t / 250.0)[:, None]


def test_cd_loss_vanishes_at_the_exact_consistency_function():
    x = MIXTURE.sample(jax.random.key(0), 2048)
    cd = losses.make_objective("cd", num_scales=18, distance="l2", teacher_solver="heun")
    results = {}
    for name, eps in [("exact", 0.0), ("perturbed", 0.2)]:
        net = _consistency_network(eps)
        loss, metrics = jax.jit(lambda k, net=net: cd(net, None, x, k, 0, target_params=None,
                                                       teacher_params=None, teacher_network=TEACHER))(
            jax.random.key(1))
        results[name] = float(loss)
    assert int(metrics["num_scales"]) == 18 and float(metrics["target_ema"]) == 0.0
    assert results["exact"] < 2e-4, results
    assert results["perturbed"] > 20 * results["exact"], results


def _mlp_setup(batch=16):
    module = models.get({"name": "mlp", "hidden_dim": 32, "num_layers": 1, "dropout": 0.2})
    x = MIXTURE.sample(jax.random.key(0), batch)
    params = module.init({"params": jax.random.key(1)}, x, jnp.zeros(batch))["params"]
    # Non-zero output layer so the network's dropout and parameters matter.
    params = jax.tree.map(lambda p: p + 0.05, params)

    def network(p, x_in, t_in, key):
        return module.apply({"params": p}, x_in, t_in, train=True, rngs={"dropout": key})

    return network, params, x


@pytest.mark.parametrize("name", ["edm", "cd", "ct", "ict", "ect", "fm"])
def test_every_objective_gives_finite_loss_and_gradients(name):
    network, params, x = _mlp_setup()
    objective = losses.make_objective(name)
    kwargs = {"target_params": params}
    if name == "cd":
        kwargs.update(teacher_params=None, teacher_network=TEACHER)

    @jax.jit
    def grad_fn(p, k):
        return jax.value_and_grad(lambda p: objective(network, p, x, k, 123, **kwargs), has_aux=True)(p)

    (loss, metrics), grads = grad_fn(params, jax.random.key(2))
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert np.isfinite(float(metrics["loss"]))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))


def test_online_and_target_share_the_dropout_key():
    seen = []
    network, params, x = _mlp_setup()

    def recording_network(p, x_in, t_in, key):
        jax.debug.callback(lambda k: seen.append(np.asarray(k)), jax.random.key_data(key))
        return network(p, x_in, t_in, key)

    objective = losses.make_objective("ict")
    jax.jit(lambda k: objective(recording_network, params, x, k, 0))(jax.random.key(3))
    jax.effects_barrier()
    assert len(seen) == 2 and np.array_equal(seen[0], seen[1])


def test_ict_loss_compiles_once_across_curriculum_stages():
    traces = []
    network, params, x = _mlp_setup()
    objective = losses.make_objective("ict", total_steps=800_000)

    @jax.jit
    def loss_fn(p, k, step):
        traces.append(1)
        return objective(network, p, x, k, step)

    n_seen = []
    for step in (0, 100_000, 250_000, 799_999):  # stages with N = 11, 21, 41, 1281
        _, metrics = loss_fn(params, jax.random.key(step), jnp.int32(step))
        n_seen.append(int(metrics["num_scales"]))
    assert n_seen == [11, 21, 41, 1281]
    assert len(traces) == 1


def test_ict_pairs_follow_the_lognormal_and_weighting():
    """With a network that outputs 0, the per-sample distance and weight are known in closed form."""
    zero = lambda p, x_in, t, k: jnp.zeros_like(x_in)  # noqa: E731
    x = jnp.zeros((4096, 2))
    loss, metrics = losses.make_objective("ict", distance="l2", weighting="uniform")(
        zero, None, x, jax.random.key(0), 0)
    # f(x, σ) = c_skip(σ)·x with x = σ·z: the distance is E[(c_skip(σ')σ' − c_skip(σ)σ)²]·z² per coord.
    sig = np.asarray(schedules.karras_sigmas(11), np.float64)
    probs = np.asarray(schedules.ict_index_probs(sig))
    c = lambda s: 0.25 / ((s - 0.002) ** 2 + 0.25)  # noqa: E731
    expected = np.sum(probs * (c(sig[1:]) * sig[1:] - c(sig[:-1]) * sig[:-1]) ** 2)
    np.testing.assert_allclose(float(loss), expected, rtol=0.1)


def test_distances():
    a = jnp.zeros((2, 4, 4, 3))
    b = jnp.ones((2, 4, 4, 3)) * jnp.array([1.0, 2.0])[:, None, None, None]
    np.testing.assert_allclose(distances.l2_distance(a, b), [1.0, 4.0])
    np.testing.assert_allclose(distances.l1_distance(a, b), [1.0, 2.0])
    c = distances.ict_huber_c((32, 32, 3))
    np.testing.assert_allclose(c, 0.00054 * math.sqrt(3072))
    huber = distances.get("pseudo_huber", (4, 4, 3))
    np.testing.assert_allclose(huber(a, b), [math.sqrt(48 + 0.00054**2 * 48) - 0.00054 * math.sqrt(48),
                                             math.sqrt(48 * 4 + 0.00054**2 * 48) - 0.00054 * math.sqrt(48)],
                               rtol=1e-6)
    # c = 0 is the L2 norm, with a finite gradient where a = b.
    g = jax.grad(lambda y: jnp.sum(distances.pseudo_huber_distance(y, a, 0.0)))(a)
    assert np.all(np.isfinite(g))
    with pytest.raises(ValueError, match="Unknown distance"):
        distances.get("l3", (2,))


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match=r"no setting\(s\) \['num_scale'\]"):
        losses.make_objective("cd", num_scale=18)
    with pytest.raises(ValueError, match="Unknown method"):
        losses.make_objective("lcm")
    network, params, x = _mlp_setup()
    with pytest.raises(ValueError, match="needs a teacher"):
        losses.make_objective("cd")(network, params, x, jax.random.key(0), 0)
    with pytest.raises(ValueError, match="target_params"):
        losses.make_objective("ct")(network, params, x, jax.random.key(0), 0)
    assert "s1" in losses.objective_settings("ict") and "teacher_params" not in losses.objective_settings("ict")


# ----------------------------------------------------------------------------------------------
# Flow matching (SiT's objective).


def _fm(network, x, key, **settings):
    return jax.jit(lambda x, k: losses.make_objective("fm", **settings)(network, None, x, k, 0))(x, key)


def test_fm_loss_is_sits_velocity_regression():
    """SiT's `training_losses` for Linear + velocity, written out: t ~ U(0, 1), x0 ~ N(0, I), x_t = t·x1 + (1 − t)·x0,
    mean over pixels of (v(x_t, t) − (x1 − x0))², then over the batch (transport.py:103-140, train.py:250)."""
    x = jax.random.normal(jax.random.key(0), (8, 4, 4, 2))
    key = jax.random.key(1)

    def network(params, x_t, t, dropout_key):  # any fixed function of (x_t, t)
        return 0.3 * x_t + pz.broadcast_per_sample(t, x_t) ** 2

    time_key, noise_key, _ = jax.random.split(key, 3)
    t = jax.random.uniform(time_key, (8,))
    x0 = jax.random.normal(noise_key, x.shape)
    tb = t[:, None, None, None]
    x_t = tb * x + (1 - tb) * x0
    reference = np.mean(np.mean((0.3 * x_t + tb**2 - (x - x0)) ** 2, axis=(1, 2, 3)))
    loss, metrics = _fm(network, x, key)
    np.testing.assert_allclose(float(loss), reference, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["mean_t"]), float(np.mean(t)), rtol=1e-6)


def test_fm_loss_vanishes_at_a_one_point_datasets_exact_velocity():
    """Data = one point a: the marginal velocity (a − x_t)/(1 − t) equals every conditional target a − x0, so the
    loss is 0; a network off by 0.1 everywhere pays exactly 0.1²."""
    a = jax.random.normal(jax.random.key(2), (1, 4, 4, 1))
    x = jnp.broadcast_to(a, (64, 4, 4, 1))

    def exact(params, x_t, t, dropout_key):
        return (a - x_t) / (1 - pz.broadcast_per_sample(t, x_t))

    def perturbed(params, x_t, t, dropout_key):
        return exact(params, x_t, t, dropout_key) + 0.1

    # train_eps keeps 1 − t ≥ 0.01, away from the float32 cancellation of (a − x_t)/(1 − t) at t → 1.
    zero, _ = _fm(exact, x, jax.random.key(3), train_eps=0.01)
    off, _ = _fm(perturbed, x, jax.random.key(3), train_eps=0.01)
    assert float(zero) < 1e-9, float(zero)
    np.testing.assert_allclose(float(off), 0.01, rtol=1e-4)


def test_fm_time_distributions():
    x = jnp.zeros((256, 2))
    network = lambda p, x_t, t, k: jnp.zeros_like(x_t)  # noqa: E731
    _, uniform = _fm(network, x, jax.random.key(4))
    _, near_data = _fm(network, x, jax.random.key(4), time_distribution="logit_normal", p_mean=-2.0, p_std=0.5)
    assert abs(float(uniform["mean_t"]) - 0.5) < 0.05 and float(near_data["mean_t"]) > 0.8
    with pytest.raises(errors.ConfigError, match=r"time_distribution.*'uniform', 'logit_normal'"):
        _fm(network, x, jax.random.key(4), time_distribution="lognormal")

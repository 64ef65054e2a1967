"""MeanFlow (Geng et al. 2025) and iMF: the MeanFlow identity on a flow whose velocity is known exactly, the JVP
modes, the (t, r) sampler, the sampler and σ form, the two-time networks, and the objective's options."""
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from cmjax import errors, losses, methods, models, sampling, schedules, toy_problems
from cmjax import parameterization as pz
from configs import default

RING = toy_problems.ring_of_gaussians(num_modes=4, radius=1.0, std=0.2)


def velocity(z, t):
    """The exact marginal velocity E[ε − x | z_t = z] of the path z_t = (1 − t)·x + t·ε for the mixture: z_t/(1 − t)
    is x + σ·ε at σ = t/(1 − t), so E[x | z_t] = D*(z_t/(1 − t), σ) and v = (z − D*)/t."""
    tb = t[:, None]
    return (z - RING.denoise(z / (1.0 - tb), t / (1.0 - t))) / tb


@jax.jit
def average_velocity(z, r, t):
    """u(z, r, t) = (z_t − z_r)/(t − r), z_r from integrating dz/dτ = v(z, τ) backwards from t to r (64 RK4 steps): a
    numerical average velocity, differentiable in (z, r, t)."""
    steps = 64
    dt = (r - t) / steps
    h = dt[:, None]

    def rk4(i, y):
        tau = t + dt * i
        k1 = velocity(y, tau)
        k2 = velocity(y + 0.5 * h * k1, tau + 0.5 * dt)
        k3 = velocity(y + 0.5 * h * k2, tau + 0.5 * dt)
        k4 = velocity(y + h * k3, tau + dt)
        return y + h * (k1 + 2 * k2 + 2 * k3 + k4) / 6.0

    return (z - jax.lax.fori_loop(0, steps, rk4, z)) / (t - r)[:, None]


def _times(n=32):
    t = jnp.linspace(0.3, 0.9, n)
    r = t * jnp.linspace(0.1, 0.8, n)[::-1]  # r > 0: v = (z − D)/t is stiff near t = 0
    return r, t


def test_meanflow_identity_holds_for_the_exact_flow_of_a_gaussian_mixture():
    """u = v − (t − r)·(v·∂_z u + ∂_t u) (MeanFlow eq. 8): the objective's target built from the numerical average
    velocity equals that average velocity; tangents in the wrong slots do not."""
    r, t = _times()
    z = jax.random.normal(jax.random.key(0), (32, 2))
    v = velocity(z, t)
    u = average_velocity(z, r, t)
    assert float(jnp.min(jnp.linalg.norm(u - v, axis=1))) > 1e-3  # a non-trivial flow: u differs from v
    for mode, tol in (("exact", 2e-4), ("finite_difference", 2e-3)):
        value, target = losses.meanflow_target(average_velocity, z, r, t, v, jvp_mode=mode)
        np.testing.assert_allclose(value, u, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(target, u, atol=tol)
    # The same JVP with r's and t's tangents swapped misses by far more than the tolerance.
    swapped = lambda zz, rr, tt: average_velocity(zz, tt, rr)  # noqa: E731
    _, wrong = losses.meanflow_target(swapped, z, r, t, v)
    assert float(jnp.max(jnp.abs(wrong - u))) > 50 * 2e-4


def _mlp(hidden=32):
    module = models.get({"name": "mlp", "hidden_dim": hidden, "num_layers": 2})
    params = module.init({"params": jax.random.key(0)}, jnp.zeros((1, 2)), jnp.zeros((1, 2)))["params"]
    leaves, tree = jax.tree.flatten(params)  # the init zeroes the output layer: random weights, so u ≠ 0
    keys = jax.random.split(jax.random.key(7), len(leaves))
    params = jax.tree.unflatten(tree, [0.5 * jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)])
    return module, params, lambda p, x_in, t_in, *rng, **kw: module.apply({"params": p}, x_in, t_in)


@pytest.mark.parametrize("tangent", ["sample", "predicted"])
def test_exact_and_finite_difference_jvp_give_the_same_loss_and_gradient_with_one_compile(tangent):
    _, params, network = _mlp()
    x = RING.sample(jax.random.key(1), 64)
    traces = {"exact": 0, "finite_difference": 0}
    results = {}
    for mode in traces:
        objective = losses.make_objective("meanflow", jvp_mode=mode, tangent=tangent)

        def loss_and_grad(p, key, step, mode=mode, objective=objective):
            traces[mode] += 1
            return jax.value_and_grad(lambda q: objective(network, q, x, key, step)[0])(p)

        fn = jax.jit(loss_and_grad)
        for step in range(3):  # the step and key change; the program does not
            results[mode, step] = fn(params, jax.random.key(step), jnp.int32(step))
    assert traces == {"exact": 1, "finite_difference": 1}
    for step in range(3):
        (loss_e, grad_e), (loss_f, grad_f) = results["exact", step], results["finite_difference", step]
        np.testing.assert_allclose(loss_f, loss_e, rtol=1e-4)
        flat_e, flat_f = (jax.flatten_util.ravel_pytree(g)[0] for g in (grad_e, grad_f))
        assert float(jnp.max(jnp.abs(flat_e))) > 1e-3
        np.testing.assert_allclose(flat_f, flat_e, atol=2e-3 * float(jnp.max(jnp.abs(flat_e))))
    # The JVP term matters: without it (t − r = 0 everywhere) the loss differs.
    plain, full = (losses.make_objective("meanflow", equal_fraction=f, norm_p=0.0) for f in (1.0, 0.75))
    without, with_jvp = (float(o(network, params, x, jax.random.key(0), 0)[0]) for o in (plain, full))
    assert abs(with_jvp - without) > 0.01 * without


def test_loss_is_the_adaptively_weighted_distance_to_the_identity_target():
    """One batch recomputed by hand: z, v, the target from the closed-form JVP of a network u = A·z + b·t + c·r
    (du/dt along (v, 0, 1) = A·v + b), the weight 1/(‖Δ‖² + c)^p."""
    a = jnp.array([[0.5, -0.2], [0.3, 0.8]])
    b, c = jnp.array([0.7, -0.4]), jnp.array([0.1, 0.2])

    def network(params, z, time_input, *rng, **kw):  # time_input = (t, t − r)
        t, h = time_input[:, 0:1], time_input[:, 1:2]
        return z @ params.T + t * b + (t - h) * c

    x = RING.sample(jax.random.key(3), 16)
    key = jax.random.key(4)
    loss, _ = losses.make_objective("meanflow", norm_p=0.75, norm_eps=1e-3)(network, a, x, key, 0)
    time_key, noise_key, _, _ = jax.random.split(key, 4)
    t, r = schedules.meanflow_times(time_key, 16)
    eps = jax.random.normal(noise_key, x.shape)
    z, v = (1 - t[:, None]) * x + t[:, None] * eps, eps - x
    u = network(a, z, pz.meanflow_time_input(r, t))
    target = v - (t - r)[:, None] * (v @ a.T + b)
    sq = jnp.sum(jnp.square(u - target), axis=1)
    np.testing.assert_allclose(loss, jnp.mean(sq / (sq + 1e-3) ** 0.75), rtol=1e-5)


def test_meanflow_times():
    t, r = schedules.meanflow_times(jax.random.key(0), 1000, equal_fraction=0.25)
    assert bool(jnp.all(r <= t)) and bool(jnp.all((t > 0) & (t < 1)))
    assert int(jnp.sum(t == r)) == 250 and bool(jnp.all(t[:250] == r[:250]))
    # "sort" (the paper's): t is the larger of two logit-normal draws; "min" keeps t's own distribution.
    t_min, _ = schedules.meanflow_times(jax.random.key(0), 1000, order="min", p_mean_t=-0.4)
    logit = lambda s: np.log(np.asarray(s) / (1 - np.asarray(s)))  # noqa: E731
    assert abs(float(np.mean(logit(t_min))) + 0.4) < 0.1 and float(np.mean(logit(t))) > 0.1
    with pytest.raises(ValueError, match="order"):
        schedules.meanflow_times(jax.random.key(0), 4, order="max")


def test_meanflow_sampler_is_its_definition_and_the_sigma_form_is_one_jump_to_zero():
    _, params, network = _mlp()
    u = pz.meanflow_network(network)
    u_fn = lambda z, r, t: u(params, z, r, t)  # noqa: E731
    key, shape = jax.random.key(0), (8, 2)
    eps = jax.random.normal(jax.random.fold_in(key, 0), shape)
    one = sampling.meanflow_sample(u_fn, key, shape, [1.0])
    np.testing.assert_allclose(one, eps - u_fn(eps, jnp.zeros(8), jnp.ones(8)), rtol=1e-6)
    mid = eps - 0.6 * u_fn(eps, jnp.full(8, 0.4), jnp.ones(8))
    two = sampling.meanflow_sample(u_fn, key, shape, [1.0, 0.4])
    np.testing.assert_allclose(two, mid - 0.4 * u_fn(mid, jnp.zeros(8), jnp.full(8, 0.4)), rtol=1e-5, atol=1e-6)
    for bad in ([0.9], [1.0, 1.0], [1.0, 0.0]):
        with pytest.raises(ValueError, match="decrease from 1.0"):
            sampling.meanflow_sample(u_fn, key, shape, bad)
    # σ form: x_σ = x + σ·ε is z_t·(1 + σ) at t = σ/(1 + σ); the clean estimate is z_t − t·u(z_t, 0, t).
    sigma = jnp.full(8, 3.0)
    z = eps * 0.75
    np.testing.assert_allclose(pz.denoise(network, params, z * 4.0, sigma, kind="meanflow"),
                               z - 0.75 * u_fn(z, jnp.zeros(8), jnp.full(8, 0.75)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,fields", [
    ("mlp", {"hidden_dim": 16, "num_layers": 1, "time_embed_dim": 8}),
    # The conv nets in the second tier (20 s and 12 s of compile on 2 cores): the default tier keeps the MLP.
    pytest.param("unet", {"image_size": 8, "in_channels": 1, "out_channels": 1, "model_channels": 32,
                          "channel_mult": (1,), "num_res_blocks": 1, "attention_resolutions": (),
                          "num_head_channels": 32, "num_classes": 0}, marks=pytest.mark.slow),
    pytest.param("ncsnpp", {"image_size": 8, "in_channels": 1, "out_channels": 1, "nf": 32, "ch_mult": (1, 1),
                            "num_res_blocks": 1, "attn_resolutions": ()}, marks=pytest.mark.slow),
])
def test_two_time_networks_embed_both_times_and_differ_only_in_the_first_embedding_layer(name, fields):
    module = models.get({"name": name, **fields})
    x = jnp.zeros((2, 2) if name == "mlp" else (2, 8, 8, 1))
    one = jax.tree_util.tree_flatten_with_path(module.init(jax.random.key(0), x, jnp.zeros((2,)))["params"])[0]
    params = module.init(jax.random.key(0), x, jnp.zeros((2, 2)))["params"]
    two = jax.tree_util.tree_flatten_with_path(params)[0]
    changed = [jax.tree_util.keystr(p) for (p, a), (_, b) in zip(one, two) if a.shape != b.shape]
    assert [p for p, _ in one] == [p for p, _ in two] and len(changed) == 1, changed
    # Both columns reach the output: changing t or t − r alone changes u (random weights: the output layer is 0).
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.3 * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])
    xs = jax.random.normal(jax.random.key(2), x.shape)
    out = lambda ti: module.apply({"params": params}, xs, jnp.asarray(ti, jnp.float32))  # noqa: E731
    base = out([[0.5, 0.2], [0.5, 0.2]])
    assert float(jnp.max(jnp.abs(out([[0.6, 0.2], [0.6, 0.2]]) - base))) > 1e-4
    assert float(jnp.max(jnp.abs(out([[0.5, 0.3], [0.5, 0.3]]) - base))) > 1e-4


def test_method_facts_and_settings():
    config = default.get_config()
    methods.select(config, "meanflow")
    assert methods.time_inputs("meanflow") == 2 and methods.time_inputs("ict") == 1
    assert methods.parameterization_kind(config) == "meanflow" and methods.is_meanflow(config)
    assert models.sample_inputs(config, 3)[1].shape == (3, 2)
    assert set(config.method.meanflow) == set(losses.objective_settings("meanflow")) - {"num_classes", "velocity_head"}
    assert methods.settings(config)["num_classes"] == 0
    config.model.num_classes = 10  # class-conditional: label dropout needs the "no class" row
    with pytest.raises(errors.ConfigError, match="null_label=True"):
        methods.settings(config)
    config.method.meanflow.class_dropout = 0.0
    assert methods.settings(config)["num_classes"] == 10


def test_guidance_is_folded_into_the_target_with_the_null_label():
    """guidance "cfg" on a class-conditional network: the guided target ω·v + (1 − ω − κ)·u(∅) + κ·u(c) inside
    the interval; the network sees the dropped labels; an unconditional run refuses guidance."""
    seen = []

    def network(params, z, time_input, *rng, label_drop=None):
        seen.append(label_drop)
        drop = 0.0 if label_drop is None else label_drop[:, None].astype(jnp.float32)
        return params * z + 0.5 * drop  # "no class" shifts u by 0.5: guidance moves the target

    x = RING.sample(jax.random.key(3), 64)
    common = dict(num_classes=4, class_dropout=0.25, equal_fraction=1.0, norm_p=0.0)  # r = t: the target is v_g
    plain, _ = losses.make_objective("meanflow", **common)(network, jnp.float32(0.0), x, jax.random.key(5), 0)
    guided, _ = losses.make_objective("meanflow", guidance="cfg", omega=2.0, kappa=0.0, **common)(
        network, jnp.float32(0.0), x, jax.random.key(5), 0)
    assert len(seen[-1]) == 64 and 0 < int(jnp.sum(seen[-1])) < 64
    time_key, noise_key, drop_key, _ = jax.random.split(jax.random.key(5), 4)
    t, _ = schedules.meanflow_times(time_key, 64, equal_fraction=1.0)
    v = jax.random.normal(noise_key, x.shape) - x
    dropped = (jax.random.uniform(drop_key, (64,)) < 0.25)[:, None]
    for got, v_g in ((plain, v), (guided, jnp.where(dropped, v, 2.0 * v - 0.5))):  # ω·v + (1 − ω)·u(∅)
        sq = jnp.sum(jnp.square(0.5 * dropped - v_g), axis=1)
        np.testing.assert_allclose(got, jnp.mean(sq), rtol=1e-5)
    assert abs(float(guided) - float(plain)) > 0.1
    with pytest.raises(errors.ConfigError, match="class-conditional"):
        losses.make_objective("meanflow", guidance="cfg")(network, jnp.float32(0.0), x, jax.random.key(5), 0)


def test_imf_guidance_scale_and_interval_follow_the_release_distributions():
    """ω ∈ [1, 1 + s_max]: log-uniform for β = 1 (median √8 for s_max = 7), p(ω) ∝ ω^−2 for β = 2 (median where
    (1 − 1/ω)/(1 − 1/8) = ½); the interval is [0, 1] for r = t samples, else t_min < ½ < t_max."""
    n = 20_000
    for beta, median in ((1.0, 8.0 ** 0.5), (2.0, 1.0 / (1.0 - 0.5 * (1.0 - 1.0 / 8.0)))):
        omega = schedules.imf_guidance_scale(jax.random.key(0), n, cfg_max=7.0, cfg_beta=beta)
        assert float(omega.min()) >= 1.0 and float(omega.max()) <= 8.0
        assert abs(float(jnp.median(omega)) - median) < 0.03 * median, (beta, float(jnp.median(omega)), median)
    equal = jnp.arange(n) < n // 2
    t_min, t_max = schedules.imf_guidance_interval(jax.random.key(1), equal)
    assert bool(jnp.all(t_min[: n // 2] == 0.0)) and bool(jnp.all(t_max[: n // 2] == 1.0))
    assert bool(jnp.all((t_min[n // 2:] < 0.5) & (t_max[n // 2:] > 0.5)))
    assert abs(float(jnp.mean(t_min[n // 2:])) - 0.25) < 0.01 and abs(float(jnp.mean(t_max[n // 2:])) - 0.75) < 0.01


def test_imf_guidance_as_conditioning_and_the_velocity_head_build_the_release_loss():
    """guidance "conditioned" with a v-head, recomputed by hand on a network with known outputs: u = 0.3·(1 − 1/ω)
    (it reads the conditioning column 1 − 1/ω), the v-head 0.5·[no class] + 0.2·(its 1 − 1/ω). Then v_c =
    0.2·(1 − 1/w), v_u = 0.5, v_g = v + (1 − 1/w)·(v_c − v_u) (w = ω inside the interval, else 1; v for dropped
    labels), and the loss is ‖u − v_g‖² + ‖v_head − v_g‖² (iMF's v-loss and its auxiliary loss; norm_p = 0)."""
    widths, velocity_calls = set(), []

    def network(params, z, time_input, *rng, label_drop=None, with_velocity=False):
        widths.add(time_input.shape[1])
        g = time_input[:, 2:3]
        u = params * z + 0.3 * g
        if not with_velocity:
            return u
        drop = 0.0 if label_drop is None else label_drop[:, None].astype(jnp.float32)
        if not isinstance(time_input, jax.core.Tracer):
            velocity_calls.append(np.asarray(time_input))
        return u, 0.5 * drop + 0.2 * g + 0.0 * z

    n, key = 64, jax.random.key(9)
    x = RING.sample(jax.random.key(3), n)
    settings = dict(num_classes=4, class_dropout=0.25, guidance="conditioned", tangent="predicted",
                    velocity_head=True, norm_p=0.0, equal_fraction=0.5)
    loss, metrics = losses.make_objective("meanflow", **settings)(network, jnp.float32(0.0), x, key, 0)
    assert widths == {5}
    # The two instantaneous-velocity calls: t − r = 0 and the interval [0, 1]; the unconditional one at ω = 1.
    cond_in, uncond_in = velocity_calls[:2]
    assert np.all(cond_in[:, 1] == 0) and np.all(cond_in[:, 3] == 0) and np.all(cond_in[:, 4] == 1)
    assert np.all(uncond_in[:, 2] == 0)
    time_key, noise_key, drop_key, _ = jax.random.split(key, 4)
    scale_key, interval_key = jax.random.split(jax.random.fold_in(key, 5))
    t, r = schedules.meanflow_times(time_key, n, equal_fraction=0.5)
    v = jax.random.normal(noise_key, x.shape) - x
    dropped = (jax.random.uniform(drop_key, (n,)) < 0.25)[:, None]
    omega = schedules.imf_guidance_scale(scale_key, n)
    t_min, t_max = schedules.imf_guidance_interval(interval_key, r == t)
    w = jnp.where((t >= t_min) & (t <= t_max), omega, 1.0)[:, None]
    assert 0 < int(jnp.sum(w[:, 0] == 1.0)) < n  # some samples outside their interval, unguided
    np.testing.assert_allclose(cond_in[:, 2:3], 1 - 1 / w, rtol=1e-6)
    v_g = jnp.where(dropped, v, v + (1 - 1 / w) * (0.2 * (1 - 1 / w) - 0.5))
    g = (1 - 1 / omega)[:, None]
    expected = jnp.mean(jnp.sum(jnp.square(0.3 * g - v_g), axis=1)
                        + jnp.sum(jnp.square(0.5 * dropped + 0.2 * g - v_g), axis=1))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert "velocity_mean_squared_error" in metrics
    # Without guidance the same network and batch give another loss: the conditioning is not a no-op.
    unguided, _ = losses.make_objective("meanflow", **dict(settings, guidance="none"))(
        lambda p, z, ti, *a, **k: network(p, z, jnp.concatenate([ti, jnp.zeros((n, 3))], 1), *a, **k),
        jnp.float32(0.0), x, key, 0)
    assert abs(float(unguided) - float(loss)) > 0.05 * float(loss)


@pytest.mark.slow  # three networks initialised and applied (~6 s on 2 cores)
def test_velocity_head_is_sown_beside_the_output_and_trains_only_where_asked():
    """The MLP's and the UNet's v-head: the main output is unchanged by adding it (same parameters otherwise),
    the head's value reaches `models.apply_with_heads`, and a network without one fails with the fix named."""
    x, t = jnp.ones((2, 8, 8, 1)), jnp.full((2, 2), 0.5)
    for fields in ({"name": "mlp", "hidden_dim": 16, "num_layers": 1, "time_embed_dim": 8},
                   {"name": "unet", "image_size": 8, "in_channels": 1, "out_channels": 1, "model_channels": 32,
                    "channel_mult": (1,), "num_res_blocks": 1, "attention_resolutions": (), "num_classes": 0,
                    "num_head_channels": 32},
                   {"name": "dit", "image_size": 8, "in_channels": 1, "out_channels": 1, "depth": 2, "hidden_size": 32,
                    "num_heads": 2, "patch_size": 2, "num_classes": 0, "velocity_head_depth": 1}):
        plain, headed = models.get(fields), models.get(dict(fields, velocity_head=True))
        params = headed.init({"params": jax.random.key(0)}, x, t)["params"]
        out, heads = models.apply_with_heads(headed, {"params": params}, x, t)
        assert set(heads) == {"velocity"} and heads["velocity"].shape == x.shape
        trunk = {k: v for k, v in params.items() if not k.startswith("velocity")}
        np.testing.assert_array_equal(out, plain.apply({"params": trunk}, x, t))
        assert set(params) - set(trunk)  # the head has parameters of its own
        if fields["name"] == "dit":  # a branch: the last trunk block duplicated, iMF's layout
            assert {"velocity_blocks_0", "velocity_final_layer_linear"} <= set(params) and "blocks_1" in params

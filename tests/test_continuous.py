"""sCM (Lu & Song 2024): TrigFlow and its exact EDM correspondence, the JVP layer, and the sCT/sCD objectives
checked against the analytic consistency function of a Gaussian."""
import json
import os

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from cmjax import evaluate, jvp, losses, methods, models, sharding, toy_problems, train
from cmjax import parameterization as pz
from cmjax.interop import runs
from configs import digits

SD = 0.5  # σ_data
S = 0.3  # std of the Gaussian data N(0, S²I): ≠ σ_data, so nothing cancels by accident


def _mlp():
    module = models.get({"name": "mlp", "hidden_dim": 32, "num_layers": 2})
    params = module.init({"params": jax.random.key(0)}, jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]
    # The init zeroes the output layer (F = 0): random weights instead, so every term is exercised.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    params = jax.tree.unflatten(tree, [0.5 * jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)])

    def network(p, x_in, t_in, *rng):
        return module.apply({"params": p}, x_in, t_in)

    return module, params, network


def _points(n=64, seed=1):
    return jax.random.normal(jax.random.key(seed), (n, 2), jnp.float32)


# ----------------------------------------------------------------------------------------------
# TrigFlow ↔ EDM.


def test_trigflow_consistency_function_is_the_edm_denoiser_at_matching_sigma():
    _, params, network = _mlp()
    trig = pz.trigflow_network_from_edm(network, SD)
    sigma = jnp.array([0.002, 0.05, 0.3, 1.0, 5.0, 80.0] * 4, jnp.float32)[:16]
    x_sigma = _points(16) * jnp.sqrt(SD**2 + sigma[:, None] ** 2)
    t = pz.trigflow_time(sigma, SD)
    np.testing.assert_allclose(pz.trigflow_sigma(t, SD), sigma, rtol=2e-5)
    x_t = jnp.cos(t)[:, None] * x_sigma  # x_σ = x_t / cos t
    edm = pz.edm_denoise(network, params, x_sigma, sigma, SD)
    assert float(jnp.max(jnp.abs(network(params, x_sigma, pz.network_time_input(sigma))))) > 0.1
    # f(x_t, t) from TrigFlow time (tan t loses ~1e-5 relative near π/2 in float32, hence the tolerance) …
    np.testing.assert_allclose(pz.trigflow_consistency(trig, params, x_t, t, sigma_data=SD), edm,
                               rtol=5e-4, atol=5e-4)
    # … and the σ form the samplers use: EDM's D to float32 rounding.
    np.testing.assert_allclose(pz.denoise(network, params, x_sigma, sigma, kind="trigflow_edm", sigma_data=SD),
                               edm, rtol=1e-6, atol=1e-6)
    # The native kind (c_noise(t) = t): its σ form is its own f at t = arctan(σ/σd) of x_t = cos t·x_σ, and it
    # is a different model from the EDM reading of the same weights.
    native = pz.trigflow_consistency(pz.trigflow_network(network, SD, "trigflow"), params, x_t, t, sigma_data=SD)
    np.testing.assert_allclose(pz.denoise(network, params, x_sigma, sigma, kind="trigflow", sigma_data=SD),
                               native, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(native - edm))) > 0.1
    # The inverse conversion round-trips the raw network (through arctan and tan: float32-conditioned near π/2).
    back = pz.edm_network_from_trigflow(trig, SD)
    t_in = pz.network_time_input(sigma)
    np.testing.assert_allclose(back(params, x_sigma, t_in), network(params, x_sigma, t_in), rtol=1e-3, atol=1e-3)


def test_a_trigflow_conditioned_edm_teacher_is_read_in_edm_form_and_trains_on_the_same_loss():
    """EDM's parameterization_kind "trigflow" (time input t = arctan(σ/σd)) is the same denoiser as kind "edm":
    the exact denoiser wrapped either way gives the same EDM loss, and the trigflow-conditioned raw network at
    `teacher_time_input` equals the EDM-conditioned one at 250·ln σ (what CD and sCD read)."""
    gauss = toy_problems.GaussianMixture(np.zeros((1, 2)), np.array([S]), np.array([1.0]))
    as_edm = pz.network_from_denoiser(gauss.denoise, kind="edm", sigma_data=SD)
    as_trig = pz.network_from_denoiser(gauss.denoise, kind="trigflow", sigma_data=SD)
    x = _gauss_data(512)
    losses_by_kind = {kind: float(losses.make_objective("edm", sigma_data=SD, parameterization_kind=kind)(
        net, None, x, jax.random.key(3), 0)[0]) for kind, net in (("edm", as_edm), ("trigflow", as_trig))}
    np.testing.assert_allclose(losses_by_kind["trigflow"], losses_by_kind["edm"], rtol=1e-4)
    # The wrong reading (the trigflow network fed EDM's time input) is far off.
    wrong = float(losses.make_objective("edm", sigma_data=SD)(as_trig, None, x, jax.random.key(3), 0)[0])
    assert abs(wrong - losses_by_kind["edm"]) > 0.03 * losses_by_kind["edm"]  # 8 % here; equal ones agree to 1e-4
    sigma = jnp.array([0.01, 0.3, 1.0, 6.0, 40.0] * 4, jnp.float32)[:16]
    x_in = _points(16) / jnp.sqrt(SD**2 + sigma[:, None] ** 2)
    t_in = pz.network_time_input(sigma)
    np.testing.assert_allclose(as_trig(None, x_in, pz.teacher_time_input(t_in, "trigflow", SD)),
                               as_edm(None, x_in, t_in), rtol=2e-4, atol=2e-4)
    np.testing.assert_array_equal(pz.teacher_time_input(t_in, "edm"), t_in)
    with pytest.raises(Exception, match="EDM-form"):
        pz.teacher_time_input(t_in, "consistency")


def test_trigflow_network_of_the_exact_edm_denoiser_is_the_pf_ode_velocity():
    """Sign and scaling: σd·F_trig of a Gaussian's exact EDM denoiser is E[dx_t/dt | x_t] =
    cos t·sin t·(σd² − S²)/(cos²t·S² + sin²t·σd²)·x_t, the TrigFlow PF-ODE velocity."""
    gauss = toy_problems.GaussianMixture(np.zeros((1, 2)), np.array([S]), np.array([1.0]))
    trig = pz.trigflow_network_from_edm(pz.network_from_denoiser(gauss.denoise, kind="edm", sigma_data=SD), SD)
    t = jnp.linspace(0.05, 1.5, 16)
    x_t = _points(16)
    c, s = jnp.cos(t)[:, None], jnp.sin(t)[:, None]
    expected = c * s * (SD**2 - S**2) / (c**2 * S**2 + s**2 * SD**2) * x_t
    np.testing.assert_allclose(SD * trig(None, x_t / SD, t), expected, rtol=1e-4, atol=1e-5)


def _consistency_network(scale_key="scale"):
    """The analytic TrigFlow consistency function of N(0, S²I), as a raw network of the sCM objectives' default
    kind "trigflow" times a scalar parameter: f(x_σ, σ) = S/√(S² + σ²)·x_σ (the PF-ODE carries
    x_σ ∝ √(S² + σ²)); scale 1 is exact."""
    base = pz.network_from_denoiser(lambda x, sigma: S / jnp.sqrt(S**2 + sigma[:, None] ** 2) * x,
                                    kind="trigflow", sigma_data=SD)
    return lambda p, x_in, t_in, *rng: p[scale_key] * base(None, x_in, t_in)


def test_the_analytic_consistency_function_follows_the_pf_ode():
    """Integrating the TrigFlow PF-ODE dx/dt = E[dx_t/dt | x_t] from t to 0 lands on f(x_t, t)."""
    trig = pz.trigflow_network(_consistency_network(), SD, "trigflow")
    t0, steps = 1.2, 4000
    x = np.asarray(_points(8), np.float64)
    x_t = x.copy()
    for i in range(steps):  # midpoint rule on the linear ODE, float64
        t = t0 * (1 - (i + 0.5) / steps)
        c, s = np.cos(t), np.sin(t)
        x = x - (t0 / steps) * c * s * (SD**2 - S**2) / (c**2 * S**2 + s**2 * SD**2) * x
    f = pz.trigflow_consistency(trig, {"scale": 1.0}, x_t, jnp.full((8,), t0), sigma_data=SD)
    np.testing.assert_allclose(f, x, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# JVP.


# The finite-difference step each time conditioning needs (cmjax/jvp.py): EDM's 250·ln σ moves 250× faster.
FD_STEPS = {"trigflow": 1e-3, "trigflow_edm": 1e-4}


@pytest.mark.parametrize("kind", sorted(FD_STEPS))
def test_exact_jvp_equals_a_central_finite_difference_of_the_network(kind):
    _, params, network = _mlp()
    trig = pz.trigflow_network(network, SD, kind)
    x_t, t = _points(16) * 0.7, jnp.linspace(0.1, 1.4, 16)
    fn = lambda xt, tt: trig(params, xt / SD, tt)  # noqa: E731
    v_x, v_t = jax.random.normal(jax.random.key(2), x_t.shape), jnp.cos(t) * jnp.sin(t)
    value, exact = jvp.value_and_jvp(fn, (x_t, t), (v_x, v_t), mode="exact")
    value_fd, fd = jvp.value_and_jvp(fn, (x_t, t), (v_x, v_t), mode="finite_difference", step=FD_STEPS[kind])
    np.testing.assert_allclose(value, fn(x_t, t), rtol=1e-6)
    np.testing.assert_allclose(value_fd, value, rtol=1e-6)
    assert float(jnp.max(jnp.abs(exact))) > 0.1  # a real derivative, not zeros
    np.testing.assert_allclose(fd, exact, rtol=1e-2, atol=3e-3 * float(jnp.max(jnp.abs(exact))))
    # A wrong tangent (time tangent dropped) is visibly different: the check has teeth.
    _, no_time = jvp.value_and_jvp(fn, (x_t, t), (v_x, 0.0 * v_t), mode="exact")
    assert float(jnp.max(jnp.abs(no_time - exact))) > 0.1 * float(jnp.max(jnp.abs(exact)))


@pytest.mark.parametrize("kind", sorted(FD_STEPS))
def test_both_jvp_modes_give_the_same_sct_loss_and_gradient(kind):
    _, params, network = _mlp()
    x = _points(64) * S
    out = {}
    for mode in jvp.MODES:
        objective = losses.make_objective("sct", jvp_mode=mode, tangent_warmup_steps=0, sigma_data=SD,
                                          parameterization_kind=kind, jvp_fd_step=FD_STEPS[kind])
        (loss, _), grads = jax.value_and_grad(objective, argnums=1, has_aux=True)(
            network, params, x, jax.random.key(3), 0)
        out[mode] = (loss, jax.flatten_util.ravel_pytree(grads)[0])
    (l_exact, g_exact), (l_fd, g_fd) = out["exact"], out["finite_difference"]
    assert np.isfinite(float(l_exact)) and float(l_exact) > 0
    np.testing.assert_allclose(l_fd, l_exact, rtol=1e-3)
    # ≤ 0.1 % of the largest component at these steps (8 % for trigflow_edm at 1e-3: cmjax/jvp.py).
    np.testing.assert_allclose(g_fd, g_exact, rtol=1e-2, atol=5e-3 * float(jnp.max(jnp.abs(g_exact))))


# ----------------------------------------------------------------------------------------------
# sCD / sCT at the analytic solution.


def _gauss_data(n, seed=4):
    return S * jax.random.normal(jax.random.key(seed), (n, 2), jnp.float32)


def test_scd_loss_vanishes_at_the_analytic_consistency_function_with_the_exact_teacher():
    gauss = toy_problems.GaussianMixture(np.zeros((1, 2)), np.array([S]), np.array([1.0]))
    teacher = pz.network_from_denoiser(gauss.denoise, kind="edm", sigma_data=SD)
    objective = losses.make_objective("scd", tangent_warmup_steps=0, sigma_data=SD)
    network = _consistency_network()
    x = _gauss_data(1024)
    loss = {scale: float(objective(network, {"scale": jnp.float32(scale)}, x, jax.random.key(5), 0,
                                   teacher_network=lambda p, xi, ti: teacher(p, xi, ti), teacher_params=None)[0])
            for scale in (1.0, 0.9, 1.1)}
    assert loss[1.0] < 1e-8, loss
    assert loss[0.9] > 1e-3 and loss[1.1] > 1e-3, loss


def test_sct_gradient_vanishes_at_the_analytic_solution_and_points_back_to_it():
    """With the conditional velocity cos t·z − sin t·x0 the tangent is zero only in expectation given x_t
    (a Gaussian's residual is symmetric and independent of x_t), so the loss value is not ~0 but its
    gradient is; off the solution the gradient pulls the scale back towards 1."""
    objective = losses.make_objective("sct", tangent_warmup_steps=0, sigma_data=SD)
    network = _consistency_network()
    x = _gauss_data(32768)

    def grad(scale):
        g = jax.grad(lambda p: objective(network, p, x, jax.random.key(6), 0)[0])({"scale": jnp.float32(scale)})
        return float(g["scale"])

    at, low, high = grad(1.0), grad(0.8), grad(1.2)
    assert low < 0 < high, (low, at, high)
    assert abs(at) < 0.1 * min(-low, high), (low, at, high)


def test_warmup_is_traced_one_compile_across_steps():
    _, params, network = _mlp()
    objective = losses.make_objective("sct", tangent_warmup_steps=100, sigma_data=SD)
    fn = jax.jit(lambda p, k, step: objective(network, p, _points(8) * S, k, step))
    r = [float(fn(params, jax.random.key(0), jnp.int32(s))[1]["tangent_warmup"]) for s in (0, 50, 100, 400)]
    assert r == [0.0, 0.5, 1.0, 1.0]
    assert fn._cache_size() == 1
    # r changes the loss (the tangent's second term is on after warm-up).
    l0, l1 = (float(fn(params, jax.random.key(0), jnp.int32(s))[0]) for s in (0, 100))
    assert abs(l0 - l1) > 1e-4 * abs(l0)


def test_unknown_scm_settings_are_config_errors_and_prior_weighting_reweights():
    from cmjax import errors

    _, params, network = _mlp()
    x = _points(8) * S
    for setting in ({"tangent_norm": "l1"}, {"weighting": "learned"}, {"jvp_mode": "forward"},
                    {"parameterization_kind": "edm"}):
        with pytest.raises(errors.ConfigError, match=repr(next(iter(setting.values())))):
            losses.make_objective("sct", **setting)(network, params, x, jax.random.key(0), 0)
    with pytest.raises(errors.ConfigError, match="teacher"):
        losses.make_objective("scd")(network, params, x, jax.random.key(0), 0)
    none, prior = (float(losses.make_objective("sct", weighting=w)(network, params, x, jax.random.key(0), 0)[0])
                   for w in ("none", "prior"))
    assert np.isfinite(prior) and abs(prior - none) > 1e-3 * none


# ----------------------------------------------------------------------------------------------
# The method table and training.


def test_sct_and_scd_read_as_trigflow_by_evaluation_and_export():
    config = digits.get_config("smoke")
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
    module = models.get(config.model)
    for name in ("sct", "scd"):
        config.method.name = name
        for kind, exported in (("trigflow", "trigflow"), ("trigflow_edm", "edm")):
            config.method[name].parameterization_kind = kind
            assert methods.parameterization_kind(config) == kind
            assert evaluate.Evaluator(config, module, mesh).kind == kind
            assert not runs.consistency_parameterised(config)  # not a CM App. C consistency function
            assert runs.exported_parameterization(config) == exported  # trigflow_edm is exactly EDM's D
    assert methods.get("scd").needs_teacher and not methods.get("scd").starts_from_teacher
    assert not methods.get("sct").needs_teacher and not methods.get("sct").keeps_target


def _digits_run(tmp_path, method, model=None, **section):
    config = digits.get_config("smoke")
    config.data.data_dir = str(tmp_path / "tfds")
    config.total_steps = 2
    config.log_every = 1
    config.model.update(model or {})
    methods.select(config, method, **section)
    workdir = str(tmp_path / method)
    final = train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    assert final["train_step_compilations"] == 1  # sCT: r = 0 then 1 in one executable
    return workdir, rows


def test_sct_with_the_learned_adaptive_weight_trains_and_samples_on_digits(tmp_path):
    """sCT through the loop with the head: one compile (r = 0 then 1), logvar logged, and the end-of-run sample
    grids (which call the network without the head's output) written. (Without the head: tests/test_main.py.)"""
    workdir, rows = _digits_run(tmp_path, "sct", model={"logvar_head": True}, tangent_warmup_steps=1,
                                weighting="adaptive_prior")
    assert [r["tangent_warmup"] for r in rows] == [0.0, 1.0]
    assert all("mean_logvar" in r and np.isfinite(r["unweighted_loss"]) for r in rows)
    assert rows[0]["mean_logvar"] == 0.0  # zero-initialised (the smoke's learning rate warms up from 0)
    assert any(name.endswith(".png") for _, _, files in os.walk(workdir) for name in files)


def test_settings_the_network_cannot_serve_are_config_errors_before_training():
    from cmjax import errors

    config = digits.get_config("smoke")
    methods.select(config, "sct", weighting="adaptive")
    with pytest.raises(errors.ConfigError, match="logvar_head=True"):
        methods.objective_from_config(config)
    config.model.logvar_head = True
    methods.objective_from_config(config)
    methods.select(config, "scd", guidance_scale=2.0)
    with pytest.raises(errors.ConfigError, match="unconditional"):
        methods.objective_from_config(config)


def test_export_leaves_the_training_only_head_out():
    from cmjax.interop import openai

    unet = models.get({**SCM_NETWORKS["unet"], "emb_norm": "none"})
    shapes = openai.unet_param_shapes(unet)
    assert "logvar_linear" in shapes
    plain = openai.unet_param_shapes(models.get({**SCM_NETWORKS["unet"], "emb_norm": "none", "logvar_head": False}))
    assert openai.openai_state_dict_shapes(openai.without_training_heads(shapes)) == \
        openai.openai_state_dict_shapes(plain)


def test_scd_distils_an_edm_run_two_steps_on_digits(tmp_path):
    """The teacher plumbing end to end: an EDM run's workdir as config.teacher.workdir (the CLI's path)."""
    from cmjax import errors

    teacher_workdir, _ = _digits_run(tmp_path, "edm")
    config = digits.get_config("smoke")
    config.method.name = "scd"
    with pytest.raises(errors.ConfigError, match="teacher"):
        train.train_and_evaluate(config, str(tmp_path / "no_teacher"))
    config = digits.get_config("smoke")
    config.data.data_dir = str(tmp_path / "tfds")
    config.total_steps, config.log_every = 2, 1
    methods.select(config, "scd", tangent_warmup_steps=0)
    config.teacher.workdir = teacher_workdir
    workdir = str(tmp_path / "scd")
    train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)


# ----------------------------------------------------------------------------------------------
# Learning on the 2-D ring (cmjax/demo_2d.py).


def _ring_scores(method, steps, teacher=None):
    import dataclasses

    from cmjax import demo_2d

    ring = toy_problems.ring_of_gaussians(num_modes=8, radius=1.0, std=0.1)
    config = dataclasses.replace(demo_2d.Demo2DConfig(), method=method, steps=steps, log_every=steps,
                                 eval_ema=0.995, eval_samples=4096)
    teacher = demo_2d.exact_teacher(ring, toy_problems.data_std(ring)) if teacher else None
    model = demo_2d.train(config, ring, teacher=teacher, log=lambda s: None)
    assert model.kind == "trigflow"
    return demo_2d.evaluate(model, ring, config, teacher_denoise=ring.denoise if teacher else None)[0]


@pytest.mark.slow  # a learning proof: 1 minute on 2 shared cores (three trainings, each compiled)
def test_sct_and_scd_learn_the_ring_in_one_step():
    """1,000 steps: sCT and sCD (from the exact teacher) sample the 8-mode ring in one step far better than
    the untrained model (sliced W2 0.71; measured 0.062 and 0.056; the data floor 0.016, the teacher's 35-step
    EDM sampler 0.040). With the "trigflow_edm" conditioning sCT stays at 0.63 after 2,000 steps."""
    untrained = _ring_scores("sct", 1)["one_step"]
    sct = _ring_scores("sct", 1000)
    scd = _ring_scores("scd", 1000, teacher=True)
    print(untrained, sct, scd)
    assert untrained > 0.5
    assert sct["one_step"] < 0.15 * untrained and sct["two_step"] < 0.15 * untrained, sct
    assert scd["one_step"] < 2.5 * scd["teacher_edm"], scd


# ----------------------------------------------------------------------------------------------
# sCM's learned adaptive weight, network options for stable JVPs, and classifier-free guidance in sCD.


def test_adaptive_weight_is_optimal_at_minus_log_mean_residual():
    """sCM §4.2: e^{w}·m − w (m = ‖·‖²/D) is minimised at w = −ln m; in the logvar form e^{−logvar}·m + logvar
    that is logvar = ln m, where the weighted residual is 1. A flipped sign convention has no minimum there."""
    m = jnp.array([0.01, 0.3, 2.0, 40.0], jnp.float32)
    best = jnp.log(m)
    grad = jax.grad(lambda lv: jnp.sum(losses.scm_adaptive_loss(m, lv)))(best)
    np.testing.assert_allclose(grad, 0.0, atol=1e-5)
    at = losses.scm_adaptive_loss(m, best)
    np.testing.assert_allclose(at, 1.0 + jnp.log(m), rtol=1e-6)
    for shift in (-0.5, 0.5):
        assert bool(jnp.all(losses.scm_adaptive_loss(m, best + shift) > at + 0.1))
    # The paper's convention: w = −logvar, so the optimum is w = −ln m.
    paper = lambda w: jnp.exp(w) * m - w  # noqa: E731
    np.testing.assert_allclose(paper(-best), at, rtol=1e-6)


def _headed_mlp():
    module = models.get({"name": "mlp", "hidden_dim": 32, "num_layers": 2, "logvar_head": True})
    params = nn.meta.unbox(module.init({"params": jax.random.key(0)}, jnp.zeros((1, 2)), jnp.zeros((1,)))["params"])
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(8), p.shape), params)

    def network(p, x_in, t_in, dropout_key=None, with_logvar=False):
        if with_logvar:
            return models.apply_with_logvar(module, {"params": p}, x_in, t_in)
        return module.apply({"params": p}, x_in, t_in)

    return module, params, network


def test_the_adaptive_sct_loss_trains_the_head_and_has_sCMs_form():
    module, params, network = _headed_mlp()
    x = _points(64) * S
    key = jax.random.key(3)
    adaptive = losses.make_objective("sct", weighting="adaptive", tangent_warmup_steps=0, sigma_data=SD)
    plain = losses.make_objective("sct", weighting="none", tangent_warmup_steps=0, sigma_data=SD)
    (loss, metrics), grads = jax.value_and_grad(adaptive, argnums=1, has_aux=True)(network, params, x, key, 0)
    head = grads["logvar_linear"]
    assert float(jnp.max(jnp.abs(head["kernel"]))) > 1e-3 and float(jnp.abs(head["bias"][0])) > 1e-3
    # The head's value, read from the same forward pass: loss = mean(e^{−logvar}·m + logvar), m the plain loss.
    _, logvar = network(params, x, pz.trigflow_time_input(jnp.zeros((64,)), SD), with_logvar=True)
    assert logvar.shape == (64,)
    plain_loss = float(plain(network, params, x, key, 0)[0])
    np.testing.assert_allclose(metrics["unweighted_loss"], plain_loss, rtol=1e-5)
    assert abs(float(loss) - plain_loss) > 1e-3 * plain_loss  # the head's random weights reweight
    # A head without other changes: zeroing it gives logvar = 0, the adaptive loss is then the plain loss.
    zeroed = dict(params, logvar_linear=jax.tree.map(jnp.zeros_like, params["logvar_linear"]))
    np.testing.assert_allclose(adaptive(network, zeroed, x, key, 0)[0], plain(network, zeroed, x, key, 0)[0],
                               rtol=1e-6)
    # adaptive_prior multiplies the residual by FastGen's prior 1/σ inside the exponential weight.
    prior = losses.make_objective("sct", weighting="adaptive_prior", tangent_warmup_steps=0, sigma_data=SD)
    both = float(prior(network, zeroed, x, key, 0)[0])
    np.testing.assert_allclose(both, float(losses.make_objective(
        "sct", weighting="prior", tangent_warmup_steps=0, sigma_data=SD)(network, zeroed, x, key, 0)[0]), rtol=1e-6)
    # The main output does not depend on the head (samplers, evaluation and export read only it).
    t_in = jnp.linspace(0.1, 1.4, 64)
    other = dict(params, logvar_linear=jax.tree.map(lambda a: a + 1.0, params["logvar_linear"]))
    np.testing.assert_array_equal(network(params, x, t_in), network(other, x, t_in))


def test_a_few_steps_move_the_head_to_its_optimum():
    """Gradient descent on the head alone reaches the first-order condition of its bias: the mean weighted
    residual E[e^{−logvar}·m] = 1 (at logvar = 0 it is the plain loss, far from 1)."""
    module, params, network = _headed_mlp()
    x = _points(256) * S
    objective = losses.make_objective("sct", weighting="adaptive", tangent_warmup_steps=0, sigma_data=SD)
    key = jax.random.key(0)

    @jax.jit
    def step(head):
        fn = lambda h: objective(network, dict(params, logvar_linear=h), x, key, 0)[0]  # noqa: E731
        return jax.tree.map(lambda h, g: h - 0.05 * g, head, jax.grad(fn)(head))

    def weighted_residual(head):
        loss, metrics = objective(network, dict(params, logvar_linear=head), x, key, 0)
        return float(loss - metrics["mean_logvar"])

    head = jax.tree.map(jnp.zeros_like, params["logvar_linear"])
    before = weighted_residual(head)
    for _ in range(150):
        head = step(head)
    after = weighted_residual(head)
    assert abs(before - 1.0) > 0.3 and abs(after - 1.0) < 0.05, (before, after)


@pytest.fixture
def fast_compiles():
    """XLA's optimisation passes double these tests' compile time and change no property they check."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


SCM_NETWORKS = {
    # The ADM UNet with attention, sCM's double pixel norm of AdaGN and the head.
    "unet": dict(name="unet", image_size=8, in_channels=1, out_channels=1, model_channels=32, channel_mult=(1,),
                 num_res_blocks=1, attention_resolutions=(8,), num_head_channels=16, use_scale_shift_norm=True,
                 resblock_updown=False, num_classes=0, emb_norm="double_pixel_norm", logvar_head=True),
    # NCSN++ with attention, positional embeddings of the time input as given, and the head.
    "ncsnpp": dict(name="ncsnpp", image_size=8, nf=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,),
                   time_embedding="positional", logvar_head=True),
    "mlp": dict(name="mlp", hidden_dim=32, num_layers=2, logvar_head=True),
}


@pytest.mark.parametrize("family", sorted(SCM_NETWORKS))
def test_the_jvp_goes_through_every_network_family_with_the_scm_options(family, fast_compiles):
    """Exact (forward-mode) and finite-difference JVPs of F_trig(x_t/σd, t) agree with sCM's options on, and the
    head leaves the output unchanged: the same weights without the head give the same F."""
    cfg = SCM_NETWORKS[family]
    module = models.get(cfg)
    shape = (2, 8, 8, 3 if family == "ncsnpp" else 1) if family != "mlp" else (2, 2)
    x_t = 0.7 * jax.random.normal(jax.random.key(1), shape)
    params = nn.meta.unbox(module.init({"params": jax.random.key(0)}, x_t, jnp.zeros((2,)))["params"])
    # Zero-initialised output layers would make F ≡ 0: perturb every weight.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.2 * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])
    network = lambda p, x_in, t_in, *rng: module.apply({"params": p}, x_in, t_in)  # noqa: E731
    trig = pz.trigflow_network(network, SD, "trigflow")
    fn = lambda xt, tt: trig(params, xt / SD, tt)  # noqa: E731
    t = jnp.array([0.3, 1.2])
    v_x = jax.random.normal(jax.random.key(2), shape)
    v_t = jnp.cos(t) * jnp.sin(t)
    _, exact = jvp.value_and_jvp(fn, (x_t, t), (v_x, v_t), mode="exact")
    _, fd = jvp.value_and_jvp(fn, (x_t, t), (v_x, v_t), mode="finite_difference", step=1e-3)
    scale = float(jnp.max(jnp.abs(exact)))
    assert scale > 1e-2
    np.testing.assert_allclose(fd, exact, rtol=2e-2, atol=5e-3 * scale)
    # The time tangent matters (the positional embedding of t is differentiated, not dropped).
    _, no_time = jvp.value_and_jvp(fn, (x_t, t), (v_x, 0.0 * v_t), mode="exact")
    assert float(jnp.max(jnp.abs(no_time - exact))) > 1e-3 * scale
    plain = models.get({**cfg, "logvar_head": False})
    headless = {k: v for k, v in params.items() if k != "logvar_linear"}
    np.testing.assert_allclose(plain.apply({"params": headless}, x_t, t), module.apply({"params": params}, x_t, t),
                               rtol=1e-6, atol=1e-6)
    _, logvar = models.apply_with_logvar(module, {"params": params}, x_t, t)
    assert logvar.shape == (2,) and bool(jnp.all(jnp.isfinite(logvar)))
    assert models.apply_with_logvar(plain, {"params": headless}, x_t, t)[1] is None


def test_network_option_defaults_are_unchanged_and_checked():
    from cmjax import errors
    from cmjax.models import layers

    for cfg in ({"name": "mlp"}, {"name": "ncsnpp"}, {"name": "unet"}):
        module = models.get(cfg)
        assert module.logvar_head is False
    assert models.get({"name": "ncsnpp"}).time_embedding == "fourier"
    assert models.get({"name": "unet"}).emb_norm == "none"
    # Double pixel norm: scale and shift each at unit RMS (the joint pixel norm is not).
    v = jnp.array([[3.0, 4.0, 0.1, 0.1]])
    double = layers.double_pixel_norm(v)
    np.testing.assert_allclose(jnp.mean(jnp.square(double[:, :2])), 1.0, rtol=1e-5)
    np.testing.assert_allclose(jnp.mean(jnp.square(double[:, 2:])), 1.0, rtol=1e-5)
    assert float(jnp.mean(jnp.square(layers.pixel_norm(v)[:, 2:]))) < 0.01
    x, t = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,))
    with pytest.raises(errors.ConfigError, match="use_scale_shift_norm"):
        jax.eval_shape(lambda: models.get({**SCM_NETWORKS["unet"], "use_scale_shift_norm": False}).init(
            jax.random.key(0), x, t))
    with pytest.raises(errors.ConfigError, match="time_embedding"):
        jax.eval_shape(lambda: models.get({**SCM_NETWORKS["ncsnpp"], "time_embedding": "learned"}).init(
            jax.random.key(0), jnp.zeros((1, 8, 8, 3)), t))


# The null label of classifier-free guidance.


def test_the_null_label_drops_the_class_embedding():
    module = models.get({"name": "mlp", "hidden_dim": 32, "num_layers": 1, "num_classes": 10})
    x, t = _points(4), jnp.linspace(-100.0, 100.0, 4)
    labels = jnp.array([0, 3, 9, 5])
    params = nn.meta.unbox(module.init({"params": jax.random.key(0)}, x, t, labels)["params"])
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(1), p.shape), params)
    null = jnp.full((4,), models.NULL_LABEL)
    no_labels = dict(params, label_emb=jax.tree.map(jnp.zeros_like, params["label_emb"]))
    np.testing.assert_allclose(module.apply({"params": params}, x, t, null),
                               module.apply({"params": no_labels}, x, t, labels), rtol=1e-6)
    assert float(jnp.max(jnp.abs(module.apply({"params": params}, x, t, labels)
                                 - module.apply({"params": params}, x, t, null)))) > 1e-2


def test_label_dropout_trains_the_unconditional_prediction_only_in_training():
    module = models.get({"name": "mlp", "hidden_dim": 32, "num_layers": 1, "num_classes": 10, "label_dropout": 1.0})
    x, t = _points(4), jnp.linspace(-100.0, 100.0, 4)
    labels = jnp.array([0, 3, 9, 5])
    params = nn.meta.unbox(module.init({"params": jax.random.key(0)}, x, t, labels)["params"])
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(1), p.shape), params)
    rngs = {"dropout": jax.random.key(2)}
    null = jnp.full((4,), models.NULL_LABEL)
    np.testing.assert_allclose(module.apply({"params": params}, x, t, labels, train=True, rngs=rngs),
                               module.apply({"params": params}, x, t, null), rtol=1e-6)
    kept = models.get({"name": "mlp", "hidden_dim": 32, "num_layers": 1, "num_classes": 10})
    np.testing.assert_allclose(module.apply({"params": params}, x, t, labels),
                               kept.apply({"params": params}, x, t, labels), rtol=1e-6)
    half = models.get({"name": "mlp", "hidden_dim": 32, "num_layers": 1, "num_classes": 10, "label_dropout": 0.5})
    big = _points(512, seed=3)
    out, drop = (half.apply({"params": params}, big, jnp.zeros((512,)), jnp.full((512,), 3), train=True, rngs=rngs),
                 kept.apply({"params": params}, big, jnp.zeros((512,)), jnp.full((512,), models.NULL_LABEL)))
    dropped = np.mean(np.all(np.isclose(out, drop, rtol=1e-6), axis=1))
    assert 0.4 < dropped < 0.6, dropped


def test_scd_guidance_mixes_the_conditional_and_unconditional_teacher():
    """Guidance 1 is the conditional teacher; s ≠ 1 distils v_u + s·(v_c − v_u), here checked against a teacher
    that outputs that mix itself (F_trig and the velocity are linear in the raw network output)."""
    _, params, network = _mlp()
    x = _points(32) * S

    def raw(p, x_in, t_in, shift):
        return network(p, x_in, t_in) + shift

    def teacher(p, x_in, t_in, unconditional=False):  # a class-conditional teacher, two labels' worth
        return raw(p, x_in, t_in, -0.4 if unconditional else 0.6)

    def loss(scale, teacher_network):
        objective = losses.make_objective("scd", tangent_warmup_steps=0, sigma_data=SD, guidance_scale=scale)
        return float(objective(network, params, x, jax.random.key(4), 0, teacher_network=teacher_network,
                               teacher_params=params)[0])

    conditional_only = lambda p, x_in, t_in: raw(p, x_in, t_in, 0.6)  # noqa: E731
    assert loss(1.0, teacher) == loss(1.0, lambda p, x_in, t_in, unconditional=False: conditional_only(p, x_in, t_in))
    for s in (0.0, 2.5):
        mixed = lambda p, x_in, t_in, unconditional=False, s=s: raw(p, x_in, t_in, -0.4 + s * (0.6 + 0.4))  # noqa
        np.testing.assert_allclose(loss(s, teacher), loss(1.0, mixed), rtol=1e-5)
        assert abs(loss(s, teacher) - loss(1.0, teacher)) > 1e-3 * loss(1.0, teacher)
    np.testing.assert_allclose(losses.guided_velocity(jnp.float32(2.0), jnp.float32(1.0), 3.0), 4.0)

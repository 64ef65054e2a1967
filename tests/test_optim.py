"""Optimizer from config: every setting honoured by adam, radam and adamw, against optax and hand-computed numbers."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cmjax import optim

OPTIMIZERS = ("adam", "radam", "adamw")
PEAK = 1e-3


def _config(optimizer, **overrides):
    config = optim.default_config()
    config.optimizer = optimizer
    config.learning_rate = PEAK
    config.weight_decay = 0.1 if optimizer == "adamw" else 0.0
    config.update(overrides)
    return config


def _params():
    return {"w": jnp.array([[0.5, -1.0, 2.0], [0.25, 3.0, -0.75]], jnp.float32), "b": jnp.array([0.1, -0.2])}


def _grads(steps, scale=1.0):
    """A fixed sequence of gradients (numpy, so it costs no compiles); `scale` multiplies every one."""
    rng = np.random.default_rng(0)
    return [
        {"w": scale * rng.standard_normal((2, 3)).astype(np.float32),
         "b": scale * rng.standard_normal(2).astype(np.float32)}
        for _ in range(steps)
    ]


def _updates(tx, grads_seq, params=None):
    """The update of each step, with params held fixed, so runs differing only in lr scale exactly by the lr."""
    params = _params() if params is None else params
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for grads in grads_seq:
        updates, state = update(grads, state, params)
        out.append(updates)
    return out, state


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_default_config_holds_every_key_and_builds():
    config = optim.default_config()
    assert set(config.keys()) == set(optim.VALID_KEYS)
    assert len(optim.VALID_KEYS) == 10
    tx, learning_rate_fn = optim.make_optimizer(config, total_steps=100)
    assert isinstance(tx, optax.GradientTransformation)
    assert learning_rate_fn(0).dtype == jnp.float32 and float(learning_rate_fn(0)) == pytest.approx(1e-4)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_plain_settings_match_the_optax_reference(optimizer):
    """No warmup, no decay, no clipping: the chain equals optax.adam / optax.radam / optax.adamw."""
    config = _config(optimizer, b1=0.8, b2=0.99, eps=1e-6)
    reference = {
        "adam": optax.adam(PEAK, b1=0.8, b2=0.99, eps=1e-6),
        "radam": optax.radam(PEAK, b1=0.8, b2=0.99, eps=1e-6),
        "adamw": optax.adamw(PEAK, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.1),
    }[optimizer]
    tx, _ = optim.make_optimizer(config, total_steps=100)
    grads = _grads(8)
    ours, _ = _updates(tx, grads)
    theirs, _ = _updates(reference, grads)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(_flat(a), _flat(b), rtol=1e-6, atol=1e-9)


def test_first_updates_by_hand_and_radam_differs_from_adam():
    """Step 1: Adam's m̂/√v̂ = sign(g) (up to eps); RAdam's variance is not yet tractable, so it moves by lr·g."""
    grads = {"w": np.array([[0.5, -2.0, 4.0], [1e-2, -3.0, 0.25]], np.float32), "b": np.array([1.0, -0.5], np.float32)}
    eps = 1e-8
    adam, _ = optim.make_optimizer(_config("adam"), total_steps=10)
    radam, _ = optim.make_optimizer(_config("radam"), total_steps=10)
    (adam_update,), _ = _updates(adam, [grads])
    (radam_update,), _ = _updates(radam, [grads])
    g = _flat(grads)
    np.testing.assert_allclose(_flat(adam_update), -PEAK * g / (np.abs(g) + eps), rtol=1e-5)
    np.testing.assert_allclose(_flat(radam_update), -PEAK * g, rtol=1e-5)
    assert np.abs(_flat(adam_update) - _flat(radam_update)).max() > 1e-4


def test_adamw_decay_is_decoupled_and_scaled_by_the_learning_rate():
    """adamw update − adam update = −lr·wd·θ exactly (the decay never enters the moments)."""
    params = _params()
    grads = _grads(3)
    adam, _ = optim.make_optimizer(_config("adam"), total_steps=10)
    adamw, _ = optim.make_optimizer(_config("adamw", weight_decay=0.1), total_steps=10)
    adam_updates, _ = _updates(adam, grads, params)
    adamw_updates, _ = _updates(adamw, grads, params)
    for a, w in zip(adam_updates, adamw_updates):
        np.testing.assert_allclose(_flat(w) - _flat(a), -PEAK * 0.1 * _flat(params), rtol=1e-5, atol=1e-10)


def test_learning_rate_schedule_hand_computed():
    """lr = peak·min(k/W, 1)/sqrt(max(k/D, 1)), W = 10, D = 100."""
    config = _config("adam", warmup_steps=10, decay="inverse_sqrt", decay_start_step=100)
    _, learning_rate_fn = optim.make_optimizer(config, total_steps=1000)
    expected = {0: 0.0, 1: 1e-4, 5: 5e-4, 10: 1e-3, 100: 1e-3, 400: 5e-4, 900: 1e-3 / 3}
    for step, lr in expected.items():
        assert float(learning_rate_fn(step)) == pytest.approx(lr, rel=1e-6), step
    assert learning_rate_fn(jnp.int32(5)).dtype == jnp.float32
    # Traceable: one compiled schedule for every step.
    np.testing.assert_allclose(jax.jit(learning_rate_fn)(jnp.arange(3)), [0.0, 1e-4, 2e-4], rtol=1e-6)


def test_cosine_schedule_hand_computed():
    """lr = peak·min(k/W, 1)·½(1 + cos(π·(k − W)/(T − W))), W = 10, T = 110: peak after warmup, half at the
    middle of the decay, 0 at (and after) total_steps."""
    config = _config("adam", warmup_steps=10, decay="cosine")
    _, learning_rate_fn = optim.make_optimizer(config, total_steps=110)
    expected = {0: 0.0, 5: 5e-4, 10: 1e-3, 35: 1e-3 * (1 + np.cos(np.pi / 4)) / 2, 60: 5e-4, 110: 0.0, 200: 0.0}
    for step, lr in expected.items():
        assert float(learning_rate_fn(step)) == pytest.approx(lr, rel=1e-5, abs=1e-12), step


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_warmup_scales_the_first_updates(optimizer):
    """With W = 4 warmup steps, update k is exactly k/4 of the un-warmed update (step 0 moves nothing)."""
    grads = _grads(6)
    plain, _ = optim.make_optimizer(_config(optimizer), total_steps=100)
    warm, _ = optim.make_optimizer(_config(optimizer, warmup_steps=4), total_steps=100)
    plain_updates, _ = _updates(plain, grads)
    warm_updates, _ = _updates(warm, grads)
    for k, (p, w) in enumerate(zip(plain_updates, warm_updates)):
        np.testing.assert_allclose(_flat(w), min(k / 4, 1.0) * _flat(p), rtol=1e-5, atol=1e-12)
    assert np.abs(_flat(plain_updates[1])).max() > 1e-5  # the scaled updates are not trivially zero


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_inverse_sqrt_decays_the_updates(optimizer):
    """decay_start_step = 2: update k is 1/sqrt(max(k/2, 1)) of the constant-lr update."""
    grads = _grads(9)
    constant, _ = optim.make_optimizer(_config(optimizer), total_steps=100)
    decayed, _ = optim.make_optimizer(_config(optimizer, decay="inverse_sqrt", decay_start_step=2), total_steps=100)
    constant_updates, _ = _updates(constant, grads)
    decayed_updates, _ = _updates(decayed, grads)
    for k, (c, d) in enumerate(zip(constant_updates, decayed_updates)):
        np.testing.assert_allclose(_flat(d), _flat(c) / np.sqrt(max(k / 2, 1.0)), rtol=1e-5, atol=1e-12)
    ratio = np.linalg.norm(_flat(decayed_updates[8])) / np.linalg.norm(_flat(constant_updates[8]))
    assert ratio == pytest.approx(0.5, rel=1e-5)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_clipping_bounds_a_huge_gradient_before_the_moments(optimizer):
    """Clipping to 1.0 equals feeding the optimizer pre-clipped gradients, and bounds what a 1e6× gradient does."""
    grads = _grads(2)
    grads[1] = jax.tree.map(lambda g: 1e6 * g, grads[1])
    clipped_by_hand = [optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())[0] for g in grads]
    with_clip, _ = optim.make_optimizer(_config(optimizer, grad_clip_norm=1.0), total_steps=100)
    without_clip, _ = optim.make_optimizer(_config(optimizer), total_steps=100)
    clip_updates, clip_state = _updates(with_clip, grads)
    reference_updates, _ = _updates(without_clip, clipped_by_hand)
    raw_updates, _ = _updates(without_clip, grads)
    for a, b in zip(clip_updates, reference_updates):
        np.testing.assert_allclose(_flat(a), _flat(b), rtol=1e-5, atol=1e-12)
    assert np.abs(_flat(clip_updates[1]) - _flat(raw_updates[1])).max() > 1e-5
    # The first moment saw clipped gradients: ‖m‖ <= (1 − b1)·1 + b1·(1 − b1)·1.
    first_moment = clip_state[1].mu
    assert np.linalg.norm(_flat(first_moment)) <= 0.1 + 0.09 + 1e-6
    if optimizer == "radam":
        # RAdam's early steps are momentum SGD (lr·m̂), so an unclipped 1e6× gradient moves θ by ~1e3·lr.
        assert np.linalg.norm(_flat(raw_updates[1])) > 100 * PEAK
        assert np.linalg.norm(_flat(clip_updates[1])) <= 1.0 * PEAK + 1e-9


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"momentum": 0.9}, r"Unknown optimizer setting\(s\) \['momentum'\]; the valid keys are \['b1'"),
        ({"optimizer": "sgd"}, r"optim.optimizer='sgd' is not one of \['adam', 'radam', 'adamw'\]"),
        ({"optimizer": "adam", "weight_decay": 0.01}, r"set optimizer='adamw' or weight_decay=0"),
        ({"optimizer": "radam", "weight_decay": 0.01}, r"set optimizer='adamw' or weight_decay=0"),
        ({"decay": "inverse_sqrt"}, r"needs optim.decay_start_step > 0"),
        ({"decay": "linear"}, r"optim.decay='linear' is not one of"),
        ({"warmup_steps": 500}, r"set warmup_steps <= 100"),
        ({"grad_clip_norm": -1.0}, r"0 or None turns it off"),
        ({"b2": 1.0}, r"optim.b2=1.0 must lie in \[0, 1\)"),
    ],
)
def test_config_errors_name_the_value_and_the_fix(overrides, message):
    config = optim.default_config().to_dict()
    config.update(overrides)
    with pytest.raises(ValueError, match=message):
        optim.make_optimizer(config, total_steps=100)


def test_missing_key_points_to_default_config_and_none_disables_clipping():
    config = optim.default_config().to_dict()
    del config["eps"]
    with pytest.raises(ValueError, match=r"Missing optimizer setting\(s\) \['eps'\].*default_config"):
        optim.make_optimizer(config, total_steps=100)
    config = optim.default_config().to_dict()
    config["grad_clip_norm"] = None
    tx, _ = optim.make_optimizer(config, total_steps=100)
    assert len(tx.init(_params())) == 2  # radam moments and the schedule count: no clipping stage

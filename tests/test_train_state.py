"""TrainState: creation, the optimizer/EMA/target update against hand-computed numbers, and non-finite skipping."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cmjax import optim, train_state

SGD_LR = 0.1


def _params():
    return {"dense": {"kernel": jnp.array([[1.0, -2.0], [0.5, 4.0]]), "bias": jnp.array([0.25, -0.5])}}


def _grads(scale=1.0):
    return {"dense": {"kernel": scale * np.array([[1.0, 1.0], [-2.0, 0.5]], np.float32),
                      "bias": scale * np.array([4.0, -1.0], np.float32)}}


def _nan_in_one_leaf():
    grads = _grads()
    grads["dense"]["bias"][1] = np.nan
    return grads


@pytest.fixture(scope="module")
def sgd_step():
    """One compiled update with plain SGD (so the new θ is p − lr·g by hand) and a traced μ."""
    tx = optax.sgd(SGD_LR)

    @jax.jit
    def step(state, grads, loss, mu):
        return train_state.apply_gradients(state, grads, tx, target_ema=mu, loss=loss)

    return tx, step


def _assert_tree_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_ema_key_is_stable_and_checked():
    assert train_state.ema_key(0.9999) == "0.9999"
    assert train_state.ema_key(0.99993) == "0.99993"
    assert train_state.ema_key(np.float32(0.9999)) == "0.9999"  # not "0.9998999834060669"
    assert train_state.ema_key("0.99990") == "0.9999"
    assert train_state.ema_key(0) == "0"
    for bad in (1.0, -0.1, "fast"):
        with pytest.raises(ValueError, match="EMA rate"):
            train_state.ema_key(bad)


def test_create_copies_params_into_ema_and_target():
    params = _params()
    tx = optax.adam(1e-3)
    state = train_state.create(params, tx, ema_rates=[0.999, 0.9999], keep_target=True)
    assert state.step.dtype == jnp.int32 and state.step.shape == () and int(state.step) == 0
    assert int(state.nonfinite_steps) == 0 and int(state.skipped_steps) == 0
    assert sorted(state.ema) == ["0.999", "0.9999"]
    _assert_tree_equal(state.ema["0.9999"], params)
    _assert_tree_equal(state.target_params, params)
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(tx.init(params))
    no_target = train_state.create(params, tx, ema_rates=[0.999], keep_target=False)
    assert no_target.target_params is None and list(no_target.ema) == ["0.999"]
    with pytest.raises(ValueError, match="repeat a rate"):
        train_state.create(params, tx, ema_rates=[0.999, np.float32(0.999)], keep_target=False)


def test_create_unboxes_partitioned_params():
    boxed = {"dense": {"kernel": nn.Partitioned(_params()["dense"]["kernel"], ("embed_in", "embed_out")),
                       "bias": _params()["dense"]["bias"]}}
    state = train_state.create(boxed, optax.adam(1e-3), ema_rates=[0.99], keep_target=True)
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert not any(isinstance(x, nn.Partitioned) for x in leaves)
    _assert_tree_equal(state.params, _params())


def test_finite_step_updates_params_ema_and_target_by_hand(sgd_step):
    """θ' = θ − lr·g, EMA_r = r·θ + (1 − r)·θ', θ⁻ = μ·θ + (1 − μ)·θ' (new θ: CM Alg. 3)."""
    tx, step = sgd_step
    params = _params()
    state = train_state.create(params, tx, ema_rates=[0.9, 0.5], keep_target=True)
    state = step(state, _grads(), jnp.float32(1.5), jnp.float32(0.25))
    new = jax.tree.map(lambda p, g: p - SGD_LR * g, params, _grads())
    for got, want in [
        (state.params, new),
        (state.ema["0.9"], jax.tree.map(lambda p, n: 0.9 * p + 0.1 * n, params, new)),
        (state.ema["0.5"], jax.tree.map(lambda p, n: 0.5 * p + 0.5 * n, params, new)),
        (state.target_params, jax.tree.map(lambda p, n: 0.25 * p + 0.75 * n, params, new)),
    ]:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)
    assert (int(state.step), int(state.nonfinite_steps), int(state.skipped_steps)) == (1, 0, 0)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((state.params, state.ema, state.target_params)))
    # μ = 0 (CD on CIFAR-10) copies θ into the target.
    state = step(state, _grads(), jnp.float32(1.0), jnp.float32(0.0))
    _assert_tree_equal(state.target_params, state.params)


def test_ema_complement_keeps_float32_digits():
    """From θ = 0 to θ' = 1 the 0.9999 EMA is 1e-4; 1 − float32(0.9999) would give 1.00017e-4."""
    zeros = jax.tree.map(jnp.zeros_like, _params())
    state = train_state.create(zeros, optax.sgd(1.0), ema_rates=[0.9999], keep_target=False)
    ones_grad = jax.tree.map(lambda p: -jnp.ones_like(p), zeros)
    state = jax.jit(lambda s, g: train_state.apply_gradients(s, g, optax.sgd(1.0), loss=0.0))(state, ones_grad)
    for leaf in jax.tree.leaves(state.ema["0.9999"]):
        np.testing.assert_allclose(leaf, 1e-4, rtol=1e-6)


@pytest.mark.parametrize("bad", ["nan_loss", "inf_loss", "nan_grad"])
def test_nonfinite_step_is_skipped_inside_one_program(sgd_step, bad):
    tx, step = sgd_step
    state = train_state.create(_params(), tx, ema_rates=[0.9], keep_target=True)
    state = step(state, _grads(), jnp.float32(1.0), jnp.float32(0.5))
    before, compiled = state, step._cache_size()
    loss = {"nan_loss": jnp.nan, "inf_loss": jnp.inf, "nan_grad": 1.0}[bad]
    grads = _nan_in_one_leaf() if bad == "nan_grad" else _grads()
    for skipped in (1, 2):
        state = step(state, grads, jnp.float32(loss), jnp.float32(0.5))
        # Nothing moves and nothing turns NaN: θ, optimizer state, EMA and target are the pre-skip values.
        _assert_tree_equal((state.params, state.opt_state, state.ema, state.target_params),
                           (before.params, before.opt_state, before.ema, before.target_params))
        counters = (int(state.step), int(state.nonfinite_steps), int(state.skipped_steps))
        assert counters == (1 + skipped, skipped, skipped)
    state = step(state, _grads(), jnp.float32(1.0), jnp.float32(0.5))
    assert (int(state.step), int(state.nonfinite_steps), int(state.skipped_steps)) == (4, 0, 2)
    expected_bias = before.params["dense"]["bias"] - SGD_LR * _grads()["dense"]["bias"]
    np.testing.assert_allclose(state.params["dense"]["bias"], expected_bias, rtol=1e-6)
    assert step._cache_size() == compiled  # finite and non-finite steps ran the same executable


def test_skipped_steps_do_not_advance_the_optimizer_schedule():
    """Warmup counts applied updates: after a skip, the next update uses lr(1), and updates_applied says 1."""
    config = optim.default_config()
    config.update(optimizer="adam", learning_rate=1e-2, warmup_steps=4)
    tx, learning_rate_fn = optim.make_optimizer(config, total_steps=100)
    step = jax.jit(lambda s, g, loss: train_state.apply_gradients(s, g, tx, loss=loss))
    state = train_state.create(_params(), tx, ema_rates=[], keep_target=False)
    state = step(state, _grads(), jnp.float32(1.0))  # lr(0) = 0: θ unchanged, moments filled
    state = step(state, _grads(), jnp.float32(jnp.nan))
    assert int(train_state.updates_applied(state)) == 1 and int(state.step) == 2
    before = state.params
    state = step(state, _grads(), jnp.float32(1.0))
    # Constant gradient: m̂/√v̂ = sign(g), so the update is lr(1)·sign(g) = 2.5e-3·sign(g).
    delta = jax.tree.map(lambda a, b: a - b, state.params, before)
    expected = jax.tree.map(lambda g: -float(learning_rate_fn(1)) * np.sign(g), _grads())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4), delta, expected)
    assert float(learning_rate_fn(train_state.updates_applied(state))) == pytest.approx(5e-3)


def test_state_can_be_donated_and_stays_float32_with_bfloat16_grads():
    tx, _ = optim.make_optimizer(optim.default_config(), total_steps=10)
    state = train_state.create(_params(), tx, ema_rates=[0.99, 0.999], keep_target=True)  # eager: distinct buffers
    step = jax.jit(lambda s, g: train_state.apply_gradients(s, g, tx, target_ema=0.9, loss=1.0), donate_argnums=0)
    grads = jax.tree.map(lambda g: jnp.asarray(g, jnp.bfloat16), _grads())
    state = step(state, grads)
    assert int(state.step) == 1
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((state.params, state.ema, state.target_params)))


def test_errors_name_the_fix():
    tx = optax.sgd(SGD_LR)
    state = train_state.create(_params(), tx, ema_rates=[0.9999], keep_target=True)
    with pytest.raises(ValueError, match="needs target_ema"):
        train_state.apply_gradients(state, _grads(), tx, loss=1.0)
    _assert_tree_equal(train_state.ema_params(state, 0.9999), _params())
    _assert_tree_equal(train_state.ema_params(state, "0.9999"), _params())
    with pytest.raises(KeyError, match=r"No EMA copy at rate 0.999; this state keeps rates \['0.9999'\]"):
        train_state.ema_params(state, 0.999)

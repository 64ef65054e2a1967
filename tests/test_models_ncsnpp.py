"""NCSN++ (cmjax/models/ncsnpp.py, ncsnpp_layers.py) against the CM CIFAR-10 release's published facts.

XLA compiles are slow on a shared 2-core CPU, so most tests share one tiny network (nf 16, ch_mult (1, 2),
one res block, 8×8 input, attention at 4×4) and numpy-drawn parameters of realistic scale (shapes from
`jax.eval_shape`, no RNG compile); only the initialisation tests run the module's own `init`.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import signal

from cmjax import models
from cmjax.models import layers
from cmjax.models import ncsnpp_layers as L
from cmjax.models.ncsnpp import NCSNpp

FIR = (1, 3, 3, 1)
TINY = dict(image_size=8, nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
BATCH = 2


def _key(seed):
    # rbg keys: threefry's random-bit kernels take seconds each to compile on a loaded CPU.
    return jax.random.key(seed, impl="rbg")


def _inputs(seed=0, size=8):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(BATCH, size, size, 3)), jnp.float32)
    sigma = np.array([0.05, 20.0], np.float32)
    return x, jnp.asarray(250.0 * np.log(sigma))  # cmjax's time input, 1000·c_noise


def _numpy_params(model, x, t, seed=0):
    """Parameters of `model`'s shapes with O(1) activations: kernels N(0, 1/fan_in), norms ~1, W ~ N(0, scale²)."""
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x, t)["params"])
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "time_fourier" in name:
            return jnp.asarray(rng.normal(size=leaf.shape) * model.fourier_scale, jnp.float32)
        if leaf.ndim == 1:
            base = 1.0 if "scale" in name else 0.0
            return jnp.asarray(base + 0.1 * rng.normal(size=leaf.shape), jnp.float32)
        fan_in = math.prod(leaf.shape[:-1])
        return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
    """XLA's optimisation passes double these tests' compile time and change no property they check."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="module")
def tiny():
    model = NCSNpp(**TINY)
    x, t = _inputs()
    return model, _numpy_params(model, x, t), x, t


# --- published configuration ---------------------------------------------------------------------------------


def test_cifar10_parameter_count_matches_the_release():
    """56,395,651 = every entry of "params" at the release config, the frozen Fourier W (128) included."""
    model = models.get({"name": "ncsnpp"})
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x, t)
    assert set(variables) == {"params"}
    params = nn.unbox(variables["params"])
    total = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    assert params["time_fourier"]["W"].shape == (128,)
    assert total == 56_395_651
    assert total - 128 == 56_395_523  # trainable entries (W has a zero gradient, see test below)


def test_every_parameter_carries_logical_axis_names():
    model = NCSNpp(**TINY)
    x, t = _inputs()
    boxed = jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
    for v in leaves:
        assert len(v.names) == v.value.ndim
        if v.value.ndim == 4:
            assert v.names == layers.CONV_KERNEL_AXES
        assert v.value.dtype == jnp.float32


def test_group_norm_follows_the_release():
    """min(C//4, 32) groups and flax's epsilon 1e-6 (not openai's 32 groups / 1e-5)."""
    assert L.group_norm(16, name="n").num_groups == 4
    assert L.group_norm(256, name="n").num_groups == 32
    assert L.group_norm(256, name="n").epsilon == 1e-6


# --- time input ------------------------------------------------------------------------------------------------


def test_fourier_embedding_receives_c_noise(tiny):
    """The release embeds cond_t = ¼·ln σ (EDM's c_noise); cmjax passes 250·ln σ, so the module divides by 1000."""
    model, params, x, t = tiny
    seen = {}

    class Seen(Exception):
        pass

    def intercept(next_fn, args, kwargs, context):
        if isinstance(context.module, L.GaussianFourierProjection):
            seen["t"] = np.asarray(args[0])
            raise Seen  # nothing after the embedding needs to run
        return next_fn(*args, **kwargs)

    with nn.intercept_methods(intercept), pytest.raises(Seen):
        model.apply({"params": params}, x, t)
    np.testing.assert_allclose(seen["t"], 0.25 * np.log([0.05, 20.0]), rtol=1e-6)


def test_fourier_features():
    """[sin(2π·t·W), cos(2π·t·W)] with W ~ N(0, scale²), W of length `embedding_size`."""
    layer = L.GaussianFourierProjection(embedding_size=4096, scale=16.0)
    c_noise = jnp.array([-0.7, 0.3])
    variables = layer.init(_key(0), c_noise)
    w = np.asarray(nn.unbox(variables["params"])["W"])
    assert w.shape == (4096,) and 15.0 < w.std() < 17.0
    proj = np.asarray(c_noise)[:, None] * w[None] * 2 * np.pi
    np.testing.assert_allclose(
        np.asarray(layer.apply(variables, c_noise)), np.concatenate([np.sin(proj), np.cos(proj)], -1), atol=1e-4
    )


@pytest.fixture(scope="module")
def tiny_grads(tiny):
    """(loss, grads) of a regression loss through the tiny network, without and with remat."""
    model, params, x, t = tiny
    targets = jnp.ones_like(x)

    def loss_and_grads(m):
        def fn(p):
            out = m.apply({"params": p}, x, t)
            return jnp.mean((out - targets) ** 2), out

        return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)

    return loss_and_grads(model), loss_and_grads(model.clone(remat=True))


def test_fourier_projection_is_frozen(tiny_grads):
    """W sits behind stop_gradient, so Adam/RAdam updates leave it exactly as initialised."""
    (_, grads), _ = tiny_grads
    assert np.all(np.asarray(grads["time_fourier"]["W"]) == 0.0)
    assert np.abs(np.asarray(grads["time_dense_0"]["kernel"])).max() > 0.0


# --- initialisation --------------------------------------------------------------------------------------------


def test_release_initialisation():
    """DDPM fan_avg-uniform inits; init_scale 0 (→ 1e-10) on the last conv of every block and the output: F ≈ 0."""
    model = NCSNpp(**TINY)
    x, t = _inputs()
    params = nn.unbox(jax.jit(model.init)(_key(0), x, t)["params"])

    def bound(w, scale):  # variance_scaling(scale, fan_avg, uniform) draws from U(±√(3·scale/fan_avg))
        receptive = math.prod(w.shape[:-2])
        return math.sqrt(3.0 * scale / (receptive * (w.shape[-2] + w.shape[-1]) / 2))

    for path, scale in [
        (("down_0_block_0", "conv_0", "kernel"), 1.0),
        (("mid_attn", "q", "kernel"), 0.1),
        (("down_0_block_0", "conv_1", "kernel"), 1e-10),
        (("mid_attn", "out", "kernel"), 1e-10),
        (("out_conv", "kernel"), 1e-10),
    ]:
        w = np.asarray(params[path[0]][path[1]][path[2]] if len(path) == 3 else params[path[0]][path[1]])
        b = bound(w, scale)
        assert 0.9 * b < np.abs(w).max() <= b, path
    assert np.all(np.asarray(params["out_conv"]["bias"]) == 0.0)
    out = model.apply({"params": params}, x, t)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert 0.0 < float(jnp.abs(out).max()) < 1e-4


# --- forward behaviour -----------------------------------------------------------------------------------------


def test_forward_shape_dtype_and_time_dependence(tiny):
    model, params, x, t = tiny
    out = model.apply({"params": params}, x, t)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out)))
    assert float(jnp.abs(out).mean()) > 0.05  # realistic parameters give an O(1) output
    # Swapping the two noise levels changes each sample's output: the network is time-conditional.
    swapped = model.apply({"params": params}, x, t[::-1])
    assert float(jnp.abs(swapped - out).max()) > 1e-2


def test_dropout_only_when_training(tiny):
    model, params, x, t = tiny
    noisy = model.clone(dropout=0.5)
    apply = lambda key: noisy.apply({"params": params}, x, t, train=True, rngs={"dropout": key})  # noqa: E731
    a, b, a_again = apply(_key(1)), apply(_key(2)), apply(_key(1))
    assert float(jnp.abs(a - b).max()) > 1e-2
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a_again))
    # train=False ignores the rate entirely: identical to the dropout-free network, no rng needed.
    np.testing.assert_array_equal(
        np.asarray(noisy.apply({"params": params}, x, t, train=False)),
        np.asarray(model.apply({"params": params}, x, t)),
    )


def test_bfloat16_compute_tracks_float32(tiny):
    """bfloat16 convs/matmuls (float32 params, norms, softmax, time embedding): max error < 5% of the output range."""
    model, params, x, t = tiny
    ref = model.apply({"params": params}, x, t)
    low = jax.jit(model.clone(dtype="bfloat16").apply)({"params": params}, x, t)  # one compile beats eager bf16 ops
    assert low.dtype == jnp.float32
    err = float(jnp.abs(low - ref).max()) / float(jnp.abs(ref).max())
    assert 0.0 < err < 0.05


def test_remat_gives_identical_outputs_and_gradients(tiny_grads):
    """Same function, same gradients, up to float32 reassociation (remat changes XLA's fusion, not the maths)."""
    ((loss, out), grads), ((loss_remat, out_remat), grads_remat) = tiny_grads
    np.testing.assert_allclose(np.asarray(out_remat), np.asarray(out), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(loss_remat), float(loss), rtol=1e-5)
    assert jax.tree.structure(grads) == jax.tree.structure(grads_remat)
    # The attention key biases have gradients that are zero up to rounding (softmax ignores a per-query shift):
    # compare on the scale of the whole gradient.
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
    for g, g_remat in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat)):
        np.testing.assert_allclose(np.asarray(g_remat), np.asarray(g), rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.parametrize(
    "variant, expected_params",
    [
        # score_sde's NCSN++ VE variant: output-skip pyramid, input-skip with concatenation, DDPM blocks, no FIR.
        (dict(progressive="output_skip", progressive_input="input_skip", progressive_combine="cat",
              resblock_type="ddpm", fir=False), ("up_0_pyramid_conv", "down_0_combine", "down_0_downsample")),
        (dict(progressive="residual", conditional=False), ("up_1_pyramid_conv", "up_0_pyramid_upsample")),
    ],
)
def test_release_variants_run(variant, expected_params):
    model = NCSNpp(**TINY, **variant)
    x, t = _inputs()
    params = _numpy_params(model, x, t)
    assert set(expected_params) <= set(params)
    if not variant.get("conditional", True):
        assert "time_dense_0" not in params
    out = model.apply({"params": params}, x, t)
    assert out.shape == x.shape and np.all(np.isfinite(np.asarray(out)))


def test_clear_errors(tiny):
    model, params, x, t = tiny
    with pytest.raises(ValueError, match="unconditional"):
        model.apply({"params": params}, x, t, class_labels_b=jnp.zeros((BATCH,), jnp.int32))
    with pytest.raises(ValueError, match="expects inputs"):
        model.apply({"params": params}, x[:, :4, :4], t)
    with pytest.raises(ValueError, match="progressive_input"):
        model.clone(progressive_input="skip").apply({"params": params}, x, t)


# --- FIR resampling --------------------------------------------------------------------------------------------


def test_fir_kernel_normalisation():
    k = L.fir_kernel_2d(FIR)
    np.testing.assert_allclose(k, np.outer(FIR, FIR) / 64.0)
    np.testing.assert_allclose(L.fir_kernel_2d(FIR, gain=4.0).sum(), 4.0, rtol=1e-6)


def _scipy_upfirdn(x_bhwc, up, down):
    """Separable reference with scipy.signal.upfirdn (full convolution) cropped to StyleGAN2's alignment."""
    taps = np.asarray(FIR, np.float64) / sum(FIR) * up
    start = 1 if up == 2 else 2  # offsets implied by StyleGAN2's pad0 for a 4-tap kernel
    def along(a, axis):
        n = a.shape[axis] * up // down
        full = np.apply_along_axis(lambda v: signal.upfirdn(taps, v, up=up), axis, a)
        return np.take(full, start + down * np.arange(n), axis=axis)
    return along(along(np.asarray(x_bhwc, np.float64), 1), 2)


def test_fir_resampling_matches_scipy_upfirdn():
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(L.upsample_2d(jnp.asarray(x), FIR)), _scipy_upfirdn(x, 2, 1), atol=1e-5)
    np.testing.assert_allclose(np.asarray(L.downsample_2d(jnp.asarray(x), FIR)), _scipy_upfirdn(x, 1, 2), atol=1e-5)


def test_fir_resampling_preserves_constants_and_ramps():
    ones = jnp.ones((1, 8, 8, 1))
    np.testing.assert_allclose(np.asarray(L.upsample_2d(ones, FIR))[0, 1:-1, 1:-1], 1.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(L.downsample_2d(ones, FIR))[0, 1:-1, 1:-1], 1.0, atol=1e-6)
    # down(up(x)) is the identity away from the zero-padded border for a linear ramp: the two filters are aligned.
    ramp = jnp.broadcast_to(jnp.arange(16.0)[None, :, None, None] + 2.0 * jnp.arange(16.0)[None, None, :, None],
                            (1, 16, 16, 1))
    back = L.downsample_2d(L.upsample_2d(ramp, FIR), FIR)
    np.testing.assert_allclose(np.asarray(back)[0, 1:-1, 1:-1], np.asarray(ramp)[0, 1:-1, 1:-1], atol=1e-4)


@pytest.mark.parametrize("up", [True, False])
def test_fused_fir_conv_equals_resample_then_conv_inside(up):
    """StyleGAN2's fused ops equal FIR resampling and a SAME conv away from the border (padding is applied once)."""
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 8, 8, 4)), jnp.float32)
    layer = L.FIRConv(5, up=up, down=not up)
    params = _numpy_params_for_layer(layer, x)
    fused = np.asarray(layer.apply({"params": params}, x))
    w = params["weight"]
    def same(y):
        return jax.lax.conv_general_dilated(y, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    unfused = np.asarray(same(L.upsample_2d(x, FIR)) if up else L.downsample_2d(same(x), FIR)) + params["bias"]
    assert fused.shape == ((1, 16, 16, 5) if up else (1, 4, 4, 5))
    np.testing.assert_allclose(fused[:, 1:-1, 1:-1], unfused[:, 1:-1, 1:-1], atol=1e-5)
    if up:
        # Whole image, borders included: the release's TF-style conv2d_transpose(VALID) followed by the FIR blur.
        w_t = jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2))
        transposed = jax.lax.conv_transpose(x, w_t, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            transpose_kernel=True)
        release = L.upfirdn_2d(transposed, L.fir_kernel_2d(FIR, gain=4.0), pad0=1, pad1=1) + params["bias"]
        np.testing.assert_allclose(fused, np.asarray(release), atol=1e-5)


def _numpy_params_for_layer(layer, x):
    shapes = nn.unbox(jax.eval_shape(layer.init, jax.random.key(0), x)["params"])
    rng = np.random.default_rng(2)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) / 4.0, jnp.float32), shapes)

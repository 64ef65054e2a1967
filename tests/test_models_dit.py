"""DiT: the paper's parameter counts, the output contract, labels and the null row, two-time input, the JVP,
sharding names. Parity with diffusers' DiTTransformer2DModel is in tests/test_interop_dit.py."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmjax import jvp, models, sharding
from cmjax.models import dit, layers

TINY = dict(image_size=8, in_channels=4, out_channels=4, depth=1, hidden_size=32, num_heads=2, patch_size=2,
            num_classes=10, null_label=True)


def _count(module, image_size=32, in_channels=4, times=1):
    x = jnp.zeros((1, image_size, image_size, in_channels))
    t = jnp.zeros((1,) if times == 1 else (1, times))
    labels = jnp.zeros((1,), jnp.int32) if module.num_classes else None
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x, t, labels))
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nn.meta.unbox(shapes["params"])))


def _hand_count(depth, d, patch, in_channels=4, out_channels=8, rows=1001):
    """The official DiT's modules (facebookresearch/DiT models.py @ ed81ce2) counted by hand, without pos_embed."""
    linear = lambda i, o: i * o + o  # noqa: E731
    block = linear(d, 3 * d) + linear(d, d) + linear(d, 4 * d) + linear(4 * d, d) + linear(d, 6 * d)
    embed = patch * patch * in_channels * d + d + linear(256, d) + linear(d, d) + rows * d
    return embed + depth * block + linear(d, 2 * d) + linear(d, patch * patch * out_channels)


@pytest.mark.parametrize("size,depth,width,heads,official", [
    ("S/2", 12, 384, 6, 32_963_360), ("B/2", 12, 768, 12, 130_512_416),
    pytest.param("L/2", 24, 1024, 16, 458_102_816, marks=pytest.mark.slow),  # tracing 24–28 blocks: seconds
    pytest.param("XL/2", 28, 1152, 16, 675_129_632, marks=pytest.mark.slow)])
def test_parameter_counts_are_the_officials(size, depth, width, heads, official):
    """The official models (learn_sigma, 4 latent channels, 1000 classes + the null row; models.py:328-362 sizes)
    counted as its train.py:152 logs them, sum(p.numel() for p in model.parameters()): that includes the frozen
    16×16×D pos_embed parameter, which cmjax computes instead of storing (XL/2: 675,129,632, the paper's 675M, =
    674,834,720 trainable + 294,912)."""
    net = dit.DiT(depth=depth, hidden_size=width, num_heads=heads, patch_size=2, learn_sigma=True, null_label=True)
    count = _count(net)
    assert count == _hand_count(depth, width, 2)
    assert count + 16 * 16 * width == official
    if size == "XL/2":
        # Without learn_sigma (one prediction shaped like the input) only the final linear shrinks.
        assert _count(dit.DiT(null_label=True)) == count - 2 * 2 * 4 * width - 2 * 2 * 4
        # MeanFlow's two-time input adds the second timestep embedder h_embedder (models_dit.py:208).
        assert _count(dit.DiT(null_label=True), times=2) == _count(dit.DiT(null_label=True)) + 256 * width + \
            width + width * width + width


@pytest.fixture(scope="module")
def tiny():
    """A tiny DiT with every parameter random (the zero-initialised adaLN/final layers too), and its forward."""
    net = dit.DiT(**TINY)
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 4))
    t = jnp.array([-300.0, 10.0, 500.0])
    init_out, variables = jax.jit(net.init_with_output)(jax.random.key(0), x, t, jnp.zeros(3, jnp.int32))
    params = nn.meta.unbox(variables["params"])
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = tree.unflatten([a + 0.05 * jax.random.normal(k, a.shape) for k, a in zip(keys, leaves)])
    apply = jax.jit(lambda p, x, t, y: net.apply({"params": p}, x, t, y))
    return net, params, x, t, apply, init_out


def test_init_is_adaln_zero_and_output_shaped_like_input(tiny):
    """adaLN-Zero (models.py:207-216): the freshly initialised network outputs exactly 0, shaped like its input."""
    _, _, x, _, _, out = tiny
    assert out.shape == x.shape and out.dtype == jnp.float32 and not np.any(np.asarray(out))
    assert models.get({"name": "dit", **TINY}) == dit.DiT(**TINY)
    assert models.get({"name": "sit", **TINY}) == dit.DiT(**TINY)


def test_labels_time_and_null_row(tiny):
    net, params, x, t, apply, _ = tiny
    out = np.asarray(apply(params, x, t, jnp.array([1, 2, 3])))
    assert np.abs(out).mean() > 1e-2
    assert not np.allclose(out, apply(params, x, t, jnp.array([1, 2, 4])))  # the label matters
    assert not np.allclose(out, apply(params, x, t + 1.0, jnp.array([1, 2, 3])))  # so does the time
    # The null label (layers.NULL_LABEL, what drop_labels and guided teachers pass) is the official row num_classes.
    np.testing.assert_array_equal(apply(params, x, t, jnp.full(3, layers.NULL_LABEL)),
                                  apply(params, x, t, jnp.full(3, 10)))
    # Tokens see each other (attention), and the patch grid is unpatchified in place: a change in one corner
    # patch moves the output everywhere, most in that patch.
    moved = np.abs(np.asarray(apply(params, x.at[:, :2, :2].add(1.0), t, jnp.array([1, 2, 3]))) - out)
    assert moved[:, 4:, 4:].max() > 0 and moved[:, :2, :2].mean() > moved[:, 4:, 4:].mean()


def test_jvp_through_dit_equals_finite_difference(tiny):
    """`cmjax.jvp.value_and_jvp` exact (forward mode through attention, LayerNorm and adaLN) against the
    central difference, along an image and a time tangent."""
    net, params, x, t, _, _ = tiny
    labels = jnp.array([1, 2, 3])
    fn = jax.jit(lambda x, t: net.apply({"params": params}, x, t, labels))
    v_x, v_t = jax.random.normal(jax.random.key(3), x.shape), jnp.array([3.0, -2.0, 1.0])
    value, exact = jvp.value_and_jvp(fn, (x, t), (v_x, v_t))
    _, fd = jvp.value_and_jvp(fn, (x, t), (v_x, v_t), mode="finite_difference", step=1e-3)
    exact, fd = np.asarray(exact), np.asarray(fd)
    assert np.abs(exact).mean() > 1e-2
    np.testing.assert_allclose(exact, fd, atol=2e-3 * np.abs(exact).max())


def test_two_time_input_and_sharding_names():
    """[B, 2] input (MeanFlow's (t, t − r)): a second embedder h_embedder; big kernels split over fsdp by their
    output features (logical names), the label table by rows' features."""
    net = dit.DiT(**TINY)
    x, labels = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32)
    boxed = jax.eval_shape(lambda: net.init(jax.random.key(0), x, jnp.zeros((1, 2)), labels))["params"]
    assert "h_embedder" in boxed and "t_embedder" in boxed
    assert boxed["blocks_0"]["mlp_fc1"]["kernel"].names == layers.DENSE_KERNEL_AXES
    assert boxed["x_embedder"]["kernel"].names == layers.CONV_KERNEL_AXES
    mesh = jax.make_mesh((1, 8), sharding.MESH_AXES, devices=jax.devices()[:8])
    specs = sharding.param_partition_specs(boxed, mesh, min_size_to_shard=1024)
    assert specs["blocks_0"]["mlp_fc1"]["kernel"] == jax.sharding.PartitionSpec(None, "fsdp")
    assert specs["blocks_0"]["adaLN_modulation_1"]["kernel"] == jax.sharding.PartitionSpec(None, "fsdp")


def test_user_errors_name_the_fix():
    from cmjax import errors

    x = jnp.zeros((1, 8, 8, 4))
    with pytest.raises(errors.ConfigError, match="attention_impl"):
        dit.DiT(**{**TINY, "attention_impl": "splash"}).init(jax.random.key(0), x, jnp.zeros(1), jnp.zeros(1, int))
    with pytest.raises(errors.ConfigError, match="class_labels_b"):
        dit.DiT(**TINY).init(jax.random.key(0), x, jnp.zeros(1))
    with pytest.raises(errors.ConfigError, match="divisible"):
        dit.DiT(**{**TINY, "num_heads": 3}).init(jax.random.key(0), x, jnp.zeros(1), jnp.zeros(1, int))


@pytest.mark.slow
def test_xl2_forward_is_the_papers_118_6_gflops():
    """DiT Table 4: DiT-XL/2 at 256×256 costs 118.6 Gflops, counted as multiply-adds (half of bench/model_flops.py's
    2-FLOPs-per-multiply-add jaxpr count of the convolutions and matmuls)."""
    from bench import model_flops

    result = model_flops.forward_flops("dit_xl2")
    assert result["params"] == 674_834_720
    assert round(result["matmul_gflops"] / 2, 1) == 118.6


@pytest.mark.slow  # Pallas interpret mode on CPU: seconds of compile
def test_flash_attention_gives_the_dit_the_same_value_and_jvp():
    """attention_impl="flash" (cmjax.models.attention's Pallas kernel with its fused JVP) through the DiT: value
    and forward-mode derivative equal XLA attention's, as sCM and MeanFlow need."""
    fields = {"name": "dit", "image_size": 8, "in_channels": 1, "out_channels": 1, "depth": 1, "hidden_size": 32,
              "num_heads": 2, "patch_size": 2, "num_classes": 0}
    reference, flash = models.get(fields), models.get(dict(fields, attention_impl="flash"))
    x, t = jax.random.normal(jax.random.key(0), (2, 8, 8, 1)), jnp.array([0.3, 0.7])
    params = reference.init({"params": jax.random.key(1)}, x, t)["params"]
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape), params)  # no zeros
    outs = [jax.jvp(lambda xx, tt, m=m: m.apply({"params": params}, xx, tt), (x, t),
                    (jnp.ones_like(x), jnp.ones_like(t))) for m in (reference, flash)]
    (value, tangent), (flash_value, flash_tangent) = outs
    assert float(jnp.max(jnp.abs(tangent))) > 0.01
    np.testing.assert_allclose(flash_value, value, atol=1e-5)
    np.testing.assert_allclose(flash_tangent, tangent, atol=1e-5)

"""ADM UNet: released parameter counts, output contract, conditioning, dropout, bfloat16, remat, sharding names."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmjax import models
from cmjax.models import layers
from cmjax.models.unet import UNet

TINY = dict(
    image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
    num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True, num_classes=10, dropout=0.3,
)


def _param_count(unet):
    s = unet.image_size
    labels = jnp.zeros((1,), jnp.int32) if unet.num_classes else None
    shapes = jax.eval_shape(lambda: unet.init(jax.random.key(0), jnp.zeros((1, s, s, 3)), jnp.zeros((1,)), labels))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(shapes["params"])))


def _shapes(unet):
    return nn.meta.unbox(jax.eval_shape(lambda: unet.init(jax.random.key(0), *_inputs(unet)))["params"])


def _init(unet, seed=0):
    return nn.meta.unbox(jax.jit(unet.init)(jax.random.key(seed), *_inputs(unet))["params"])


def _apply(unet):
    """One compiled forward per configuration (eager Flax on CPU compiles op by op, which is far slower)."""
    return jax.jit(unet.apply, static_argnames=("train",))


def _inputs(unet, batch=2):
    x = jax.random.normal(jax.random.key(7), (batch, unet.image_size, unet.image_size, unet.in_channels))
    t = 250.0 * jnp.log(jnp.linspace(0.01, 40.0, batch))
    labels = jnp.arange(batch) % unet.num_classes if unet.num_classes else None
    return x, t, labels


def test_released_parameter_counts():
    """CM release: ImageNet-64 295,899,267 and LSUN-256 526,304,771 parameters (shapes only, nothing allocated)."""
    imagenet64 = UNet()  # the defaults are the ImageNet-64 release
    lsun256 = UNet(
        image_size=256, model_channels=256, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
        attention_resolutions=(32, 16, 8), num_head_channels=64, use_scale_shift_norm=False,
        resblock_updown=True, num_classes=None,
    )
    assert _param_count(imagenet64) == 295_899_267
    assert _param_count(lsun256) == 526_304_771
    # Without AdaGN each emb_layers Dense halves; without resblock up/down the resample blocks shrink to convs.
    assert _param_count(UNet(use_scale_shift_norm=False)) < 295_899_267
    assert _param_count(UNet(resblock_updown=False)) != 295_899_267


def test_registry_builds_unet_from_config():
    unet = models.get({"name": "unet", **TINY})
    assert isinstance(unet, UNet) and unet.model_channels == 32


@pytest.fixture(scope="module")
def tiny():
    """The tiny network with dropout 0.3, its compiled forward, fresh parameters and randomised parameters."""
    unet = UNet(**TINY)
    fresh = _init(unet)
    rng = np.random.default_rng(1)  # numpy: eager jax.random would compile once per parameter shape
    perturbed = jax.tree.map(lambda p: p + np.float32(0.05) * rng.standard_normal(p.shape, np.float32), fresh)
    return unet, _apply(unet), fresh, perturbed


def test_output_contract_and_zero_init_head(tiny):
    unet, apply, fresh, _ = tiny
    x, t, labels = _inputs(unet)
    out = apply({"params": fresh}, x, t, labels)
    assert out.shape == x.shape and out.dtype == jnp.float32
    # openai zero_module on the final conv: a freshly initialised network outputs exactly zero.
    assert float(jnp.abs(out).max()) == 0.0
    wide = UNet(**{**TINY, "out_channels": 6})
    out6 = jax.eval_shape(lambda: wide.apply(wide.init(jax.random.key(0), x, t, labels), x, t, labels))
    assert out6.shape == x.shape[:3] + (6,)


def test_time_and_class_conditioning_change_the_output(tiny):
    unet, apply, _, params = tiny
    x, t, labels = _inputs(unet)
    base = apply({"params": params}, x, t, labels)
    other_label = apply({"params": params}, x, t, (labels + 1) % 10)
    other_time = apply({"params": params}, x, t + 100.0, labels)
    assert float(jnp.abs(base - other_label).max()) > 1e-3
    assert float(jnp.abs(base - other_time).max()) > 1e-3
    with pytest.raises(ValueError, match="class_labels_b"):
        jax.eval_shape(lambda: unet.apply({"params": params}, x, t))


def test_dropout_only_in_training(tiny):
    unet, apply, _, params = tiny
    x, t, labels = _inputs(unet)
    evaluated = apply({"params": params}, x, t, labels, train=False)
    no_dropout = _apply(UNet(**{**TINY, "dropout": 0.0}))({"params": params}, x, t, labels)
    np.testing.assert_array_equal(evaluated, no_dropout)
    a = apply({"params": params}, x, t, labels, train=True, rngs={"dropout": jax.random.key(1)})
    b = apply({"params": params}, x, t, labels, train=True, rngs={"dropout": jax.random.key(2)})
    a_again = apply({"params": params}, x, t, labels, train=True, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(a, a_again)
    assert float(jnp.abs(a - b).max()) > 1e-3
    assert float(jnp.abs(a - evaluated).max()) > 1e-3


def test_bfloat16_compute_matches_float32(tiny):
    """bfloat16 torso, float32 params/embedding/head: relative RMS error below 5% on a random tiny network."""
    unet, apply, _, params = tiny
    x, t, labels = _inputs(unet)
    ref = apply({"params": params}, x, t, labels)
    bf16 = UNet(**{**TINY, "dtype": jnp.bfloat16})
    low = _apply(bf16)({"params": params}, x, t, labels)
    assert low.dtype == jnp.float32
    rel = float(jnp.sqrt(jnp.mean((low - ref) ** 2) / jnp.mean(ref**2)))
    assert 1e-4 < rel < 5e-2, rel  # nonzero: the torso really ran in bfloat16 (measured 2.1%)
    # The parameters stay float32 whatever the compute dtype.
    shapes = jax.eval_shape(lambda: bf16.init(jax.random.key(0), x, t, labels))
    assert {leaf.dtype for leaf in jax.tree.leaves(nn.meta.unbox(shapes))} == {jnp.dtype(jnp.float32)}
    # bfloat16 attention too (the TPU setting), with the dtype given as a config string, stays within the bound.
    bf16_attn = UNet(**{**TINY, "dtype": "bfloat16", "attention_dtype": "bfloat16"})
    low_attn = _apply(bf16_attn)({"params": params}, x, t, labels)
    assert float(jnp.sqrt(jnp.mean((low_attn - ref) ** 2) / jnp.mean(ref**2))) < 5e-2


def test_remat_gives_identical_outputs_and_gradients():
    # One level (resblocks and attention at 16×16) keeps the two backward compiles short.
    one_level = {**TINY, "channel_mult": (1,), "attention_resolutions": (16,)}
    plain = UNet(**one_level)
    remat = UNet(**{**one_level, "remat": True})
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32) * 0.2, _shapes(plain))
    x, t, labels = _inputs(plain)

    def loss(module, p):
        out = module.apply({"params": p}, x, t, labels, train=True, rngs={"dropout": jax.random.key(3)})
        return jnp.mean(out**2)

    (l0, g0), (l1, g1) = (jax.jit(jax.value_and_grad(lambda p, m=m: loss(m, p)))(params) for m in (plain, remat))
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    assert jax.tree.structure(g1) == jax.tree.structure(g0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g0)
    # remat really rematerialises: the gradient program of the remat version holds checkpointed blocks.
    jaxpr_plain = str(jax.make_jaxpr(jax.grad(lambda p: loss(plain, p)))(params))
    jaxpr_remat = str(jax.make_jaxpr(jax.grad(lambda p: loss(remat, p)))(params))
    assert "remat" in jaxpr_remat or "checkpoint" in jaxpr_remat
    assert "remat" not in jaxpr_plain and "checkpoint" not in jaxpr_plain


def test_parameters_carry_logical_axis_names():
    unet = UNet(**TINY)
    boxed = jax.eval_shape(lambda: unet.init(jax.random.key(0), *_inputs(unet)))["params"]
    specs = nn.get_partition_spec(boxed)
    assert tuple(specs["input_blocks_1_0"]["in_layers_2"]["kernel"]) == layers.CONV_KERNEL_AXES
    assert tuple(specs["input_blocks_1_0"]["emb_layers_1"]["kernel"]) == layers.DENSE_KERNEL_AXES
    assert tuple(specs["middle_block_1"]["qkv"]["kernel"]) == layers.CONV_KERNEL_AXES
    assert tuple(specs["out_0"]["scale"]) == layers.NORM_AXES
    assert tuple(specs["label_emb"]["embedding"]) == layers.EMBEDDING_AXES
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
    unnamed = [p for p, leaf in leaves if not isinstance(leaf, nn.Partitioned)]
    assert unnamed == []


def test_hooks_are_checked_and_keep_the_parameter_tree():
    x, t, labels = _inputs(UNet(**TINY))
    with pytest.raises(ValueError, match="emb_norm='rms'"):
        jax.eval_shape(lambda: UNet(**{**TINY, "emb_norm": "rms"}).init(jax.random.key(0), x, t, labels))
    pixel = UNet(**{**TINY, "emb_norm": "pixel_norm"})
    hooked = jax.eval_shape(lambda: pixel.init(jax.random.key(0), x, t, labels))["params"]
    assert jax.tree.structure(nn.meta.unbox(hooked)) == jax.tree.structure(_shapes(UNet(**TINY)))


def test_group_norm_and_timestep_embedding():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 64)) * 3.0 + 5.0
    gn = layers.GroupNorm32()
    out = gn.apply(gn.init(jax.random.key(0), x), x)
    grouped = np.asarray(out).reshape(2, 16, 32, 2)
    np.testing.assert_allclose(grouped.mean(axis=(1, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(grouped.var(axis=(1, 3)), 1.0, rtol=1e-3)  # eps 1e-5 against variance 9
    assert gn.apply(gn.init(jax.random.key(0), x), x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    emb = layers.timestep_embedding(jnp.array([0.0, 10.0]), 8)
    # [cos | sin] with frequencies 10000^(-i/4): t = 0 gives ones then zeros.
    np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0])
    freqs = 10000.0 ** (-np.arange(4) / 4)
    np.testing.assert_allclose(emb[1], np.concatenate([np.cos(10 * freqs), np.sin(10 * freqs)]), rtol=1e-6)
    normed = layers.pixel_norm(jnp.array([[3.0, 4.0]]))
    np.testing.assert_allclose(np.mean(np.square(normed)), 1.0, rtol=1e-6)

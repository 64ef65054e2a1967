"""Mesh from config, the batch sharding, host-local <-> global arrays and FSDP parameter rules on 8 CPU devices."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from cmjax import models, optim, sharding, train_state
from cmjax.models import layers


@pytest.mark.parametrize(
    "config, shape",
    [({"data": -1, "fsdp": 1}, (8, 1)), ({"data": 2, "fsdp": -1}, (2, 4)), ({"fsdp": -1}, (1, 8)),
     ({"data": 4, "fsdp": 2}, (4, 2))],
)
def test_mesh_shape_fills_minus_one(config, shape):
    assert sharding.mesh_shape(config, 8) == shape


@pytest.mark.parametrize(
    "config, message",
    [({"data": -1, "fsdp": -1}, "At most one"), ({"data": 3, "fsdp": -1}, "do not divide by 3"),
     ({"data": 2, "fsdp": 2}, "has 4 devices but 8"), ({"model": 2}, "Unknown mesh axes"),
     ({"data": 0, "fsdp": -1}, "positive or -1")],
)
def test_mesh_shape_errors(config, message):
    with pytest.raises(ValueError, match=message):
        sharding.mesh_shape(config, 8)


def test_make_mesh_uses_every_device_with_auto_axes():
    mesh = sharding.make_mesh({"data": 2, "fsdp": -1})
    assert mesh.axis_names == ("data", "fsdp") and dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_process_batch_size_and_the_indivisible_error():
    mesh = sharding.make_mesh({"data": 2, "fsdp": -1})
    assert sharding.batch_device_count(mesh) == 8
    assert sharding.process_batch_size(24, mesh) == 24  # one process feeds the whole batch
    with pytest.raises(ValueError, match=r"Global batch size 12 does not divide evenly over the 8 devices"):
        sharding.process_batch_size(12, mesh)


@pytest.mark.parametrize("config", [{"data": -1, "fsdp": 1}, {"data": 2, "fsdp": 4}])
def test_host_local_to_global_splits_rows_over_both_axes(config):
    mesh = sharding.make_mesh(config)
    local = {"x": np.arange(16 * 3).reshape(16, 3), "y": np.arange(16, dtype=np.int32)}
    batch = sharding.host_local_to_global(local, mesh)
    assert batch["x"].shape == (16, 3) and batch["x"].sharding.spec == P(("data", "fsdp"))
    # Device (i, j) of the mesh holds rows 2*(i*fsdp + j) .. +2: data-major, then fsdp.
    fsdp = mesh.shape["fsdp"]
    for (i, j), device in np.ndenumerate(mesh.devices):
        block = 2 * (i * fsdp + j)
        shard = next(s for s in batch["x"].addressable_shards if s.device == device)
        np.testing.assert_array_equal(shard.data, local["x"][block : block + 2])
    back = sharding.global_to_host_local(batch)
    np.testing.assert_array_equal(back["x"], local["x"])
    np.testing.assert_array_equal(back["y"], local["y"])


# --- FSDP parameter rules ---------------------------------------------------------------------------------------

def _boxed(shape, names):
    return nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, jnp.float32), names)


def test_param_specs_prefer_the_logical_output_axis_then_the_largest_divisible_one():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    abstract = {
        "conv_wide_in": {"kernel": _boxed((3, 3, 512, 256), layers.CONV_KERNEL_AXES)},  # in is larger; out is named
        "conv_rgb_out": {"kernel": _boxed((3, 3, 512, 6), layers.CONV_KERNEL_AXES)},  # 6 does not divide by 4
        "dense": {"kernel": _boxed((1024, 512), layers.DENSE_KERNEL_AXES)},
        "embed": {"embedding": _boxed((1000, 768), layers.EMBEDDING_AXES)},
        "embed_odd": {"embedding": _boxed((1000, 6), layers.EMBEDDING_AXES)},  # falls to the vocab axis
        "norm": {"scale": _boxed((1024,), layers.NORM_AXES)},  # small
        "prime": {"kernel": _boxed((3, 3, 7, 5), layers.CONV_KERNEL_AXES)},  # nothing divides by 4
        "plain_tall": jax.ShapeDtypeStruct((2048, 512), jnp.float32),  # no names: largest divisible dimension
        "plain_square": jax.ShapeDtypeStruct((512, 512), jnp.float32),  # tie: the later (output) dimension
        "plain_scale": jax.ShapeDtypeStruct((64,), jnp.float32),
    }
    specs = sharding.param_partition_specs(abstract, mesh, min_size_to_shard=200)
    expected = {
        "conv_wide_in": {"kernel": P(None, None, None, "fsdp")},
        "conv_rgb_out": {"kernel": P(None, None, "fsdp", None)},
        "dense": {"kernel": P(None, "fsdp")},
        "embed": {"embedding": P(None, "fsdp")},
        "embed_odd": {"embedding": P("fsdp", None)},
        "norm": {"scale": P("fsdp")},
        "prime": {"kernel": P()},
        "plain_tall": P("fsdp", None),
        "plain_square": P(None, "fsdp"),
        "plain_scale": P(),
    }
    assert specs == expected
    # The default threshold (2**18 elements) replicates everything below a 512x512 kernel.
    default = sharding.param_partition_specs(abstract, mesh)
    assert default["norm"]["scale"] == P() and default["plain_square"] == P(None, "fsdp")
    assert default["conv_rgb_out"]["kernel"] == P()  # 27,648 elements
    # One fsdp shard: nothing to split.
    no_fsdp = sharding.param_partition_specs(abstract, sharding.make_mesh({"data": -1, "fsdp": 1}))
    assert set(jax.tree.leaves(no_fsdp, is_leaf=lambda x: isinstance(x, P))) == {P()}


def test_state_shardings_mirror_params_in_optimizer_moments():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    params = {"big": jnp.ones((8, 64)), "small": jnp.ones((3,))}
    config = optim.default_config()
    config.update(optimizer="adamw", weight_decay=0.1, grad_clip_norm=1.0, warmup_steps=5)
    tx, _ = optim.make_optimizer(config, total_steps=10)
    for keep_target in (True, False):
        abstract = jax.eval_shape(lambda p: train_state.create(p, tx, [0.9, 0.99], keep_target), params)
        shardings = sharding.state_shardings(abstract, mesh, min_size_to_shard=64)
        spec = jax.tree.map(lambda s: s.spec, shardings)
        param_spec = {"big": P(None, "fsdp"), "small": P()}
        assert spec.params == param_spec and spec.ema == {"0.9": param_spec, "0.99": param_spec}
        assert spec.target_params == (param_spec if keep_target else None)
        adam = spec.opt_state[1]
        assert adam.mu == param_spec and adam.nu == param_spec and adam.count == P()
        assert spec.opt_state[-1].count == P() and spec.step == P() and spec.skipped_steps == P()
    with pytest.raises(ValueError, match="does not match the state's parameter tree"):
        sharding.state_shardings(abstract, mesh, param_specs={"big": P()})


UNET = dict(image_size=8, model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(8,),
            num_head_channels=32, num_classes=10)
UNET_MIN_SIZE = 2**13  # the tiny UNet's 3x3x32x32 kernels (9,216) are sharded, its 1x1 qkv (3,072) is not


def test_unet_state_is_created_fsdp_sharded_and_equals_an_unsharded_creation():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    unet = models.get({"name": "unet", **UNET})
    inputs = (jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
    tx, _ = optim.make_optimizer(optim.default_config(), total_steps=10)

    def create(rng):
        return train_state.create(unet.init(rng, *inputs)["params"], tx, [0.999, 0.9999], keep_target=True)

    boxed = jax.eval_shape(unet.init, jax.random.key(0), *inputs)["params"]
    specs = sharding.param_partition_specs(boxed, mesh, min_size_to_shard=UNET_MIN_SIZE)
    conv = ("input_blocks_1_0", "in_layers_2", "kernel")
    assert specs[conv[0]][conv[1]][conv[2]] == P(None, None, None, "fsdp")
    assert specs["time_embed_2"]["kernel"] == P(None, "fsdp")
    assert specs["middle_block_1"]["qkv"]["kernel"] == P()  # 3,072 elements: replicated
    assert specs["label_emb"]["embedding"] == P() and specs["out_0"]["scale"] == P()
    # Rule over the whole network: a large leaf splits its (last, output) axis; a small one is replicated.
    for (path, spec), shape in zip(
        jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P)),
        [x.shape for x in jax.tree.leaves(nn.meta.unbox(boxed))],
    ):
        large = np.prod(shape) >= UNET_MIN_SIZE and shape[-1] % 4 == 0
        want = P(*([None] * (len(shape) - 1)), "fsdp") if large else P()
        assert spec == want, (jax.tree_util.keystr(path), shape)

    abstract_state = jax.eval_shape(create, jax.random.key(0))
    shardings = sharding.state_shardings(abstract_state, mesh, param_specs=specs)
    state = jax.jit(create, out_shardings=shardings)(jax.random.key(0))
    jax.tree.map(lambda leaf, s: assert_equivalent(leaf.sharding, s, leaf.ndim), state, shardings)

    kernel = state.params[conv[0]][conv[1]][conv[2]]
    moment = state.opt_state[0].mu[conv[0]][conv[1]][conv[2]]
    for array in (kernel, state.ema["0.9999"][conv[0]][conv[1]][conv[2]], moment):
        assert array.shape == (3, 3, 32, 32)
        for shard in array.addressable_shards:
            # Device (i, j) holds output channels 8j..8j+8: a quarter, the same on both "data" rows.
            j = int(np.argwhere(mesh.devices == shard.device)[0][1])
            assert shard.data.shape == (3, 3, 32, 8)
            np.testing.assert_array_equal(shard.data, np.asarray(array)[..., 8 * j : 8 * j + 8])

    reference = jax.jit(create)(jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, state, reference)

    # A sharded update keeps every leaf's sharding and computes what the unsharded one does.
    def step(s, grads):
        return train_state.apply_gradients(s, grads, tx, target_ema=0.5, loss=1.0)

    grads = jax.tree.map(lambda p: 0.01 * p + 0.001, reference.params)
    sharded_step = jax.jit(step, in_shardings=(shardings, shardings.params), out_shardings=shardings,
                           donate_argnums=0)
    new_state = sharded_step(state, jax.device_put(grads, shardings.params))
    jax.tree.map(lambda leaf, s: assert_equivalent(leaf.sharding, s, leaf.ndim), new_state, shardings)
    expected = jax.jit(step)(reference, grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), new_state, expected)


def assert_equivalent(actual, expected, ndim):
    assert actual.is_equivalent_to(expected, ndim), (actual, expected)

"""LPIPS (cmjax/metrics/lpips.py) against the `lpips` package with the same random VGG16 weights, and as the
`lpips` training distance inside the jitted, sharded train step.

torchvision's pretrained VGG16 would be a download, so the VGG weights here are random (seeded, biases
included) and go through the real converter; the linear heads are the ones shipped in the lpips package.
"""
import copy
import json
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
lpips_package = pytest.importorskip("lpips")

from cmjax import distances, methods, models, optim, sharding, train, train_step  # noqa: E402
from cmjax import workdir as workdir_lib  # noqa: E402
from cmjax.metrics import lpips  # noqa: E402
from configs import digits  # noqa: E402

PARITY_ATOL = 1e-5


@pytest.fixture(scope="module")
def reference(lpips_random_weights):
    """(lpips.LPIPS(net="vgg") with random VGG16 weights, the .npz our converter made of the same weights)."""
    return lpips_random_weights


def _images(batch, size, seed):
    """Pairs in [−1, 1] that differ by little and by much: smooth images, noise, a shifted copy."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(-1, 1, (batch, 3, 4, 4)).astype(np.float32)
    x = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=size, mode="bilinear").numpy()
    y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
    y[0] = np.roll(x[0], 3, axis=-1)
    y[-1] = rng.uniform(-1, 1, x.shape[1:])
    return x, y  # NCHW


def _torch_distance(model, x_nchw, y_nchw):
    with torch.no_grad():
        return model(torch.from_numpy(x_nchw), torch.from_numpy(y_nchw)).reshape(-1).numpy()


def _nhwc(a):
    return jnp.asarray(a.transpose(0, 2, 3, 1))


def test_equals_lpips_package_with_the_same_random_vgg_weights(reference):
    model, npz = reference
    params = lpips.load_params(npz)
    x, y = _images(batch=4, size=64, seed=0)
    expected = _torch_distance(model, x, y)
    got = np.asarray(lpips.lpips_distance(params, _nhwc(x), _nhwc(y)))
    assert np.all(expected > 1e-3) and np.ptp(expected) > 1e-2, expected  # distinct, non-trivial values
    np.testing.assert_allclose(got, expected, rtol=0, atol=PARITY_ATOL)
    # Identical images are at distance 0; swapping the arguments changes nothing.
    np.testing.assert_allclose(lpips.lpips_distance(params, _nhwc(x), _nhwc(x)), 0.0, atol=1e-7)
    np.testing.assert_allclose(lpips.lpips_distance(params, _nhwc(y), _nhwc(x)), got, rtol=1e-6)


def test_average_pooling_equals_the_package_with_avgpool_vgg(reference):
    """pooling="avg" is piq's replace_pooling=True (the CM release's LPIPS): the same net, AvgPool2d(2, 2)."""
    model, npz = reference
    avg_model = copy.deepcopy(model)
    for k in range(2, 6):
        block = getattr(avg_model.net, f"slice{k}")
        for name, layer in block.named_children():
            if isinstance(layer, torch.nn.MaxPool2d):
                setattr(block, name, torch.nn.AvgPool2d(2, 2))
    x, y = _images(batch=2, size=32, seed=1)
    expected = _torch_distance(avg_model, x, y)
    params = lpips.load_params(npz)
    got = np.asarray(lpips.lpips_distance(params, _nhwc(x), _nhwc(y), pooling="avg"))
    np.testing.assert_allclose(got, expected, rtol=0, atol=PARITY_ATOL)
    assert np.all(np.abs(got - lpips.lpips_distance(params, _nhwc(x), _nhwc(y))) > 1e-4)  # pooling matters


def test_training_distance_upsamples_small_images_to_224_as_the_cm_release(reference):
    """The registered `lpips` distance: 16×16 images → F.interpolate(size=224, mode="bilinear") → LPIPS."""
    model, npz = reference
    params = lpips.load_params(npz)
    x, y = _images(batch=2, size=16, seed=2)
    up = lambda a: torch.nn.functional.interpolate(torch.from_numpy(a), size=224, mode="bilinear").numpy()  # noqa: E731
    np.testing.assert_allclose(lpips.resize_bilinear(_nhwc(x), 224), _nhwc(up(x)), rtol=0, atol=1e-6)
    expected = _torch_distance(model, up(x), up(y))
    distance = distances.get("lpips", (16, 16, 3), params=params)
    got = np.asarray(jax.jit(distance)(_nhwc(x), _nhwc(y)))
    np.testing.assert_allclose(got, expected, rtol=0, atol=PARITY_ATOL)
    with pytest.raises(ValueError, match="needs its network weights"):
        distances.get("lpips", (16, 16, 3))


def test_missing_or_foreign_weights_name_the_converter(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m cmjax.metrics.lpips --convert"):
        lpips.load_params(str(tmp_path / "absent.npz"))
    np.savez(tmp_path / "other.npz", w=np.zeros(3))
    with pytest.raises(ValueError, match=r"python -m cmjax.metrics.lpips --convert"):
        lpips.load_params(str(tmp_path / "other.npz"))
    assert distances.load_params("pseudo_huber", "ignored") is None


# ----------------------------------------------------------------------------------------------
# The training distance inside the train step.

MLP = ml_collections.ConfigDict({"name": "mlp", "hidden_dim": 64, "num_layers": 2})


def _ict_lpips_config(tmp_path_factory, distance, weights, **overrides):
    config = digits.get_config("smoke")
    config.data.data_dir = str(tmp_path_factory.getbasetemp() / "tfds")
    config.model = MLP
    config.log_every = 1
    config.optim.warmup_steps = 0
    config.method.ict.distance = distance
    config.distance_weights = weights
    for key, value in overrides.items():
        config[key] = value
    return config


def _largest_constant(module_text):
    shapes = re.findall(r"stablehlo.constant dense[^\n]*?: tensor<([0-9x]*)[a-z][a-z0-9]*>", module_text)
    return max((int(np.prod([int(d) for d in shape.split("x") if d] or [1])) for shape in shapes), default=0)


def test_step_takes_the_lpips_weights_as_arguments_not_constants(reference, tmp_path_factory):
    """The 224-pixel `lpips` path lowered inside the real step on the 8-device mesh: every VGG16 weight is
    an argument of the program (replicated), none is baked in as a constant."""
    _, npz = reference
    config = _ict_lpips_config(tmp_path_factory, "lpips", npz)
    mesh = sharding.make_mesh(config.mesh)
    module = models.get(config.model)
    optimizer, lr_fn = optim.make_optimizer(config.optim, config.total_steps)
    abstract_state, state_shardings = workdir_lib.abstract_train_state(config, module, mesh)
    distance_params = train_step.distance_params_from_config(config, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    assert all(a.sharding == replicated for a in jax.tree.leaves(distance_params))
    step = jax.jit(train_step.make_train_step(config, module, methods.objective_from_config(config), optimizer, lr_fn),
                   in_shardings=(state_shardings, sharding.batch_sharding(mesh), None, replicated))
    batch = {"image": jax.ShapeDtypeStruct((16, 8, 8, 1), jnp.uint8),
             "label": jax.ShapeDtypeStruct((16,), jnp.int32)}
    text = step.lower(abstract_state, batch, None, distance_params).as_text()
    assert re.search(r"tensor<\d+x224x224x3xf32>", text), "no 224×224 VGG input in the program"
    signature = re.search(r"func.func public @main\((.*?)\) ->", text, re.S).group(1)
    num_args = len(re.findall(r"%arg\d+:", signature))
    assert num_args == len(jax.tree.leaves(abstract_state)) + len(jax.tree.leaves(distance_params)) + 1
    assert _largest_constant(text) < 4096


def test_lpips_distance_trains_inside_the_sharded_step(reference, tmp_path_factory):
    """iCT with an LPIPS distance through `train_and_evaluate` on 8 devices: weights read from
    config.distance_weights, loss finite, gradients non-zero. The images are resized to 32 instead of
    224 (a distance registered here through the same registry) to fit the CPU budget."""
    _, npz = reference
    distances.register("lpips_at32", lpips.make_training_distance(resize=32), load_params=lpips.load_params)
    # 4 steps over the digits recipe's 4 iCT stages (K′ = 1; fewer steps than stages would make K′ = 0).
    config = _ict_lpips_config(tmp_path_factory, "lpips_at32", npz, total_steps=4, ckpt_every=4)
    workdir = str(tmp_path_factory.mktemp("lpips_run"))
    final = train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 and r["grad_norm"] > 0 for r in rows), rows
    assert final["skipped_steps"] == 0 and final["train_step_compilations"] == 1

    config.distance_weights = str(tmp_path_factory.mktemp("empty") / "missing.npz")
    with pytest.raises(FileNotFoundError, match=r"--convert"):
        train.train_and_evaluate(config, str(tmp_path_factory.mktemp("lpips_missing")))

"""Zero-shot editing (cmjax/editing.py, CM paper App. D / Algorithm 4): the orthogonal maps, the kept part exact at
every step, the tasks' contracts, sharded batches, and `--mode=edit` through the CLI (user errors exit 2)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from test_main import _one_line_error, run_cli

from cmjax import editing, evaluate, methods, sampling, sharding
from cmjax import parameterization as pz
from cmjax.models import toy
from configs import digits

SMOKE = "configs/digits.py:smoke"
SIGMAS = [80.0, 4.0, 0.5]


def _raw_network(params, x_in, time_input, *unused):
    """A fixed nonlinear 'network' of any image shape: the edits' contracts hold for every f."""
    return 1.5 * jnp.tanh(3.0 * x_in + 0.01 * x_in[:, ::-1]) + 0.001 * time_input[:, None, None, None]


def _denoise(x, sigma):
    return pz.consistency_denoise(_raw_network, None, x, sigma)


def _images(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape), jnp.float32)


def _perturbed(params):
    """Untrained MLP weights with every leaf moved: its output layer starts at zero, which would leave F = 0."""
    leaves, tree = jax.tree.flatten(params)
    return jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(jax.random.key(i), p.shape)
                                     for i, p in enumerate(leaves)])


def test_colour_basis_is_the_papers_orthonormal_luma_basis():
    q = editing.colour_basis()
    np.testing.assert_allclose(q.T @ q, np.eye(3), atol=1e-12)
    luma = np.asarray(editing.LUMA)
    np.testing.assert_allclose(q[:, 0], luma / np.linalg.norm(luma), atol=1e-12)
    # openai's construction (QR of the identity with the luma direction first, sign fixed), to 4 decimals: the Q
    # of App. D's colorization. Its other two columns span the chroma plane in a fixed orientation.
    openai = [[0.4471, -0.8204, 0.3564], [0.8781, 0.4785, 0.0], [0.1705, -0.3129, -0.9343]]
    np.testing.assert_allclose(q, openai, atol=6e-5)


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_patch_basis_is_orthonormal_with_the_patch_mean_first(factor):
    q = editing.patch_basis(factor)
    np.testing.assert_allclose(q.T @ q, np.eye(factor**2), atol=1e-12)
    np.testing.assert_allclose(q[:, 0], np.full(factor**2, 1.0 / factor), atol=1e-12)


OPERATORS = {
    "inpaint": lambda: editing.inpainting((_images((2, 6, 6, 1), 5) > 0).astype(jnp.float32)),
    "colorize": editing.colorization,
    "superres2": lambda: editing.super_resolution(2),
    "superres3": lambda: editing.super_resolution(3),
}


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_the_kept_part_and_its_orthogonal_complement_reconstruct_the_input(name):
    op, x = OPERATORS[name](), _images((2, 6, 6, 3))
    kept, generated = editing.known_part(op, x), editing.generated_part(op, x)
    np.testing.assert_allclose(kept + generated, x, atol=1e-6)
    np.testing.assert_allclose(editing.inverse(op, editing.transform(op, x)), x, atol=1e-6)
    assert abs(float(jnp.vdot(kept, generated))) < 1e-4  # orthogonal, so neither holds the other's part
    assert float(jnp.abs(kept).max()) > 0.1 and float(jnp.abs(generated).max()) > 0.1
    np.testing.assert_allclose(editing.known_part(op, kept), kept, atol=1e-6)  # a projection
    if name == "inpaint":  # A = I: exact to the bit
        assert np.array_equal(np.asarray(kept + generated), np.asarray(x))


def test_the_kept_part_is_the_luma_and_the_patch_means():
    x = _images((2, 6, 6, 3))
    grey = editing.known_part(editing.colorization(), x)
    luma = np.asarray(editing.LUMA) / np.linalg.norm(editing.LUMA)
    np.testing.assert_allclose(grey, (np.asarray(x) @ luma)[..., None] * luma, atol=1e-6)
    means = editing.known_part(editing.super_resolution(3), x)
    np.testing.assert_allclose(means, editing.upsample(editing.downsample(x, 3), 3), atol=1e-6)


def test_inpainting_keeps_the_known_pixels_bit_for_bit_at_every_step():
    y = _images((3, 8, 8, 1))
    mask = jnp.zeros((3, 8, 8, 1)).at[:, 4:].set(1.0)  # bottom half generated
    x, steps = editing.edit(_denoise, editing.inpainting(mask), y, jax.random.key(0), SIGMAS, trajectory=True)
    assert steps.shape == (len(SIGMAS), 3, 8, 8, 1)
    for iterate in steps:
        assert np.array_equal(np.asarray(iterate[:, :4]), np.asarray(y[:, :4]))
    assert float(jnp.abs(x[:, 4:] - y[:, 4:]).max()) > 0.1  # the rest is generated, not copied
    np.testing.assert_array_equal(editing.inpaint(_denoise, y, mask, jax.random.key(0), SIGMAS), x)


def test_colorization_keeps_the_luma_at_every_step_on_a_three_channel_network():
    module = toy.MLP(hidden_dim=32, num_layers=1, time_embed_dim=16)
    params = _perturbed(module.init(jax.random.key(1), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)))["params"])
    fn = evaluate.consistency_fn_for(module, params, None, sigma_data=0.5, sigma_min=0.002)
    grey = _images((2, 8, 8, 1))
    x, steps = editing.edit(fn, editing.colorization(), editing.grey_to_rgb(grey), jax.random.key(0), SIGMAS,
                            trajectory=True)
    luma_of = lambda images: editing.transform(editing.colorization(), images)[..., 0]  # noqa: E731
    want = luma_of(editing.grey_to_rgb(grey))
    for iterate in steps:
        np.testing.assert_allclose(luma_of(iterate), want, atol=2e-6)
    chroma = editing.transform(editing.colorization(), x)[..., 1:]
    assert float(jnp.abs(chroma).max()) > 0.05  # colour was generated
    np.testing.assert_array_equal(editing.colorize(fn, grey, jax.random.key(0), SIGMAS), x)


@pytest.mark.parametrize("factor,size", [(2, 8), (3, 9), (4, 8)])
def test_super_resolution_keeps_the_low_res_patch_means_at_every_step(factor, size):
    low = _images((2, size // factor, size // factor, 3))
    op = editing.super_resolution(factor)
    x, steps = editing.edit(_denoise, op, editing.upsample(low, factor), jax.random.key(0), SIGMAS, trajectory=True)
    for iterate in steps:
        np.testing.assert_allclose(editing.downsample(iterate, factor), low, atol=2e-6)
    assert float(jnp.abs(x - editing.upsample(low, factor)).max()) > 0.05  # detail was generated
    np.testing.assert_allclose(editing.downsample(editing.super_resolve(_denoise, low, factor, jax.random.key(0),
                                                                        SIGMAS), factor), low, atol=2e-6)


def test_a_factor_that_does_not_divide_the_image_is_a_user_error():
    with pytest.raises(editing.errors.ConfigError, match="3×3 patches"):
        editing.transform(editing.super_resolution(3), jnp.zeros((1, 8, 8, 1)))


def test_interpolation_endpoints_are_the_two_one_step_samples():
    z1, z2 = _images((2, 8, 8, 1), 1), _images((2, 8, 8, 1), 2)
    frames = editing.interpolate(_denoise, z1, z2, [0.0, 0.3, 1.0], sigma_max=80.0)
    one_step = lambda z: jnp.clip(_denoise(80.0 * z, jnp.full((2,), 80.0)), -1, 1)  # noqa: E731
    np.testing.assert_allclose(frames[0], one_step(z1), atol=1e-5)
    np.testing.assert_allclose(frames[2], one_step(z2), atol=1e-5)
    assert float(jnp.abs(frames[1] - frames[0]).max()) > 1e-3


def test_slerp_is_spherical():
    e1, e2 = jnp.zeros((1, 4)).at[0, 0].set(3.0), jnp.zeros((1, 4)).at[0, 1].set(3.0)
    for alpha in (0.0, 0.25, 0.5, 1.0):  # orthogonal inputs of equal norm: a quarter circle, norm kept
        want = 3.0 * jnp.zeros((1, 4)).at[0, 0].set(np.cos(alpha * np.pi / 2)).at[0, 1].set(np.sin(alpha * np.pi / 2))
        np.testing.assert_allclose(editing.slerp(e1, e2, alpha), want, atol=1e-6)
    np.testing.assert_allclose(editing.slerp(e1, e1, 0.3), e1, atol=1e-6)  # equal noises: no 0/0


def test_denoising_is_one_evaluation_and_stroke_generation_starts_from_the_strokes():
    x = _images((2, 8, 8, 1))
    np.testing.assert_allclose(editing.denoise(_denoise, x, 0.002, clip=False), x, atol=1e-6)  # f(x, σmin) = x
    np.testing.assert_allclose(editing.denoise(_denoise, x, 0.7), jnp.clip(_denoise(x, jnp.full((2,), 0.7)), -1, 1))
    key = jax.random.key(3)
    out = editing.stroke_guided(_denoise, x, key, [1.0])
    z = jax.random.normal(jax.random.fold_in(key, 0), x.shape)
    np.testing.assert_allclose(out, jnp.clip(_denoise(x + 1.0 * z, jnp.full((2,), 1.0)), -1, 1), atol=1e-6)


def test_an_images_edit_depends_on_its_own_key_only():
    y = _images((3, 8, 8, 1))
    mask = jnp.zeros((3, 8, 8, 1)).at[:, :, :3].set(1.0)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(3))
    batch = editing.inpaint(_denoise, y, mask, keys, SIGMAS)
    alone = editing.inpaint(_denoise, y[1:2], mask[1:2], keys[1:2], SIGMAS)
    np.testing.assert_allclose(batch[1:2], alone, atol=1e-6)


def test_edit_batch_spreads_images_over_every_device_and_matches_one_device():
    module = toy.MLP(hidden_dim=32, num_layers=1, time_embed_dim=16)
    params = _perturbed(module.init(jax.random.key(1), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))["params"])
    sampler = {"parameterization": "consistency", "sigma_min": 0.002, "sigma_max": 10.0, "sigma_data": 0.5,
               "renoise": "cm", "clip": True}
    images = np.asarray(_images((5, 8, 8, 1)))  # 5 images over 8 devices: padded, then cut
    mask = np.zeros((5, 8, 8, 1), np.float32)
    mask[:, 4:] = 1.0
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    assert sharding.batch_device_count(mesh) == jax.device_count() == 8
    key = jax.random.key(7)
    out = editing.edit_batch(module, params, "inpaint", {"image": images, "mask": mask}, None, key, mesh=mesh,
                             sampler=sampler, image_shape=(8, 8, 1), sigmas=[10.0, 1.0])
    fn = evaluate.consistency_fn_for(module, params, None, sigma_data=0.5, sigma_min=0.002)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(5))
    want = editing.inpaint(fn, images, mask, keys, [10.0, 1.0], sigma_min=0.002, sigma_max=10.0)
    np.testing.assert_allclose(out["result"], want, atol=1e-5)
    assert np.array_equal(out["result"][:, :4], images[:, :4])

    # A class-conditional network: the labels reach it (another label, another edit).
    conditional = toy.MLP(hidden_dim=32, num_layers=1, time_embed_dim=16, num_classes=10)
    params = conditional.init(jax.random.key(1), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)),
                              jnp.zeros((1,), jnp.int32))["params"]
    params = _perturbed(params)
    results = [editing.edit_batch(conditional, params, "inpaint", {"image": images, "mask": mask}, labels, key,
                                  mesh=mesh, sampler=sampler, image_shape=(8, 8, 1), sigmas=[10.0, 1.0])["result"]
               for labels in (np.arange(5), np.arange(5) + 5)]
    assert float(np.abs(results[0] - results[1]).max()) > 1e-3


@pytest.mark.parametrize("method", ["ect", "sct"])
def test_ect_and_scm_runs_are_edited_as_they_sample(method):
    """ECT (boundary scalings at σ_min 0.003, x + τ·z renoising, unclipped) and sCM's TrigFlow f go through the same
    program: the kept pixels stay exact and the edit is finite."""
    config = digits.get_config("smoke")
    methods.select(config, method)
    sampler = editing.consistency_sampler(config)
    module = toy.MLP(hidden_dim=16, num_layers=1, time_embed_dim=16)
    params = _perturbed(module.init(jax.random.key(1), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))["params"])
    images = np.asarray(_images((8, 8, 8, 1)))
    mask = np.zeros_like(images)
    mask[:, :, 4:] = 1.0
    sigmas = editing.ts_sigmas([0, 20, 39], 40, sampler)
    out = editing.edit_batch(module, params, "inpaint", {"image": images, "mask": mask}, None, jax.random.key(0),
                             mesh=sharding.make_mesh({"data": -1, "fsdp": 1}), sampler=sampler,
                             image_shape=(8, 8, 1), sigmas=sigmas)["result"]
    assert np.all(np.isfinite(out)) and np.array_equal(out[:, :, :4], images[:, :, :4])
    assert sampler["renoise"] == ("plain" if method == "ect" else "cm")


@pytest.mark.parametrize("method", ["cd", "ct", "ict", "ect", "sct", "scd", "edm"])
def test_every_consistency_method_can_be_edited_and_edm_cannot(method):
    config = digits.get_config("smoke")
    methods.select(config, method)
    if method == "edm":
        with pytest.raises(editing.errors.ConfigError, match="needs a consistency model"):
            editing.consistency_sampler(config)
    else:
        assert editing.consistency_sampler(config)["parameterization"] in editing.CONSISTENCY_KINDS


def test_ts_end_at_sigma_min_and_follow_openais_grid():
    sampler = {"sigma_min": 0.002, "sigma_max": 80.0}
    np.testing.assert_allclose(editing.ts_sigmas([0, 22, 39], 40, sampler),
                               sampling.openai_ts_sigmas([0, 22, 39], 40)[:2], rtol=1e-6)
    with pytest.raises(editing.errors.ConfigError, match="end at 39"):
        editing.ts_sigmas([0, 22], 40, sampler)


# ---------------------------------------------------------------------------------------------------------------
# The command line.


def _png(path, pixels):
    Image.fromarray(np.asarray(pixels, np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit_inputs")
    rng = np.random.default_rng(0)
    mask = np.zeros((8, 8), np.uint8)
    mask[4:] = 255
    return {"a": _png(root / "a.png", rng.integers(0, 256, (8, 8))),
            "b": _png(root / "b.png", rng.integers(0, 256, (8, 8))),
            "low": _png(root / "low.png", rng.integers(0, 256, (4, 4))),
            "big": _png(root / "big.png", rng.integers(0, 256, (10, 10))),
            "mask": _png(root / "mask.png", mask), "small_mask": _png(root / "small_mask.png", mask[:4, :4]),
            "text": str(root / "notes.png")}


def test_edit_user_errors_print_one_line_and_exit_2(capfd, tmp_path, pngs):
    with open(pngs["text"], "w") as f:
        f.write("not an image")
    base = [f"--config={SMOKE}", f"--workdir={tmp_path / 'none'}", "--mode=edit"]
    inpaint = base + ["--edit_task=inpaint", f"--edit_images={pngs['a']}"]
    cases = {
        "no task": (base, ["needs --edit_task", "inpaint"]),
        "unknown task": (base + ["--edit_task=deblur"], ["deblur", "colorize"]),
        "missing file": (base + ["--edit_task=inpaint", f"--edit_images={tmp_path / 'gone.png'}",
                                 f"--edit_masks={pngs['mask']}"], ["gone.png"]),
        "not an image": (base + ["--edit_task=stroke", f"--edit_images={pngs['text']}"], ["notes.png", "PNG"]),
        "wrong image size": (base + ["--edit_task=stroke", f"--edit_images={pngs['big']}"], ["10×10", "8×8"]),
        "mask of another size": (inpaint + [f"--edit_masks={pngs['small_mask']}"], ["small_mask.png", "4×4"]),
        "no mask": (inpaint, ["--edit_masks"]),
        "option of another task": (inpaint + [f"--edit_masks={pngs['mask']}", "--edit_factor=2"],
                                   ["does not take --edit_factor"]),
        "colour on a grey model": (base + ["--edit_task=colorize", f"--edit_images={pngs['a']}"], ["3-channel"]),
        "bad ts": (inpaint + [f"--edit_masks={pngs['mask']}", "--edit_ts=0,20"], ["end at 39"]),
        "labels for an unconditional model": (inpaint + [f"--edit_masks={pngs['mask']}", "--edit_labels=3"],
                                              ["unconditional"]),
        "denoise without sigma": (base + ["--edit_task=denoise", f"--edit_images={pngs['a']}"], ["--edit_sigma"]),
        "edm is not a consistency model": (inpaint + [f"--edit_masks={pngs['mask']}", "--config.method.name=edm"],
                                           ["'edm'", "consistency"]),
        "edit flag in another mode": ([f"--config={SMOKE}", f"--workdir={tmp_path / 'none'}", "--mode=sample",
                                       "--edit_task=inpaint"], ["does not take --edit_task"]),
    }
    for name, (args, fragments) in cases.items():
        code, _, err = run_cli(capfd, *args)
        _one_line_error(code, err, *fragments)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step iCT smoke run on digits, trained through the CLI."""
    root = tmp_path_factory.mktemp("edit_run")
    return {"workdir": str(root / "run"), "data_dir": str(tmp_path_factory.getbasetemp() / "tfds")}


def _train_once(capfd, trained):
    if not trained.get("done"):
        code, _, err = run_cli(capfd, f"--config={SMOKE}", f"--workdir={trained['workdir']}",
                               "--config.total_steps=2", "--config.ckpt_every=2", "--config.log_every=1",
                               "--config.ema_rates=(0.999,)", f"--config.data.data_dir={trained['data_dir']}")
        assert code == 0, err[-3000:]
        trained["done"] = True
    return trained["workdir"]


def test_edit_mode_writes_results_and_a_grid(capfd, tmp_path, pngs, trained):
    workdir = _train_once(capfd, trained)
    out = tmp_path / "inpaint"
    code, stdout, err = run_cli(capfd, f"--config={SMOKE}", f"--workdir={workdir}", "--mode=edit",
                                "--edit_task=inpaint", f"--edit_images={pngs['a']},{pngs['b']}",
                                f"--edit_masks={pngs['mask']}", "--edit_ts=0,20,39", f"--output={out}")
    assert code == 0, err[-3000:]
    assert "inpaint_grid.png" in stdout
    for i, name in enumerate(("a", "b")):
        result = np.asarray(Image.open(out / f"inpaint_{i:03d}.png"))
        given = np.asarray(Image.open(pngs[name]))
        assert np.array_equal(result[:4], given[:4])  # the kept half, pixel for pixel
    grid = Image.open(out / "inpaint_grid.png")
    assert grid.size == (8 * (3 * 9 + 1), 8 * (2 * 9 + 1))  # 2 rows × (input | mask | result), 8 px + 1 pad, ×8

    out = tmp_path / "superres"
    code, _, err = run_cli(capfd, f"--config={SMOKE}", f"--workdir={workdir}", "--mode=edit", "--edit_task=superres",
                           f"--edit_images={pngs['low']}", "--edit_ts=0,39", f"--output={out}")
    assert code == 0, err[-3000:]
    result = np.asarray(Image.open(out / "superres_000.png"), np.float64)
    low = np.asarray(Image.open(pngs["low"]), np.float64)
    means = result.reshape(4, 2, 4, 2).mean(axis=(1, 3))
    assert np.abs(means - low).max() <= 0.5 + 1e-9  # the patch means survive the uint8 rounding of each pixel


@pytest.mark.slow
@pytest.mark.parametrize("task,extra", [
    ("denoise", ["--edit_sigma=0.3", "--edit_add_noise"]),
    ("stroke", ["--edit_ts=20,39"]),
    ("interpolate", ["--num_samples=2", "--edit_frames=5"]),
])
def test_every_other_task_runs_from_the_command_line(capfd, tmp_path, pngs, trained, task, extra):
    workdir = _train_once(capfd, trained)
    images = [] if task == "interpolate" else [f"--edit_images={pngs['a']},{pngs['b']}"]
    code, _, err = run_cli(capfd, f"--config={SMOKE}", f"--workdir={workdir}", "--mode=edit", f"--edit_task={task}",
                           *images, *extra, f"--output={tmp_path}")
    assert code == 0, err[-3000:]
    files = sorted(os.listdir(tmp_path))
    assert f"{task}_grid.png" in files
    assert len([f for f in files if f.startswith(f"{task}_0")]) == (10 if task == "interpolate" else 2)


@pytest.mark.slow
def test_a_trained_digits_model_inpaints_and_super_resolves_the_true_class():
    """bench/editing.py's proof, reduced: configs/digits.py's iCT MLP trained 3,000 steps (`demo_2d.train`, one
    device), the 360 test digits, App. D's 40-point schedule (bench/results/editing_digits_cpu.md: the full
    model reaches 66.7 % and 78.5 % there)."""
    import importlib
    import sys

    from cmjax.metrics import digits as digits_metric

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    bench = importlib.import_module("editing")  # bench/editing.py

    model = bench.train_digit_vectors(3000, colour=False, log=lambda *_: None)
    fn = model.denoiser()
    images, labels = bench.digits_split("test")
    classifier = digits_metric.train_classifier()
    sigmas = editing.ts_sigmas(range(40), 40, {"sigma_min": 0.002, "sigma_max": 10.0})
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(len(images)))
    run = jax.jit(lambda task, *args: task(fn, *args, keys, sigmas, sigma_max=10.0), static_argnums=0)
    inpainted = np.asarray(run(editing.inpaint, images, bench.bottom_half_mask(len(images))))
    low = editing.downsample(images, 2)
    upsampled = np.asarray(run(lambda f, lo, k, s, **kw: editing.super_resolve(f, lo, 2, k, s, **kw), low))
    bilinear = np.clip(np.asarray(jax.image.resize(low, images.shape, "bilinear")), -1, 1)
    rate = lambda x: bench.class_rate(classifier, x, labels)  # noqa: E731
    assert np.array_equal(inpainted[:, :4], images[:, :4])
    assert rate(inpainted) > 0.3, rate(inpainted)  # chance 10 %; the top half alone 15.6 %
    assert rate(upsampled) > rate(bilinear) + 0.03, (rate(upsampled), rate(bilinear))

"""Latent datasets (cmjax/data/latents.py): --mode=encode writes what a direct VAE encode gives, resumes per chunk
to the same dataset, the pipeline reads it on the 8-device mesh and resumes exactly, user errors are one line.

The VAE is `vae.SMALL_CONFIG` for one channel (8×8 digits → 4×4×4 latents) with random weights: these tests check
the mechanics, not what a trained VAE makes of the digits. The slow tier encodes with 2 processes × 4 devices and
runs the whole latent path (encode, train, sample, evaluate) through the command line.
"""
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from cmjax import errors, sharding
from cmjax.data import digits, latents, pipeline
from cmjax.interop import vae as interop_vae
from cmjax.models import vae

sys.path.insert(0, os.path.dirname(__file__))
from test_main import _one_line_error, run_cli  # noqa: E402

SPLIT, CHUNK, BATCH = "train[:40]", 16, 8  # chunks [0, 16), [16, 32), [32, 40)
WORKER = os.path.join(os.path.dirname(__file__), "_latents_worker.py")


def small_vae(seed=0):
    module = vae.AutoencoderKL(**{**vae.SMALL_CONFIG, **latents.DIGITS_VAE})
    return module, vae.init_params(module, jax.random.key(seed), (8, 8))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("latents_tfds"))
    digits.prepare(path)
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A digits TFDS dir and two random-weight small VAE folders (seed 0 encodes, seed 1 is "another VAE")."""
    path = tmp_path_factory.mktemp("latents")
    digits.prepare(str(path / "tfds"))
    for seed in (0, 1):
        module, params = small_vae(seed)
        interop_vae.save_autoencoder(str(path / f"vae{seed}"), params, module)
    return path


def encode_config(root, data_dir=None, **data):
    from configs import digits as digits_config

    config = digits_config.get_config("smoke")
    config.data.name = "digits_latents"
    config.data.data_dir = data_dir or str(root / "tfds")
    config.data.split = SPLIT
    config.data.random_flip = True
    config.latent.vae = str(root / "vae0") if root else ""
    config.latent.chunk_size = CHUNK
    config.latent.batch_size = BATCH
    for key, value in data.items():
        config.data[key] = value
    return config


def records(path):
    """Every record of a latent dataset directory, keyed by source row."""
    builder = tfds.builder_from_directory(path)
    out = {}
    for ex in tfds.as_numpy(builder.as_dataset(split="train", shuffle_files=False)):
        out[int(ex["id"])] = ex
    return out


@pytest.fixture(scope="module")
def encoded(root):
    """The dataset of one uninterrupted encode (in its own data dir)."""
    data_dir = str(root / "tfds_whole")
    shutil.copytree(str(root / "tfds" / "sklearn_digits"), os.path.join(data_dir, "sklearn_digits"))
    result = latents.encode_dataset(encode_config(root, data_dir), str(root / "encode_whole"))
    return {"data_dir": data_dir, **result}


def test_latent_datasets_have_the_latent_shape_and_their_pixel_source():
    from cmjax import models
    from cmjax.data import datasets
    from configs import imagenet256_meanflow

    config = encode_config(None, data_dir="/nowhere")
    assert models.image_shape(config) == (4, 4, 4)  # 8×8 digits through the 2-level small VAE
    assert models.image_shape(imagenet256_meanflow.get_config("b2")) == (32, 32, 4)  # 256² through the SD-VAE (f8)
    pixels = datasets.get_spec("imagenet256")
    assert pixels.image_shape == (256, 256, 3) and pixels.center_crop
    assert [datasets.pixel_source(n) for n in ("imagenet256_latents", "digits_latents", "digits")] == [
        "imagenet256", "digits", "digits"]
    assert datasets.get_spec("digits_latents").dtype == "float32" and datasets.get_spec("digits").dtype == "uint8"
    digits_vae = vae.AutoencoderKL(**{**vae.SMALL_CONFIG, **latents.DIGITS_VAE})
    assert vae.latent_shape(digits_vae, (8, 8)) == datasets.get_spec("digits_latents").image_shape


def test_chunks_cover_the_split_and_splits_resolve_to_rows():
    assert latents.chunk_plan({"num_examples": 40, "chunk_size": 16}) == [(0, 16), (16, 32), (32, 40)]
    assert latents._source_rows("train", 1437) == ("train", 0, 1437)
    assert latents._source_rows("train[:40]", 1437) == ("train", 0, 40)
    assert latents._source_rows("train[10%:20%]", 1437) == ("train", 144, 287)
    with pytest.raises(errors.ConfigError, match="not a union"):
        latents._source_rows("train[:5]+train[9:]", 1437)
    recorded = {"folder": "/a", "fingerprint": "0" * 64}
    latents.check_vae({"folder": "/b", "fingerprint": "0" * 64}, recorded, "x")  # same weights, moved: fine
    with pytest.raises(errors.ConfigError, match="is not the VAE that encoded dataset 'x'"):
        latents.check_vae({"folder": "/a", "fingerprint": "1" * 64}, recorded, "x")


def test_user_errors_print_one_line_and_exit_2(data_dir, capfd, tmp_path):
    base = ["--config=configs/digits.py:smoke", "--config.data.name=digits_latents", f"--config.data.split={SPLIT}",
            "--config.total_steps=2", "--config.ckpt_every=2", f"--config.data.data_dir={data_dir}"]
    cases = {
        "encode without a VAE": (["--mode=encode"], ["--mode=encode needs a VAE", "config.latent.vae"]),
        "encode a pixel dataset": (["--mode=encode", "--config.data.name=digits", f"--config.latent.vae={tmp_path}"],
                                   ["pixel dataset", "digits_latents"]),
        "train before encoding": ([], ["'digits_latents'", "not prepared", "--mode=encode"]),
        "not a VAE folder": (["--mode=encode", f"--config.latent.vae={tmp_path}"], ["config.json"]),
        "a flag encode does not take": (["--mode=encode", "--step=3"], ["--mode=encode does not take --step"]),
        "editing a latent run": (["--mode=edit", "--edit_task=interpolate"], ["--mode=edit works on pixels"]),
    }
    for name, (args, fragments) in cases.items():
        code, _, err = run_cli(capfd, *base, f"--workdir={tmp_path / name.replace(' ', '_')}", *args)
        _one_line_error(code, err, *fragments)


# ---------------------------------------------------------------------------------------------------------------
# Slow tier: these compile the small VAE (its convolutions take tens of seconds to compile on 2 CPU cores).


@pytest.mark.slow
def test_encode_writes_the_posterior_of_every_image_and_its_mirror(root, encoded):
    assert encoded["examples"] == 40 and encoded["chunks_encoded"] == 3
    stored = records(encoded["dataset"])
    assert sorted(stored) == list(range(40))
    builder = digits.SklearnDigits(data_dir=str(root / "tfds"))
    source = list(tfds.as_numpy(builder.as_dataset(split=SPLIT, shuffle_files=False)))
    images = np.stack([ex["image"] for ex in source])
    module, params = small_vae(0)
    x = images.astype(np.float32) / 127.5 - 1
    for variant, pixels in enumerate([x, x[:, :, ::-1]]):  # variant 1: the latent of the mirrored *image*
        mean, logvar = module.apply({"params": params}, pixels, method=module.encode)
        np.testing.assert_allclose(np.stack([stored[i]["mean"][variant] for i in range(40)]), mean, atol=1e-5)
        np.testing.assert_allclose(np.stack([stored[i]["std"][variant] for i in range(40)]),
                                   np.exp(0.5 * logvar), rtol=1e-5)
    assert not np.allclose(stored[0]["mean"][1], stored[0]["mean"][0][:, ::-1])  # not a mirrored latent
    assert [int(stored[i]["label"]) for i in range(40)] == [int(ex["label"]) for ex in source]
    metadata = tfds.builder_from_directory(encoded["dataset"]).info.metadata
    assert metadata["vae"]["fingerprint"] == latents.fingerprint(module, params)
    assert metadata["vae"]["scaling_factor"] == pytest.approx(0.18215)
    assert (metadata["source"], metadata["source_split"], metadata["flips"]) == ("digits", SPLIT, True)


@pytest.mark.slow
def test_a_killed_encode_resumes_at_its_first_missing_chunk_and_writes_the_same_dataset(root, encoded, monkeypatch):
    config, workdir = encode_config(root), str(root / "encode_killed")
    saved = []
    real_save = latents._save_npz

    def save_then_die(path, arrays):
        if saved:
            raise KeyboardInterrupt("killed")  # after the first chunk file
        saved.append(path)
        real_save(path, arrays)

    monkeypatch.setattr(latents, "_save_npz", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        latents.encode_dataset(config, workdir)
    monkeypatch.setattr(latents, "_save_npz", real_save)
    assert sorted(os.listdir(os.path.join(workdir, latents.CHUNK_DIR))) == ["chunk_0000000000_0000000016.npz"]
    assert pipeline.find_latent_dir(pipeline.datasets.get_spec("digits_latents"), config.data.data_dir) is None
    resumed = latents.encode_dataset(config, workdir)
    assert resumed["chunks_encoded"] == 2  # chunk one was not encoded again
    whole, again = records(encoded["dataset"]), records(resumed["dataset"])
    assert sorted(whole) == sorted(again)
    for i in whole:
        for key in ("mean", "std", "label"):
            np.testing.assert_array_equal(whole[i][key], again[i][key])
    # Another VAE may neither continue these chunks nor overwrite the dataset.
    other = encode_config(root)
    other.latent.vae = str(root / "vae1")
    with pytest.raises(errors.ConfigError, match="is not the VAE that encoded"):
        latents.encode_dataset(other, workdir)


@pytest.mark.slow
def test_the_pipeline_reads_latents_on_the_mesh_and_resumes_exactly(root, encoded):
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    data = dict(name="digits_latents", split="train", data_dir=encoded["data_dir"], shuffle_buffer=0,
                random_flip=True, cache=False, prefetch=2, ram_budget_gb=1)
    it = pipeline.build(data, mesh, global_batch_size=16, seed=3)
    first = [jax.device_get(next(it)) for _ in range(3)]  # 48 rows: past the 40-example epoch
    batch = next(pipeline.build(data, mesh, global_batch_size=16, seed=3))
    assert batch["image"].dtype == jnp.float32 and batch["image"].shape == (16, 4, 4, 4)
    assert batch["image"].sharding == sharding.batch_sharding(mesh)
    assert it.abstract_batch()["image"].dtype == jnp.float32
    # Row i (file order, shuffle_buffer 0) = scale·(mean + std·ε) of variant coin(i), ε = N(0, I) keyed by i.
    builder = tfds.builder_from_directory(encoded["dataset"])
    stored = list(tfds.as_numpy(builder.as_dataset(split="train", shuffle_files=False)))
    seeds = pipeline.process_seeds(3, 0)
    rows = np.concatenate([b["image"] for b in first])
    for i in range(48):
        coin = tf.random.stateless_uniform([], seed=[seeds["flip"], i]).numpy()
        variant = int(coin < 0.5)
        noise = tf.random.stateless_normal((4, 4, 4), seed=[seeds["noise"], i]).numpy()
        ex = stored[i % 40]
        np.testing.assert_allclose(rows[i], 0.18215 * (ex["mean"][variant] + ex["std"][variant] * noise), atol=1e-6)
    assert {int(tf.random.stateless_uniform([], seed=[seeds["flip"], i]).numpy() < 0.5) for i in range(48)} == {0, 1}
    # Exact resume (shuffled, flipped): a fresh iterator given the state continues bit for bit.
    data = dict(data, shuffle_buffer=32)
    it = pipeline.build(data, mesh, global_batch_size=16, seed=3)
    for _ in range(4):
        next(it)
    state = it.get_state()
    expected = [jax.device_get(next(it)) for _ in range(3)]
    fresh = pipeline.build(data, mesh, global_batch_size=16, seed=3)
    fresh.set_state(state)
    for want in expected:
        got = jax.device_get(next(fresh))
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])
    # A dataset encoded without flips cannot serve random_flip=True.
    with pytest.raises(errors.ConfigError, match="encoded without flips"):
        unflipped = encode_config(root, str(root / "tfds_noflip"), random_flip=False)
        shutil.copytree(str(root / "tfds" / "sklearn_digits"), str(root / "tfds_noflip" / "sklearn_digits"))
        latents.encode_dataset(unflipped, str(root / "encode_noflip"))
        pipeline.build(dict(data, data_dir=str(root / "tfds_noflip")), mesh, global_batch_size=16, seed=3)


@pytest.mark.slow
def test_training_with_another_vae_than_the_dataset_s_is_one_line(root, encoded, capfd, tmp_path):
    code, _, err = run_cli(capfd, "--config=configs/digits.py:smoke", "--config.data.name=digits_latents",
                           f"--config.data.data_dir={encoded['data_dir']}", "--config.total_steps=2",
                           f"--config.latent.vae={root}/vae1", f"--workdir={tmp_path / 'w'}")
    _one_line_error(code, err, "is not the VAE that encoded", "config.latent.vae=''")


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_encode_the_same_dataset_as_one(root, encoded, tmp_path):
    data_dir = str(tmp_path / "tfds")
    shutil.copytree(str(root / "tfds" / "sklearn_digits"), os.path.join(data_dir, "sklearn_digits"))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.getcwd(),
               XLA_FLAGS=" ".join([f for f in os.environ.get("XLA_FLAGS", "").split()
                                   if "device_count" not in f] + ["--xla_force_host_platform_device_count=4"]))
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, WORKER, str(port), str(i), data_dir, str(root / "vae0"),
                               str(tmp_path / "encode"), SPLIT, str(CHUNK), str(BATCH)], env=env)
             for i in range(2)]
    for proc in procs:
        assert proc.wait(timeout=600) == 0
    two = records(pipeline.find_latent_dir(pipeline.datasets.get_spec("digits_latents"), data_dir))
    one = records(encoded["dataset"])
    assert sorted(one) == sorted(two)
    for i in one:
        np.testing.assert_allclose(two[i]["mean"], one[i]["mean"], atol=1e-6)
        np.testing.assert_allclose(two[i]["std"], one[i]["std"], rtol=1e-6)
        assert int(two[i]["label"]) == int(one[i]["label"])


@pytest.mark.slow
def test_the_latent_path_end_to_end_from_the_command_line(root, encoded, capfd, tmp_path):
    """Encode (the `encoded` fixture), train iCT on the latents, sample and evaluate with decoding, as a user runs
    them. The VAE has random weights: this proves every stage runs and hands the next one the right thing (latents
    in training, 8×8×1 pixels out of sampling and into the digit classifier), not sample quality."""
    workdir = str(tmp_path / "run")
    common = ["--config=configs/digits.py:smoke", "--config.data.name=digits_latents",
              f"--config.data.data_dir={encoded['data_dir']}", f"--workdir={workdir}"]
    code, out, err = run_cli(capfd, *common, "--config.total_steps=4", "--config.ckpt_every=4", "--config.log_every=2")
    assert code == 0, err[-3000:]
    assert "Final metrics" in out
    grids = sorted(os.listdir(os.path.join(workdir, "samples")))
    assert any(name.endswith(".png") for name in grids)
    code, out, err = run_cli(capfd, *common, "--mode=sample", "--num_samples=8")
    assert code == 0, err[-3000:]
    with np.load(os.path.join(workdir, "samples", "ema0.999_1step_00000004.npz")) as samples:
        assert samples["images"].shape == (8, 8, 8, 1) and samples["images"].dtype == np.uint8  # pixels, decoded
        assert samples["images"].std() > 0
    code, out, err = run_cli(capfd, *common, "--mode=eval", "--num_samples=128", "--config.eval.batch_size=64")
    assert code == 0, err[-3000:]
    import json

    metrics = json.load(open(os.path.join(workdir, "eval", "metrics_00000004.json")))
    assert metrics["metric"] == "digits" and 0 <= metrics["ema0.999_1step/confident_fraction"] <= 1

"""Input pipeline: global arrays, labels, flips, coverage, resume across a restart, 2-process disjointness."""
import collections
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from cmjax import sharding
from cmjax.data import digits, pipeline

HELPER = os.path.join(os.path.dirname(__file__), "_multiprocess_data.py")
sys.path.insert(0, os.path.dirname(__file__))
import _multiprocess_data as helper  # noqa: E402

BASE = dict(name="digits", split="train", shuffle_buffer=256, random_flip=False, cache=False, prefetch=2,
            ram_budget_gb=1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    digits.prepare(path)
    return path


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh({"data": -1, "fsdp": 1})


def split_examples(data_dir, split):
    """(image bytes, label) pairs of a digits split, read straight from TFDS."""
    builder = digits.SklearnDigits(data_dir=data_dir)
    return [(ex["image"].tobytes(), int(ex["label"])) for ex in tfds.as_numpy(builder.as_dataset(split=split))]


def subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    return env


def test_global_batch_shape_dtype_and_sharding(data_dir, mesh):
    it = pipeline.build(dict(BASE, data_dir=data_dir), mesh, global_batch_size=64, seed=0)
    batch = next(it)
    assert batch["image"].shape == (64, 8, 8, 1) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (64,) and batch["label"].dtype == np.int32
    assert batch["image"].sharding == sharding.batch_sharding(mesh)
    # Each of the 8 devices holds its own 8 rows.
    assert sorted(s.data.shape for s in batch["image"].addressable_shards) == [(8, 8, 8, 1)] * 8
    assert (it.image_shape, it.num_classes, it.per_process_batch_size) == ((8, 8, 1), 10, 64)
    abstract = it.abstract_batch()  # what the train step compiles against
    for key in ("image", "label"):
        assert (abstract[key].shape, abstract[key].dtype) == (batch[key].shape, batch[key].dtype)
        assert abstract[key].sharding == batch[key].sharding


def test_one_epoch_is_a_permutation_of_the_split_with_matching_labels(data_dir, mesh):
    # 1437 train examples; 22 batches of 64 = 1408 rows, all from epoch one (shuffle happens before repeat).
    it = pipeline.build(dict(BASE, data_dir=data_dir), mesh, global_batch_size=64, seed=1)
    seen = collections.Counter()
    for _ in range(22):
        batch = jax.device_get(next(it))
        seen.update(zip((im.tobytes() for im in batch["image"]), batch["label"].tolist()))
    available = collections.Counter(split_examples(data_dir, "train"))
    assert sum(seen.values()) == 1408
    assert not seen - available  # every (image, label) pair is a real example, drawn at most as often as it exists
    first = jax.device_get(next(pipeline.build(dict(BASE, data_dir=data_dir), mesh, global_batch_size=64, seed=1)))
    other = jax.device_get(next(pipeline.build(dict(BASE, data_dir=data_dir), mesh, global_batch_size=64, seed=2)))
    assert not np.array_equal(first["label"], other["label"])  # the seed changes the order


def test_cache_changes_speed_not_the_stream(data_dir, mesh):
    def first_batches(cache, state=None):
        it = pipeline.build(dict(BASE, data_dir=data_dir, cache=cache, random_flip=True), mesh,
                            global_batch_size=64, seed=5)
        if state is not None:
            it.set_state(state)
        return it, [jax.device_get(next(it)) for _ in range(3)]

    _, plain = first_batches(False)
    cached_it, cached = first_batches(True)
    for a, b in zip(plain, cached):
        np.testing.assert_array_equal(a["image"], b["image"])
    state = cached_it.get_state()  # the partly filled cache travels in the state; resume is exact too
    expected = [jax.device_get(next(cached_it)) for _ in range(2)]
    _, resumed = first_batches(True, state)
    for a, b in zip(expected, resumed[:2]):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_to_model_range():
    x = jax.numpy.array([0, 1, 127, 128, 255], dtype=jax.numpy.uint8)
    y = pipeline.to_model_range(x)
    assert y.dtype == jax.numpy.float32
    np.testing.assert_allclose(y, [-1.0, -253 / 255, -1 / 255, 1 / 255, 1.0], atol=1e-6)


def test_indivisible_global_batch_names_both_numbers(data_dir, mesh):
    with pytest.raises(ValueError, match=r"Global batch size 60 does not divide evenly over the 8 devices"):
        pipeline.build(dict(BASE, data_dir=data_dir), mesh, global_batch_size=60, seed=0)


def halves_dataset(num_examples):
    """A fake cifar10 whose images are white on the left half and black on the right: a flip is visible."""

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
        del self, split, decoders, read_config, shuffle_files
        image = np.zeros((32, 32, 3), np.uint8)
        image[:, :16] = 255
        ds = tf.data.Dataset.from_tensor_slices(np.arange(num_examples) % 10)
        return ds.map(lambda label: {"id": tf.strings.as_string(label), "image": tf.io.encode_png(image),
                                     "label": label})

    return as_dataset


@pytest.mark.parametrize("random_flip", [True, False])
def test_flip_statistics(mesh, random_flip):
    config = dict(BASE, name="cifar10", random_flip=random_flip, shuffle_buffer=16)
    with tfds.testing.mock_data(as_dataset_fn=halves_dataset(512)):
        it = pipeline.build(config, mesh, global_batch_size=128, seed=0)
        images = np.concatenate([jax.device_get(next(it))["image"] for _ in range(16)])
    flipped = images[:, 0, 0, 0] == 0
    # Every image is either intact or exactly mirrored.
    assert np.all(images[:, :, :16] == np.where(flipped, 0, 255)[:, None, None, None])
    assert np.all(images[:, :, 16:] == np.where(flipped, 255, 0)[:, None, None, None])
    if random_flip:
        assert 0.45 < flipped.mean() < 0.55, flipped.mean()  # 2048 coins: 3 sigma is 0.033
        assert 0.4 < flipped[:128].mean() < 0.6  # and not all in one stretch of the stream
    else:
        assert not flipped.any()


def test_state_resume_is_bit_exact_after_a_process_restart(data_dir, mesh, tmp_path):
    config = dict(helper.RESUME_CONFIG, data_dir=data_dir)
    it = pipeline.build(config, mesh, global_batch_size=helper.RESUME_BATCH, seed=helper.RESUME_SEED)
    for _ in range(30):  # past one epoch (1437 / 64 = 22.5 batches): reshuffle and flips of epoch two
        next(it)
    state_file = pipeline.save_state(it, str(tmp_path / "ckpt"))
    assert os.path.basename(state_file) == "data_process_00000-of-00001.tfdata"
    expected = [jax.device_get(next(it)) for _ in range(5)]
    out = tmp_path / "resumed.npz"
    subprocess.run([sys.executable, HELPER, "resume", data_dir, str(tmp_path / "ckpt"), "5", str(out)],
                   check=True, timeout=180, env=subprocess_env(), capture_output=True)
    resumed = np.load(out)
    np.testing.assert_array_equal(resumed["image"], np.stack([b["image"] for b in expected]))
    np.testing.assert_array_equal(resumed["label"], np.stack([b["label"] for b in expected]))
    # A fresh stream differs from the resumed one, so the check above is not vacuous.
    fresh = jax.device_get(next(pipeline.build(config, mesh, global_batch_size=64, seed=helper.RESUME_SEED)))
    assert not np.array_equal(fresh["image"], expected[0]["image"])


def test_state_of_another_stream_is_refused(data_dir, mesh, tmp_path):
    state = pipeline.build(dict(BASE, data_dir=data_dir), mesh, global_batch_size=64, seed=0).get_state()
    other = pipeline.build(dict(BASE, data_dir=data_dir), mesh, global_batch_size=128, seed=0)
    with pytest.raises(ValueError, match="global_batch_size"):
        other.set_state(state)
    with pytest.raises(FileNotFoundError, match="process 0 of 1"):
        pipeline.restore_state(other, str(tmp_path))


def test_config_defaults_and_unknown_keys(data_dir, mesh):
    config = pipeline.default_config()
    assert sorted(config.keys()) == sorted(pipeline.DEFAULTS) and config.data_dir is None
    config.data_dir = data_dir  # the placeholder takes a path
    assert pipeline.resolve_config(config)["shuffle_buffer"] == 10_000
    with pytest.raises(ValueError, match=r"Unknown config.data key\(s\) \['batch_size'\]"):
        pipeline.build(dict(BASE, data_dir=data_dir, batch_size=8), mesh, global_batch_size=64, seed=0)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_read_disjoint_halves_that_cover_the_split(data_dir, tmp_path):
    steps = 3  # 96 examples / 32 per global batch: exactly one epoch
    port = free_port()
    env = subprocess_env()
    env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=4"
                        " --xla_cpu_collective_call_terminate_timeout_seconds=600"
                        " --xla_cpu_collective_timeout_seconds=600")
    outs = [tmp_path / f"process{i}.npz" for i in range(2)]
    procs = [
        subprocess.Popen([sys.executable, HELPER, "distributed", data_dir, str(port), str(i), str(steps), str(out)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for i, out in enumerate(outs)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=240)[0].decode(errors="replace"))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-3000:]
    results = [np.load(out) for out in outs]
    for r in results:
        assert (int(r["process_count"]), int(r["device_count"]), int(r["local_device_count"])) == (2, 8, 4)
        assert r["global_shape"].tolist() == [[32, 8, 8, 1]] * steps
        assert r["image"].shape == (steps, 16, 8, 8, 1)  # per-process batch = 32 / 2
    # The global array holds both processes' rows: its sum is the sum of the two local parts.
    local_sums = [r["image"].astype(np.int64).sum(axis=(1, 2, 3, 4)) for r in results]
    np.testing.assert_array_equal(results[0]["global_sum"], local_sums[0] + local_sums[1])
    np.testing.assert_array_equal(results[1]["global_sum"], results[0]["global_sum"])
    # Each process read its own half; together exactly the split, nothing twice.
    parts = [collections.Counter(zip((im.tobytes() for im in r["image"].reshape(-1, 8, 8, 1)),
                                     r["label"].reshape(-1).tolist())) for r in results]
    assert parts[0] + parts[1] == collections.Counter(split_examples(data_dir, "train[:96]"))
    for i, part in enumerate(parts):
        own = collections.Counter(split_examples(
            data_dir, tfds.split_for_jax_process("train[:96]", process_index=i, process_count=2)))
        assert part == own

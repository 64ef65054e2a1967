"""Dataset specs: ADM center crop, mock CIFAR-10 / ImageNet-64 / LSUN through the pipeline, missing data."""
import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from cmjax import sharding
from cmjax.data import datasets, pipeline

MOCK = dict(split="train", shuffle_buffer=8, random_flip=True, cache=False, prefetch=1, ram_budget_gb=1)


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh({"data": -1, "fsdp": 1})


def test_unknown_dataset_lists_the_known_ones():
    known = (r"\['cifar10', 'color_digits32', 'digits', 'digits_latents', 'imagenet256', 'imagenet256_latents', "
             r"'imagenet64'")
    with pytest.raises(ValueError, match=r"'imagenet'.*" + known):
        datasets.get_spec("imagenet")


def test_center_crop_takes_the_middle_of_the_long_side():
    # Short side already equals the size: no resampling, only the crop. Columns carry their index.
    image = np.broadcast_to(np.arange(192, dtype=np.uint8)[None, :, None], (64, 192, 3))
    out = datasets.center_crop_arr(np.ascontiguousarray(image), 64)
    np.testing.assert_array_equal(out, image[:, 64:128])
    tall = np.ascontiguousarray(np.transpose(image, (1, 0, 2)))
    np.testing.assert_array_equal(datasets.center_crop_arr(tall, 64), tall[64:128])


def test_center_crop_halves_with_box_before_the_bicubic_step():
    # While the short side is >= 2*size the image is BOX-halved first, so f(x) == f(box_half(x)) there;
    # a single bicubic resize from full size gives different pixels.
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)
    half = np.asarray(Image.fromarray(image).resize((210, 150), resample=Image.BOX))
    out = datasets.center_crop_arr(image, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, datasets.center_crop_arr(half, 64))
    direct = np.asarray(Image.fromarray(image).resize((90, 64), resample=Image.BICUBIC))[:, 13:77]
    assert not np.array_equal(out, direct)


def test_center_crop_in_tf_matches_numpy_and_keeps_gray_channels():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)
    out = datasets.center_crop_tf(tf.constant(image), (32, 32, 3)).numpy()
    np.testing.assert_array_equal(out, datasets.center_crop_arr(image, 32))
    gray = rng.integers(0, 256, (40, 50, 1), dtype=np.uint8)
    assert datasets.center_crop_arr(gray, 16).shape == (16, 16, 1)


def test_mock_cifar10_batches(mesh):
    with tfds.testing.mock_data(num_examples=64):
        it = pipeline.build(dict(MOCK, name="cifar10"), mesh, global_batch_size=32, seed=0)
        batch = jax.device_get(next(it))
    assert batch["image"].shape == (32, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and 0 <= batch["label"].min() and batch["label"].max() < 10
    assert len(np.unique(batch["label"])) > 1  # labels are passed through, not zeroed
    assert (it.image_shape, it.num_classes) == ((32, 32, 3), 10)


def assorted_jpegs(num_examples):
    """A fake imagenet2012 of JPEGs in assorted shapes, from tensors (TFDS's mock generator can't checkpoint)."""
    rng = np.random.default_rng(0)
    encoded = [
        tf.io.encode_jpeg(rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8)).numpy()
        for h, w in rng.integers(40, 300, (num_examples, 2))
    ]

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
        del self, split, decoders, read_config, shuffle_files
        return tf.data.Dataset.from_tensor_slices(
            {"file_name": [b"x"] * num_examples, "image": encoded, "label": np.arange(num_examples) * 7 % 1000}
        )

    return as_dataset


def test_mock_imagenet64_center_crops_any_size_and_resumes(mesh):
    # Images of assorted shapes each leave the pipeline 64x64 with their label.
    config = dict(MOCK, name="imagenet64")
    with tfds.testing.mock_data(as_dataset_fn=assorted_jpegs(48)):
        it = pipeline.build(config, mesh, global_batch_size=16, seed=0)
        first = jax.device_get(next(it))
        state = it.get_state()
        expected = [jax.device_get(next(it)) for _ in range(3)]
        resumed = pipeline.build(config, mesh, global_batch_size=16, seed=0)
        resumed.set_state(state)
        got = [jax.device_get(next(resumed)) for _ in range(3)]
    assert first["image"].shape == (16, 64, 64, 3)
    assert first["label"].max() < 1000 and len(np.unique(first["label"])) > 1
    assert (it.image_shape, it.num_classes) == ((64, 64, 3), 1000)
    for e, g in zip(expected, got):  # the PIL step inside tf.data does not break the iterator state
        np.testing.assert_array_equal(e["image"], g["image"])
        np.testing.assert_array_equal(e["label"], g["label"])


def test_mock_lsun_is_unconditional(mesh):
    with tfds.testing.mock_data(num_examples=16):
        it = pipeline.build(dict(MOCK, name="lsun_cat"), mesh, global_batch_size=8, seed=0)
        batch = jax.device_get(next(it))
    assert batch["image"].shape == (8, 256, 256, 3)
    assert it.num_classes == 0 and not batch["label"].any()


def test_missing_dataset_says_how_to_prepare_it(mesh, tmp_path):
    with pytest.raises(datasets.DatasetNotPreparedError) as info:
        pipeline.build(dict(MOCK, name="cifar10", data_dir=str(tmp_path)), mesh, global_batch_size=8, seed=0)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert f"`tfds build cifar10 --data_dir={tmp_path}`" in message
    assert "TFDS_DATA_DIR" in message and "gs://" in message
    assert info.value.__suppress_context__  # one message, not TFDS's AssertionError chained under it
    with pytest.raises(datasets.DatasetNotPreparedError, match="--manual_dir"):
        pipeline.build(dict(MOCK, name="imagenet64", data_dir=str(tmp_path)), mesh, global_batch_size=8, seed=0)

"""The embedded `sklearn_digits` TFDS dataset: offline build, splits, pixel scaling, labels."""
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from cmjax.data import digits


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    return digits.prepare(str(tmp_path_factory.mktemp("tfds")))


def read(builder, split):
    return list(tfds.as_numpy(builder.as_dataset(split=split)))


def test_splits_are_a_fixed_80_20_partition(builder):
    assert builder.info.splits["train"].num_examples == 1437
    assert builder.info.splits["test"].num_examples == 360
    train_ids = {int(ex["id"]) for ex in read(builder, "train")}
    test_ids = {int(ex["id"]) for ex in read(builder, "test")}
    assert not train_ids & test_ids and train_ids | test_ids == set(range(1797))
    assert train_ids == set(digits.split_indices()["train"].tolist())  # the same split on every build
    assert train_ids != set(range(1437))  # shuffled, not the first rows (which run writer by writer)


def test_pixels_scaled_to_uint8_and_labels_kept(builder):
    reference = load_digits()
    examples = read(builder, "test")
    for ex in examples:
        row = int(ex["id"])
        assert ex["image"].shape == (8, 8, 1) and ex["image"].dtype == np.uint8
        np.testing.assert_array_equal(ex["image"][..., 0], np.round(reference.images[row] * 255 / 16))
        assert ex["label"] == reference.target[row]
    stacked = np.stack([ex["image"] for ex in examples])
    assert stacked.max() == 255 and stacked.min() == 0  # 16 -> 255, the full uint8 range


def test_prepare_reuses_a_built_dataset(builder):
    info_file = os.path.join(builder.data_dir, "dataset_info.json")
    before = os.stat(info_file).st_mtime_ns
    again = digits.prepare(os.path.dirname(os.path.dirname(builder.data_dir)))
    assert again.data_dir == builder.data_dir
    assert os.stat(info_file).st_mtime_ns == before
    # The builder is registered, so plain TFDS calls find it by name.
    assert tfds.builder("sklearn_digits", data_dir=again.data_dir_root).info.splits["train"].num_examples == 1437


@pytest.fixture(scope="module")
def color_builder(builder):
    return digits.prepare(os.path.dirname(os.path.dirname(builder.data_dir)), "color_digits32")


def test_color_digits_are_the_digits_upsampled_and_coloured_per_image(builder, color_builder):
    grey = {int(ex["id"]): ex for ex in read(builder, "test")}
    colour = {int(ex["id"]): ex for ex in read(color_builder, "test")}
    assert color_builder.info.splits["train"].num_examples == 1437 and set(colour) == set(grey)  # same split
    for row in list(colour)[:40]:
        image, source = colour[row]["image"], grey[row]["image"]
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert colour[row]["label"] == grey[row]["label"]
        foreground, background = digits.image_colors(row)
        assert abs(float((foreground - background) @ digits.LUMA)) >= digits.MIN_LUMA_CONTRAST
        # Where the source pixel is blank (and its neighbours too) the image is the background colour.
        blank = np.argwhere(np.lib.stride_tricks.sliding_window_view(
            np.pad(source[..., 0], 1), (3, 3)).max(axis=(2, 3)) == 0)
        for y, x in blank[:3]:
            np.testing.assert_allclose(image[4 * y + 1, 4 * x + 1] / 255.0, background, atol=1 / 255)
    # Deterministic from the seed, different per image.
    assert np.array_equal(digits.image_colors(5)[0], digits.image_colors(5)[0])
    assert not np.allclose(digits.image_colors(5)[0], digits.image_colors(6)[0])
    # Rebuilding elsewhere gives the same pixels.
    again = digits.color_digits_uint8(np.stack([grey[r]["image"] for r in list(grey)[:5]]), np.array(list(grey)[:5]))
    np.testing.assert_array_equal(again, np.stack([colour[r]["image"] for r in list(grey)[:5]]))


def test_to_digit_input_recovers_the_grey_digit_whatever_the_colours(builder):
    examples = read(builder, "test")[:64]
    grey = np.stack([ex["image"] for ex in examples])
    rows = np.array([int(ex["id"]) for ex in examples])
    target = grey.astype(np.float32) / 127.5 - 1.0
    for seed in (digits.COLOR_SEED, 7):  # other colours, same digits
        mapped = digits.to_digit_input(digits.color_digits_uint8(grey, rows, seed) / 127.5 - 1.0)
        assert mapped.shape == (64, 8, 8, 1) and mapped.min() >= -1.0 and mapped.max() <= 1.0
        corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(mapped, target)]
        assert np.median(corr) > 0.9
    with pytest.raises(ValueError, match=r"\[N, 32, 32, 3\]"):
        digits.to_digit_input(target)

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

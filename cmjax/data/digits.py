"""`sklearn_digits`: the embedded default dataset, a TFDS builder over scikit-learn's handwritten digits.

scikit-learn ships 1,797 grayscale 8x8 digits (UCI optdigits test set, values 0..16, 10 classes) inside the
package, so this dataset builds offline in about a second, through the same TFDS path that CIFAR-10 takes.

Image size: native 8x8x1. A UNet with two downsamplings (8 -> 4 -> 2) still has spatial extent at the
bottom, and 8x8 keeps the demo at a few steps per second on 2 CPU cores; padding or resizing to 16x16 would
cost four times the compute per step and add no information. Values are mapped 0..16 -> 0..255 with
round(v * 255 / 16), so 16 is exactly white and the pipeline treats digits like any other uint8 image.

Splits: a permutation of the 1,797 examples drawn with a fixed seed (numpy PCG64, seed 0); the first 1,437
(80 %) are `train`, the other 360 are `test`. Every example keeps `id`, its row in `load_digits()`.
"""
from __future__ import annotations

import contextlib
import fcntl
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 10
NUM_TRAIN = 1437
SPLIT_SEED = 0


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (images uint8 [1797, 8, 8, 1] in 0..255, labels int64 [1797])."""
    from sklearn.datasets import load_digits  # imported here: only building needs scikit-learn

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int64)


def split_indices() -> dict[str, np.ndarray]:
    """Row indices of each split: a seeded permutation, first 80 % train."""
    order = np.random.default_rng(SPLIT_SEED).permutation(1797)
    return {"train": np.sort(order[:NUM_TRAIN]), "test": np.sort(order[NUM_TRAIN:])}


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits as a TFDS dataset (train 1,437 / test 360)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "8x8x1 uint8 images (0..16 scaled to 0..255), labels, source row ids."}
    # TFDS finds a builder's source through `importlib_resources` when it lives outside tensorflow_datasets;
    # naming the file keeps the build working where that backport is not installed.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=IMAGE_SHAPE),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                    "id": np.int32,
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download: the data ships with scikit-learn
        return {name: self._generate_examples(rows) for name, rows in split_indices().items()}

    def _generate_examples(self, rows: np.ndarray):
        images, labels = digits_uint8()
        for row in rows:
            yield int(row), {"image": images[row], "label": labels[row], "id": np.int32(row)}


@contextlib.contextmanager
def _file_lock(path: str):
    """An exclusive lock, so processes sharing a data dir build the dataset once."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare(data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """The `sklearn_digits` builder, written into `data_dir` (TFDS default if None) on first use, offline."""
    builder = SklearnDigits(data_dir=data_dir)
    if builder.is_prepared():
        return builder
    root = str(builder.data_dir_root)
    # A local lock serialises processes on one host; remote dirs (gs://) rely on TFDS's atomic rename.
    lock = _file_lock(os.path.join(root, ".sklearn_digits.lock")) if "://" not in root else contextlib.nullcontext()
    with lock:
        builder = SklearnDigits(data_dir=data_dir)  # another process may have built it meanwhile
        if not builder.is_prepared():
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False)
            )
    return SklearnDigits(data_dir=data_dir)

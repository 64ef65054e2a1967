"""`sklearn_digits`: the embedded default dataset, a TFDS builder over scikit-learn's handwritten digits.

scikit-learn ships 1,797 grayscale 8x8 digits (UCI optdigits test set, values 0..16, 10 classes) inside the
package, so this dataset builds offline in about a second, through the same TFDS path that CIFAR-10 takes.

Image size: native 8x8x1. A UNet with two downsamplings (8 -> 4 -> 2) still has spatial extent at the
bottom, and 8x8 keeps the demo at a few steps per second on 2 CPU cores; padding or resizing to 16x16 would
cost four times the compute per step and add no information. Values are mapped 0..16 -> 0..255 with
round(v * 255 / 16), so 16 is exactly white and the pipeline treats digits like any other uint8 image.

Splits: a permutation of the 1,797 examples drawn with a fixed seed (numpy PCG64, seed 0); the first 1,437
(80 %) are `train`, the other 360 are `test`. Every example keeps `id`, its row in `load_digits()`.

`color_digits32`: the same digits at CIFAR-10's shape (32x32x3), where convolutional networks belong. Each
digit is upsampled 8 -> 32 bilinearly (PIL, on the 0..255 image) and coloured: ink fraction a = up/255, pixel
= (1 - a)·background + a·foreground, with one foreground and one background RGB colour per image, drawn
uniformly in [0, 1]^3 from numpy PCG64 seeded by (COLOR_SEED, source row) and redrawn until their lumas
(Rec. 601: 0.299 R + 0.587 G + 0.114 B) differ by at least MIN_LUMA_CONTRAST, so the digit stays legible.
Deterministic: the same row always gets the same colours; same splits, labels and `id` as `sklearn_digits`.
`to_digit_input` maps such images back to the 8x8 grey input of the digit classifier (cmjax/metrics/digits.py).
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
COLOR_IMAGE_SHAPE = (32, 32, 3)
COLOR_SEED = 32
MIN_LUMA_CONTRAST = 0.4
LUMA = np.array([0.299, 0.587, 0.114])  # Rec. 601


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


def image_colors(row: int, seed: int = COLOR_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(foreground, background) RGB in [0, 1] of source row `row`: uniform draws, redrawn until their lumas
    differ by at least MIN_LUMA_CONTRAST."""
    rng = np.random.default_rng([seed, row])
    while True:
        foreground, background = rng.uniform(size=(2, 3))
        if abs(float((foreground - background) @ LUMA)) >= MIN_LUMA_CONTRAST:
            return foreground, background


def color_digits_uint8(images: np.ndarray, rows: np.ndarray, seed: int = COLOR_SEED) -> np.ndarray:
    """8x8x1 uint8 digits [N, 8, 8, 1] of source rows `rows` -> coloured 32x32x3 uint8 [N, 32, 32, 3]."""
    from PIL import Image

    size = COLOR_IMAGE_SHAPE[:2]
    out = np.empty((len(images), *COLOR_IMAGE_SHAPE), np.uint8)
    for i, (image, row) in enumerate(zip(images, rows)):
        up = np.asarray(Image.fromarray(image[..., 0]).resize(size[::-1], resample=Image.BILINEAR), np.float64)
        ink = (up / 255.0)[..., None]
        foreground, background = image_colors(int(row), seed)
        out[i] = np.round(255.0 * ((1.0 - ink) * background + ink * foreground))
    return out


def to_digit_input(images_bhwc) -> np.ndarray:
    """Colour digits [N, 32, 32, 3] in [-1, 1] -> the digit classifier's input [N, 8, 8, 1] in [-1, 1].

    Luma (Rec. 601), 4x4 mean pooling to 8x8, then per image the ink fraction |l − b| / max|l − b|, where b is
    the median luma of the 28 border pixels (the digits' border is background in 1,780 of the 1,797 sources),
    scaled to [-1, 1]: background −1, the strongest ink +1, whichever of the two colours is the lighter. The
    ink's own scale (0..16 in the source) is lost where no pixel is full ink; the classifier's one-pixel-shift
    augmentation does not cover that, so the floor of the mapped real images is measured, not assumed."""
    images = np.asarray(images_bhwc, np.float64)
    if images.ndim != 4 or images.shape[1:] != COLOR_IMAGE_SHAPE:
        raise ValueError(f"to_digit_input takes colour digits [N, 32, 32, 3]; got shape {images.shape}.")
    luma = images @ LUMA
    pooled = luma.reshape(len(images), 8, 4, 8, 4).mean(axis=(2, 4))
    border = np.concatenate([pooled[:, 0], pooled[:, -1], pooled[:, 1:-1, 0], pooled[:, 1:-1, -1]], axis=1)
    distance = np.abs(pooled - np.median(border, axis=1)[:, None, None])
    ink = distance / np.maximum(distance.max(axis=(1, 2), keepdims=True), 1e-6)
    return (2.0 * ink - 1.0).astype(np.float32)[..., None]


def _digits_info(builder: tfds.core.GeneratorBasedBuilder, image_shape) -> tfds.core.DatasetInfo:
    """The features both embedded digits builders share: image of `image_shape`, 10-class label, source row id."""
    return builder.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=image_shape),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                "id": np.int32,
            }
        ),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
    )


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits as a TFDS dataset (train 1,437 / test 360)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "8x8x1 uint8 images (0..16 scaled to 0..255), labels, source row ids."}
    # TFDS finds a builder's source through `importlib_resources` when it lives outside tensorflow_datasets;
    # naming the file keeps the build working where that backport is not installed.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return _digits_info(self, IMAGE_SHAPE)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download: the data ships with scikit-learn
        return {name: self._generate_examples(rows) for name, rows in split_indices().items()}

    def _generate_examples(self, rows: np.ndarray):
        images, labels = digits_uint8()
        for row in rows:
            yield int(row), {"image": images[row], "label": labels[row], "id": np.int32(row)}


class ColorDigits32(tfds.core.GeneratorBasedBuilder):
    """The digits upsampled to 32x32 and coloured per image (module docstring); train 1,437 / test 360."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "32x32x3 uint8: bilinear 8->32, per-image foreground/background colours (seed 32)."}
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return _digits_info(self, COLOR_IMAGE_SHAPE)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download: the data ships with scikit-learn
        return {name: self._generate_examples(rows) for name, rows in split_indices().items()}

    def _generate_examples(self, rows: np.ndarray):
        images, labels = digits_uint8()
        coloured = color_digits_uint8(images[rows], rows)
        for row, image in zip(rows, coloured):
            yield int(row), {"image": image, "label": labels[row], "id": np.int32(row)}


BUILDERS = {"sklearn_digits": SklearnDigits, "color_digits32": ColorDigits32}


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


def prepare(data_dir: str | None = None, name: str = "sklearn_digits") -> tfds.core.DatasetBuilder:
    """The embedded builder `name` (`BUILDERS`), written into `data_dir` (TFDS default if None) on first use,
    offline."""
    cls = BUILDERS[name]
    builder = cls(data_dir=data_dir)
    if builder.is_prepared():
        return builder
    root = str(builder.data_dir_root)
    # A local lock serialises processes on one host; remote dirs (gs://) rely on TFDS's atomic rename.
    lock = _file_lock(os.path.join(root, f".{name}.lock")) if "://" not in root else contextlib.nullcontext()
    with lock:
        builder = cls(data_dir=data_dir)  # another process may have built it meanwhile
        if not builder.is_prepared():
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False)
            )
    return cls(data_dir=data_dir)

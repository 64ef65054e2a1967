"""Dataset specs: which TFDS dataset `config.data.name` reads, its image shape, classes and preprocessing.

Names and sources:
- `digits`: the embedded default, `sklearn_digits` (cmjax/data/digits.py), 8x8x1, 10 classes, built on first use.
- `color_digits32`: the same digits at CIFAR-10's shape, 32x32x3, upsampled and coloured per image
  (cmjax/data/digits.py), 10 classes, built on first use; for the CIFAR-10 recipes' convolutional networks.
- `cifar10`: TFDS `cifar10`, 32x32x3, 10 classes (CM trains it unconditionally; the label is still passed).
- `imagenet64`: TFDS `imagenet2012` (ILSVRC2012 train JPEGs, manual download), reduced to 64x64 with ADM's
  `center_crop_arr`, 1000 classes. This is the data of the CM paper: openai's `cm` release trains ImageNet-64
  through ADM's `image_datasets.load_data(image_size=64, class_cond=True)`, which applies `center_crop_arr`
  to the full-size training images, and its FID reference batch (`VIRTUAL_imagenet64_labeled.npz`) was made
  the same way. `downsampled_imagenet/64x64` (van den Oord et al. 2016) has no labels, so it cannot train the
  class-conditional models; `imagenet_resized/64x64` (Chrabaszcz et al. 2017) box-resizes the whole image
  without keeping the aspect ratio, a different image distribution from the one the published FIDs measure.
  Labels agree with ADM's: TFDS numbers the classes by sorted WordNet id, as ADM sorts its class folders.
- `imagenet256`: TFDS `imagenet2012` reduced to 256x256 with `center_crop_arr`, 1000 classes: the pixels that
  the ImageNet-256 latent recipes encode. DiT (facebookresearch/DiT train.py, `center_crop_arr` then a random
  flip) and ADM's 256x256 models prepare ImageNet-256 this way; the MeanFlow release encodes the same crop
  (Gsunshine/meanflow utils/data_util.py `create_imagenet_dataloader`: `center_crop_arr(pil_image, image_size)`,
  normalised to [-1, 1]).
- `lsun_bedroom`, `lsun_cat`: TFDS `lsun/bedroom`, `lsun/cat`, 256x256x3 by `center_crop_arr`, unconditional.

Latent datasets (`source` set; cmjax/data/latents.py): the VAE posterior of every image of a pixel dataset,
encoded once by `--mode=encode` into the TFDS dataset `latent_images/<name>`; `image_shape` is the latent's.
- `imagenet256_latents`: `imagenet256` through the SD-VAE (8x downsampling, 4 channels): 32x32x4.
- `digits_latents`: `digits` through the small embedded autoencoder (`latents.DIGITS_VAE`, 2x): 4x4x4.

Unconditional datasets report `num_classes == 0` and batches carry label 0, so every batch has one structure.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import tensorflow as tf
from PIL import Image

from cmjax import errors

# The embedded datasets (built offline on first use) and the digit classifier scores their samples.
EMBEDDED = ("digits", "color_digits32")


class DatasetNotPreparedError(errors.UserError, ValueError):
    """The TFDS dataset is not in the data dir; the message says how to prepare it."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How one `config.data.name` is read: TFDS source, output shape, classes, preprocessing."""

    name: str
    tfds_name: str
    image_shape: tuple[int, int, int]
    num_classes: int  # 0: unconditional, labels are all 0
    # Full-size images to crop and resize with ADM's center_crop_arr; otherwise stored at `image_shape`.
    center_crop: bool = False
    # Shuffle the encoded bytes and decode afterwards, where encoded images are much smaller than decoded
    # ones (so the shuffle buffer, and the checkpointed iterator state, stay small).
    shuffle_encoded: bool = False
    # How to prepare the data, for the not-prepared message.
    prepare_hint: str = ""
    # Latent datasets: the pixel dataset (a name in SPECS) whose images were encoded; "" for pixel datasets.
    source: str = ""

    @property
    def is_latent(self) -> bool:
        return bool(self.source)

    @property
    def dtype(self) -> str:
        """The dtype of the pipeline's "image" rows: uint8 pixels, or float32 (scaled) latents."""
        return "float32" if self.is_latent else "uint8"


ENCODE_HINT = ("A latent dataset is written once by --mode=encode from its pixel dataset with the VAE "
               "config.latent.vae (docs/latents.md): `python -m cmjax.main --config=CONFIG --mode=encode "
               "--workdir=ENCODE_WORKDIR --config.latent.vae=VAE_FOLDER --config.data.data_dir=DATA_DIR`.")

SPECS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec(
            "digits",
            "sklearn_digits",
            (8, 8, 1),
            10,
            prepare_hint="It is built automatically from scikit-learn on first use; is scikit-learn installed?",
        ),
        DatasetSpec(
            "color_digits32",
            "color_digits32",
            (32, 32, 3),
            10,
            prepare_hint="It is built automatically from scikit-learn on first use; is scikit-learn installed?",
        ),
        DatasetSpec(
            "cifar10",
            "cifar10",
            (32, 32, 3),
            10,
            prepare_hint="Prepare it (downloads 163 MB): `tfds build cifar10 --data_dir=DATA_DIR`.",
        ),
        DatasetSpec(
            "imagenet64",
            "imagenet2012",
            (64, 64, 3),
            1000,
            center_crop=True,
            prepare_hint=(
                "ImageNet needs a manual download: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
                "MANUAL_DIR, then `tfds build imagenet2012 --manual_dir=MANUAL_DIR --data_dir=DATA_DIR`."
            ),
        ),
        DatasetSpec(
            "imagenet256",
            "imagenet2012",
            (256, 256, 3),
            1000,
            center_crop=True,
            shuffle_encoded=True,
            prepare_hint=(
                "ImageNet needs a manual download: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
                "MANUAL_DIR, then `tfds build imagenet2012 --manual_dir=MANUAL_DIR --data_dir=DATA_DIR`."
            ),
        ),
        DatasetSpec(
            "lsun_bedroom",
            "lsun/bedroom",
            (256, 256, 3),
            0,
            center_crop=True,
            shuffle_encoded=True,
            prepare_hint="Prepare it (downloads ~43 GB): `tfds build lsun/bedroom --data_dir=DATA_DIR`.",
        ),
        DatasetSpec(
            "lsun_cat",
            "lsun/cat",
            (256, 256, 3),
            0,
            center_crop=True,
            shuffle_encoded=True,
            prepare_hint="Prepare it (downloads ~42 GB): `tfds build lsun/cat --data_dir=DATA_DIR`.",
        ),
        DatasetSpec(
            "imagenet256_latents",
            "latent_images/imagenet256_latents",
            (32, 32, 4),
            1000,
            source="imagenet256",
            prepare_hint=ENCODE_HINT,
        ),
        DatasetSpec(
            "digits_latents",
            "latent_images/digits_latents",
            (4, 4, 4),
            10,
            source="digits",
            prepare_hint=ENCODE_HINT,
        ),
    ]
}


# Names recipes already use for datasets that do not exist yet, with what they need.
PLANNED: dict[str, str] = {}


def get_spec(name: str) -> DatasetSpec:
    """The spec for `config.data.name`; an unknown name lists the known ones."""
    if name in PLANNED:
        raise errors.ConfigError(f"Dataset {name!r} is not in cmjax yet: {PLANNED[name]}")
    if name not in SPECS:
        raise errors.ConfigError(f"Unknown dataset {name!r}; config.data.name must be one of {sorted(SPECS)}.")
    return SPECS[name]


def pixel_source(name: str) -> str:
    """The pixel dataset behind `name`: its `source` for a latent dataset, else `name` itself (what FID
    reference statistics and the digits metric read)."""
    return get_spec(name).source or name


def not_prepared_message(spec: DatasetSpec, data_dir: str) -> str:
    """One message that names the dataset, where it was looked for, and the fix."""
    return (
        f"Dataset {spec.name!r} (TFDS {spec.tfds_name!r}) is not prepared in data dir {data_dir!r}. "
        f"{spec.prepare_hint.replace('DATA_DIR', data_dir)} Or point config.data.data_dir (or the "
        "TFDS_DATA_DIR environment variable) at a directory, local or gs://..., where it is prepared."
    )


def center_crop_arr(image_hwc: np.ndarray, image_size: int) -> np.ndarray:
    """ADM's `center_crop_arr`: BOX-halve while the short side is >= 2*size, BICUBIC to short side = size, crop."""
    pil_image = Image.fromarray(image_hwc.squeeze(-1) if image_hwc.shape[-1] == 1 else image_hwc)
    # Halving with BOX first is what makes the final bicubic step alias-free on large images.
    while min(pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(side // 2 for side in pil_image.size), resample=Image.BOX)
    scale = image_size / min(pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(side * scale) for side in pil_image.size), resample=Image.BICUBIC
    )
    arr = np.asarray(pil_image).reshape(pil_image.size[1], pil_image.size[0], image_hwc.shape[-1])
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return np.ascontiguousarray(arr[top : top + image_size, left : left + image_size])


def center_crop_tf(image_hwc: tf.Tensor, image_shape: tuple[int, int, int]) -> tf.Tensor:
    """`center_crop_arr` inside tf.data (PIL through numpy_function, so the pixels match ADM's exactly)."""
    size = image_shape[0]
    cropped = tf.numpy_function(lambda x: center_crop_arr(x, size), [image_hwc], tf.uint8, stateful=False)
    return tf.ensure_shape(cropped, image_shape)


def preprocess_fn(spec: DatasetSpec) -> Callable[[tf.Tensor], tf.Tensor]:
    """Decoded uint8 HWC image -> uint8 image of `spec.image_shape`."""
    if spec.center_crop:
        return lambda image: center_crop_tf(image, spec.image_shape)
    return lambda image: tf.ensure_shape(image, spec.image_shape)

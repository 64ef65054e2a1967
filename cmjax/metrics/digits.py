"""Sample quality on the embedded digits dataset, judged by a small digit classifier trained here.

Inception features mean nothing on 8x8 grayscale digits, so the digits demo measures its samples with a small
network trained deterministically on the `sklearn_digits` train split (seconds on CPU, cached to a file):
- `frechet`: the Fréchet distance between Gaussians fitted to the classifier's 64-d penultimate features of the
  samples and of real reference images (FID's formula in a digit classifier's feature space);
- `confident_fraction`: the fraction of samples the classifier puts in one class with probability ≥ 0.9;
- `class_fractions` / `balanced`: how often each class is the argmax, and whether every class lies in
  [5 %, 15 %] (an unconditional model should not drop or over-produce digits).
Colour digits (`color_digits32`, 32x32x3) are scored through `cmjax.data.digits.to_digit_input`, which maps
them back to the classifier's 8x8 grey input (luma, 4x4 mean pooling, ink relative to the border's colour).
`floor()` gives the same numbers for the held-out real test images against the train split: what perfect
samples would score. Score samples against the same reference, `reference_images("train")`, to compare with it
(FID likewise compares against training-set statistics).
"""
from __future__ import annotations

import dataclasses
import functools
import io
import os
import zipfile
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow_datasets as tfds
from etils import epath

from cmjax import errors
from cmjax.data import digits as digits_data
from cmjax.data import pipeline
from cmjax.metrics import frechet

# Bump whenever the network, its training or the preprocessing changes: cached weights of another version
# are retrained, never silently reused.
VERSION = "digits_classifier_v1"
FEATURE_DIM = 64
DEFAULT_STEPS = 2000
BATCH_SIZE = 128
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 1e-4
CONFIDENCE_THRESHOLD = 0.9
BALANCED_RANGE = (0.05, 0.15)
# Images go through the network in chunks of this size, padded, so every call reuses one compiled program.
EVAL_CHUNK = 512


class DigitsNet(nn.Module):
    """An MLP on the 64 pixels: 256 hidden, a 64-d feature layer, a 10-way head; inputs in [-1, 1]."""

    # An MLP, not a CNN: with one-pixel-shift augmentation it reaches the same ~98.6 % test accuracy as a
    # 2-conv net here, and XLA's CPU convolution gradients made the conv net's training ~50x slower (70 s).

    @nn.compact
    def __call__(self, x_bhwc: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(logits [B, 10], features [B, 64])."""
        x = nn.relu(nn.Dense(256)(x_bhwc.reshape(x_bhwc.shape[0], -1)))
        features = nn.relu(nn.Dense(FEATURE_DIM)(x))
        return nn.Dense(digits_data.NUM_CLASSES)(features), features


_NET = DigitsNet()


@jax.jit
def _logits_and_features(params: Any, x_bhwc: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _NET.apply({"params": params}, x_bhwc)


@dataclasses.dataclass(frozen=True)
class DigitsClassifier:
    """Trained classifier parameters and batched, jit-compiled feature and probability functions."""

    params: Any
    test_accuracy: float  # on the 360 held-out test images, measured right after training

    def _outputs(self, images) -> tuple[np.ndarray, np.ndarray]:
        """(logits [N, 10], features [N, 64]) for host-local images [N, 8, 8, 1] (or colour digits
        [N, 32, 32, 3], mapped by `to_digit_input`) in [-1, 1]."""
        # Host numpy first: sharded sample arrays from the training mesh must not meet params on one device.
        images = np.asarray(images, dtype=np.float32)
        if images.ndim == 4 and images.shape[1:] == digits_data.COLOR_IMAGE_SHAPE:
            images = digits_data.to_digit_input(images)
        if images.ndim != 4 or images.shape[1:] != digits_data.IMAGE_SHAPE:
            raise errors.ConfigError(
                "The digits classifier takes images of shape [N, 8, 8, 1] (or colour digits [N, 32, 32, 3]) in "
                f"[-1, 1]; got {images.shape}."
            )
        logits, features = [], []
        for start in range(0, len(images), EVAL_CHUNK):
            chunk = images[start : start + EVAL_CHUNK]
            padded = np.pad(chunk, [(0, EVAL_CHUNK - len(chunk)), (0, 0), (0, 0), (0, 0)])
            chunk_logits, chunk_features = _logits_and_features(self.params, padded)
            logits.append(np.asarray(chunk_logits)[: len(chunk)])
            features.append(np.asarray(chunk_features)[: len(chunk)])
        if not logits:
            return np.zeros((0, digits_data.NUM_CLASSES), np.float32), np.zeros((0, FEATURE_DIM), np.float32)
        return np.concatenate(logits), np.concatenate(features)

    def features(self, images) -> np.ndarray:
        """Penultimate features [N, 64] of images [N, 8, 8, 1] in [-1, 1]."""
        return self._outputs(images)[1]

    def probabilities(self, images) -> np.ndarray:
        """Class probabilities [N, 10] of images [N, 8, 8, 1] in [-1, 1]."""
        return np.asarray(jax.nn.softmax(self._outputs(images)[0], axis=-1))


def _read_split(split: str, data_dir: str | None, dataset: str = "sklearn_digits") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W, C], labels [N]) of a split of an embedded digits dataset (`digits_data.BUILDERS`),
    in source-row order; builds it on first use."""
    builder = digits_data.prepare(data_dir, dataset)
    examples = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
    order = np.argsort(examples["id"])  # a fixed order, whatever the TFDS file layout
    return examples["image"][order], examples["label"][order]


# config.data.name -> the TFDS builder of that embedded dataset.
_BUILDER_OF = {"digits": "sklearn_digits", "color_digits32": "color_digits32"}


def reference_images(split: str = "test", data_dir: str | None = None, dataset: str = "digits") -> np.ndarray:
    """Real images of `split` of the embedded `dataset` (digits: [N, 8, 8, 1]; color_digits32: [N, 32, 32, 3])
    as float32 in [-1, 1] (the models' range)."""
    return np.asarray(pipeline.to_model_range(_read_split(split, data_dir, _BUILDER_OF[dataset])[0]))


def _training_batches(seed: int, steps: int, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices [steps, B] (a seeded permutation per epoch) and their images, each shifted by -1..1 pixels."""
    rng = np.random.default_rng(seed)
    batches_per_epoch = len(images) // BATCH_SIZE
    epochs = -(-steps // batches_per_epoch)
    rows = np.concatenate(
        [rng.permutation(len(images))[: batches_per_epoch * BATCH_SIZE] for _ in range(epochs)]
    ).reshape(-1, BATCH_SIZE)[:steps]
    # Light augmentation: a one-pixel shift in each direction, background (-1) filling in, so the classifier
    # does not hinge on exact pixel positions that a generator may get slightly off.
    padded = np.pad(images, [(0, 0), (1, 1), (1, 1), (0, 0)], constant_values=-1.0)
    dy, dx = rng.integers(0, 3, size=(2, steps, BATCH_SIZE, 1, 1))
    height, width = images.shape[1:3]
    ys = dy + np.arange(height)[:, None]
    xs = dx + np.arange(width)[None, :]
    return rows, padded[rows[..., None, None], ys, xs]


@functools.partial(jax.jit, static_argnames="steps")
def _fit(init_key: jax.Array, x_sbhwc: jax.Array, labels_sb: jax.Array, steps: int) -> Any:
    """AdamW with cosine decay over the given minibatches, one per step, in order."""
    params = _NET.init(init_key, x_sbhwc[0])["params"]
    optimizer = optax.adamw(optax.cosine_decay_schedule(LEARNING_RATE, steps), weight_decay=WEIGHT_DECAY)

    def loss_fn(params, x, y):
        logits, _ = _NET.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def train_step(carry, batch):
        params, opt_state = carry
        grads = jax.grad(loss_fn)(params, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(train_step, (params, optimizer.init(params)), (x_sbhwc, labels_sb))
    return params


def _accuracy(params: Any, images: np.ndarray, labels: np.ndarray) -> float:
    probabilities = DigitsClassifier(params, float("nan")).probabilities(images)
    return float(np.mean(probabilities.argmax(axis=-1) == labels))


def default_cache_dir(data_dir: str | None = None) -> str:
    """`<data_dir>/cmjax` if a data dir is given, else `$XDG_CACHE_HOME/cmjax` (default `~/.cache/cmjax`)."""
    if data_dir is not None:
        return os.path.join(data_dir, "cmjax")
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "cmjax")


def cache_path(cache_dir: str, seed: int, steps: int) -> epath.Path:
    """The weights file for one (version, seed, steps)."""
    return epath.Path(cache_dir) / f"{VERSION}_seed{seed}_steps{steps}.npz"


def _param_shapes() -> Any:
    """The network's parameter tree as shapes and dtypes, without computing any."""
    zeros = jnp.zeros((1, *digits_data.IMAGE_SHAPE))
    return jax.eval_shape(lambda: _NET.init(jax.random.key(0), zeros))["params"]


def _flatten(params: Any) -> dict[str, Any]:
    """{"['Dense_0']['kernel']": leaf, ...} in the tree's leaf order."""
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def _save(path: epath.Path, classifier: DigitsClassifier, seed: int, steps: int) -> None:
    """Write the weights with their version, seed, steps and accuracy; atomically, so readers never see half."""
    flat = {name: np.asarray(value) for name, value in _flatten(classifier.params).items()}
    buffer = io.BytesIO()
    np.savez(
        buffer,
        __version__=np.array(VERSION),
        __seed__=np.array(seed),
        __steps__=np.array(steps),
        __test_accuracy__=np.array(classifier.test_accuracy),
        **{f"params{name}": value for name, value in flat.items()},
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.parent / f"{path.name}.tmp{os.getpid()}"
    partial.write_bytes(buffer.getvalue())
    partial.replace(path)


def _load(path: epath.Path, seed: int, steps: int) -> DigitsClassifier | None:
    """The cached classifier, or None if the file is missing, unreadable, or of another version or shape."""
    try:
        with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as stored:
            stored_key = (str(stored["__version__"]), int(stored["__seed__"]), int(stored["__steps__"]))
            if stored_key != (VERSION, seed, steps):
                return None
            shapes = _param_shapes()
            template = _flatten(shapes)
            names = {name[len("params") :] for name in stored.files if name.startswith("params")}
            if names != set(template):
                return None
            flat = {}
            for name, leaf in template.items():
                value = stored[f"params{name}"]
                if value.shape != leaf.shape or value.dtype != leaf.dtype or not np.all(np.isfinite(value)):
                    return None
                flat[name] = value
            accuracy = float(stored["__test_accuracy__"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # missing, truncated or not an npz
        return None
    params = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), list(flat.values()))
    return DigitsClassifier(params, accuracy)


def train_classifier(
    data_dir: str | None = None,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    *,
    cache_dir: str | None = None,
    use_cache: bool = True,
) -> DigitsClassifier:
    """The digits classifier for (seed, steps): loaded from the cache if valid, else trained and cached."""
    path = cache_path(cache_dir or default_cache_dir(data_dir), seed, steps)
    if use_cache and (cached := _load(path, seed, steps)) is not None:
        return cached
    train_images, train_labels = _read_split("train", data_dir)
    rows, batches = _training_batches(seed, steps, np.asarray(pipeline.to_model_range(train_images)))
    params = jax.device_get(_fit(jax.random.key(seed), batches, train_labels[rows], steps))
    test_images, test_labels = _read_split("test", data_dir)
    classifier = DigitsClassifier(params, _accuracy(params, pipeline.to_model_range(test_images), test_labels))
    if use_cache:
        _save(path, classifier, seed, steps)
    return classifier


def sample_quality(classifier: DigitsClassifier, samples, reference_images) -> dict[str, Any]:
    """Fréchet distance to the reference in classifier features, confident fraction and class balance.

    `samples` and `reference_images`: host-local arrays [N >= 128, 8, 8, 1] (or colour digits [N, 32, 32, 3])
    in [-1, 1]; N may differ.
    """
    samples = np.asarray(samples, dtype=np.float32)
    reference_images = np.asarray(reference_images, dtype=np.float32)
    minimum = 2 * FEATURE_DIM  # fewer images than this leave the 64x64 covariance badly underdetermined
    for name, images in (("samples", samples), ("reference_images", reference_images)):
        if images.ndim != 4 or len(images) < minimum:
            raise errors.ConfigError(
                f"sample_quality needs at least {minimum} {name} (2 x the classifier's {FEATURE_DIM}-d "
                f"features) of shape [N, 8, 8, 1]; got shape {images.shape}."
            )
    if not np.all(np.isfinite(samples)):
        bad = int(np.sum(~np.isfinite(samples).reshape(len(samples), -1).all(axis=1)))
        raise errors.ConfigError(f"{bad} of {len(samples)} samples contain NaN or inf; the model has diverged.")

    logits, sample_features = classifier._outputs(samples)
    probabilities = np.asarray(jax.nn.softmax(logits, axis=-1))
    confidence = probabilities.max(axis=-1)
    counts = np.bincount(probabilities.argmax(axis=-1), minlength=digits_data.NUM_CLASSES)
    class_fractions = counts / len(samples)
    low, high = BALANCED_RANGE
    return {
        "frechet": frechet.frechet_distance(
            *frechet.feature_statistics(sample_features),
            *frechet.feature_statistics(classifier.features(reference_images)),
        ),
        "confident_fraction": float(np.mean(confidence >= CONFIDENCE_THRESHOLD)),
        "mean_confidence": float(confidence.mean()),
        "class_fractions": [float(f) for f in class_fractions],
        "balanced": bool(np.all((class_fractions >= low) & (class_fractions <= high))),
        "num_samples": int(len(samples)),
    }


def floor(classifier: DigitsClassifier, data_dir: str | None = None, dataset: str = "digits") -> dict[str, Any]:
    """`sample_quality` of the real test images against the real train images: the score of perfect samples."""
    return sample_quality(classifier, reference_images("test", data_dir, dataset),
                          reference_images("train", data_dir, dataset))

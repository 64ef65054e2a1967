"""Digits sample-quality metric: the classifier's accuracy and determinism, its weight cache, and the metric's
ranking of real digits, noise and one-class sets."""
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cmjax.data import digits as digits_data
from cmjax.metrics import digits


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    digits_data.prepare(path)
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("classifier_cache"))


@pytest.fixture(scope="module")
def classifier(data_dir, cache_dir):
    return digits.train_classifier(data_dir, seed=0, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def test_split(data_dir):
    """(images in [-1, 1], labels) read straight from TFDS, not through the module under test."""
    examples = tfds.as_numpy(digits_data.prepare(data_dir).as_dataset(split="test", batch_size=-1))
    return examples["image"].astype(np.float32) / 127.5 - 1.0, examples["label"]


@pytest.fixture(scope="module")
def train_images(data_dir):
    return digits.reference_images("train", data_dir)


def assert_same_params(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def forbid_training(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the classifier was retrained instead of loaded from the cache")

    monkeypatch.setattr(digits, "_fit", fail)


def count_trainings(monkeypatch):
    calls = []
    real_fit = digits._fit

    def counted(*args, **kwargs):
        calls.append(1)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(digits, "_fit", counted)
    return calls


def test_classifier_is_accurate_on_held_out_digits(classifier, test_split):
    images, labels = test_split
    probabilities = classifier.probabilities(images)
    assert probabilities.shape == (360, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    accuracy = np.mean(probabilities.argmax(axis=1) == labels)
    assert accuracy >= 0.95
    assert classifier.test_accuracy == pytest.approx(accuracy)


def test_features_are_batched_consistently(classifier, train_images):
    """More images than one compiled chunk: padding and chunking must not change any image's features."""
    images = train_images[:700]
    features = classifier.features(images)
    assert features.shape == (700, digits.FEATURE_DIM) and features.dtype == np.float32
    one_by_one = np.concatenate([classifier.features(images[i : i + 1]) for i in (0, 511, 512, 699)])
    np.testing.assert_allclose(one_by_one, features[[0, 511, 512, 699]], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[N, 8, 8, 1\]"):
        classifier.features(images[..., 0])


def test_training_is_deterministic_per_seed(classifier, data_dir):
    again = digits.train_classifier(data_dir, seed=0, use_cache=False)
    assert_same_params(again.params, classifier.params)
    other = digits.train_classifier(data_dir, seed=1, use_cache=False)
    kernel = lambda c: np.asarray(c.params["Dense_0"]["kernel"])  # noqa: E731
    assert not np.array_equal(kernel(other), kernel(classifier))


def test_cache_round_trips_without_retraining(classifier, data_dir, cache_dir, test_split, monkeypatch):
    path = digits.cache_path(cache_dir, seed=0, steps=digits.DEFAULT_STEPS)
    assert os.path.exists(path)
    forbid_training(monkeypatch)
    loaded = digits.train_classifier(data_dir, seed=0, cache_dir=cache_dir)
    assert_same_params(loaded.params, classifier.params)
    assert loaded.test_accuracy == classifier.test_accuracy
    np.testing.assert_array_equal(loaded.probabilities(test_split[0]), classifier.probabilities(test_split[0]))


@pytest.mark.parametrize("damage", ["truncated", "not_an_npz", "old_version", "wrong_shape"])
def test_damaged_or_stale_cache_is_retrained(damage, classifier, data_dir, tmp_path, monkeypatch):
    path = digits.cache_path(str(tmp_path), seed=0, steps=digits.DEFAULT_STEPS)
    digits._save(path, classifier, seed=0, steps=digits.DEFAULT_STEPS)
    good = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "not_an_npz":
        path.write_bytes(b"not weights")
    else:
        with np.load(path) as stored:
            arrays = dict(stored)
        if damage == "old_version":
            arrays["__version__"] = np.array("digits_classifier_v0")
        else:
            arrays["params['Dense_0']['kernel']"] = np.zeros((3, 3), np.float32)
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)

    trainings = count_trainings(monkeypatch)
    retrained = digits.train_classifier(data_dir, seed=0, cache_dir=str(tmp_path))
    assert len(trainings) == 1
    assert_same_params(retrained.params, classifier.params)
    # The file was rewritten: the next call loads it.
    forbid_training(monkeypatch)
    assert_same_params(digits.train_classifier(data_dir, seed=0, cache_dir=str(tmp_path)).params, classifier.params)


def test_reference_images_are_the_real_split_in_model_range(data_dir, test_split):
    images = digits.reference_images("test", data_dir)
    assert images.shape == (360, 8, 8, 1) and images.dtype == np.float32
    assert images.min() == -1.0 and images.max() == 1.0
    # The same multiset of images as TFDS holds (the helper fixes the order by source row).
    def rows_sorted(x):
        return x.reshape(360, -1)[np.lexsort(x.reshape(360, -1).T)]

    np.testing.assert_array_equal(rows_sorted(images), rows_sorted(test_split[0]))


def test_metric_ranks_real_digits_above_noise(classifier, data_dir, test_split, train_images):
    real = digits.sample_quality(classifier, test_split[0], train_images)
    noise = np.random.default_rng(0).uniform(-1, 1, size=(400, 8, 8, 1)).astype(np.float32)
    fake = digits.sample_quality(classifier, noise, train_images)

    assert real["frechet"] < 10.0
    assert fake["frechet"] > 20 * real["frechet"]
    assert real["confident_fraction"] >= 0.9 and fake["confident_fraction"] < 0.5
    assert real["mean_confidence"] > fake["mean_confidence"]
    assert real["balanced"] and real["num_samples"] == 360

    # Class fractions follow the true labels when the classifier is right.
    true_fractions = np.bincount(test_split[1], minlength=10) / 360
    np.testing.assert_allclose(real["class_fractions"], true_fractions, atol=0.02)
    for result in (real, fake):
        assert len(result["class_fractions"]) == 10
        assert sum(result["class_fractions"]) == pytest.approx(1.0)

    # The floor is this very comparison, and a set against itself is at distance 0.
    floor = digits.floor(classifier, data_dir)
    assert floor["frechet"] == pytest.approx(real["frechet"], rel=1e-6)
    assert digits.sample_quality(classifier, train_images, train_images)["frechet"] == pytest.approx(0.0, abs=1e-3)


def test_one_class_set_is_not_balanced(classifier, data_dir, train_images):
    labels = tfds.as_numpy(digits_data.prepare(data_dir).as_dataset(split="train", batch_size=-1))
    order = np.argsort(labels["id"])  # reference_images orders by source row
    threes = train_images[labels["label"][order] == 3]
    assert len(threes) >= 2 * digits.FEATURE_DIM
    result = digits.sample_quality(classifier, threes, train_images)
    assert not result["balanced"]
    assert result["class_fractions"][3] > 0.9
    assert result["frechet"] > 5 * digits.floor(classifier, data_dir)["frechet"]


def test_too_few_or_broken_samples_are_refused(classifier, train_images):
    with pytest.raises(ValueError, match="at least 128 samples"):
        digits.sample_quality(classifier, train_images[:100], train_images)
    with pytest.raises(ValueError, match="at least 128 reference_images"):
        digits.sample_quality(classifier, train_images, train_images[:100])
    broken = train_images[:200].copy()
    broken[5, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="1 of 200 samples contain NaN"):
        digits.sample_quality(classifier, broken, train_images)


def test_colour_digits_are_scored_through_the_grey_mapping(classifier, data_dir):
    """The real colour digits score near the grey floor and are classified right; colour noise scores far."""
    colour_train = digits.reference_images("train", data_dir, dataset="color_digits32")
    colour_test = digits.reference_images("test", data_dir, dataset="color_digits32")
    assert colour_test.shape == (360, 32, 32, 3)
    real = digits.sample_quality(classifier, colour_test, colour_train)
    assert real["confident_fraction"] >= 0.85 and real["balanced"] and real["frechet"] < 10.0
    noise = np.random.default_rng(0).uniform(-1, 1, size=(400, 32, 32, 3)).astype(np.float32)
    assert digits.sample_quality(classifier, noise, colour_train)["frechet"] > 10 * real["frechet"]
    examples = tfds.as_numpy(digits_data.prepare(data_dir, "color_digits32").as_dataset(split="test", batch_size=-1))
    labels = examples["label"][np.argsort(examples["id"])]  # reference_images come in source-row order
    assert np.mean(classifier.probabilities(colour_test).argmax(-1) == labels) > 0.9

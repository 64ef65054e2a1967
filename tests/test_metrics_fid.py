"""FID statistics in float64 across batches, FID against a direct scipy computation, IS, precision/recall."""
import numpy as np
import pytest
import scipy.linalg

from cmjax.metrics import fid


def direct_fid(a, b):
    """Textbook FID: np.cov, scipy.linalg.sqrtm of Σ1Σ2, real part."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def test_statistics_accumulate_in_float64_over_any_batching():
    rng = np.random.default_rng(0)
    # A large common offset: a float32 one-pass covariance would lose most digits here.
    features = (rng.normal(size=(600, 16)) * 0.1 + 1000.0).astype(np.float32)
    whole = fid.FeatureStatistics(16).update(features)
    parts = [fid.FeatureStatistics(16).update(chunk) for chunk in np.array_split(features, [7, 300, 301])]
    merged = parts[0]
    for part in parts[1:]:
        merged.merge(part)
    expected_cov = np.cov(features.astype(np.float64), rowvar=False)
    for stats in (whole, merged, fid.FeatureStatistics.from_arrays(merged.as_arrays())):
        assert stats.count == 600
        np.testing.assert_allclose(stats.mean(), features.astype(np.float64).mean(0), rtol=1e-12)
        np.testing.assert_allclose(stats.covariance(), expected_cov, rtol=1e-6, atol=1e-9)


def test_fid_matches_direct_scipy_and_is_zero_against_itself():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(500, 32)) @ rng.normal(size=(32, 32)) * 0.3
    b = rng.normal(size=(400, 32)) * 1.2 + 0.5
    stats_a = fid.FeatureStatistics(32).update(a)
    stats_b = fid.FeatureStatistics(32).update(b)
    value = fid.fid_from_statistics(stats_a, stats_b.mean(), stats_b.covariance())
    assert value == pytest.approx(direct_fid(a, b), rel=1e-8)
    assert value > 10
    assert fid.fid_from_statistics(stats_a, stats_a.mean(), stats_a.covariance()) == pytest.approx(0.0, abs=1e-8)


def test_fid_with_fewer_samples_than_dimensions_matches_scipy():
    """Singular covariances (N < F, as in any small evaluation): same value as sqrtm with pytorch-fid's offset."""
    from cmjax.metrics import frechet

    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(40, 128)), rng.normal(size=(30, 128)) * 0.8 + 0.1
    expected = frechet.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    got = fid.frechet_distance_psd(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert got == pytest.approx(expected, rel=1e-4)


def test_inception_score_limits_and_splits():
    # Confident and uniform over C classes: IS = C. Every sample the same class: IS = 1.
    classes = 10
    confident = np.full((1000, classes), -50.0)
    confident[np.arange(1000), np.arange(1000) % classes] = 50.0
    mean, std = fid.inception_score(confident)
    assert mean == pytest.approx(classes, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    one_class = np.zeros((1000, classes))
    one_class[:, 3] = 50.0
    assert fid.inception_score(one_class)[0] == pytest.approx(1.0, abs=1e-6)
    # Against a direct computation, with splits of unequal content.
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(1000, 7)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for part in np.array_split(p, 10):
        py = part.mean(0)
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(py)), axis=1))))
    assert fid.inception_score(logits) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-9)


def test_knn_radii_equal_brute_force():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(70, 5)).astype(np.float32)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    expected = np.sort(d, axis=1)[:, 3]  # k = 3, the point itself at column 0
    np.testing.assert_allclose(fid.knn_radii(x, batch=16), expected, rtol=1e-4)


def test_precision_recall_on_known_configurations():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(300, 8)).astype(np.float32)
    assert fid.precision_recall(real, real, batch=64) == (1.0, 1.0)
    far = real + 100.0
    assert fid.precision_recall(real, far, batch=64) == (0.0, 0.0)
    # Mode collapse onto 5 real points (60 copies each: k-NN radii 0): precision 1, recall 5/300.
    collapsed = np.repeat(real[:5], 60, axis=0)
    assert fid.precision_recall(real, collapsed, batch=64) == (1.0, pytest.approx(5 / 300))
    # Half of the samples off the manifold: precision 1/2, recall unchanged.
    half_far = np.concatenate([real[:150], real[150:] + 100.0])
    precision, _ = fid.precision_recall(real, half_far, batch=64)
    assert precision == 0.5


def test_reference_cache_roundtrip_and_published_formats(tmp_path):
    rng = np.random.default_rng(5)
    batches = [rng.normal(size=(40, 6)) for _ in range(3)]
    stats, kept = fid.accumulate_reference(batches, 6)
    path = fid.reference_cache_path(str(tmp_path), "cifar10", "train[:50%]", 299, "inception")
    assert path.endswith("cifar10_train__50___299px_inception.npz")
    fid.save_reference(path, stats, kept)
    loaded = fid.load_reference(path)
    np.testing.assert_allclose(loaded["mu"], np.concatenate(batches).mean(0))
    np.testing.assert_array_equal(loaded["features"], np.concatenate(batches).astype(np.float32))
    # pytorch-fid's statistics file: mu and sigma only (no precision/recall).
    pytorch_fid_file = str(tmp_path / "fid_stats_cifar10_train.npz")
    np.savez(pytorch_fid_file, mu=loaded["mu"], sigma=loaded["sigma"])
    assert fid.load_reference(pytorch_fid_file)["features"] is None
    # openai's reference batch: images arr_0 alongside mu/sigma; features computed by the given function.
    adm_file = str(tmp_path / "VIRTUAL_cifar.npz")
    np.savez(adm_file, arr_0=np.zeros((5, 4, 4, 3), np.uint8), mu=loaded["mu"], sigma=loaded["sigma"])
    got = fid.load_reference(adm_file, features_fn=lambda images: np.ones((len(images), 6)))
    assert got["features"].shape == (5, 6)
    with pytest.raises(FileNotFoundError, match="config.eval.reference"):
        fid.load_reference(str(tmp_path / "missing.npz"))

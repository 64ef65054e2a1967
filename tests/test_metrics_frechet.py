"""Fréchet distance between Gaussians: closed forms, symmetry, singular covariances, feature statistics."""
import numpy as np
import pytest

from cmjax.metrics import frechet


def random_orthogonal(rng, dim):
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    return q * np.sign(np.diag(r))


def psd_sqrt(matrix):
    """Symmetric square root of a PSD matrix via eigh (an independent route to the trace term)."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def reference_distance(mu1, sigma1, mu2, sigma2):
    """‖μ1−μ2‖² + Tr Σ1 + Tr Σ2 − 2 Tr (Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2}: the same value without sqrtm(Σ1Σ2)."""
    root1 = psd_sqrt(sigma1)
    cross = np.trace(psd_sqrt(root1 @ sigma2 @ root1))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * cross)


def test_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 3.0, size=5), rng.uniform(0.1, 3.0, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # One dimension: (m1 - m2)² + (s1 - s2)² with standard deviations s.
    assert frechet.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0)


def test_shared_eigenbasis_closed_form():
    """Covariances Q diag(a) Qᵀ and Q diag(b) Qᵀ: the same closed form as the diagonal case, rotated."""
    rng = np.random.default_rng(1)
    q = random_orthogonal(rng, 6)
    a, b = rng.uniform(0.1, 2.0, size=6), rng.uniform(0.1, 2.0, size=6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_general_covariances_match_independent_formula_and_are_symmetric():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(200, 8)), rng.normal(size=(150, 8)) @ rng.normal(size=(8, 8)) + 0.5
    mu1, sigma1 = frechet.feature_statistics(x)
    mu2, sigma2 = frechet.feature_statistics(y)
    forward = frechet.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert forward == pytest.approx(reference_distance(mu1, sigma1, mu2, sigma2), rel=1e-9)
    assert forward == pytest.approx(frechet.frechet_distance(mu2, sigma2, mu1, sigma1), rel=1e-9)
    assert forward > 1.0  # clearly different distributions are clearly apart


def test_identical_statistics_give_zero_even_when_singular():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(300, 10))
    features[:, 7:] = 0.0  # three features that never fire: a singular covariance
    mu, sigma = frechet.feature_statistics(features)
    assert frechet.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)


def test_nearly_singular_covariances_give_a_finite_non_negative_real_distance():
    """Fewer samples than features (rank-deficient covariances): sqrtm picks up imaginary parts."""
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(12, 40)), rng.normal(size=(12, 40)) * 1.1 + 0.05
    mu1, sigma1 = frechet.feature_statistics(x)
    mu2, sigma2 = frechet.feature_statistics(y)
    got = frechet.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert isinstance(got, float) and np.isfinite(got) and got >= 0.0
    assert got == pytest.approx(reference_distance(mu1, sigma1, mu2, sigma2), rel=1e-3)
    # Two samples of one distribution, both rank-deficient: still ≥ 0, never a negative rounding artefact.
    mu3, sigma3 = frechet.feature_statistics(rng.normal(size=(12, 40)))
    assert frechet.frechet_distance(mu1, sigma1, mu3, sigma3) >= 0.0


def test_feature_statistics_match_numpy_in_float64():
    rng = np.random.default_rng(5)
    features = rng.normal(size=(50, 4)).astype(np.float32)
    mu, sigma = frechet.feature_statistics(features)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64 and sigma.shape == (4, 4)
    np.testing.assert_allclose(mu, features.astype(np.float64).mean(axis=0), rtol=1e-12)
    centered = features.astype(np.float64) - mu
    np.testing.assert_allclose(sigma, centered.T @ centered / 49, rtol=1e-10)  # unbiased: N - 1


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"\[N >= 2, F\]"):
        frechet.feature_statistics(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="one F"):
        frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        frechet.frechet_distance(np.zeros(2), np.eye(2), np.array([np.nan, 0.0]), np.eye(2))

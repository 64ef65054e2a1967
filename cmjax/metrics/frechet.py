"""Fréchet distance between Gaussians fitted to two feature sets (the distance behind FID, Heusel et al. 2017).

d² = ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^{1/2}), computed in float64 with `scipy.linalg.sqrtm`. Numerical trouble
is handled the way pytorch-fid does: an ε·I offset on both covariances when their product is singular or its
root not finite, and the real part of a root that picks up tiny imaginary parts from rounding.
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg

# Offset added to both covariances when their product is singular (pytorch-fid's value).
SQRTM_OFFSET = 1e-6
# Imaginary parts of (Σ1Σ2)^{1/2} above this fraction of its largest diagonal entry mean it is more than
# rounding: the ε·I offset is applied before the real part is taken.
IMAGINARY_TOLERANCE = 1e-3


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean [F] and unbiased covariance [F, F] of features [N, F], in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"feature_statistics needs features of shape [N >= 2, F]; got {features.shape}.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrtm_of_product(sigma1: np.ndarray, sigma2: np.ndarray) -> tuple[np.ndarray, bool]:
    """((Σ1Σ2)^{1/2}, possibly complex; whether scipy found the product singular)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return root, any(issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught)


def _significantly_complex(matrix: np.ndarray) -> bool:
    """True where the square root has imaginary parts beyond rounding."""
    if not np.iscomplexobj(matrix):
        return False
    scale = max(1.0, float(np.max(np.abs(np.diagonal(matrix).real))))
    return float(np.max(np.abs(matrix.imag))) > IMAGINARY_TOLERANCE * scale


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance (squared, as FID) of N(μ1, Σ1) and N(μ2, Σ2): ‖μ1−μ2‖² + Tr(Σ1+Σ2−2(Σ1Σ2)^{1/2})."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    dim = mu1.shape[0]
    if mu1.shape != mu2.shape or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"Fréchet distance needs means [F] and covariances [F, F] of one F; got mu1 {mu1.shape}, "
            f"sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}."
        )
    if not all(np.all(np.isfinite(a)) for a in (mu1, sigma1, mu2, sigma2)):
        raise ValueError("Fréchet distance got non-finite statistics (NaN or inf in a mean or covariance).")

    covmean, singular = _sqrtm_of_product(sigma1, sigma2)
    if singular or not np.all(np.isfinite(covmean)) or _significantly_complex(covmean):
        # A (nearly) singular product, e.g. from features that never fire: nudge both covariances towards
        # full rank, as pytorch-fid does; each zero-variance direction then adds about ε to the trace terms.
        offset = SQRTM_OFFSET * np.eye(dim)
        covmean, _ = _sqrtm_of_product(sigma1 + offset, sigma2 + offset)
    # The eigenvalues of Σ1Σ2 are real and ≥ 0 for covariances; imaginary parts left here are rounding.
    covmean = covmean.real

    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    # Identical statistics give 0 up to rounding, which can land a hair below it.
    return float(max(distance, 0.0))

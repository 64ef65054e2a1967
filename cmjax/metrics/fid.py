"""Sample-quality metrics on Inception features: FID, Inception Score, improved precision/recall; reference statistics.

- FID (Heusel et al. 2017): Fréchet distance between Gaussians fitted to pool3 features of samples and of real
  images (`frechet_distance_psd`: the formula of `frechet.frechet_distance` via eigh, fast at 2048-d), with the
  statistics accumulated in float64 over batches and hosts (`FeatureStatistics`), so 50k samples never need to
  sit in one array.
- Inception Score (Salimans et al. 2016): exp E_x KL(p(y|x) ‖ p(y)) over 10 splits, mean and standard deviation,
  from the 1008-way softmax of the 2015 Inception graph.
- Improved precision and recall (Kynkäänniemi et al. 2019), k = 3: a sample is "in" a set's manifold if it lies
  within the distance from some member of the set to that member's k-th nearest neighbour in the set.
- Reference statistics: mean, covariance and a feature subset of a real split, cached as `.npz`, or loaded from
  published files (pytorch-fid's `mu`/`sigma`, openai's ADM reference batches with `mu`/`sigma`/`arr_0`).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from cmjax import errors

IS_SPLITS = 10
PR_K = 3
# Reference features kept (in split order) for precision/recall; the statistics use the whole split.
MAX_REFERENCE_FEATURES = 50_000
PR_BATCH = 1024  # rows per block of pairwise distances


class FeatureStatistics:
    """Running count, sum and sum of outer products of features, in float64 (exact to float64 rounding for any
    batching): `update` per batch, `merge` across hosts or chunks, `mean`/`covariance` (unbiased) at the end."""

    def __init__(self, dim: int):
        self.count = 0
        self.total = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def update(self, features) -> "FeatureStatistics":
        features = np.asarray(features, np.float64)
        if features.ndim != 2 or features.shape[1] != self.total.shape[0]:
            raise errors.ConfigError(f"Expected features [N, {self.total.shape[0]}], got {features.shape}.")
        self.count += features.shape[0]
        self.total += features.sum(axis=0)
        self.outer += features.T @ features
        return self

    def merge(self, other: "FeatureStatistics") -> "FeatureStatistics":
        self.count += other.count
        self.total += other.total
        self.outer += other.outer
        return self

    def mean(self) -> np.ndarray:
        return self.total / self.count

    def covariance(self) -> np.ndarray:
        if self.count < 2:
            raise errors.ConfigError(f"A covariance needs at least 2 features; have {self.count}.")
        mean = self.mean()
        return (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)

    def as_arrays(self) -> dict[str, np.ndarray]:
        return {"count": np.array(self.count), "total": self.total, "outer": self.outer}

    @classmethod
    def from_arrays(cls, arrays) -> "FeatureStatistics":
        stats = cls(arrays["total"].shape[0])
        stats.count = int(arrays["count"])
        stats.total, stats.outer = np.array(arrays["total"]), np.array(arrays["outer"])
        return stats


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance_psd(mu1, sigma1, mu2, sigma2) -> float:
    """FID's ‖μ1−μ2‖² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^{1/2}) (Heusel et al. 2017) with the trace term from symmetric
    eigendecompositions: Σ1Σ2 is similar to Σ1^{1/2}Σ2Σ1^{1/2}, so Tr(Σ1Σ2)^{1/2} = Σ√λ(Σ1^{1/2}Σ2Σ1^{1/2}).
    Equal to `frechet.frechet_distance` (scipy's sqrtm) for covariances, but about 20× faster at 2048-d and
    without complex rounding residue when fewer samples than dimensions make Σ singular."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise errors.ConfigError(
            f"FID needs means [F] and covariances [F, F] of one F; got {mu1.shape}, {sigma1.shape}, "
            f"{mu2.shape}, {sigma2.shape}.")
    if not all(np.all(np.isfinite(a)) for a in (mu1, sigma1, mu2, sigma2)):
        raise errors.ConfigError("FID got non-finite statistics (NaN or inf in a mean or covariance).")
    root1 = _psd_sqrt((sigma1 + sigma1.T) / 2)
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_covmean = float(np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None))))
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean
    return float(max(distance, 0.0))  # identical statistics: 0 up to rounding


def fid_from_statistics(stats: FeatureStatistics, reference_mu, reference_sigma) -> float:
    """FID (Heusel et al. 2017) of accumulated sample statistics against reference (μ, Σ)."""
    return frechet_distance_psd(stats.mean(), stats.covariance(), reference_mu, reference_sigma)


def inception_score(logits, splits: int = IS_SPLITS) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) ‖ p(y))) per split; (mean, std) over `splits`."""
    logits = np.asarray(logits, np.float64)
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for part_p, part_log_p in zip(np.array_split(p, splits), np.array_split(log_p, splits)):
        log_marginal = np.log(part_p.mean(axis=0) + 1e-30)
        kl = np.sum(part_p * (part_log_p - log_marginal), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


@jax.jit
def _squared_distances(a, b):
    """[A, B] squared Euclidean distances (‖a‖² − 2ab + ‖b‖², as the reference implementation), clipped at 0."""
    a2 = jnp.sum(a * a, axis=1)[:, None]
    b2 = jnp.sum(b * b, axis=1)[None, :]
    ab = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(a2 - 2.0 * ab + b2, 0.0)


def _blocks(n: int, batch: int):
    return [(start, min(start + batch, n)) for start in range(0, n, batch)]


def knn_radii(features, k: int = PR_K, batch: int = PR_BATCH) -> np.ndarray:
    """Squared distance from each feature to its k-th nearest neighbour in the same set (itself excluded)."""
    features = jnp.asarray(features, jnp.float32)
    radii = []
    for start, stop in _blocks(features.shape[0], batch):
        d = _squared_distances(features[start:stop], features)
        radii.append(np.asarray(jnp.sort(d, axis=1)[:, k]))  # column 0 is the point itself
    return np.concatenate(radii)


def _inside_manifold(queries, members, member_radii, batch: int) -> np.ndarray:
    """For each query: is it within member_radii[j] of some member j?"""
    queries, members = jnp.asarray(queries, jnp.float32), jnp.asarray(members, jnp.float32)
    radii = jnp.asarray(member_radii, jnp.float32)
    inside = []
    for start, stop in _blocks(queries.shape[0], batch):
        d = _squared_distances(queries[start:stop], members)
        inside.append(np.asarray(jnp.any(d <= radii[None, :], axis=1)))
    return np.concatenate(inside)


def precision_recall(real_features, fake_features, k: int = PR_K, batch: int = PR_BATCH) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): precision = fraction of samples inside the real
    manifold (k-NN balls of the real features), recall = fraction of real features inside the samples' manifold."""
    real_radii, fake_radii = knn_radii(real_features, k, batch), knn_radii(fake_features, k, batch)
    precision = float(np.mean(_inside_manifold(fake_features, real_features, real_radii, batch)))
    recall = float(np.mean(_inside_manifold(real_features, fake_features, fake_radii, batch)))
    return precision, recall


# ---------------------------------------------------------------------------------------------------------------
# Reference statistics.


def reference_cache_path(cache_dir: str, dataset: str, split: str, resolution: int, network: str) -> str:
    """`<cache_dir>/fid_refs/<dataset>_<split>_<resolution>px_<network>.npz` (split made file-name safe)."""
    safe_split = "".join(c if c.isalnum() or c in "-_" else "_" for c in split)
    return os.path.join(cache_dir, "fid_refs", f"{dataset}_{safe_split}_{resolution}px_{network}.npz")


def save_reference(path: str, stats: FeatureStatistics, features: np.ndarray | None) -> None:
    """Writes mu, sigma, count and (optionally) features for precision/recall, atomically."""
    arrays = {"mu": stats.mean(), "sigma": stats.covariance(), "count": np.array(stats.count)}
    if features is not None:
        arrays["features"] = np.asarray(features, np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f"{path}.tmp{os.getpid()}"
    with open(partial, "wb") as f:
        np.savez(f, **arrays)
    os.replace(partial, path)


def load_reference(path: str, features_fn: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, Any]:
    """{"mu", "sigma", "features" (or None)} from a cached or published `.npz`.

    Accepts this module's cache files, pytorch-fid's statistics (`mu`, `sigma`) and openai's ADM reference batches
    (`mu`, `sigma` and the images `arr_0`, whose features `features_fn` computes for precision/recall).
    """
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise errors.MissingFileError(
            f"Reference statistics {path!r} not found; set config.eval.reference to a TFDS split "
            "(e.g. 'train') or an existing .npz with mu and sigma.")
    with np.load(path, allow_pickle=False) as stored:
        if "mu" not in stored.files or "sigma" not in stored.files:
            raise errors.ConfigError(f"{path!r} holds {stored.files}; reference statistics need 'mu' and 'sigma'.")
        reference = {"mu": np.asarray(stored["mu"], np.float64), "sigma": np.asarray(stored["sigma"], np.float64),
                     "features": None}
        if "features" in stored.files:
            reference["features"] = np.asarray(stored["features"], np.float32)
        elif "arr_0" in stored.files and features_fn is not None:
            reference["features"] = np.asarray(features_fn(stored["arr_0"][:MAX_REFERENCE_FEATURES]), np.float32)
    return reference


def accumulate_reference(feature_batches: Iterable[np.ndarray], dim: int) -> tuple[FeatureStatistics, np.ndarray]:
    """Statistics of all features in the batches and the first MAX_REFERENCE_FEATURES of them, in order."""
    stats, kept, kept_count = FeatureStatistics(dim), [], 0
    for features in feature_batches:
        stats.update(features)
        if kept_count < MAX_REFERENCE_FEATURES:
            kept.append(np.asarray(features[: MAX_REFERENCE_FEATURES - kept_count], np.float32))
            kept_count += len(kept[-1])
    return stats, np.concatenate(kept) if kept else np.zeros((0, dim), np.float32)

"""Low-dimensional problems with exactly known answers: Gaussian mixtures (with their exact denoisers), a
checkerboard (uniform on the black squares), a Gaussian's exact flow-matching velocity, and the sliced Wasserstein
distance between sample sets.

Every problem has `dim`, `sample(key, num)` and `covariance()`; `data_std` turns the latter into σ_data.

For x0 ~ Σ_k π_k N(μ_k, s_k² I) and x = x0 + σ·n, the posterior mean is exact:
  p(k | x) ∝ π_k N(x; μ_k, (s_k² + σ²) I),   E[x0 | x, k] = μ_k + s_k²/(s_k² + σ²)·(x − μ_k),
  D*(x, σ) = Σ_k p(k | x)·E[x0 | x, k]  — the ideal EDM denoiser, an analytic teacher for tests.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    """Isotropic Gaussian mixture: means [K, D], per-component std [K], weights [K]."""

    means: np.ndarray
    stds: np.ndarray
    weights: np.ndarray

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> np.ndarray:
        return self.weights @ self.means

    def covariance(self) -> np.ndarray:
        """Σ = Σ_k π_k (s_k² I + μ_k μ_kᵀ) − μ μᵀ."""
        second = sum(w * (s**2 * np.eye(self.dim) + np.outer(m, m))
                     for w, s, m in zip(self.weights, self.stds, self.means))
        return second - np.outer(self.mean(), self.mean())

    def sample(self, key, num: int):
        component_key, noise_key = jax.random.split(key)
        k = jax.random.choice(component_key, len(self.weights), (num,), p=jnp.asarray(self.weights))
        noise = jax.random.normal(noise_key, (num, self.dim), jnp.float32)
        return jnp.asarray(self.means, jnp.float32)[k] + jnp.asarray(self.stds, jnp.float32)[k, None] * noise

    def denoise(self, x, sigma):
        """Exact E[x0 | x_σ = x] for x of shape [B, D] and σ of shape [B] or scalar."""
        x = jnp.asarray(x, jnp.float32)
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])[:, None]
        means = jnp.asarray(self.means, jnp.float32)
        var = jnp.asarray(self.stds, jnp.float32) ** 2  # [K]
        total = var[None, :] + sigma**2  # [B, K]
        sq = jnp.sum(jnp.square(x[:, None, :] - means[None]), axis=-1)  # [B, K]
        logits = (jnp.log(jnp.asarray(self.weights, jnp.float32))[None]
                  - 0.5 * sq / total - 0.5 * self.dim * jnp.log(total))
        resp = jax.nn.softmax(logits, axis=-1)
        shrink = (var[None, :] / total)[..., None]  # [B, K, 1]
        posterior_means = means[None] + shrink * (x[:, None, :] - means[None])
        return jnp.sum(resp[..., None] * posterior_means, axis=1)


def gaussian_flow_velocity(mean: float, std: float):
    """The exact marginal velocity E[x1 − x0 | x_t] of SiT's linear interpolant x_t = t·x1 + (1 − t)·x0 (t = 0 noise,
    t = 1 data) for data x1 ~ N(mean, std²) per dimension, as a parameterless network(params, x_t, t), t < 1:
    E[x1 | x_t] = μ + t·s²/(t²s² + (1 − t)²)·(x_t − t·μ) and E[x0 | x_t] = (x_t − t·E[x1 | x_t])/(1 − t)."""

    def network(params, x_t, t):
        del params
        t = jnp.reshape(jnp.asarray(t, jnp.float32), jnp.shape(t) + (1,) * (x_t.ndim - jnp.ndim(t)))
        data = mean + t * std**2 / (t**2 * std**2 + (1 - t) ** 2) * (x_t - t * mean)
        return data - (x_t - t * data) / (1 - t)

    return network


def ring_of_gaussians(num_modes: int = 8, radius: float = 1.0, std: float = 0.1) -> GaussianMixture:
    """Equal-weight modes on a circle: a standard 2-D benchmark (e.g. the unrolled-GAN ring)."""
    angles = 2 * np.pi * np.arange(num_modes) / num_modes
    means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return GaussianMixture(means, np.full(num_modes, std), np.full(num_modes, 1.0 / num_modes))


@dataclasses.dataclass(frozen=True)
class Checkerboard:
    """Uniform density on the black squares of an n×n board covering [−h, h]²; square (i, j) is black when
    i + j is even (n = 4: 8 squares; FFJORD's 2-D "checkerboard")."""

    num_squares: int = 4
    half_width: float = 1.0

    dim = 2

    def _black_corners(self) -> np.ndarray:
        """Lower-left corners [M, 2] of the black squares."""
        n, side = self.num_squares, 2 * self.half_width / self.num_squares
        cells = np.array([(i, j) for i in range(n) for j in range(n) if (i + j) % 2 == 0], np.float64)
        return -self.half_width + side * cells

    def mean(self) -> np.ndarray:
        side = 2 * self.half_width / self.num_squares
        return np.mean(self._black_corners() + side / 2, axis=0)

    def covariance(self) -> np.ndarray:
        """Mixture of equal-weight uniform squares: Σ = mean of (side²/12·I + c cᵀ) − μ μᵀ, c the centres."""
        side = 2 * self.half_width / self.num_squares
        centres = self._black_corners() + side / 2
        second = side**2 / 12 * np.eye(2) + centres.T @ centres / len(centres)
        return second - np.outer(self.mean(), self.mean())

    def sample(self, key, num: int):
        cell_key, offset_key = jax.random.split(key)
        corners = jnp.asarray(self._black_corners(), jnp.float32)
        cell = jax.random.randint(cell_key, (num,), 0, corners.shape[0])
        side = 2 * self.half_width / self.num_squares
        return corners[cell] + side * jax.random.uniform(offset_key, (num, 2), jnp.float32)


def sliced_wasserstein(key, a, b, num_projections: int = 256):
    """Sliced 2-Wasserstein distance between equal-size sample sets [M, D]: the root of the mean, over
    random unit directions, of the squared 1-D W2 (sorted projections matched in order)."""
    if a.shape != b.shape:
        raise ValueError(f"Sample sets must have equal shapes, got {a.shape} and {b.shape}.")
    dirs = jax.random.normal(key, (a.shape[1], num_projections), jnp.float32)
    dirs = dirs / jnp.linalg.norm(dirs, axis=0, keepdims=True)
    pa = jnp.sort(jnp.asarray(a, jnp.float32) @ dirs, axis=0)
    pb = jnp.sort(jnp.asarray(b, jnp.float32) @ dirs, axis=0)
    return jnp.sqrt(jnp.mean(jnp.square(pa - pb)))


def data_std(problem) -> float:
    """Per-coordinate data std √(tr Σ / D) of a toy problem: the σ_data a toy run should use."""
    return math.sqrt(np.trace(problem.covariance()) / problem.dim)

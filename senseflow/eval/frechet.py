"""Fréchet distance between Gaussians fitted to features, and streaming feature statistics.

For feature sets A and B with means μ_A, μ_B and covariances Σ_A, Σ_B (docs/method.md §19: FID-T compares the
student's samples with the teacher's samples, patch FID-T the same on fixed crops):

    FD = ‖μ_A − μ_B‖² + tr(Σ_A) + tr(Σ_B) − 2·tr((Σ_A Σ_B)^{1/2})

The trace of the matrix square root is computed without a (possibly complex) ``sqrtm`` of the non-symmetric
product: with S = Σ_A^{1/2} (symmetric PSD, from an eigen-decomposition), Σ_A Σ_B is similar to the symmetric PSD
matrix M = S Σ_B S, so tr((Σ_A Σ_B)^{1/2}) = Σ_i √λ_i(M), λ_i clipped at 0. Everything is float64; a result
below 0 (round-off when the two sets are identical) is returned as 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FeatureStats", "frechet_distance", "trace_sqrt_product"]


def _sym_sqrt(a: np.ndarray) -> np.ndarray:
    """Σ^{1/2} of a symmetric PSD matrix (negative round-off eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma_a: np.ndarray, sigma_b: np.ndarray) -> float:
    """tr((Σ_A Σ_B)^{1/2}) = Σ √λ(Σ_A^{1/2} Σ_B Σ_A^{1/2}) for symmetric PSD Σ_A, Σ_B."""
    s = _sym_sqrt(np.asarray(sigma_a, np.float64))
    m = s @ np.asarray(sigma_b, np.float64) @ s
    w = np.linalg.eigvalsh((m + m.T) / 2.0)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray) -> float:
    """‖μ_A − μ_B‖² + tr(Σ_A) + tr(Σ_B) − 2·tr((Σ_A Σ_B)^{1/2}) in float64; raises ValueError on shape mismatch."""
    mu_a, mu_b = np.atleast_1d(np.asarray(mu_a, np.float64)), np.atleast_1d(np.asarray(mu_b, np.float64))
    sigma_a, sigma_b = np.atleast_2d(np.asarray(sigma_a, np.float64)), np.atleast_2d(np.asarray(sigma_b, np.float64))
    d = mu_a.shape[0]
    if mu_a.shape != (d,) or mu_b.shape != (d,):
        raise ValueError(
            f"frechet_distance: means must both be vectors of length {d}, got {mu_a.shape} and {mu_b.shape}"
        )
    if sigma_a.shape != (d, d) or sigma_b.shape != (d, d):
        raise ValueError(f"frechet_distance: covariances must be ({d}, {d}), got {sigma_a.shape} and {sigma_b.shape}")
    diff = mu_a - mu_b
    value = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * trace_sqrt_product(sigma_a, sigma_b)
    return max(float(value), 0.0)  # FD ≥ 0; a negative value is round-off (identical sets)


@dataclass
class FeatureStats:
    """Running sums of features f ∈ R^d: n, Σf, Σf fᵀ (float64), so that 5K×2048 features need not be kept.

    μ = Σf / n, Σ = (Σ f fᵀ − n μ μᵀ) / (n − 1) (unbiased, as ``numpy.cov``).
    """

    n: int = 0
    total: np.ndarray | None = None
    outer: np.ndarray | None = None

    def update(self, feats: np.ndarray) -> None:
        f = np.asarray(feats, np.float64)
        if f.ndim != 2:
            raise ValueError(f"FeatureStats.update expects (N, d) features, got shape {f.shape}")
        if self.total is None:
            self.total = np.zeros(f.shape[1])
            self.outer = np.zeros((f.shape[1], f.shape[1]))
        elif f.shape[1] != self.total.shape[0]:
            raise ValueError(f"FeatureStats.update: feature width {f.shape[1]} differs from {self.total.shape[0]}")
        self.n += f.shape[0]
        self.total += f.sum(axis=0)
        self.outer += f.T @ f

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(μ, Σ); needs at least 2 features."""
        if self.n < 2 or self.total is None or self.outer is None:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.n}")
        mu = self.total / self.n
        cov = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, cov

"""Fréchet distance of the evaluation suite (senseflow/eval/frechet.py).

FD = ‖μ_A − μ_B‖² + tr Σ_A + tr Σ_B − 2 tr((Σ_A Σ_B)^{1/2}); ours takes the trace through an eigen-decomposition,
the reference here through ``scipy.linalg.sqrtm`` of the (non-symmetric) product, as FID code usually does.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from senseflow.eval.frechet import FeatureStats, frechet_distance


def scipy_fd(fa: np.ndarray, fb: np.ndarray) -> float:
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    sa, sb = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean = linalg.sqrtm(sa @ sb)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * np.trace(covmean))


def features(rng: np.random.Generator, n: int, d: int, shift: float, scale: float) -> np.ndarray:
    mix = rng.normal(size=(d, d)) / np.sqrt(d)  # correlated features
    return (rng.normal(size=(n, d)) @ mix) * scale + shift


@pytest.mark.parametrize("d,shift,scale", [(8, 0.3, 1.0), (32, 0.0, 1.7), (64, 1.0, 0.5)])
def test_fd_equals_an_independent_scipy_computation(d, shift, scale):
    rng = np.random.default_rng(d)
    fa, fb = features(rng, 400, d, 0.0, 1.0), features(rng, 300, d, shift, scale)
    ours = frechet_distance(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))
    ref = scipy_fd(fa, fb)
    assert ref > 0
    assert abs(ours - ref) / ref < 1e-6


def test_streaming_stats_equal_numpy_mean_and_unbiased_covariance():
    rng = np.random.default_rng(0)
    f = features(rng, 257, 16, 0.5, 2.0)
    stats = FeatureStats()
    for chunk in np.array_split(f, 7):
        stats.update(chunk)
    mu, cov = stats.mean_cov()
    assert stats.n == 257
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(f, rowvar=False), rtol=1e-10, atol=1e-12)


def test_fd_is_zero_for_one_set_and_symmetric():
    rng = np.random.default_rng(1)
    fa, fb = features(rng, 200, 12, 0.0, 1.0), features(rng, 200, 12, 0.2, 1.3)
    a = (fa.mean(0), np.cov(fa, rowvar=False))
    b = (fb.mean(0), np.cov(fb, rowvar=False))
    assert frechet_distance(*a, *a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(*a, *b) == pytest.approx(frechet_distance(*b, *a), rel=1e-9)


def test_fd_of_gaussians_with_known_closed_form():
    """Diagonal covariances: FD = ‖Δμ‖² + Σ_i (√a_i − √b_i)²."""
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu_a, mu_b = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu_a, np.diag(a), mu_b, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_shape_mismatch_and_too_few_features_raise():
    with pytest.raises(ValueError, match="means"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    stats = FeatureStats()
    stats.update(np.ones((1, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        stats.mean_cov()
    with pytest.raises(ValueError, match="width"):
        stats.update(np.ones((2, 4)))

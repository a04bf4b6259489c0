"""Digit metrics on the project's classifier: prompt accuracy and Fréchet distances of its penultimate features.

* **Prompt accuracy**: the share of samples that the classifier labels as the prompted digit.
* **Fréchet distance** between Gaussians N(μ₁, Σ₁) and N(μ₂, Σ₂) fitted to classifier features f(x):
      FD = ‖μ₁ − μ₂‖² + tr(Σ₁) + tr(Σ₂) − 2·tr((Σ₁Σ₂)^{1/2})
  computed in float64 by :func:`senseflow.eval.frechet.frechet_distance`. **FD** compares samples with real digits;
  **FD-T** compares them with a reference set of samples (e.g. the teacher's), the digit analogue of
  docs/method.md §19's FID-T.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from senseflow.digits.classifier import DigitClassifier, load_classifier
from senseflow.eval.frechet import frechet_distance  # the project's one Fréchet distance (eval suite)

__all__ = [
    "frechet_distance",
    "feature_stats",
    "prompt_accuracy",
    "fd_between",
    "real_feature_stats",
    "fd_to_real",
]

_default_classifier: DigitClassifier | None = None


def _classifier(model: DigitClassifier | None) -> DigitClassifier:
    global _default_classifier
    if model is not None:
        return model
    if _default_classifier is None:
        _default_classifier = load_classifier()
    return _default_classifier


@torch.no_grad()
def feature_stats(
    images: Tensor, classifier: DigitClassifier | None = None, batch_size: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) in float64 of the classifier's penultimate features of ``images`` ((N, 3, R, R) in [−1, 1], N ≥ 2).

    ``classifier`` defaults to the shipped one. Σ is the unbiased sample covariance (divisor N − 1).
    """
    if images.ndim != 4 or images.shape[0] < 2:
        raise ValueError(
            f"feature_stats needs a batch of at least 2 images (N, 3, R, R), got shape {tuple(images.shape)}"
        )
    model = _classifier(classifier)
    feats = torch.cat(
        [model.features(images[i : i + batch_size].float()) for i in range(0, images.shape[0], batch_size)]
    )
    f = feats.double().cpu().numpy()
    return f.mean(axis=0), np.cov(f, rowvar=False)


def prompt_accuracy(images: Tensor, digits: Tensor | list[int], classifier: DigitClassifier | None = None) -> float:
    """Share of ``images`` that the classifier labels as the prompted ``digits``."""
    digits = torch.as_tensor(digits, dtype=torch.long)
    if digits.shape != (images.shape[0],):
        raise ValueError(f"prompt_accuracy: {images.shape[0]} images but {tuple(digits.shape)} prompted digits")
    return float((_classifier(classifier).predict(images.float()) == digits).double().mean())


def fd_between(images: Tensor, reference: Tensor, classifier: DigitClassifier | None = None) -> float:
    """FD between the features of two image sets (FD-T when ``reference`` holds teacher samples)."""
    return frechet_distance(*feature_stats(images, classifier), *feature_stats(reference, classifier))


def real_feature_stats(split: str = "all", classifier: DigitClassifier | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) of the real digits of ``split`` (``"all"``, ``"train"`` or ``"heldout"``) at the classifier's
    resolution."""
    from senseflow.digits.data import DigitsDataConfig, load_digits_data

    model = _classifier(classifier)
    images, _ = load_digits_data(DigitsDataConfig(resolution=model.config.resolution)).subset(split)
    return feature_stats(images, model)


def fd_to_real(images: Tensor, classifier: DigitClassifier | None = None, split: str = "all") -> float:
    """FD between the features of ``images`` and of the real digits of ``split``."""
    model = _classifier(classifier)
    return frechet_distance(*feature_stats(images, model), *real_feature_stats(split, model))

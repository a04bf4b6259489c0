"""The digits demo's metrics as one more evaluation backend (:mod:`senseflow.digits.metrics`).

* **prompt accuracy**: the share of samples the project's digit classifier labels as the prompted digit. The
  prompted digit of prompt i is its ``digit`` metadata (JSON prompt sets) or, failing that, the one digit its text
  names (a numeral ``7`` or a word ``seven``); prompts naming none or several are left out and counted.
* **FD-T**: Fréchet distance between the classifier's penultimate features of the samples and of the reference
  (teacher) images — the digit analogue of FID-T; **FD-real**: the same against the real digits of ``real_split``.
  Features and their (μ, Σ) come from :mod:`senseflow.digits.metrics`; the distance is
  :func:`senseflow.eval.frechet.frechet_distance`, as for FID-T.

Images are read as uint8, mapped to x = 2·u/255 − 1 ∈ [−1, 1] and resized (bilinear, antialiased) to the
classifier's resolution when they differ from it. Requires ``senseflow.digits``; absent, the metric is skipped.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from senseflow.eval.images import load_batch

__all__ = ["digits_available", "prompt_digit", "load_digit_images", "digits_metrics"]


def digits_available() -> bool:
    try:
        import senseflow.digits.metrics  # noqa: F401  (availability probe)
    except ImportError:
        return False
    return True


def prompt_digit(prompt: str, meta: Mapping[str, Any] | None = None) -> int | None:
    """The digit a prompt asks for: ``meta["digit"]`` if present, else the single digit its text names."""
    if meta and meta.get("digit") is not None:
        return int(meta["digit"])
    from senseflow.digits.data import DIGIT_WORDS

    text = prompt.lower()
    found = {int(d) for d in re.findall(r"(?<!\d)(\d)(?!\d)", text)}
    found |= {i for i, w in enumerate(DIGIT_WORDS) if re.search(rf"\b{w}\b", text)}
    return found.pop() if len(found) == 1 else None


def load_digit_images(paths: Sequence[Path], resolution: int, batch_size: int = 256) -> Tensor:
    """(N, 3, R, R) float images in [−1, 1] at the classifier's resolution."""
    out = []
    for start in range(0, len(paths), batch_size):
        x = load_batch(paths[start:start + batch_size]).float() / 127.5 - 1.0
        if tuple(x.shape[-2:]) != (resolution, resolution):
            x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
        out.append(x)
    return torch.cat(out)


def digits_metrics(samples: Mapping[int, Path], prompts: Sequence[str], meta: Sequence[Mapping[str, Any]],
                   reference: Mapping[int, Path] | None = None, classifier: str | None = None,
                   real_split: str | None = "heldout") -> dict[str, Any]:
    """``{"accuracy", "fd_t", "fd_real", "n", "n_labelled"}`` (an entry is None when it cannot be computed)."""
    from senseflow.digits.classifier import load_classifier
    from senseflow.digits.metrics import feature_stats, prompt_accuracy, real_feature_stats
    from senseflow.eval.frechet import frechet_distance

    model = load_classifier(classifier)
    res = model.config.resolution
    idx = sorted(samples)
    images = load_digit_images([samples[i] for i in idx], res)
    labels = [prompt_digit(prompts[i], meta[i] if i < len(meta) else None) for i in idx]
    keep = [k for k, d in enumerate(labels) if d is not None]
    out: dict[str, Any] = {"n": len(idx), "n_labelled": len(keep), "accuracy": None, "fd_t": None, "fd_real": None}
    if keep:
        out["accuracy"] = prompt_accuracy(images[keep], [d for d in labels if d is not None], model)
    if len(idx) >= 2:
        ours = feature_stats(images, model)
        if reference and len(reference) >= 2:
            ref = load_digit_images([reference[i] for i in sorted(reference)], res)
            out["fd_t"] = frechet_distance(*ours, *feature_stats(ref, model))
        if real_split:
            out["fd_real"] = frechet_distance(*ours, *real_feature_stats(real_split, model))
    return out

"""FID-T and patch FID-T (docs/method.md §19: FID of the student's samples against the teacher's samples).

* **FID-T**: each image (any size) → x ∈ [0, 1] → bilinear resize to 299×299 → Inception pool3 features f ∈ R^2048;
  FD between the Gaussians of the two feature sets (:func:`senseflow.eval.frechet.frechet_distance`).
* **Patch FID-T**: the same on fixed crops taken at full resolution, so fine detail that the 299-px resize
  removes is compared. Crops of side P (``patch_size``, 299 by default: the network sees them unresized) sit at
  fixed positions that depend only on the image size: ``center`` (one crop in the middle) or ``grid`` (k×k crops
  whose top-left corners are spread evenly, x_j = round(j·(W − P)/(k − 1)), j = 0..k−1, likewise for y; k = 1 is
  the centre crop). Every crop of every image is one feature vector.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from senseflow.eval.frechet import FeatureStats, frechet_distance
from senseflow.eval.images import batched, load_batch

__all__ = ["crop_boxes", "fixed_crops", "folder_stats", "fid_between"]

PATCH_LAYOUTS: tuple[str, ...] = ("center", "grid")


def crop_boxes(height: int, width: int, size: int, layout: str = "center", grid: int = 2) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of the fixed crops of side ``size`` for an image of ``height`` × ``width``."""
    if layout not in PATCH_LAYOUTS:
        raise ValueError(f"patch layout must be one of {', '.join(PATCH_LAYOUTS)}, got {layout!r}")
    if size > min(height, width):
        raise ValueError(f"patch size {size} exceeds the image size {height}x{width}")
    if layout == "center" or grid == 1:
        return [((height - size) // 2, (width - size) // 2)]
    if grid < 1:
        raise ValueError(f"patch grid must be >= 1, got {grid}")
    ys = [round(j * (height - size) / (grid - 1)) for j in range(grid)]
    xs = [round(j * (width - size) / (grid - 1)) for j in range(grid)]
    return [(y, x) for y in ys for x in xs]


def fixed_crops(images: Tensor, size: int, layout: str = "center", grid: int = 2) -> Tensor:
    """(B, C, H, W) → (B·n_crops, C, size, size), crops of each image consecutive."""
    boxes = crop_boxes(images.shape[-2], images.shape[-1], size, layout, grid)
    crops = [images[:, :, y:y + size, x:x + size] for (y, x) in boxes]
    return torch.stack(crops, dim=1).flatten(0, 1)


def folder_stats(paths: Sequence[Path], features: Callable[[Tensor], Tensor], batch_size: int = 32,
                 transform: Callable[[Tensor], Tensor] | None = None, progress: bool = False,
                 desc: str = "features") -> FeatureStats:
    """Running feature statistics of images read in batches (uint8) and optionally cropped by ``transform``."""
    from tqdm import tqdm

    stats = FeatureStats()
    bar = tqdm(total=len(paths), unit="img", desc=desc, disable=not progress, leave=False)
    for chunk in batched(list(paths), batch_size):
        x = load_batch(chunk)
        if transform is not None:
            x = transform(x)
        stats.update(features(x).double().cpu().numpy())
        bar.update(len(chunk))
    bar.close()
    return stats


def fid_between(a: FeatureStats, b: FeatureStats) -> float:
    """FD of the Gaussians fitted to two feature sets."""
    return frechet_distance(*a.mean_cov(), *b.mean_cov())

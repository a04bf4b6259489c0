"""Image conversions shared by training previews, inference scripts and evaluation: [−1, 1] tensors → uint8."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [−1, 1], (B, 3, H, W) → uint8 (B, H, W, 3): x ↦ round(255·(x + 1)/2), clamped."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Tile a batch of [−1, 1] images into one PNG (rows of ``nrow``, default √B)."""
    arr = to_uint8(images)
    b, h, w, c = arr.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(b))))
    ncol = int(math.ceil(b / nrow))
    grid = np.zeros((ncol * h, nrow * w, c), dtype=np.uint8)
    for i in range(b):
        r, q = divmod(i, nrow)
        grid[r * h : (r + 1) * h, q * w : (q + 1) * w] = arr[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images in [−1, 1], (B, 3, H, W) → PIL RGB images."""
    return [Image.fromarray(a) for a in to_uint8(images)]

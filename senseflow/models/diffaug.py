"""Differentiable augmentation of the discriminator's input (docs/method.md §9.1; DiffAugment, written from its math).

Each transform draws its parameters per sample from an explicit ``torch.Generator`` and is differentiable with
respect to the image x ∈ [−1, 1] of shape (B, C, H, W):

* ``color``: brightness x + (u₁ − ½); saturation m_px + 2u₂·(x − m_px) around the per-pixel channel mean;
  contrast m_img + (u₃ + ½)·(x − m_img) around the image mean; u ~ U(0, 1) per sample;
* ``translation``: an integer shift (Δy, Δx) ~ U{−r_y … r_y} × U{−r_x … r_x}, r = round(ratio·H), round(ratio·W),
  vacated pixels are zero;
* ``cutout``: one square (round(ratio·H) × round(ratio·W)) centred at a uniform pixel is zeroed (clipped at the
  borders).

The same generator state gives the same augmentation, so runs are reproducible.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from senseflow.core import rng

__all__ = ["POLICIES", "diff_augment", "augment_color", "augment_translation", "augment_cutout"]

POLICIES = ("color", "translation", "cutout")


def _uniform(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    return rng.rand(shape, generator, device=like.device).to(like.dtype)


def _randint(low: int, high_inclusive: int, shape: tuple[int, ...], generator: torch.Generator, device) -> Tensor:
    return rng.randint(low, high_inclusive, shape, generator, device=device)


def augment_color(x: Tensor, generator: torch.Generator) -> Tensor:
    """Brightness, then saturation, then contrast, each with its own per-sample uniform draw."""
    b = x.shape[0]
    x = x + (_uniform((b, 1, 1, 1), generator, x) - 0.5)
    mean_px = x.mean(dim=1, keepdim=True)
    x = (x - mean_px) * (_uniform((b, 1, 1, 1), generator, x) * 2.0) + mean_px
    mean_img = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean_img) * (_uniform((b, 1, 1, 1), generator, x) + 0.5) + mean_img
    return x


def augment_translation(x: Tensor, generator: torch.Generator, ratio: float) -> Tensor:
    """Shift each sample by an integer (Δy, Δx) with |Δ| ≤ round(ratio·size); out-of-image pixels become 0."""
    b, _, h, w = x.shape
    ry, rx = int(ratio * h + 0.5), int(ratio * w + 0.5)
    dy = _randint(-ry, ry, (b,), generator, x.device)
    dx = _randint(-rx, rx, (b,), generator, x.device)
    src_y = torch.arange(h, device=x.device)[None, :] - dy[:, None]  # (B, H): output row i reads row i − Δy
    src_x = torch.arange(w, device=x.device)[None, :] - dx[:, None]
    valid = ((src_y >= 0) & (src_y < h))[:, :, None] & ((src_x >= 0) & (src_x < w))[:, None, :]  # (B, H, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    gathered = x.permute(0, 2, 3, 1)[batch, src_y.clamp(0, h - 1)[:, :, None], src_x.clamp(0, w - 1)[:, None, :]]
    return (gathered * valid[..., None].to(x.dtype)).permute(0, 3, 1, 2)


def augment_cutout(x: Tensor, generator: torch.Generator, ratio: float) -> Tensor:
    """Zero one square of size round(ratio·H) × round(ratio·W) per sample, centred at a uniform pixel."""
    b, _, h, w = x.shape
    sh, sw = int(ratio * h + 0.5), int(ratio * w + 0.5)
    cy = _randint(0, h - 1, (b,), generator, x.device)
    cx = _randint(0, w - 1, (b,), generator, x.device)
    y0, x0 = cy - sh // 2, cx - sw // 2
    ys = torch.arange(h, device=x.device)[None, :]
    xs = torch.arange(w, device=x.device)[None, :]
    in_y = (ys >= y0[:, None]) & (ys < (y0 + sh)[:, None])
    in_x = (xs >= x0[:, None]) & (xs < (x0 + sw)[:, None])
    keep = ~(in_y[:, :, None] & in_x[:, None, :])
    return x * keep[:, None].to(x.dtype)


def diff_augment(
    x: Tensor,
    generator: torch.Generator,
    policy: Sequence[str] = POLICIES,
    translation_ratio: float = 0.125,
    cutout_ratio: float = 0.2,
) -> Tensor:
    """Apply the transforms of ``policy`` in order (defaults: §9.1's color, translation 1/8, cutout 1/5)."""
    if x.ndim != 4:
        raise ValueError(f"diff_augment expects images (B, C, H, W), got shape {tuple(x.shape)}")
    for name in policy:
        if name == "color":
            x = augment_color(x, generator)
        elif name == "translation":
            x = augment_translation(x, generator, translation_ratio)
        elif name == "cutout":
            x = augment_cutout(x, generator, cutout_ratio)
        else:
            raise ValueError(f"DiffAugment policy {name!r} is not one of {', '.join(POLICIES)}")
    return x

"""Image decoding and the resize/crop policy of docs/method.md §13.1 (PIL + torch only, no torchvision).

Policy for a target resolution R (square training images):

1. decode and convert to 8-bit RGB (:func:`to_rgb`): greyscale, palette, CMYK, YCbCr, LAB and HSV by PIL's
   conversion; images with transparency (RGBA, LA, PA, P with a transparency key) are composited over white;
   16-bit integer images (``I;16*``) are scaled v ↦ round(v / 257) so that 65535 ↦ 255 (PIL's own conversion
   clips, which would turn most of a 16-bit image white); 32-bit integer images (``I``) are scaled the same way
   when their maximum exceeds 255 and clipped to [0, 255] otherwise; float images (``F``) are taken as [0, 1]
   when their maximum is at most 1 and clipped to [0, 255] otherwise;
2. scale by s = R / min(h, w) so the shorter side becomes R; the resized size is (H′, W′) = (round(h·s), round(w·s));
3. crop an R × R window at (top, left) of the resized image: centred, top = ⌊(H′ − R)/2⌋, left = ⌊(W′ − R)/2⌋, or
   uniform over {0..H′ − R} × {0..W′ − R} from an explicit ``torch.Generator``;
4. scale uint8 u to u / 127.5 − 1 ∈ [−1, 1], layout (3, R, R), float32.

Steps 2 and 3 are done in one resampling call: the crop window is mapped back to the original image,
box = (left/s, top/s, (left + R)/s, (top + R)/s), and only that box is resampled to R × R. This avoids building the
huge intermediate image of an extreme aspect ratio (a 10 × 4000 image at R = 1024 would otherwise be 1024 × 409600).

The returned ``original_size`` = (h, w) and ``crop_coords`` = (top, left) are what SDXL's time ids
[orig_h, orig_w, crop_top, crop_left, R, R] expect (docs/method.md §12, §13.2).
"""
from __future__ import annotations

from dataclasses import dataclass
from os import PathLike

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = [
    "CROP_MODES", "RESAMPLE", "PreparedImage", "load_image", "to_rgb", "crop_box", "prepare_image", "pil_to_tensor"
]

CROP_MODES = ("center", "random")
RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
}
_TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


@dataclass(frozen=True)
class PreparedImage:
    """A training image: ``pixels`` (3, R, R) float32 in [−1, 1], ``original_size`` (h, w),
    ``crop_coords`` (top, left)."""

    pixels: Tensor
    original_size: tuple[int, int]
    crop_coords: tuple[int, int]


def load_image(path: str | PathLike[str]) -> Image.Image:
    """Decode the whole file (so truncation is detected here) and return an 8-bit RGB image (see :func:`to_rgb`).

    Raises ``OSError`` (missing, unreadable, truncated), ``SyntaxError`` or ``Image.DecompressionBombError`` as PIL
    does; callers turn these into messages that name the record.
    """
    with Image.open(path) as im:
        im.load()
        return to_rgb(im)


def _u8_from_array(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8), mode="L")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB, scaling high-bit-depth modes instead of clipping them (module docstring, step 1)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16"):
        a = np.asarray(im).astype(np.float64)
        return _u8_from_array(np.rint(a / 257.0)).convert("RGB")
    if mode == "I":
        a = np.asarray(im).astype(np.float64)
        if a.size and a.max() > 255:
            a = np.rint(np.clip(a, 0, 65535) / 257.0)
        return _u8_from_array(np.clip(a, 0, 255)).convert("RGB")
    if mode == "F":
        a = np.asarray(im).astype(np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        if a.size and a.max() <= 1.0:
            a = a * 255.0
        return _u8_from_array(np.rint(np.clip(a, 0, 255))).convert("RGB")
    if mode in _TRANSPARENT_MODES or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def crop_box(
    height: int, width: int, resolution: int, crop: str = "center", generator: torch.Generator | None = None
) -> tuple[tuple[int, int], tuple[float, float, float, float]]:
    """(top, left) of the R × R crop in the resized image and the same window in original pixel coordinates.

    s = R / min(h, w); H′ = max(R, round(h·s)), W′ = max(R, round(w·s)); box = (left, top, left + R, top + R) / s.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image has no pixels ({height}×{width})")
    if crop not in CROP_MODES:
        raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}")
    s = resolution / min(height, width)
    h2, w2 = max(resolution, round(height * s)), max(resolution, round(width * s))
    if crop == "center":
        top, left = (h2 - resolution) // 2, (w2 - resolution) // 2
    else:
        if generator is None:
            raise ValueError("crop='random' needs an explicit torch.Generator")
        top = int(torch.randint(0, h2 - resolution + 1, (), generator=generator))
        left = int(torch.randint(0, w2 - resolution + 1, (), generator=generator))
    box = (
        left / s,
        top / s,
        min(width, (left + resolution) / s),
        min(height, (top + resolution) / s),
    )
    return (top, left), box


def pil_to_tensor(im: Image.Image) -> Tensor:
    """8-bit RGB PIL image (h, w) → float32 (3, h, w) in [−1, 1]: u / 127.5 − 1."""
    w, h = im.size
    u8 = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(h, w, 3)
    return u8.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def prepare_image(
    im: Image.Image,
    resolution: int,
    crop: str = "center",
    generator: torch.Generator | None = None,
    resample: str = "bicubic",
    reducing_gap: float | None = None,
) -> PreparedImage:
    """RGB image → :class:`PreparedImage` at R × R by the policy of the module docstring (steps 2–4).

    ``reducing_gap`` is PIL's optional two-stage downscaling (faster for large downscales, not bit-exact).
    """
    if resample not in RESAMPLE:
        raise ValueError(f"resample must be one of {sorted(RESAMPLE)}, got {resample!r}")
    im = to_rgb(im)
    width, height = im.size
    crop_coords, box = crop_box(height, width, resolution, crop, generator)
    out = im.resize((resolution, resolution), resample=RESAMPLE[resample], box=box, reducing_gap=reducing_gap)
    return PreparedImage(pil_to_tensor(out), (height, width), crop_coords)

"""The digits data set: scikit-learn's 8×8 handwritten digits as 32×32 RGB images with captions.

``sklearn.datasets.load_digits()`` ships inside scikit-learn (no download): 1,797 grey images of 8×8 pixels with
ink values in 0..16 and labels 0..9. Here each image is scaled to [0, 1] (value / 16), upsampled to
``resolution``² (bilinear or bicubic), mapped to pixels x ∈ [−1, 1] by x = 2·v − 1 (ink is bright, background
−1) and repeated on three channels. Each image gets a caption from one of a few phrasings
(``"a handwritten digit seven"``, ``"the number 7 handwritten"``, ...), chosen by a seeded generator.

A fixed train / held-out split is drawn from a seeded permutation. :func:`export_json_dataset` writes the set in
the JSON image–caption format of docs/method.md §13.1 (PNG files, image paths relative to the JSON's folder).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

__all__ = [
    "DIGIT_WORDS",
    "DEFAULT_TEMPLATES",
    "DigitsDataConfig",
    "DigitsData",
    "load_digits_data",
    "caption",
    "all_captions",
    "split_indices",
    "to_uint8",
    "export_json_dataset",
]

#: English names of the ten digits, indexed by the digit.
DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: Caption phrasings; ``{word}`` is the digit's name and ``{numeral}`` its numeral.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a handwritten digit {word}",
    "the number {numeral} handwritten",
    "a drawing of the digit {word}",
    "a handwritten {numeral}",
    "the digit {word}, written by hand",
)

#: Largest ink value of sklearn's digits (values are integers 0..16).
_SKLEARN_DIGITS_MAX = 16.0


@dataclass(frozen=True)
class DigitsDataConfig:
    """How the digits become images, captions and a split (documented defaults of the schema).

    * ``resolution``: output side in pixels (the 8×8 originals are upsampled to it);
    * ``interpolation``: ``"bilinear"`` or ``"bicubic"`` (bicubic output is clamped to [−1, 1]);
    * ``templates``: caption phrasings with ``{word}`` / ``{numeral}`` fields;
    * ``holdout_fraction``: share of images in the held-out split;
    * ``seed``: seeds the split permutation and the per-image choice of phrasing.
    """

    resolution: int = 32
    interpolation: str = "bilinear"
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    holdout_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.resolution < 8:
            raise ValueError(f"DigitsDataConfig.resolution must be >= 8 (the originals are 8x8), got {self.resolution}")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(
                f"DigitsDataConfig.interpolation must be 'bilinear' or 'bicubic', got {self.interpolation!r}"
            )
        if not self.templates:
            raise ValueError("DigitsDataConfig.templates must hold at least one caption phrasing")
        for t in self.templates:
            if "{word}" not in t and "{numeral}" not in t:
                raise ValueError(f"caption template {t!r} names no digit: expected a '{{word}}' or '{{numeral}}' field")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"DigitsDataConfig.holdout_fraction must be in (0, 1), got {self.holdout_fraction}")


@dataclass
class DigitsData:
    """The whole set: ``images`` (N, 3, R, R) float32 in [−1, 1], ``labels`` (N,) int64, one caption per image,
    and the index tensors of the fixed split."""

    images: Tensor
    labels: Tensor
    captions: list[str]
    train_index: Tensor
    heldout_index: Tensor
    config: DigitsDataConfig = field(default_factory=DigitsDataConfig)

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, which: str) -> tuple[Tensor, Tensor]:
        """(images, labels) of ``"train"``, ``"heldout"`` or ``"all"``."""
        if which == "all":
            return self.images, self.labels
        if which == "train":
            return self.images[self.train_index], self.labels[self.train_index]
        if which == "heldout":
            return self.images[self.heldout_index], self.labels[self.heldout_index]
        raise ValueError(f"split {which!r} is not one of: train, heldout, all")


def caption(digit: int, template: str) -> str:
    """The caption of ``digit`` in one phrasing, e.g. ``caption(7, "a handwritten digit {word}")``."""
    if not 0 <= int(digit) <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit}")
    return template.format(word=DIGIT_WORDS[int(digit)], numeral=str(int(digit)))


def all_captions(templates: Sequence[str] = DEFAULT_TEMPLATES) -> list[list[str]]:
    """``out[d][j]`` = caption of digit d in phrasing j (every caption the data can produce)."""
    return [[caption(d, t) for t in templates] for d in range(10)]


def split_indices(n: int, holdout_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Fixed split: a permutation drawn from ``torch.Generator().manual_seed(seed)``; the first
    ⌊n·holdout_fraction⌋ indices are held out. Both index tensors are returned sorted."""
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    n_hold = int(n * holdout_fraction)
    return perm[n_hold:].sort().values, perm[:n_hold].sort().values


def _upsample(raw: np.ndarray, resolution: int, mode: str) -> Tensor:
    """(N, 8, 8) ink values 0..16 → (N, 3, R, R) pixels in [−1, 1]."""
    v = torch.from_numpy(raw.astype(np.float32) / _SKLEARN_DIGITS_MAX)[:, None]
    v = F.interpolate(v, size=(resolution, resolution), mode=mode, align_corners=False)
    x = (2.0 * v - 1.0).clamp(-1.0, 1.0)
    return x.expand(-1, 3, -1, -1).contiguous()


def load_digits_data(config: DigitsDataConfig | None = None) -> DigitsData:
    """Load sklearn's digits offline and build images, labels, captions and the split of ``config``."""
    from sklearn.datasets import load_digits

    config = config or DigitsDataConfig()
    bunch = load_digits()
    images = _upsample(bunch.images, config.resolution, config.interpolation)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    gen = torch.Generator().manual_seed(int(config.seed) + 1)  # phrasing choice, independent of the split draw
    which = torch.randint(len(config.templates), (len(labels),), generator=gen)
    captions = [caption(int(d), config.templates[int(j)]) for d, j in zip(labels, which)]
    train_idx, held_idx = split_indices(len(labels), config.holdout_fraction, config.seed)
    return DigitsData(images, labels, captions, train_idx, held_idx, config)


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, 3, H, W) pixels in [−1, 1] → (N, H, W, 3) uint8 with u = round((x + 1)/2 · 255)."""
    u = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return u.permute(0, 2, 3, 1).cpu().numpy()


def export_json_dataset(
    folder: str | Path,
    config: DigitsDataConfig | None = None,
    json_name: str = "dataset.json",
    image_dir: str = "images",
) -> Path:
    """Write every image as ``<folder>/<image_dir>/<key>.png`` and ``<folder>/<json_name>`` holding
    ``{"keys": [...], "image_paths": [...], "prompts": [...]}`` (docs/method.md §13.1). Image paths are relative to
    the JSON's folder. Returns the JSON path."""
    data = load_digits_data(config)
    folder = Path(folder)
    (folder / image_dir).mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(data.images)
    keys, paths = [], []
    for i in range(len(data)):
        key = f"{i:08d}"
        rel = f"{image_dir}/{key}.png"
        Image.fromarray(pixels[i]).save(folder / rel)
        keys.append(key)
        paths.append(rel)
    out = folder / json_name
    out.write_text(json.dumps({"keys": keys, "image_paths": paths, "prompts": data.captions}, indent=1))
    return out

"""The image-caption set a teacher trains on, held in memory: pixels, captions, SDXL size/crop ids, fingerprint.

The set is any JSON / JSON Lines image-caption file that ``senseflow data check`` accepts (docs/method.md §13.1);
it is checked first (every record decoded), then loaded once at the teacher's resolution with a centre crop
(:class:`~senseflow.data.json_images.ImageCaptionDataset`). The fingerprint is the sha256 of the records file and
of every image file, in record order: it changes when any caption or pixel does.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from senseflow.config import ConfigError

__all__ = ["CaptionedImages", "check_image_set", "load_image_set"]


@dataclass
class CaptionedImages:
    """``pixels`` (N, 3, R, R) in [−1, 1]; ``captions`` (N); ``original_sizes`` / ``crop_coords`` (N, 2)."""

    pixels: Tensor
    captions: list[str]
    original_sizes: Tensor
    crop_coords: Tensor
    fingerprint: str

    def __len__(self) -> int:
        return len(self.captions)


def check_image_set(path: str | Path, resolution: int) -> int:
    """Refuse, in one line, a set that ``senseflow data check`` would not accept or that holds no images (an LMDB
    of latents); returns the record count."""
    from senseflow.data.check import check_dataset

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"--data {p}: no such file (expected a JSON or JSON Lines image-caption set)")
    report = check_dataset(p, resolution)
    if report.format == "lmdb":
        raise ConfigError(f"--data {p}: an LMDB of latents has no images to train a VAE on; pass the JSON or JSON "
                          f"Lines image-caption set it was built from")
    if not report.usable:
        first = report.structural or next((i.message for i in report.issues if i.severity == "error"),
                                          f"{report.count} records")
        raise ConfigError(f"--data {p}: not a usable image-caption set ({first}); run `senseflow data check {p}`")
    return report.count


def load_image_set(path: str | Path, resolution: int) -> CaptionedImages:
    """Every record at ``resolution`` (centre crop), with the set's content fingerprint."""
    from senseflow.data.json_images import ImageCaptionDataset

    ds = ImageCaptionDataset(path, resolution, crop="center")
    digest = hashlib.sha256(Path(path).read_bytes())
    pixels, captions, sizes, crops = [], [], [], []
    for i in range(len(ds)):
        sample = ds.load(i)
        digest.update(Path(ds.records.record(i).image_path).read_bytes())
        pixels.append(sample["pixels"])
        captions.append(sample["caption"])
        sizes.append(torch.as_tensor(sample["original_size"]))
        crops.append(torch.as_tensor(sample["crop_coords"]))
    return CaptionedImages(torch.stack(pixels), captions, torch.stack(sizes), torch.stack(crops), digest.hexdigest())

"""Image-caption data set over a §13.1 JSON or a JSON Lines file (SD3.5 / FLUX real data; docs/method.md §13.1, §13.4).

A sample is a dict (default-collatable):

* ``pixels``: float32 (3, R, R) in [−1, 1] (policy in :mod:`senseflow.data.images`);
* ``caption``: str;
* ``original_size``: int64 (2,) = (h, w) of the decoded file; ``crop_coords``: int64 (2,) = (top, left) of the crop in
  the resized image (collated to (B, 2), the inputs of SDXL-style time ids);
* ``key``: str, ``index``: int (record index in the file);
* ``latents`` (C, h, w) when a complete :class:`~senseflow.data.cache.LatentCache` is given, and
  ``text.<field>`` tensors when a complete :class:`~senseflow.data.cache.EmbeddingCache` is given.

Random crops draw from a generator seeded with mix_seed(seed, epoch, index), so an epoch's crops do not depend on
which worker loads which sample, and a resumed run sees the crops an uninterrupted run would have seen.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from senseflow.data.cache import EmbeddingCache, LatentCache
from senseflow.data.errors import BadSampleError, DataError
from senseflow.data.images import CROP_MODES, RESAMPLE, load_image, prepare_image
from senseflow.data.records import RecordSource, open_records
from senseflow.data.seeding import generator_for

__all__ = ["ImageCaptionDataset", "IMAGE_LOAD_ERRORS"]

logger = logging.getLogger(__name__)

#: Exceptions PIL raises for missing, truncated, unidentifiable or oversized files.
IMAGE_LOAD_ERRORS = (OSError, SyntaxError, EOFError, ValueError, Image.DecompressionBombError)


class ImageCaptionDataset(Dataset):
    """Images and captions of a JSON / JSON Lines file at resolution ``resolution`` (R × R).

    ``kind`` is "json", "jsonl" or "auto" (by file suffix); ``seed`` seeds the random crops; ``repeat`` repeats the
    record list; ``resample`` / ``reducing_gap`` are PIL's resampling filter and optional two-stage reduction.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        resolution: int,
        crop: str = "center",
        seed: int = 0,
        repeat: int = 1,
        resample: str = "bicubic",
        reducing_gap: float | None = None,
        latent_cache: LatentCache | None = None,
        embedding_cache: EmbeddingCache | None = None,
        kind: str = "auto",
    ) -> None:
        if not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
        if crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}")
        if resample not in RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(RESAMPLE)}, got {resample!r}")
        if repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {repeat}")
        self.path = Path(path)
        self.records: RecordSource = open_records(self.path, kind)
        self.resolution, self.crop, self.seed, self.repeat = resolution, crop, seed, repeat
        self.resample, self.reducing_gap = resample, reducing_gap
        if latent_cache is not None and latent_cache.crop != crop:
            raise ValueError(
                f"latent cache {latent_cache.directory} holds {latent_cache.crop!r} crops; the data set uses {crop!r}"
            )
        self.latent_cache = self._complete_or_none(latent_cache, "latent")
        self.embedding_cache = self._complete_or_none(embedding_cache, "embedding")

    def _complete_or_none(self, cache, what: str):
        """Use a cache only if it covers every record (a partial cache would make batches inconsistent)."""
        if cache is None:
            return None
        if cache.stale:
            logger.warning(
                "%s cache %s is stale (source or settings changed); not used until rebuilt", what, cache.directory
            )
            return None
        try:
            keys = [r.key for r in self.records]
        except DataError as e:
            raise DataError(f"cannot match the {what} cache against the records: {e}") from None
        missing = cache.missing(keys)
        if missing:
            logger.warning(
                "%s cache %s covers %d of %d records (first missing key %r); not used",
                what, cache.directory, len(keys) - len(missing), len(keys), missing[0],
            )
            return None
        return cache

    def __len__(self) -> int:
        return len(self.records) * self.repeat

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.load(index)

    def load(self, index: int, epoch: int = 0) -> dict[str, Any]:
        """Sample ``index`` of epoch ``epoch``; raises :class:`BadSampleError` naming the file and the record."""
        n = len(self.records)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.path}: index {index} out of range for {len(self)} samples")
        i = index % n
        try:
            rec = self.records.record(i)
        except DataError as e:
            raise BadSampleError(str(e), index) from None
        loc = self.records.locate(i, rec.key)
        try:
            im = load_image(rec.image_path)
        except FileNotFoundError:
            raise BadSampleError(f"{loc}: image {rec.image_path} does not exist", index) from None
        except IMAGE_LOAD_ERRORS as e:
            raise BadSampleError(
                f"{loc}: image {rec.image_path} is unreadable ({type(e).__name__}: {e})", index
            ) from None
        gen = generator_for(self.seed, epoch, index) if self.crop == "random" else None
        try:
            prep = prepare_image(im, self.resolution, self.crop, gen, self.resample, self.reducing_gap)
        except ValueError as e:
            raise BadSampleError(f"{loc}: image {rec.image_path} cannot be prepared ({e})", index) from None
        sample: dict[str, Any] = {
            "pixels": prep.pixels,
            "caption": rec.prompt,
            "original_size": torch.tensor(prep.original_size, dtype=torch.int64),
            "crop_coords": torch.tensor(prep.crop_coords, dtype=torch.int64),
            "key": rec.key,
            "index": i,
        }
        if self.latent_cache is not None:
            sample["latents"] = self.latent_cache.get(rec.key).float()
        if self.embedding_cache is not None:
            for field, t in self.embedding_cache.get(rec.key).items():
                sample[f"text.{field}"] = t
        return sample

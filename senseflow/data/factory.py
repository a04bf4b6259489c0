"""Pick the data set class from the path: an LMDB folder/file → latents, ``.jsonl`` → JSON Lines, else JSON.

The JSON layout is that of docs/method.md §13.1.
"""
from __future__ import annotations

import os
from pathlib import Path

from senseflow.data.cache import EmbeddingCache, LatentCache
from senseflow.data.errors import DataError
from senseflow.data.json_images import ImageCaptionDataset
from senseflow.data.lmdb_latents import LatentLMDBDataset, is_lmdb
from senseflow.data.records import JSONL_SUFFIXES

__all__ = ["dataset_format", "open_dataset"]


def dataset_format(path: str | os.PathLike[str]) -> str:
    """``"lmdb"``, ``"jsonl"`` or ``"json"``; raises ``FileNotFoundError`` / :class:`DataError` otherwise."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: data set does not exist")
    if is_lmdb(p):
        return "lmdb"
    if p.is_dir():
        raise DataError(f"{p}: folder without data.mdb; expected an LMDB folder, a .json or a .jsonl file")
    return "jsonl" if p.suffix.lower() in JSONL_SUFFIXES else "json"


def open_dataset(
    path: str | os.PathLike[str],
    resolution: int,
    *,
    kind: str = "auto",
    crop: str = "center",
    seed: int = 0,
    repeat: int = 1,
    vae_scale_factor: int = 8,
    latent_cache: LatentCache | None = None,
    embedding_cache: EmbeddingCache | None = None,
) -> ImageCaptionDataset | LatentLMDBDataset:
    """The data set at ``path``: ``kind`` "auto" (see :func:`dataset_format`), "json", "jsonl" or "lmdb"
    (``crop``, ``seed`` and the caches apply to image sets only)."""
    if kind not in ("auto", "json", "jsonl", "lmdb"):
        raise ValueError(f"data set kind must be auto, json, jsonl or lmdb, got {kind!r}")
    if kind == "auto":
        kind = dataset_format(path)
    if kind == "lmdb":
        return LatentLMDBDataset(path, resolution=resolution, vae_scale_factor=vae_scale_factor, repeat=repeat)
    return ImageCaptionDataset(
        path, resolution, crop=crop, seed=seed, repeat=repeat, latent_cache=latent_cache,
        embedding_cache=embedding_cache, kind=kind,
    )

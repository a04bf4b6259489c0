"""The trainer's view of the data: one call from the ``data`` config section to an endless, resumable batch stream.

``build_training_data(cfg.data, batch_size, seed, rank, world_size, teacher=cfg.teacher)`` refuses latents of
another size than the teacher's VAE makes, runs :func:`~senseflow.data.check.quick_check` (so a malformed set fails
with a message naming file and record), opens the set and wraps it in
:func:`~senseflow.data.loader.build_dataloader` over the GLOBAL rank. Batches are dicts with ``caption`` (list of
str), ``original_size`` / ``crop_coords`` (B, 2) int64, ``key``, ``index`` and either ``pixels`` (B, 3, R, R) in
[−1, 1] (JSON / JSONL) or ``latents`` (B, C, h, w) fp32 (LMDB; also JSON sets with a complete latent cache).
"""
from __future__ import annotations

from typing import Any, Iterator

from senseflow.data.check import quick_check
from senseflow.data.errors import DataError
from senseflow.data.factory import open_dataset
from senseflow.data.lmdb_latents import latents_fit_problem, teacher_vae_factor
from senseflow.data.loader import MapDataset, ResumableDataLoader, build_dataloader, infinite_batches

__all__ = ["TrainingData", "build_training_data"]


class TrainingData:
    """``next()`` gives the next batch of this rank forever; ``state_dict()`` / ``load_state_dict()`` resume it."""

    def __init__(self, dataset: MapDataset, loader: ResumableDataLoader) -> None:
        self.dataset, self.loader = dataset, loader
        self._stream: Iterator[Any] | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def next(self) -> dict[str, Any]:
        if self._stream is None:
            self._stream = infinite_batches(self.loader)
        return next(self._stream)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
        self._stream = None  # the next batch starts from the loaded position


def _get(cfg: Any, name: str, default: Any) -> Any:
    return cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)


def build_training_data(cfg: Any, batch_size: int, seed: int, rank: int, world_size: int,
                        teacher: Any = None) -> TrainingData:
    """From the ``data`` section (path, kind, resolution, crop, num_workers, pin_memory, persistent_workers,
    max_bad_samples; optional vae_scale_factor, quick_check_samples) and the per-rank batch size.

    With the ``teacher`` section (its ``path``), an LMDB whose latents are not the size the teacher's VAE makes at
    ``resolution`` is refused first (:func:`~senseflow.data.lmdb_latents.latents_fit_problem`), and the VAE's own
    scale factor replaces ``vae_scale_factor``."""
    path, kind, resolution = str(cfg.path), str(_get(cfg, "kind", "auto")), int(cfg.resolution)
    vae_scale_factor = int(_get(cfg, "vae_scale_factor", 8))
    if teacher is not None:
        problem = latents_fit_problem(path, kind, resolution, str(teacher.path))
        if problem is not None:
            raise DataError(problem)
        vae_scale_factor = teacher_vae_factor(str(teacher.path)) or vae_scale_factor
    quick_check(path, resolution, int(_get(cfg, "quick_check_samples", 4)), vae_scale_factor, kind)
    dataset = open_dataset(path, resolution, kind=kind, crop=str(_get(cfg, "crop", "center")), seed=seed,
                           vae_scale_factor=vae_scale_factor)
    loader = build_dataloader(
        dataset, batch_size, int(_get(cfg, "num_workers", 0)), bool(_get(cfg, "pin_memory", False)),
        bool(_get(cfg, "persistent_workers", False)), seed, rank, world_size, drop_last=True,
        max_bad_samples=int(_get(cfg, "max_bad_samples", 100)),
    )
    return TrainingData(dataset, loader)

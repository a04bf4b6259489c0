"""Data loaders for training: distributed over the global rank, reshuffled per epoch, resumable, robust to bad files.

* :class:`RobustDataset` replaces a sample that fails to load (deleted or corrupt file, bad bytes) by another,
  deterministic one — attempt a of sample i reads index mix_seed(seed, i, a) mod N — and logs a warning naming
  the file and record. The indices found bad travel with the batch (key ``_bad_indices``) to the main process.
* :class:`ResumableDataLoader` counts the *consumed* global position of the current epoch (see
  :mod:`senseflow.data.sampler`), so ``state_dict()`` taken after any step and ``load_state_dict()`` in a new run
  continue the epoch without repeating or skipping a sample. It stops training with a ``RuntimeError`` once more
  than ``max_bad_samples`` distinct bad records have been met.
* :func:`infinite_batches` loops over epochs (each epoch reshuffled) forever.
* Loader worker processes leave stopping to the trainer (:func:`leave_stop_to_trainer`), which stops cleanly at the
  end of an iteration on SIGTERM or Ctrl-C (:mod:`senseflow.trainer.stop`).
"""
from __future__ import annotations

import logging
import os
import signal
from typing import Any, Callable, Iterator, Protocol

import torch
from torch.utils.data import DataLoader, Dataset

from senseflow.data.errors import BadSampleError
from senseflow.data.sampler import ResumableDistributedSampler
from senseflow.data.seeding import mix_seed

__all__ = ["MapDataset", "RobustDataset", "ResumableDataLoader", "build_dataloader", "infinite_batches",
           "BAD_INDICES_KEY", "leave_stop_to_trainer"]


class MapDataset(Protocol):
    """A map-style data set with a length (every data set of :mod:`senseflow.data`; ``load(index, epoch)`` is used
    when it has one)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...

logger = logging.getLogger(__name__)

#: batch key carrying the comma-separated record indices found bad while building each sample
BAD_INDICES_KEY = "_bad_indices"


class RobustDataset(Dataset):
    """Wraps a map-style data set whose samples are dicts and whose ``load(index, epoch)`` (or ``[index]``) raises
    :class:`BadSampleError` for a bad record; items are ``(epoch, index)`` pairs or plain indices."""

    def __init__(self, dataset: MapDataset, max_bad_samples: int, seed: int = 0) -> None:
        if max_bad_samples < 0:
            raise ValueError(f"max_bad_samples must be >= 0, got {max_bad_samples}")
        self.dataset, self.max_bad_samples, self.seed = dataset, max_bad_samples, seed
        self._known_bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.dataset)

    def _load(self, index: int, epoch: int) -> dict[str, Any]:
        load = getattr(self.dataset, "load", None)
        sample = load(index, epoch) if callable(load) else self.dataset[index]
        if not isinstance(sample, dict):
            raise TypeError(f"samples must be dicts, got {type(sample).__name__}")
        return sample

    def __getitem__(self, item: tuple[int, int] | int) -> dict[str, Any]:
        epoch, index = item if isinstance(item, tuple) else (0, int(item))
        n = len(self.dataset)
        bad: list[int] = []
        current = index
        for attempt in range(1, self.max_bad_samples + 2):
            if current not in self._known_bad:
                try:
                    sample = self._load(current, epoch)
                    sample[BAD_INDICES_KEY] = ",".join(map(str, bad))
                    return sample
                except BadSampleError as e:
                    self._known_bad.add(current)
                    nxt = mix_seed(self.seed, index, attempt) % n
                    logger.warning("bad sample: %s; replaced by sample %d", e, nxt)
                    bad.append(current)
                    current = nxt
                    continue
            bad.append(current)
            current = mix_seed(self.seed, index, attempt) % n
        raise RuntimeError(
            f"more than max_bad_samples={self.max_bad_samples} bad records met while replacing sample {index} "
            f"(bad indices {sorted(set(bad))[:10]}...); the data set is damaged: run `senseflow data check`"
        )


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        for v in batch.values():
            return _batch_size(v)
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (list, tuple)):
        return len(batch)
    raise TypeError(f"cannot tell the batch size of a {type(batch).__name__}")


def leave_stop_to_trainer(worker_id: int) -> None:
    """``worker_init_fn`` of the training loader: the worker ignores SIGINT and leaves the trainer's process group.

    A terminal's Ctrl-C and torchrun's stop signal (sent to the trainer's whole process group) would otherwise end
    the worker mid-iteration and the trainer with "DataLoader worker exited unexpectedly", instead of letting it
    finish the iteration and save. The worker still ends when the trainer closes the loader (torch's own SIGTERM
    from the parent) or dies. A signal that reaches a worker before this function runs (while it starts: at the
    first batch, and each epoch when ``persistent_workers`` is off) still ends it and the trainer with it.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(os, "setpgrp"):
        os.setpgrp()


class ResumableDataLoader:
    """A ``DataLoader`` over :class:`RobustDataset` and :class:`ResumableDistributedSampler` that knows its position.

    Iterating yields the rest of the current epoch, then advances ``epoch`` (position 0). ``state_dict()`` =
    {epoch, position (global, consumed), world_size, num_samples, seed, bad_indices}.
    """

    def __init__(
        self,
        dataset: MapDataset,
        batch_size: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        shuffle: bool = True,
        max_bad_samples: int = 100,
        collate_fn: Callable | None = None,
        prefetch_factor: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = RobustDataset(dataset, max_bad_samples, seed)
        self.sampler = ResumableDistributedSampler(len(dataset), world_size, rank, seed, shuffle, drop_last)
        self.batch_size, self.drop_last, self.max_bad_samples = batch_size, drop_last, max_bad_samples
        kwargs: dict[str, Any] = {}
        if num_workers > 0:
            kwargs["persistent_workers"] = persistent_workers
            kwargs["worker_init_fn"] = leave_stop_to_trainer
            if prefetch_factor is not None:
                kwargs["prefetch_factor"] = prefetch_factor
        self.loader = DataLoader(
            self.dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=pin_memory,
            drop_last=drop_last,
            collate_fn=collate_fn,
            **kwargs,
        )
        self.epoch, self.position = 0, 0
        self.bad_indices: set[int] = set()

    def __len__(self) -> int:
        """Batches per full epoch on this rank."""
        n = self.sampler.per_rank
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _tally(self, batch: Any) -> None:
        if not isinstance(batch, dict) or BAD_INDICES_KEY not in batch:
            return
        for s in batch.pop(BAD_INDICES_KEY):
            if s:
                self.bad_indices.update(int(v) for v in s.split(","))
        if len(self.bad_indices) > self.max_bad_samples:
            raise RuntimeError(
                f"{len(self.bad_indices)} bad records met, more than max_bad_samples={self.max_bad_samples}; "
                f"stopping. First bad record indices: {sorted(self.bad_indices)[:10]}. The warnings above name the "
                "files; run `senseflow data check <dataset>` and fix or rebuild the data set."
            )

    def __iter__(self) -> Iterator[Any]:
        self.sampler.set_epoch(self.epoch, self.position)
        w = self.sampler.world_size
        for batch in self.loader:
            self.position += _batch_size(batch) * w
            self._tally(batch)
            yield batch
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "world_size": self.sampler.world_size,
            "num_samples": self.sampler.num_samples,
            "seed": self.sampler.seed,
            "bad_indices": sorted(self.bad_indices),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the data set size and seed must match (the epoch order depends on them)."""
        for k in ("num_samples", "seed"):
            if int(state[k]) != getattr(self.sampler, k):
                raise ValueError(
                    f"loader state has {k}={state[k]} but this run has {getattr(self.sampler, k)}; "
                    "the epoch order would differ, so the data position cannot be resumed"
                )
        position, w = int(state["position"]), self.sampler.world_size
        if position % w:
            logger.warning(
                "data position %d is not a multiple of the new world size %d; rewinding to %d (%d samples repeat)",
                position, w, position - position % w, position % w,
            )
            position -= position % w
        self.epoch, self.position = int(state["epoch"]), min(position, self.sampler.epoch_positions)
        self.bad_indices = set(int(i) for i in state.get("bad_indices", []))


def build_dataloader(
    dataset: MapDataset,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    persistent_workers: bool,
    seed: int,
    rank: int,
    world_size: int,
    drop_last: bool = True,
    *,
    shuffle: bool = True,
    max_bad_samples: int = 100,
    collate_fn: Callable | None = None,
    prefetch_factor: int | None = None,
) -> ResumableDataLoader:
    """The training loader of one process: ``rank`` is the GLOBAL rank, ``batch_size`` the per-rank batch."""
    return ResumableDataLoader(
        dataset, batch_size, num_workers, pin_memory, persistent_workers, seed, rank, world_size, drop_last,
        shuffle, max_bad_samples, collate_fn, prefetch_factor,
    )


def infinite_batches(loader: ResumableDataLoader) -> Iterator[Any]:
    """Batches forever, advancing (and reshuffling) epochs; the loader's ``state_dict`` is always current."""
    if len(loader) == 0:
        raise ValueError(
            f"an epoch has {loader.sampler.per_rank} samples per rank, fewer than batch_size={loader.batch_size}"
        )
    while True:
        yield from loader

"""A distributed, reshuffled-per-epoch, resumable sampler (docs/method.md §13.3, §17.4: global rank, set_epoch).

Epoch e of a data set of N samples is one permutation π_e of {0..N−1}, drawn from a CPU generator seeded
mix_seed(seed, e) (identity when ``shuffle=False``); every rank computes the same π_e. With W ranks the epoch is
cut to T = ⌊N/W⌋·W positions (``drop_last=True``) or padded by wrapping around to T = ⌈N/W⌉·W, and global rank r
reads positions p ≡ r (mod W): π_e[r], π_e[r + W], ...

The position within an epoch is *global*: a run that has consumed P positions (P a multiple of W; each rank has
read P/W samples) resumes with ``set_epoch(e, start=P)``; rank r then reads π_e[P + r], π_e[P + r + W], ... so no
sample of the epoch is repeated or skipped, even when W changes between runs (as long as W divides P).

Items are ``(epoch, index)`` pairs so that per-sample augmentation can be seeded by (seed, epoch, index)
independently of which worker loads the sample; :class:`senseflow.data.loader.RobustDataset` unpacks them.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

from senseflow.data.seeding import mix_seed

__all__ = ["ResumableDistributedSampler"]


class ResumableDistributedSampler(Sampler[tuple[int, int]]):
    """Yields (epoch, index) for global rank ``rank`` of ``world_size`` from global position ``start`` on."""

    def __init__(
        self,
        num_samples: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"the data set is empty (num_samples={num_samples})")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if drop_last and num_samples < world_size:
            raise ValueError(f"{num_samples} samples cannot feed {world_size} ranks with drop_last=True")
        self.num_samples, self.world_size, self.rank = num_samples, world_size, rank
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch, self.start = 0, 0

    @property
    def epoch_positions(self) -> int:
        """T: positions per epoch over all ranks (a multiple of the world size)."""
        n, w = self.num_samples, self.world_size
        return (n // w) * w if self.drop_last else -(-n // w) * w

    @property
    def per_rank(self) -> int:
        """Samples per rank per epoch, T / W."""
        return self.epoch_positions // self.world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select epoch ``epoch`` and the global position ``start`` (a multiple of the world size) to begin at."""
        if start % self.world_size or not 0 <= start <= self.epoch_positions:
            raise ValueError(
                f"start position {start} must be a multiple of world_size {self.world_size} "
                f"in [0, {self.epoch_positions}]"
            )
        self.epoch, self.start = int(epoch), int(start)

    def order(self, epoch: int) -> torch.Tensor:
        """π_e, cut or padded to T positions."""
        n = self.num_samples
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            perm = torch.randperm(n, generator=g)
        else:
            perm = torch.arange(n)
        t = self.epoch_positions
        if t > n:
            perm = torch.cat([perm, perm.repeat(-(-(t - n) // n))[: t - n]])
        return perm[:t]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        mine = self.order(epoch)[self.start + self.rank :: self.world_size]
        return _pairs(epoch, mine)

    def __len__(self) -> int:
        return (self.epoch_positions - self.start) // self.world_size


def _pairs(epoch: int, indices: torch.Tensor, chunk: int = 1 << 16) -> Iterator[tuple[int, int]]:
    """(epoch, index) pairs, converting the index tensor to Python ints a chunk at a time (epochs can be huge)."""
    for part in indices.split(chunk):
        for i in part.tolist():
            yield epoch, i

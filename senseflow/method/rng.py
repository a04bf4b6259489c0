"""Random streams of a distributed run (METHOD.md decision 2).

* ``shared``: seeded identically on every rank; every *decision* that must agree across ranks (the
  backward-simulation coin, the anchor index k, the ISG mid-point, the teacher guidance scale, the timestep of a
  shared draw) comes from it. Every rank makes the same calls in the same order, so the draws agree without a
  broadcast; ``assert_shared_agree`` checks it in tests and in debug runs.
* ``noise``: seeded with the seed and the global rank, so noise differs per rank.

Both are CPU generators (results do not depend on the accelerator); tensors drawn from them are moved to the
device by the caller. Their states are part of every checkpoint, so a resumed run draws what an uninterrupted
run would have drawn.
"""
from __future__ import annotations

import torch
from torch import Tensor

# Large odd multiplier that spreads rank seeds far apart in the Philox / MT seed space.
_RANK_STRIDE = 1_000_003


class RunRNG:
    """The two generators of one process: ``shared`` (same on all ranks) and ``noise`` (per rank)."""

    def __init__(self, seed: int, rank: int) -> None:
        self.seed, self.rank = int(seed), int(rank)
        self.shared = torch.Generator().manual_seed(self.seed)
        self.noise = torch.Generator().manual_seed(self.seed + _RANK_STRIDE * (self.rank + 1))

    def randn(self, shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype = torch.float32) -> Tensor:
        """Per-rank Gaussian noise on ``device``."""
        return torch.randn(shape, generator=self.noise).to(device=device, dtype=dtype)

    def coin(self, p: float) -> bool:
        """A shared Bernoulli(p) decision."""
        return bool(torch.rand((), generator=self.shared).item() < p)

    def randint(self, low: int, high_inclusive: int) -> int:
        """A shared integer uniform on {low..high_inclusive}."""
        return int(torch.randint(low, high_inclusive + 1, (), generator=self.shared).item())

    def state_dict(self) -> dict[str, Tensor]:
        return {"shared": self.shared.get_state(), "noise": self.noise.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.shared.set_state(state["shared"])
        self.noise.set_state(state["noise"])

"""Random streams of a run (docs/method.md, decision 2) and the draw helpers every module uses.

* ``shared``: one generator seeded identically on every rank; every *decision* that must agree across ranks and
  micro-batches (the backward-simulation coin, the anchor index k, the ISG mid-point, the teacher guidance scale)
  comes from it. Every rank makes the same calls in the same order, so the draws agree without a broadcast.
* ``noise``: per-sample generators (diffusers' convention of a list of generators, one per batch element). Slot s
  of rank r is seeded from (seed, r·slots + s), so noise differs across ranks and across samples, and a sample's
  noise does not depend on how the per-rank batch is split into accumulation micro-batches: two micro-batches of
  one sample draw exactly what one batch of two draws.

All generators live on the CPU (results do not depend on the accelerator); tensors are moved to the device after
the draw. Their states are part of every checkpoint, so a resumed run draws what an uninterrupted one would have.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

#: a single generator, or one generator per sample of the batch (the leading dimension of every draw)
NoiseSource = Union[torch.Generator, Sequence[torch.Generator], None]

# Large odd multiplier that spreads slot seeds far apart.
_SLOT_STRIDE = 1_000_003


def _per_sample(shape: tuple[int, ...], source: NoiseSource) -> Sequence[torch.Generator] | None:
    if source is None or isinstance(source, torch.Generator):
        return None
    gens = list(source)
    if not shape or shape[0] != len(gens):
        raise ValueError(f"per-sample noise: {len(gens)} generators for a draw of shape {tuple(shape)}")
    return gens


def _gen_device(source: NoiseSource) -> torch.device:
    if isinstance(source, torch.Generator):
        return source.device
    return torch.device("cpu") if source is None else list(source)[0].device


def _draw(fn, shape: Sequence[int], source: NoiseSource, device, **kwargs) -> Tensor:
    """``fn(shape)`` from one generator, or sample i's slice from ``source[i]`` when ``source`` is a list."""
    shape = tuple(shape)
    gens = _per_sample(shape, source)
    if gens is None:
        out = fn(shape, generator=source, device=_gen_device(source), **kwargs)
    else:
        out = torch.cat([fn((1, *shape[1:]), generator=g, device=g.device, **kwargs) for g in gens])
    return out.to(device) if device is not None else out


def randn(shape: Sequence[int], source: NoiseSource, device: torch.device | str | None = None,
          dtype: torch.dtype = torch.float32) -> Tensor:
    """ε ~ N(0, I) of ``shape``; sample i comes from ``source[i]`` when ``source`` is a list."""
    return _draw(torch.randn, shape, source, device, dtype=dtype)


def rand(shape: Sequence[int], source: NoiseSource, device: torch.device | str | None = None,
         dtype: torch.dtype = torch.float32) -> Tensor:
    """U[0, 1) of ``shape`` (per-sample generators as in :func:`randn`)."""
    return _draw(torch.rand, shape, source, device, dtype=dtype)


def randint(low: int, high_inclusive: int, shape: Sequence[int], source: NoiseSource,
            device: torch.device | str | None = None) -> Tensor:
    """Integers uniform on {low..high_inclusive} (per-sample generators as in :func:`randn`)."""
    return _draw(lambda size, **kw: torch.randint(low, high_inclusive + 1, size, **kw), shape, source, device)


def gaussian_like(x: Tensor, generator: NoiseSource) -> Tensor:
    """ε ~ N(0, I) shaped like ``x``, drawn in fp32 on the generator's device, then moved to x's device/dtype."""
    return randn(tuple(x.shape), generator, device=x.device).to(x.dtype)


class RunRNG:
    """The random streams of one process: ``shared`` (same on all ranks) and per-sample ``noise`` slots."""

    def __init__(self, seed: int, rank: int, slots: int = 1) -> None:
        self.seed, self.rank, self.slots = int(seed), int(rank), int(slots)
        self.shared = torch.Generator().manual_seed(self.seed)
        self.noise_slots = [
            torch.Generator().manual_seed(self.seed + _SLOT_STRIDE * (self.rank * self.slots + s + 1))
            for s in range(self.slots)
        ]

    def noise(self, start: int, count: int) -> list[torch.Generator]:
        """The generators of samples ``start .. start+count-1`` of this rank's iteration batch."""
        if start + count > self.slots:
            raise ValueError(f"noise slots {start}..{start + count - 1} exceed the {self.slots} of this run")
        return self.noise_slots[start : start + count]

    def coin(self, p: float) -> bool:
        """A shared Bernoulli(p) decision."""
        return bool(torch.rand((), generator=self.shared).item() < p)

    def randint(self, low: int, high_inclusive: int) -> int:
        """A shared integer uniform on {low..high_inclusive}."""
        return int(torch.randint(low, high_inclusive + 1, (), generator=self.shared).item())

    def state_dict(self) -> dict[str, Tensor]:
        state = {"shared": self.shared.get_state()}
        state.update({f"noise_{s}": g.get_state() for s, g in enumerate(self.noise_slots)})
        return state

    def holds_layout(self, state: dict[str, Tensor]) -> bool:
        """Whether a saved :meth:`state_dict` has exactly this stream's noise slots (the same batch layout)."""
        return all(f"noise_{s}" in state for s in range(self.slots)) and f"noise_{self.slots}" not in state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.shared.set_state(state["shared"])
        for s, g in enumerate(self.noise_slots):
            g.set_state(state[f"noise_{s}"])

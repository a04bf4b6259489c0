"""Deterministic seed mixing for the data layer (no Python ``random``, no global RNG).

``mix_seed(a, b, ...)`` folds integers into one 63-bit seed with the SplitMix64 finaliser, so that nearby inputs
such as (seed, epoch) and (seed + 1, epoch − 1) give unrelated streams (a plain ``seed + epoch`` would collide).
"""
from __future__ import annotations

import torch

__all__ = ["mix_seed", "generator_for"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*values: int) -> int:
    """A seed in [0, 2⁶³) that depends on every value and their order."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1


def generator_for(*values: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``mix_seed(*values)``."""
    return torch.Generator().manual_seed(mix_seed(*values))

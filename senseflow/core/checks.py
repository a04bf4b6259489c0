"""Run-time narrowing of optional values that an earlier step must have set."""
from __future__ import annotations

from typing import TypeVar

__all__ = ["need"]

_T = TypeVar("_T")


def need(value: _T | None, what: str) -> _T:
    """``value``, which an earlier step has set (a RuntimeError naming ``what`` when a step ran out of order)."""
    if value is None:
        raise RuntimeError(f"{what} is not set: a step ran out of order")
    return value

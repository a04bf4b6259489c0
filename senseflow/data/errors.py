"""Errors of the data layer. Every message names the file and, where there is one, the record (index and key)."""
from __future__ import annotations

from os import PathLike

__all__ = ["DataError", "BadSampleError", "where"]


def where(path: str | PathLike[str], index: int | None = None, key: str | None = None, line: int | None = None) -> str:
    """``"<path>, record 12 (key '0000012'), line 13"`` — the location part of every data error message."""
    parts = [str(path)]
    if index is not None:
        rec = f"record {index}"
        if key is not None:
            rec += f" (key {key!r})"
        parts.append(rec)
    elif key is not None:
        parts.append(f"key {key!r}")
    if line is not None:
        parts.append(f"line {line}")
    return ", ".join(parts)


class DataError(ValueError):
    """A malformed data set or record (structure, types, encoding). A ``ValueError`` so callers can catch either."""


class BadSampleError(DataError):
    """One record could not be turned into a sample (missing or corrupt file, bad bytes). Training may replace it
    with another sample (see :class:`senseflow.data.loader.RobustDataset`); everything else should stop."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index

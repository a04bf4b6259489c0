"""The one atomic file write: write a temporary file beside the target, then ``os.replace`` it over the target.

A reader (or a resumed run) therefore sees the old complete file or the new complete file, never a half-written
one; an interrupted write leaves at most a hidden ``.<name>.<random>.tmp`` beside the target, and a failed one
removes its temporary file. The temporary file is created by ``write`` itself, so the final file gets the
permissions of a normally created one.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write", "atomic_write_text", "fsync_file"]


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to the storage device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], fsync: bool = False) -> Path:
    """Call ``write(tmp)`` on a temporary path in ``path``'s folder, then rename it to ``path``; return ``path``.

    ``fsync``: flush the temporary file to disk before the rename (checkpoints, images that must survive a crash).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        if fsync:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8", fsync: bool = False) -> Path:
    """:func:`atomic_write` of a text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding=encoding), fsync=fsync)

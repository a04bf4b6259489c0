"""The one atomic file write: write a temporary file beside the target, then ``os.replace`` it over the target.

A reader (or a resumed run) therefore sees the old complete file or the new complete file, never a half-written
one; an interrupted write leaves at most a hidden ``.<name>.<random>.tmp`` beside the target, and a failed one
removes its temporary file. The final file has the permissions of a normally created one (0666 minus the
user's umask): some writers (safetensors, ``tempfile``) create their file 0600, so :func:`atomic_write` sets the mode
of the temporary file before the rename, and :func:`apply_umask` does the same for a file written in place.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable

__all__ = ["apply_umask", "atomic_write", "atomic_write_text", "fsync_file", "umask"]


def umask() -> int:
    """The process's file-creation mask (read from ``/proc/self/status`` on Linux, so no other thread ever sees a
    changed mask; elsewhere set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give a regular file the mode a plain ``open(path, "w")`` would have: 0666 minus the user's umask."""
    os.chmod(path, 0o666 & ~umask())


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
        apply_umask(tmp)
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

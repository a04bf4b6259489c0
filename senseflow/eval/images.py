"""Image folders of an evaluation: one PNG per prompt, named ``{index:05d}.png`` (as :mod:`senseflow.inference`).

Writes are atomic (a temporary file in the same folder, then ``os.replace``), so a PNG that exists under its
final name is complete; :func:`is_complete_png` also checks the PNG signature and the closing ``IEND`` chunk, so a
file truncated by other means (a copy interrupted, a full disk) is regenerated rather than scored.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from senseflow.core.io import atomic_write

__all__ = ["image_name", "image_path", "is_complete_png", "save_png_atomic", "indexed_images", "load_rgb",
           "load_batch", "batched"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_NAME = re.compile(r"^(\d{5,})\.png$")


def image_name(index: int) -> str:
    """``00007.png`` for prompt 7."""
    return f"{int(index):05d}.png"


def image_path(folder: Path | str, index: int) -> Path:
    return Path(folder) / image_name(index)


def is_complete_png(path: Path | str) -> bool:
    """True when ``path`` is a file that starts with the PNG signature and ends with the IEND chunk."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size < len(_PNG_SIGNATURE) + len(_IEND):
            return False
        with path.open("rb") as f:
            head = f.read(len(_PNG_SIGNATURE))
            f.seek(-len(_IEND), os.SEEK_END)
            tail = f.read()
    except OSError:
        return False
    return head == _PNG_SIGNATURE and tail == _IEND


def save_png_atomic(image: Image.Image, path: Path | str) -> Path:
    """Save ``image`` as PNG at ``path`` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"), fsync=True)


def indexed_images(folder: Path | str, indices: Iterable[int] | None = None) -> dict[int, Path]:
    """``{index: path}`` of the complete ``NNNNN.png`` files of ``folder`` (restricted to ``indices`` if given)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    found: dict[int, Path] = {}
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m and is_complete_png(p):
            found[int(m.group(1))] = p
    if indices is not None:
        wanted = set(int(i) for i in indices)
        found = {i: p for i, p in found.items() if i in wanted}
    return dict(sorted(found.items()))


def load_rgb(path: Path | str) -> Image.Image:
    """The image at ``path`` as an RGB PIL image (fully read, file closed)."""
    with Image.open(path) as im:
        return im.convert("RGB")


def pil_to_uint8(image: Image.Image) -> Tensor:
    """PIL RGB → uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def load_batch(paths: Sequence[Path]) -> Tensor:
    """uint8 (B, 3, H, W) of same-sized images; a size mismatch raises ValueError naming the file."""
    tensors = [pil_to_uint8(load_rgb(p)) for p in paths]
    shape = tensors[0].shape
    for p, t in zip(paths, tensors):
        if t.shape != shape:
            raise ValueError(f"{p} is {tuple(t.shape[1:])}, but {paths[0]} is {tuple(shape[1:])}; "
                             "a batch needs images of one size")
    return torch.stack(tensors)


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]

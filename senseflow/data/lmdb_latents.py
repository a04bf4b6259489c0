"""VAE-latent LMDB in DMD2's layout (SDXL real data, docs/method.md §13.2): reader and writer.

One LMDB environment (a folder holding ``data.mdb``, or a single file) with the keys

* ``latents_shape``: ASCII "N C H W", e.g. b"500000 4 128 128"; its presence marks a *finished* set;
* ``prompts_shape``: ASCII "N";
* ``latents_{i}_data``: raw little-endian float16 bytes of latent i, C·H·W·2 bytes (131,072 for 4×128×128);
  the latent is already normalised, z = (z_vae − shift)·scale;
* ``prompts_{i}_data``: the UTF-8 caption of record i;
* optional per record (written by ``senseflow data build-lmdb``): ``orig_size_{i}_data`` ASCII "h w",
  ``crop_coords_{i}_data`` ASCII "top left", ``keys_{i}_data`` UTF-8 source key;
* optional: ``resolution`` ASCII "R" (training resolution); ``build_info`` / ``build_progress`` JSON (builder
  provenance and the committed position of an unfinished build).

When a record has no size/crop entries (DMD2's files) the reader returns original_size = (R, R) and crop = (0, 0), with
R = the ``resolution`` argument, else the stored ``resolution``, else H·``vae_scale_factor``.

The environment is opened read-only without locks (``lock=False, readonly=True, readahead=False``) lazily in the
process that reads, never pickled: data-loader workers each open their own handle (one per process and file, shared
by every reader of that file in the process, as LMDB requires).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import lmdb
import numpy as np
import torch
from torch.utils.data import Dataset

from senseflow.core.family import vae_factor
from senseflow.data.errors import BadSampleError, DataError, where

__all__ = [
    "LatentLMDBDataset",
    "LMDBHeader",
    "read_lmdb_header",
    "open_lmdb_readonly",
    "release_lmdb",
    "is_lmdb",
    "latent_key",
    "prompt_key",
    "orig_size_key",
    "crop_coords_key",
    "record_key_key",
    "LATENTS_SHAPE",
    "PROMPTS_SHAPE",
    "RESOLUTION",
    "BUILD_INFO",
    "BUILD_PROGRESS",
    "LATENT_DTYPE",
    "teacher_vae_factor",
    "teacher_latent_shape",
    "latents_fit_problem",
    "check_latents_fit_teacher",
]

LATENTS_SHAPE = b"latents_shape"
PROMPTS_SHAPE = b"prompts_shape"
RESOLUTION = b"resolution"
BUILD_INFO = b"build_info"
BUILD_PROGRESS = b"build_progress"
#: stored element type of the latents
LATENT_DTYPE = np.dtype("<f2")


def latent_key(i: int) -> bytes:
    return f"latents_{i}_data".encode()


def prompt_key(i: int) -> bytes:
    return f"prompts_{i}_data".encode()


def orig_size_key(i: int) -> bytes:
    return f"orig_size_{i}_data".encode()


def crop_coords_key(i: int) -> bytes:
    return f"crop_coords_{i}_data".encode()


def record_key_key(i: int) -> bytes:
    return f"keys_{i}_data".encode()


def is_lmdb(path: str | os.PathLike[str]) -> bool:
    """A folder holding ``data.mdb``, or a file whose name ends in ``.mdb`` / ``.lmdb``."""
    p = Path(path)
    return (p.is_dir() and (p / "data.mdb").exists()) or (p.is_file() and p.suffix.lower() in (".mdb", ".lmdb"))


_SHARED: dict[str, tuple[int, tuple[int, int], lmdb.Environment]] = {}


def _data_file_identity(p: Path) -> tuple[int, int]:
    st = os.stat(p / "data.mdb" if p.is_dir() else p)
    return st.st_dev, st.st_ino


def _close_quietly(env: lmdb.Environment) -> None:
    try:
        env.close()
    except lmdb.Error:  # pragma: no cover - closing a handle never fails in practice
        pass


def open_lmdb_readonly(path: str | os.PathLike[str]) -> lmdb.Environment:
    """The process-wide read-only, lock-free handle of ``path`` (safe for many reader processes on a finished set).

    LMDB allows one open handle per file and process, and py-lmdb refuses a second one, so every reader in a
    process shares this handle; callers must not close it (see :func:`release_lmdb`). A handle inherited through
    ``fork`` (a data-loader worker) or left pointing at replaced files is closed in this process and reopened.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: LMDB does not exist")
    if p.is_dir() and not (p / "data.mdb").exists():
        raise DataError(f"{p}: folder has no data.mdb; not an LMDB environment")
    key, ident = str(p.resolve()), _data_file_identity(p)
    hit = _SHARED.get(key)
    if hit is not None:
        pid, hit_ident, env = hit
        if pid == os.getpid() and hit_ident == ident:
            return env
        del _SHARED[key]
        _close_quietly(env)
    try:
        env = lmdb.open(
            str(p), subdir=p.is_dir(), readonly=True, lock=False, readahead=False, meminit=False, max_readers=512
        )
    except lmdb.Error as e:
        raise DataError(f"{p}: cannot open as LMDB ({e})") from None
    _SHARED[key] = (os.getpid(), ident, env)
    return env


def release_lmdb(path: str | os.PathLike[str]) -> None:
    """Close this process's shared read handle of ``path`` if there is one (before writing to or deleting it)."""
    hit = _SHARED.pop(str(Path(path).resolve()), None)
    if hit is not None:
        _close_quietly(hit[2])


@overload
def _ascii_ints(raw: bytes, what: str, path: Path, count: int | None = None) -> list[int]: ...
@overload
def _ascii_ints(raw: bytes | None, what: str, path: Path, count: int | None = None) -> list[int] | None: ...
def _ascii_ints(raw: bytes | None, what: str, path: Path, count: int | None = None) -> list[int] | None:
    if raw is None:
        return None
    try:
        values = [int(v) for v in bytes(raw).decode("ascii").split()]
    except (UnicodeDecodeError, ValueError):
        raise DataError(
            f"{path}: '{what}' must be ASCII integers separated by spaces, got {bytes(raw)[:40]!r}"
        ) from None
    if count is not None and len(values) != count:
        raise DataError(f"{path}: '{what}' must hold {count} integers, got {values}")
    return values


@dataclass(frozen=True)
class LMDBHeader:
    """The set-level keys: N latents of shape (C, H, W), the prompt count and the stored resolution (if any)."""

    count: int
    latent_shape: tuple[int, int, int]
    prompt_count: int
    resolution: int | None
    unfinished_build: bool

    @property
    def latent_nbytes(self) -> int:
        c, h, w = self.latent_shape
        return c * h * w * LATENT_DTYPE.itemsize


def read_lmdb_header(path: str | os.PathLike[str], env: lmdb.Environment | None = None) -> LMDBHeader:
    """Validate and return the set-level keys; raises :class:`DataError` naming the file and the key."""
    p = Path(path)
    env = env or open_lmdb_readonly(p)
    with env.begin() as txn:
        shape_raw, prompts_raw = txn.get(LATENTS_SHAPE), txn.get(PROMPTS_SHAPE)
        res_raw, progress = txn.get(RESOLUTION), txn.get(BUILD_PROGRESS)
    if shape_raw is None:
        hint = (
            " An unfinished `senseflow data build-lmdb` left it; run the same command again to resume."
            if progress is not None
            else " Expected DMD2's layout: b'N C H W'."
        )
        raise DataError(f"{p}: no 'latents_shape' key; not a finished latent LMDB.{hint}")
    shape = _ascii_ints(shape_raw, "latents_shape", p, 4)
    if any(v < 1 for v in shape):
        raise DataError(f"{p}: 'latents_shape' must be positive, got {shape}")
    if prompts_raw is None:
        raise DataError(f"{p}: no 'prompts_shape' key; expected ASCII b'N' next to 'latents_shape'")
    prompt_count = _ascii_ints(prompts_raw, "prompts_shape", p)
    if not prompt_count:
        raise DataError(f"{p}: 'prompts_shape' is empty")
    if prompt_count[0] != shape[0]:
        raise DataError(
            f"{p}: 'prompts_shape' says {prompt_count[0]} prompts but 'latents_shape' says {shape[0]} latents"
        )
    res = _ascii_ints(res_raw, "resolution", p, 1)
    return LMDBHeader(
        shape[0], (shape[1], shape[2], shape[3]), prompt_count[0], res[0] if res else None, progress is not None
    )


class LatentLMDBDataset(Dataset):
    """DMD2-layout latents: sample = {``latents`` fp32 (C, H, W), ``caption``, ``original_size`` (2,),
    ``crop_coords`` (2,), ``key``, ``index``}.

    ``resolution`` R sets the default original_size (R, R); when None it is the stored ``resolution`` key, else
    H·``vae_scale_factor``.
    """

    def __init__(
        self, path: str | os.PathLike[str], resolution: int | None = None, vae_scale_factor: int = 8, repeat: int = 1
    ) -> None:
        if repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {repeat}")
        self.path = Path(path)
        self.header = read_lmdb_header(self.path)
        self.resolution = resolution or self.header.resolution or self.header.latent_shape[1] * vae_scale_factor
        self.repeat = repeat
        self._env: lmdb.Environment | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self.header.count * self.repeat

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_env"], state["_pid"] = None, None
        return state

    def _environment(self) -> lmdb.Environment:
        if self._env is None or self._pid != os.getpid():
            self._env = open_lmdb_readonly(self.path)
            self._pid = os.getpid()
        return self._env

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.load(index)

    def load(self, index: int, epoch: int = 0) -> dict[str, Any]:
        """Sample ``index`` (``epoch`` is unused: no augmentation); raises :class:`BadSampleError` naming the record."""
        if not 0 <= index < len(self):
            raise IndexError(f"{self.path}: index {index} out of range for {len(self)} samples")
        i = index % self.header.count
        try:
            with self._environment().begin(buffers=False) as txn:
                raw_latent = txn.get(latent_key(i))
                raw_prompt = txn.get(prompt_key(i))
                raw_size, raw_crop = txn.get(orig_size_key(i)), txn.get(crop_coords_key(i))
                raw_key = txn.get(record_key_key(i))
        except lmdb.Error as e:
            raise BadSampleError(f"{where(self.path, i)}: LMDB read failed ({e})", index) from None
        key = raw_key.decode("utf-8", errors="replace") if raw_key is not None else f"{i:08d}"
        loc = where(self.path, i, key if raw_key is not None else None)
        if raw_latent is None:
            raise BadSampleError(f"{loc}: missing '{latent_key(i).decode()}'", index)
        if len(raw_latent) != self.header.latent_nbytes:
            raise BadSampleError(
                f"{loc}: latent has {len(raw_latent)} bytes, expected {self.header.latent_nbytes} "
                f"(float16 {'×'.join(map(str, self.header.latent_shape))})",
                index,
            )
        if raw_prompt is None:
            raise BadSampleError(f"{loc}: missing '{prompt_key(i).decode()}'", index)
        try:
            caption = raw_prompt.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadSampleError(f"{loc}: prompt is not valid UTF-8 (byte {e.start})", index) from None
        try:
            size = _ascii_ints(raw_size, orig_size_key(i).decode(), self.path, 2) or [self.resolution, self.resolution]
            crop = _ascii_ints(raw_crop, crop_coords_key(i).decode(), self.path, 2) or [0, 0]
        except DataError as e:
            raise BadSampleError(f"{loc}: {e}", index) from None
        latent = torch.from_numpy(np.frombuffer(raw_latent, dtype=LATENT_DTYPE).astype(np.float32))
        return {
            "latents": latent.view(self.header.latent_shape),
            "caption": caption,
            "original_size": torch.tensor(size, dtype=torch.int64),
            "crop_coords": torch.tensor(crop, dtype=torch.int64),
            "key": key,
            "index": i,
        }


# ---- latents against the teacher's VAE (read from metadata only, before any network loads) --------------------

def _fmt(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape))


def _teacher_vae_config(teacher_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The teacher's ``vae/config.json`` (None when there is none; the folder checks report that)."""
    config_file = Path(teacher_path).expanduser() / "vae" / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{config_file}: not readable JSON ({e})") from None
    if not isinstance(config, dict) or "latent_channels" not in config:
        raise DataError(f"{config_file}: no 'latent_channels'; expected a diffusers AutoencoderKL config")
    return config


def teacher_vae_factor(teacher_path: str | os.PathLike[str]) -> int | None:
    """Pixel-to-latent factor 2^(levels − 1) of the teacher's VAE (:func:`senseflow.core.family.vae_factor`, the
    one the families use); None without ``<teacher_path>/vae/config.json``."""
    config = _teacher_vae_config(teacher_path)
    return None if config is None else vae_factor(config)


def teacher_latent_shape(teacher_path: str | os.PathLike[str], resolution: int) -> tuple[int, int, int] | None:
    """(C, h, w) of the latents the teacher's VAE (``<teacher_path>/vae/config.json``) makes of a
    ``resolution``² image: ``latent_channels`` and resolution / 2^(levels − 1). None without that file."""
    config = _teacher_vae_config(teacher_path)
    if config is None:
        return None
    f = vae_factor(config)
    return int(config["latent_channels"]), resolution // f, resolution // f


def latents_fit_problem(data_path: str | os.PathLike[str], kind: str, resolution: int,
                        teacher_path: str | os.PathLike[str]) -> str | None:
    """One line when the latents of an LMDB set do not have the size the teacher's VAE gives at ``resolution``
    (an LMDB made by another VAE or at another resolution), else None.

    Reads the LMDB's ``latents_shape`` and the teacher's ``vae/config.json`` only. Image sets (``kind`` json /
    jsonl, or ``auto`` on a path that is no LMDB) are encoded by the teacher's own VAE and always fit; a missing
    data set or VAE config is left to the data and folder checks (None here).
    """
    if kind in ("json", "jsonl") or not Path(data_path).exists() or (kind == "auto" and not is_lmdb(data_path)):
        return None
    expected = teacher_latent_shape(teacher_path, resolution)
    if expected is None:
        return None
    stored = read_lmdb_header(data_path).latent_shape
    if stored == expected:
        return None
    return (f"data.path: the LMDB {data_path} holds latents of {_fmt(stored)} (C×H×W) but the teacher's VAE "
            f"({Path(teacher_path) / 'vae' / 'config.json'}) makes {_fmt(expected)} at data.resolution={resolution}; "
            "encode the set with this teacher's VAE (senseflow data build-lmdb) or use the teacher whose VAE made it")


def check_latents_fit_teacher(cfg: Any) -> None:
    """Raise :class:`DataError` (a ``ValueError``) with :func:`latents_fit_problem`'s line when the LMDB at
    ``cfg.data.path`` holds latents of another size than ``cfg.teacher.path``'s VAE makes at ``data.resolution``.
    Reads metadata only, so the trainer's pre-flight runs it before any network loads."""
    data, teacher = cfg.data, cfg.teacher
    kind = data.get("kind", "auto") if hasattr(data, "get") else getattr(data, "kind", "auto")
    problem = latents_fit_problem(str(data.path), str(kind), int(data.resolution), str(teacher.path))
    if problem is not None:
        raise DataError(problem)

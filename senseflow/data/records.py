"""Image-caption record lists: the JSON file of docs/method.md §13.1 and its JSON Lines variant for large sets.

JSON (one object, three lists of equal length N)::

    {"keys": ["00000000", ...], "image_paths": ["/abs/00000000.png", ...], "prompts": ["caption", ...]}

JSON Lines (one object per non-blank line)::

    {"key": "00000000", "image_path": "images/00000000.png", "prompt": "caption"}

A relative image path resolves against the folder of the JSON/JSONL file. Keys may be strings or integers (kept as
their decimal string); paths and prompts must be strings. A JSON file is validated completely when opened; a JSONL
file is only indexed (byte offset of every record line) and each record is validated when it is read, so opening a
file of millions of lines stays cheap (:func:`senseflow.data.check.check_dataset` validates every line).

Strings are kept in compact tables (one UTF-8 byte array plus offsets) rather than lists of Python objects, so
data-loader workers forked from the main process do not copy them page by page through reference counting.
"""
from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import numpy as np

from senseflow.data.errors import DataError, where

__all__ = ["ImageRecord", "RecordSource", "JsonRecords", "JsonlRecords", "open_records", "JSONL_SUFFIXES"]

JSON_LIST_KEYS = ("keys", "image_paths", "prompts")
JSONL_FIELDS = ("key", "image_path", "prompt")
JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass(frozen=True)
class ImageRecord:
    """One image-caption pair; ``image_path`` is already resolved."""

    index: int
    key: str
    image_path: str
    prompt: str


class _StringTable:
    """Immutable list of strings stored as one UTF-8 byte array plus int64 offsets."""

    def __init__(self, strings: Sequence[str]) -> None:
        encoded = [s.encode("utf-8") for s in strings]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        if encoded:
            np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self._blob[self._offsets[i] : self._offsets[i + 1]].tobytes().decode("utf-8")


def _resolve(base: Path, p: str) -> str:
    return p if os.path.isabs(p) else str(base / p)


def _check_key(value: object, loc: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{loc}: key must be a string (or integer), got {type(value).__name__}")
    return str(value)


def _check_str(value: object, field: str, loc: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{loc}: {field} must be a string, got {type(value).__name__}")
    return value


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: data set file does not exist") from None
    if not raw.strip():
        raise DataError(f"{path}: file is empty; expected a JSON object with lists {', '.join(JSON_LIST_KEYS)}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{where(path, line=line)}: invalid UTF-8 at byte {e.start}; the file must be UTF-8") from None


class RecordSource(ABC):
    """A random-access list of :class:`ImageRecord` read from ``path``."""

    path: Path

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def record(self, index: int) -> ImageRecord:
        """Record ``index``; raises :class:`DataError` naming the file and record if it is malformed."""

    def __iter__(self) -> Iterator[ImageRecord]:
        for i in range(len(self)):
            yield self.record(i)

    def locate(self, index: int, key: str | None = None) -> str:
        """Human-readable location of record ``index`` for messages."""
        return where(self.path, index, key)


class JsonRecords(RecordSource):
    """The §13.1 JSON file, validated completely on construction."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        text = _read_text(self.path)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{where(self.path, line=e.lineno)}: invalid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(
                f"{self.path}: top level must be an object with lists {', '.join(JSON_LIST_KEYS)}, "
                f"got {type(obj).__name__}"
                + (" (a list of records? use a .jsonl file with one record per line)" if isinstance(obj, list) else "")
            )
        missing = [k for k in JSON_LIST_KEYS if k not in obj]
        if missing:
            raise DataError(f"{self.path}: missing key(s) {missing}; expected lists {', '.join(JSON_LIST_KEYS)}")
        for k in JSON_LIST_KEYS:
            if not isinstance(obj[k], list):
                raise DataError(f"{self.path}: '{k}' must be a list, got {type(obj[k]).__name__}")
        lengths = {k: len(obj[k]) for k in JSON_LIST_KEYS}
        if len(set(lengths.values())) != 1:
            raise DataError(f"{self.path}: lists must have equal length, got {lengths}")
        n = lengths["keys"]
        if n == 0:
            raise DataError(f"{self.path}: the data set has no records")
        keys = [_check_key(k, where(self.path, i)) for i, k in enumerate(obj["keys"])]
        base = self.path.parent
        paths = [
            _resolve(base, _check_str(p, "image_path", where(self.path, i, keys[i])))
            for i, p in enumerate(obj["image_paths"])
        ]
        prompts = [_check_str(p, "prompt", where(self.path, i, keys[i])) for i, p in enumerate(obj["prompts"])]
        seen: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k in seen:
                raise DataError(f"{where(self.path, i, k)}: duplicate key (first used by record {seen[k]})")
            seen[k] = i
        del obj, seen
        self._keys, self._paths, self._prompts = _StringTable(keys), _StringTable(paths), _StringTable(prompts)

    def __len__(self) -> int:
        return len(self._keys)

    def record(self, index: int) -> ImageRecord:
        return ImageRecord(index, self._keys[index], self._paths[index], self._prompts[index])


class JsonlRecords(RecordSource):
    """JSON Lines records, indexed by byte offset on construction and parsed on access."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        offsets: list[int] = []
        lines: list[int] = []
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path}: data set file does not exist") from None
        with f:
            pos = 0
            for lineno, raw in enumerate(f, start=1):
                if raw.strip():
                    offsets.append(pos)
                    lines.append(lineno)
                pos += len(raw)
        if not offsets:
            raise DataError(
                f"{self.path}: file is empty; expected one JSON record {{{', '.join(JSONL_FIELDS)}}} per line"
            )
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._lines = np.asarray(lines, dtype=np.int64)
        self._fh: BinaryIO | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self._offsets)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fh"], state["_pid"] = None, None
        return state

    def close(self) -> None:
        """Close this process's file handle (reopened on the next read)."""
        if self._fh is not None and self._pid == os.getpid():
            self._fh.close()
        self._fh, self._pid = None, None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def _handle(self):
        if self._fh is None or self._pid != os.getpid():
            self._fh = open(self.path, "rb")
            self._pid = os.getpid()
        return self._fh

    def line_of(self, index: int) -> int:
        return int(self._lines[index])

    def locate(self, index: int, key: str | None = None) -> str:
        return where(self.path, index, key, line=self.line_of(index))

    def record(self, index: int) -> ImageRecord:
        fh = self._handle()
        fh.seek(int(self._offsets[index]))
        raw = fh.readline()
        loc = self.locate(index)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{loc}: invalid UTF-8 at byte {e.start} of the line") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{loc}: invalid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(
                f"{loc}: a record must be an object {{{', '.join(JSONL_FIELDS)}}}, got {type(obj).__name__}"
            )
        missing = [k for k in JSONL_FIELDS if k not in obj]
        if missing:
            raise DataError(f"{loc}: missing field(s) {missing}; expected {list(JSONL_FIELDS)}")
        key = _check_key(obj["key"], loc)
        loc = self.locate(index, key)
        path = _check_str(obj["image_path"], "image_path", loc)
        prompt = _check_str(obj["prompt"], "prompt", loc)
        return ImageRecord(index, key, _resolve(self.path.parent, path), prompt)


def open_records(path: str | os.PathLike[str], kind: str = "auto") -> RecordSource:
    """``kind`` "json" or "jsonl"; "auto": JSON Lines for ``.jsonl``/``.ndjson`` files, the §13.1 JSON otherwise."""
    p = Path(path)
    if kind not in ("auto", "json", "jsonl"):
        raise ValueError(f"record file kind must be auto, json or jsonl, got {kind!r}")
    if p.is_dir():
        raise DataError(f"{p}: is a folder; expected a .json or .jsonl file (an LMDB folder is opened as latents)")
    if kind == "auto":
        kind = "jsonl" if p.suffix.lower() in JSONL_SUFFIXES else "json"
    return JsonlRecords(p) if kind == "jsonl" else JsonRecords(p)

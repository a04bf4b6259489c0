"""Optional caches in safetensors: image latents and text embeddings of JSON/JSONL sets keyed by record key, and the
training run's text conditioning keyed by caption (:class:`TextCache`, ``data.text_cache``; docs/method.md §13.5).

A cache is a folder::

    index.json                 {"fingerprint": "...", "entries": {record_key: [shard_file, [tensor names]]}}
    shard_00000.safetensors    tensors named "<n>.<field>", n a per-shard entry number

The fingerprint is a hash of what the cached values depend on: the source file's resolved path, size and
modification time (ns), the training resolution, the encoder's name and any extra settings (crop mode, maximum
text length). A cache whose stored fingerprint differs is *stale*: it reads as empty and the next :meth:`flush`
deletes the old shards and starts a new index, so a cache is rebuilt rather than silently reused.

Writes are buffered by :meth:`put` and made durable by :meth:`flush` (one new shard per flush, index replaced
atomically). One process writes (rank 0); any number read (shards are opened lazily per process).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from senseflow.core.io import atomic_write_text

__all__ = ["source_fingerprint", "TensorCache", "LatentCache", "EmbeddingCache", "TextCache", "caption_key",
           "read_cache_meta"]

_INDEX = "index.json"


def source_fingerprint(source: str | os.PathLike[str], **settings: Any) -> str:
    """sha256 of {path, size, mtime_ns} of ``source`` and the JSON-serialisable ``settings`` (sorted)."""
    p = Path(source).resolve()
    st = p.stat()
    payload = {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "settings": settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class TensorCache:
    """Map record key → dict of named tensors, persisted as safetensors shards (see module docstring)."""

    def __init__(self, directory: str | os.PathLike[str], fingerprint: str, meta: dict[str, Any] | None = None) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        #: JSON-serialisable facts written into the index beside the fingerprint (what it was computed from)
        self.meta: dict[str, Any] = dict(meta or {})
        self._entries: dict[str, tuple[str, list[str]]] = {}
        self._pending: dict[str, dict[str, Tensor]] = {}
        self._handles: dict[str, Any] = {}
        self._pid: int | None = None
        self.stale = False
        index = self.directory / _INDEX
        if index.exists():
            try:
                meta = json.loads(index.read_text())
                stored = meta["fingerprint"]
                entries = meta["entries"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: unreadable cache index ({e}); delete the folder to rebuild it") from None
            if stored == fingerprint:
                self._entries = {k: (v[0], list(v[1])) for k, v in entries.items()}
            else:
                self.stale = True

    # -- reading -----------------------------------------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        return key in self._pending or key in self._entries

    def __len__(self) -> int:
        return len(self._entries.keys() | self._pending.keys())

    def keys(self) -> set[str]:
        return set(self._entries) | set(self._pending)

    def missing(self, keys: list[str] | set[str]) -> list[str]:
        """The keys of ``keys`` that have no entry."""
        return [k for k in keys if k not in self]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"], state["_pid"] = {}, None
        return state

    def _shard(self, name: str):
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.directory / name), framework="pt")
        return self._handles[name]

    def get_entry(self, key: str) -> dict[str, Tensor] | None:
        """The tensors stored for ``key`` (field → tensor), or None when absent (or the cache is stale)."""
        if key in self._pending:
            return dict(self._pending[key])
        hit = self._entries.get(key)
        if hit is None:
            return None
        shard, names = hit
        f = self._shard(shard)
        return {n.split(".", 1)[1]: f.get_tensor(n) for n in names}

    # -- writing -----------------------------------------------------------------------------------------
    def put_entry(self, key: str, tensors: dict[str, Tensor]) -> None:
        """Buffer ``tensors`` for ``key`` (replacing an older entry); durable after :meth:`flush`."""
        if not tensors:
            raise ValueError(f"cache {self.directory}: nothing to store for key {key!r}")
        self._pending[key] = {f: t.detach().to("cpu").contiguous() for f, t in tensors.items()}

    def flush(self) -> None:
        """Write buffered entries as one new shard and atomically replace the index (drops stale shards first)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.stale:
            for old in self.directory.glob("shard_*.safetensors"):
                old.unlink()
            self._entries, self._handles, self.stale = {}, {}, False
        if self._pending:
            number = len({s for s, _ in self._entries.values()})
            while (self.directory / f"shard_{number:05d}.safetensors").exists():
                number += 1
            shard = f"shard_{number:05d}.safetensors"
            flat: dict[str, Tensor] = {}
            for n, (key, fields) in enumerate(self._pending.items()):
                names = []
                for field, t in fields.items():
                    name = f"{n}.{field}"
                    flat[name] = t
                    names.append(name)
                self._entries[key] = (shard, names)
            save_file(flat, str(self.directory / shard), metadata={"fingerprint": self.fingerprint})
            self._pending = {}
        index: dict[str, Any] = {"fingerprint": self.fingerprint, "entries": self._entries}
        if self.meta:
            index["meta"] = self.meta
        atomic_write_text(self.directory / _INDEX, json.dumps(index))


class LatentCache(TensorCache):
    """Normalised VAE latents (z − shift)·scale of centre-cropped images, one tensor (C, h, w) per record key.

    The fingerprint covers the source file, ``resolution``, ``encoder`` (e.g. the VAE folder) and ``crop``.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        source: str | os.PathLike[str],
        resolution: int,
        encoder: str,
        crop: str = "center",
    ) -> None:
        super().__init__(
            directory, source_fingerprint(source, kind="latent", resolution=resolution, encoder=encoder, crop=crop)
        )
        self.crop = crop

    def get(self, key: str) -> Tensor | None:
        entry = self.get_entry(key)
        return None if entry is None else entry["latent"]

    def put(self, key: str, latent: Tensor) -> None:
        self.put_entry(key, {"latent": latent})


class EmbeddingCache(TensorCache):
    """Text-encoder outputs per record key, a dict of named tensors (e.g. ``prompt_embeds`` and ``pooled``).

    The fingerprint covers the source file, ``encoder`` (e.g. the teacher folder) and ``max_length``.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        source: str | os.PathLike[str],
        encoder: str,
        max_length: int | None = None,
    ) -> None:
        super().__init__(
            directory, source_fingerprint(source, kind="embedding", encoder=encoder, max_length=max_length)
        )

    def get(self, key: str) -> dict[str, Tensor] | None:
        return self.get_entry(key)

    def put(self, key: str, embeddings: dict[str, Tensor]) -> None:
        self.put_entry(key, embeddings)



def read_cache_meta(directory: str | os.PathLike[str]) -> tuple[str, dict[str, Any], set[str]] | None:
    """(fingerprint, meta, entry keys) of the cache index in ``directory``, or None when it has none; reads the
    index only (no shard is opened). Raises ``ValueError`` for an unreadable index."""
    index = Path(directory) / _INDEX
    if not index.is_file():
        return None
    try:
        data = json.loads(index.read_text())
        return str(data["fingerprint"]), dict(data.get("meta") or {}), set(data["entries"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: unreadable cache index ({e}); delete the folder to rebuild it") from None


def caption_key(caption: str) -> str:
    """The entry key of a caption in a :class:`TextCache`: sha256 of its UTF-8 bytes (any text, fixed length)."""
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


def parts_fingerprint(parts: dict[str, Any]) -> str:
    """sha256 of the JSON of ``parts`` (sorted keys): the fingerprint of a :class:`TextCache`."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class TextCache(TensorCache):
    """Text conditioning per caption (``data.text_cache``, built by ``senseflow data text-cache``).

    An entry is keyed by :func:`caption_key` and holds the family's encoder outputs for that caption (``prompt_embeds``
    and ``pooled``: one row of :meth:`~senseflow.core.family.TeacherFamily.encode_prompts`'s Condition, in the text
    encoders' dtype) and, with the GAN, the discriminator's L2-normalised CLIP text features (``clip``). ``parts``
    are what the values depend on (teacher text encoders, caption list, token lengths, D's CLIP folder: see
    :mod:`senseflow.data.text_cache`); the fingerprint is their hash and ``parts`` is kept in the index, so a stale
    cache can say which part changed.
    """

    def __init__(self, directory: str | os.PathLike[str], parts: dict[str, Any],
                 meta: dict[str, Any] | None = None) -> None:
        super().__init__(directory, parts_fingerprint(parts), {**(meta or {}), "parts": parts})

    def get_caption(self, caption: str) -> dict[str, Tensor] | None:
        """The tensors stored for ``caption`` (field → tensor), or None."""
        return self.get_entry(caption_key(caption))

    def put_caption(self, caption: str, tensors: dict[str, Tensor]) -> None:
        self.put_entry(caption_key(caption), tensors)

    def has_caption(self, caption: str) -> bool:
        return caption_key(caption) in self

    def stack(self, captions: list[str] | tuple[str, ...], field: str) -> Tensor:
        """``field`` of every caption stacked on a new batch axis; a caption without an entry is a ``KeyError``
        naming it (the cache was built for another caption list)."""
        rows = []
        for caption in captions:
            entry = self.get_caption(caption)
            if entry is None or field not in entry:
                raise KeyError(f"data.text_cache {self.directory}: no {field!r} for caption {caption!r}; rebuild it "
                               "with senseflow data text-cache")
            rows.append(entry[field])
        return torch.stack(rows)

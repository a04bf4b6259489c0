"""The text-conditioning cache of a training run (``data.text_cache``): what it depends on, the check the trainer
and its pre-flight make, and the build of ``senseflow data text-cache`` (docs/method.md §13.5).

With ``data.text_cache`` set, the trainer loads no text encoder: every caption's conditioning (the family's
``prompt_embeds`` and ``pooled``), the empty prompt's (the unconditional branch of CFG) and, with the GAN, the
discriminator's CLIP text features are read from the cache. Its fingerprint covers (:func:`text_cache_parts`):

* ``teacher_text``: the family, ``teacher.text_encoder_dtype`` and, for every text encoder and tokenizer folder of
  the teacher, the name, size and modification time of each file;
* ``captions``: sha256 of the sorted distinct captions of ``data.path`` (JSON, JSON Lines or LMDB);
* ``lengths``: ``teacher.clip_max_length``, ``teacher.t5_max_length`` (families with a T5 encoder) and the token
  length of the discriminator's CLIP text model;
* ``clip``: with ``method.gan.enabled``, the files of ``discriminator.clip_path`` (None without the GAN).

A cache whose stored parts differ is refused with one line naming the part, before any network loads
(:func:`check_text_cache`, also run by ``senseflow train``'s pre-flight). Preview prompts (``train.preview_prompts``)
are encoded too; a run whose preview prompts are not all in the cache skips its previews with a logged note.

The build encodes the training captions in batches of ``train.batch_size`` (the batch the trainer encodes on the
fly, so each cached row is computed by the same kernels as on the fly), the preview prompts as one batch (as a
preview does) and the empty prompt alone (as the family's unconditional condition is), on the run's
``train.device``. The build resumes: captions already in a fresh cache are skipped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from senseflow.data.cache import TextCache, caption_key, parts_fingerprint, read_cache_meta

__all__ = ["training_captions", "text_cache_parts", "check_text_cache", "open_text_cache", "build_text_cache",
           "TextCacheBuild", "DISC_TEXT_MAX_LENGTH", "TEXT_CACHE_COMMAND"]

log = logging.getLogger(__name__)

#: token length of the discriminator's CLIP text conditioner (docs/method.md §9.2; TextConditioner's default)
DISC_TEXT_MAX_LENGTH = 77
#: how a stale or missing cache is rebuilt (named in every refusal)
TEXT_CACHE_COMMAND = "senseflow data text-cache --config CONFIG [key=value ...]"


def _get(node: Any, name: str, default: Any = None) -> Any:
    return node.get(name, default) if hasattr(node, "get") else getattr(node, name, default)


def _iter_captions(data: Any) -> Iterator[str]:
    """Every caption of the training set ``data`` (the config's ``data`` section), in record order."""
    from senseflow.data.factory import dataset_format
    from senseflow.data.lmdb_latents import open_lmdb_readonly, prompt_key, read_lmdb_header
    from senseflow.data.records import open_records

    path, kind = str(data.path), str(_get(data, "kind", "auto"))
    if kind == "auto":
        kind = dataset_format(path)
    if kind == "lmdb":
        header = read_lmdb_header(path)
        with open_lmdb_readonly(path).begin(buffers=False) as txn:
            for i in range(header.count):
                raw = txn.get(prompt_key(i))
                if raw is None:
                    raise ValueError(f"data.path {path}: record {i} has no caption")
                yield raw.decode("utf-8")
        return
    for record in open_records(path, kind):
        yield record.prompt


def training_captions(data: Any) -> list[str]:
    """The distinct captions of the training set, sorted."""
    return sorted(set(_iter_captions(data)))


def _folder_files(folder: Path) -> list[list[Any]]:
    """[name, size, mtime_ns] of every file under ``folder`` (sorted), the identity of a model folder's weights."""
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            out.append([str(p.relative_to(folder)), st.st_size, st.st_mtime_ns])
    return out


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def text_cache_parts(cfg: Any, captions: list[str]) -> dict[str, Any]:
    """The four parts of the fingerprint (module docstring) for the training config ``cfg`` and its ``captions``."""
    from senseflow.models.families import get_family

    t = cfg.teacher
    family = get_family(str(t.family))
    root = Path(str(t.path)).expanduser().resolve()
    folders = {name: _folder_files(root / name) for c in family.text_components for name in (c.encoder, c.tokenizer)}
    lengths: dict[str, int] = {"clip_max_length": int(t.clip_max_length)}
    if family.default_t5_max_length is not None:
        lengths["t5_max_length"] = int(t.t5_max_length)
    gan = bool(cfg.method.gan.enabled)
    if gan:
        lengths["discriminator_clip_max_length"] = DISC_TEXT_MAX_LENGTH
    clip = None
    if gan:
        clip_root = Path(str(cfg.discriminator.clip_path)).expanduser().resolve()
        clip = _sha({"path": str(clip_root), "files": _folder_files(clip_root)})
    return {
        "teacher_text": _sha({"family": family.name, "path": str(root), "dtype": str(t.text_encoder_dtype),
                              "files": folders}),
        "captions": _sha(captions),
        "lengths": lengths,
        "clip": clip,
    }


_PART_NAMES = {
    "teacher_text": "the teacher's text encoders (teacher.path, teacher.family or teacher.text_encoder_dtype)",
    "captions": "the training captions (data.path)",
    "lengths": "the token lengths (teacher.clip_max_length / teacher.t5_max_length)",
    "clip": "the discriminator's CLIP text model (discriminator.clip_path or method.gan.enabled)",
}


def check_text_cache(cfg: Any, captions: list[str] | None = None) -> dict[str, Any]:
    """Refuse ``cfg.data.text_cache`` unless it is a complete cache of this config (index metadata only: no tensor
    and no network is read). Returns the stored metadata. Raises ``ValueError`` with one line naming the key, what
    is wrong and the command that rebuilds it."""
    directory = Path(str(cfg.data.text_cache))
    rebuild = f"build it with {TEXT_CACHE_COMMAND}"
    found = read_cache_meta(directory)
    if found is None:
        raise ValueError(f"data.text_cache {directory}: no text cache there (no index.json); {rebuild}")
    fingerprint, meta, keys = found
    captions = training_captions(cfg.data) if captions is None else captions
    parts = text_cache_parts(cfg, captions)
    if fingerprint != parts_fingerprint(parts):
        stored = meta.get("parts") or {}
        changed = [_PART_NAMES[k] for k in _PART_NAMES if stored.get(k) != parts.get(k)] or ["its settings"]
        raise ValueError(f"data.text_cache {directory}: stale, built for other {' and '.join(changed)}; re{rebuild}")
    missing = [c for c in [*captions, ""] if caption_key(c) not in keys]
    if missing:
        raise ValueError(f"data.text_cache {directory}: incomplete, {len(missing)} of {len(captions) + 1} captions "
                         f"missing (e.g. {missing[0]!r}); run {TEXT_CACHE_COMMAND} again to finish it")
    return meta


def open_text_cache(cfg: Any) -> TextCache:
    """The checked cache of ``cfg.data.text_cache`` (see :func:`check_text_cache`), opened for reading."""
    captions = training_captions(cfg.data)
    meta = check_text_cache(cfg, captions)
    batch = meta.get("encode_batch")
    if batch is not None and int(batch) != int(cfg.train.batch_size):
        log.warning("data.text_cache was encoded in batches of %s, train.batch_size is %s: the cached conditioning "
                    "equals on-the-fly encoding within float rounding, not bit for bit", batch, cfg.train.batch_size)
    return TextCache(str(cfg.data.text_cache), text_cache_parts(cfg, captions))


@dataclass(frozen=True)
class TextCacheBuild:
    """What a build did: the folder, the captions it holds, how many were encoded now, the preview prompts."""

    out: Path
    captions: int
    encoded: int
    previews: int


def _batches(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def build_text_cache(cfg: Any, out: str | os.PathLike[str], device: str | None = None,
                     flush_every: int = 4096) -> TextCacheBuild:
    """Encode every caption of ``cfg``'s training set, its preview prompts and the empty prompt into a
    :class:`TextCache` at ``out`` (module docstring). ``device``: default ``train.device`` (auto: CUDA if
    available). Refuses (``FileExistsError``, nothing written) a non-empty ``out`` that is not a text cache."""
    import torch

    from senseflow.core.checks import need
    from senseflow.models.families import build_family

    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "index.json").is_file())):
        raise FileExistsError(f"--out {out}: exists and is not a text cache or an empty folder (nothing written)")
    captions = training_captions(cfg.data)
    parts = text_cache_parts(cfg, captions)
    name = str(device or cfg.train.device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    batch = int(cfg.train.batch_size)
    cache = TextCache(out, parts, {"encode_batch": batch})
    family = build_family(cfg.teacher, dev)
    conditioner = None
    if bool(cfg.method.gan.enabled):
        from senseflow.models.discriminator import TextConditioner, load_discriminator_backbones

        d = cfg.discriminator
        bb = load_discriminator_backbones(d.dino_path, d.clip_path, dev, torch.float32, dino=False)
        conditioner = TextConditioner(need(bb.text_model, "the CLIP text model"), bb.tokenizer,
                                      max_length=DISC_TEXT_MAX_LENGTH).to(dev)
    previews = [str(p) for p in cfg.train.preview_prompts]
    # the empty prompt alone first: the unconditional condition is encoded as a batch of one
    groups = [[""]] if not cache.has_caption("") else []
    groups += _batches([c for c in captions if c != "" and not cache.has_caption(c)], batch)
    todo_previews = [p for p in dict.fromkeys(previews) if p not in captions and p != ""]
    if todo_previews and not all(cache.has_caption(p) for p in todo_previews):
        groups.append(list(dict.fromkeys(previews)))  # one batch, as a preview encodes them
    encoded, pending = 0, 0
    for group in groups:
        cond = family.encode_prompts(group)
        clip = conditioner(group) if conditioner is not None else None
        for i, caption in enumerate(group):
            if cache.has_caption(caption):
                continue
            entry = {"prompt_embeds": cond.prompt_embeds[i], "pooled": cond.pooled[i]}
            if clip is not None:
                entry["clip"] = clip[i]
            cache.put_caption(caption, entry)
            encoded += 1
            pending += 1
        if pending >= flush_every:
            cache.flush()
            pending = 0
    cache.flush()
    return TextCacheBuild(out, len(cache), encoded, len(previews))

"""Validate a data set before training: ``check_dataset`` (every record, for ``senseflow data check``) and
``quick_check`` (structure, counts and a few samples, run by training at start-up).

Findings are errors (the record cannot be used: missing or unreadable image, malformed record, missing prompt,
latent of the wrong byte length, duplicate key) or warnings (usable but suspicious: image smaller than the
training resolution, so upscaled; aspect ratio beyond ``max_aspect``, so the square crop drops most of it; empty
caption). A set is *unusable* when its structure is broken (unreadable file, missing or inconsistent set-level
keys, latent shape that does not match the resolution), when no record is good, or when more than ``max_bad``
records have errors.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from senseflow.data.errors import BadSampleError, DataError, where
from senseflow.data.factory import dataset_format, open_dataset
from senseflow.data.images import load_image
from senseflow.data.json_images import IMAGE_LOAD_ERRORS
from senseflow.data.lmdb_latents import (
    LatentLMDBDataset,
    LMDBHeader,
    crop_coords_key,
    latent_key,
    open_lmdb_readonly,
    orig_size_key,
    prompt_key,
    read_lmdb_header,
)
from senseflow.data.records import open_records

__all__ = ["Issue", "CheckReport", "check_dataset", "quick_check", "quick_check_section"]

ERROR, WARNING = "error", "warning"


@dataclass(frozen=True)
class Issue:
    severity: str
    kind: str
    message: str
    index: int | None = None


@dataclass
class CheckReport:
    """Result of :func:`check_dataset`; ``summary()`` is what the CLI prints."""

    path: Path
    format: str
    count: int = 0
    checked: int = 0
    resolution: int | None = None
    max_bad: int = 0
    structural: str | None = None
    issues: list[Issue] = field(default_factory=list)

    def add(self, severity: str, kind: str, message: str, index: int | None = None) -> None:
        self.issues.append(Issue(severity, kind, message, index))

    @property
    def bad_records(self) -> int:
        return len({i.index for i in self.issues if i.severity == ERROR and i.index is not None})

    @property
    def usable(self) -> bool:
        return self.structural is None and self.checked > self.bad_records and self.bad_records <= self.max_bad

    def counts(self) -> Counter:
        return Counter((i.severity, i.kind) for i in self.issues)

    def summary(self, max_listed: int = 20) -> str:
        lines = [f"{self.path} ({self.format}): {self.count} records, {self.checked} checked"
                 + (f" at resolution {self.resolution}" if self.resolution else "")]
        if self.structural:
            lines.append(f"  STRUCTURE: {self.structural}")
        for (sev, kind), n in sorted(self.counts().items()):
            lines.append(f"  {sev:7s} {kind:18s} {n}")
        listed = sorted(self.issues, key=lambda i: (i.severity != ERROR, i.index if i.index is not None else -1))
        for i in listed[:max_listed]:
            lines.append(f"  - {i.severity}: {i.message}")
        if len(listed) > max_listed:
            lines.append(f"  ... {len(listed) - max_listed} more")
        verdict = "usable" if self.usable else "UNUSABLE"
        lines.append(f"  {verdict}: {self.bad_records} bad record(s), max_bad={self.max_bad}")
        return "\n".join(lines)


def _check_image_records(
    report: CheckReport, resolution: int | None, limit: int | None, decode: bool, max_aspect: float
) -> None:
    try:
        records = open_records(report.path)
    except (DataError, FileNotFoundError) as e:
        report.structural = str(e)
        return
    report.count = len(records)
    n = len(records) if limit is None else min(limit, len(records))
    seen: dict[str, int] = {}
    for i in range(n):
        report.checked += 1
        try:
            rec = records.record(i)
        except DataError as e:
            report.add(ERROR, "malformed_record", str(e), i)
            continue
        loc = records.locate(i, rec.key)
        if rec.key in seen:
            report.add(ERROR, "duplicate_key", f"{loc}: duplicate key (first used by record {seen[rec.key]})", i)
        seen.setdefault(rec.key, i)
        if not rec.prompt.strip():
            report.add(WARNING, "empty_caption", f"{loc}: empty caption", i)
        try:
            if decode:
                w, h = load_image(rec.image_path).size
            else:
                with Image.open(rec.image_path) as im:
                    w, h = im.size
        except FileNotFoundError:
            report.add(ERROR, "missing_image", f"{loc}: image {rec.image_path} does not exist", i)
            continue
        except IMAGE_LOAD_ERRORS as e:
            report.add(
                ERROR, "unreadable_image", f"{loc}: image {rec.image_path} is unreadable ({type(e).__name__}: {e})", i
            )
            continue
        if resolution is not None and min(w, h) < resolution:
            report.add(WARNING, "small_image", f"{loc}: image is {w}×{h}, smaller than {resolution} (upscaled)", i)
        if max(w, h) / min(w, h) > max_aspect:
            kept = 100.0 * min(w, h) / max(w, h)
            report.add(WARNING, "extreme_aspect", f"{loc}: aspect ratio {w}×{h}; the square crop keeps {kept:.1f}%", i)


def _lmdb_resolution_problem(
    path: Path, header: LMDBHeader, resolution: int | None, vae_scale_factor: int
) -> str | None:
    if resolution is None:
        return None
    h = header.latent_shape[1]
    implied = header.resolution or h * vae_scale_factor
    if implied != resolution:
        src = "stored 'resolution'" if header.resolution else f"latent side {h} × vae_scale_factor {vae_scale_factor}"
        return (
            f"{path}: latents are {'×'.join(map(str, header.latent_shape))} ({src} = {implied} px) "
            f"but the training resolution is {resolution}"
        )
    return None


def _check_lmdb(report: CheckReport, resolution: int | None, limit: int | None, vae_scale_factor: int) -> None:
    p = report.path
    try:
        env = open_lmdb_readonly(p)
    except (DataError, FileNotFoundError) as e:
        report.structural = str(e)
        return
    try:
        header = read_lmdb_header(p, env)
    except DataError as e:
        report.structural = str(e)
        return
    report.count = header.count
    problem = _lmdb_resolution_problem(p, header, resolution, vae_scale_factor)
    if problem:
        report.structural = problem
    n = header.count if limit is None else min(limit, header.count)
    with env.begin(buffers=True) as txn:
        for i in range(n):
            report.checked += 1
            loc = where(p, i)
            lat = txn.get(latent_key(i))
            if lat is None:
                report.add(ERROR, "missing_latent", f"{loc}: missing '{latent_key(i).decode()}'", i)
            elif len(lat) != header.latent_nbytes:
                report.add(
                    ERROR, "latent_size", f"{loc}: latent has {len(lat)} bytes, expected {header.latent_nbytes}", i
                )
            else:
                a = np.frombuffer(lat, dtype="<f2")
                if not np.isfinite(a).all():
                    report.add(ERROR, "latent_nonfinite", f"{loc}: latent holds NaN or Inf", i)
            raw = txn.get(prompt_key(i))
            if raw is None:
                report.add(ERROR, "missing_prompt", f"{loc}: missing '{prompt_key(i).decode()}'", i)
            else:
                try:
                    if not bytes(raw).decode("utf-8").strip():
                        report.add(WARNING, "empty_caption", f"{loc}: empty caption", i)
                except UnicodeDecodeError as e:
                    report.add(ERROR, "invalid_prompt", f"{loc}: prompt is not valid UTF-8 (byte {e.start})", i)
            for k in (orig_size_key(i), crop_coords_key(i)):
                v = txn.get(k)
                if v is not None:
                    try:
                        ok = len([int(x) for x in bytes(v).decode("ascii").split()]) == 2
                    except (UnicodeDecodeError, ValueError):
                        ok = False
                    if not ok:
                        report.add(
                            ERROR,
                            "bad_size_crop",
                            f"{loc}: '{k.decode()}' must be ASCII 'a b', got {bytes(v)[:20]!r}",
                            i,
                        )
        if txn.get(latent_key(header.count)) is not None:
            report.add(
                WARNING,
                "extra_records",
                f"{p}: holds '{latent_key(header.count).decode()}' beyond latents_shape N={header.count}",
            )


def check_dataset(
    path: str | os.PathLike[str],
    resolution: int | None = None,
    *,
    max_bad: int = 0,
    limit: int | None = None,
    decode: bool = True,
    max_aspect: float = 4.0,
    vae_scale_factor: int = 8,
) -> CheckReport:
    """Check every record (the first ``limit`` if given). ``decode=False`` reads image headers only (faster, but
    truncated files go unnoticed)."""
    p = Path(path)
    try:
        fmt = dataset_format(p)
    except (DataError, FileNotFoundError) as e:
        return CheckReport(p, "unknown", resolution=resolution, max_bad=max_bad, structural=str(e))
    report = CheckReport(p, fmt, resolution=resolution, max_bad=max_bad)
    if fmt == "lmdb":
        _check_lmdb(report, resolution, limit, vae_scale_factor)
    else:
        _check_image_records(report, resolution, limit, decode, max_aspect)
    return report


def _refuse_bom(path: Path) -> None:
    """A JSON or JSONL file must be UTF-8 without a byte-order mark (the JSON standard forbids one)."""
    if not path.is_file():
        return
    try:
        with open(path, "rb") as f:
            head = f.read(3)
    except OSError:
        return  # reading it fails below with its own message
    if head == b"\xef\xbb\xbf":
        raise DataError(f"{path}: starts with a UTF-8 byte-order mark (BOM); save it as UTF-8 without a BOM")


def quick_check(
    path: str | os.PathLike[str], resolution: int, n_samples: int = 4, vae_scale_factor: int = 8, kind: str = "auto"
) -> int:
    """Cheap start-up check: structure, count and ``n_samples`` evenly spaced samples fully loaded.

    Returns the record count; raises ``ValueError`` (``FileNotFoundError`` for a missing path) naming the file and
    the record.
    """
    fmt = dataset_format(path) if kind == "auto" else kind
    _refuse_bom(Path(path))
    ds = open_dataset(path, resolution, kind=fmt, vae_scale_factor=vae_scale_factor)
    if isinstance(ds, LatentLMDBDataset):  # fmt == "lmdb"
        problem = _lmdb_resolution_problem(Path(path), ds.header, resolution, vae_scale_factor)
        if problem:
            raise DataError(problem)
    n = len(ds)
    picks = sorted({int(round(x)) for x in np.linspace(0, n - 1, num=max(1, min(n_samples, n)))})
    for i in picks:
        try:
            ds.load(i)
        except BadSampleError as e:
            raise DataError(f"quick check failed: {e}") from None
    return n


def quick_check_section(data: Any, vae_scale_factor: int | None = None) -> int:
    """:func:`quick_check` of a training config's ``data`` section, with the arguments the trainer's start-up check
    uses (:func:`senseflow.data.training.build_training_data`): path, kind, resolution, the optional
    ``quick_check_samples`` (default 4), and ``vae_scale_factor`` (the teacher VAE's when given, else the section's,
    default 8). Returns the record count."""
    def get(name: str, default: Any) -> Any:
        return data.get(name, default) if hasattr(data, "get") else getattr(data, name, default)

    factor = vae_scale_factor or int(get("vae_scale_factor", 8))
    return quick_check(str(data.path), int(data.resolution), int(get("quick_check_samples", 4)), factor,
                       str(get("kind", "auto")))

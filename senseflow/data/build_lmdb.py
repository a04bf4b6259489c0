"""Build a DMD2-layout latent LMDB (docs/method.md §13.2) from a JSON / JSON Lines image-caption set and a teacher VAE.

For record i with prepared pixels x_i ∈ [−1, 1]^{3×R×R} (:mod:`senseflow.data.images`, centre crop by default) the
VAE posterior N(μ_i, σ_i²) = E(x_i) gives

    z_i = μ_i + σ_i·ε_i   (``sample_posterior=True``, ε_i ~ N(0, I) from a CPU generator seeded mix_seed(seed, i))
    z_i = μ_i             (``sample_posterior=False``)

and the stored latent is (z_i − shift)·scale with the VAE config's ``shift_factor`` (None ↦ 0) and
``scaling_factor`` (SDXL: no shift, 0.13025), as float16. Because ε_i depends only on (seed, i), an interrupted and
resumed build stores exactly what an uninterrupted one stores (with the same batch size; another batch size changes
only the rounding of the batched convolutions).

Resume: every batch is written in one committed transaction together with ``build_progress`` (JSON: records
consumed, latents written, a fingerprint of the inputs). Running the same build again continues from the committed
count; a different source / resolution / VAE / crop / seed is refused. The set is finished by writing
``latents_shape`` and ``prompts_shape`` last; a finished set is never overwritten (``FileExistsError``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from senseflow.core.family import vae_factor
from senseflow.data.cache import source_fingerprint
from senseflow.data.errors import BadSampleError, DataError
from senseflow.data.json_images import ImageCaptionDataset
from senseflow.data.lmdb_latents import (
    BUILD_INFO,
    BUILD_PROGRESS,
    LATENT_DTYPE,
    LATENTS_SHAPE,
    PROMPTS_SHAPE,
    RESOLUTION,
    crop_coords_key,
    latent_key,
    orig_size_key,
    prompt_key,
    record_key_key,
    release_lmdb,
)
from senseflow.data.seeding import generator_for

__all__ = ["BuildResult", "build_latent_lmdb", "load_vae", "encode_latents", "resolve_vae_folder"]

logger = logging.getLogger(__name__)

_MIN_MAP_SIZE = 1 << 30


@dataclass(frozen=True)
class BuildResult:
    """Outcome of one call: ``consumed`` of ``total`` records read, ``written`` latents stored, ``skipped`` bad ones."""

    out: Path
    total: int
    consumed: int
    written: int
    skipped: int
    finished: bool


def resolve_vae_folder(path: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """(folder, subfolder) of an AutoencoderKL: a diffusers pipeline folder with ``vae/`` or a VAE folder itself."""
    p = Path(path)
    if (p / "vae" / "config.json").exists():
        return p, "vae"
    if (p / "config.json").exists():
        return p, None
    raise FileNotFoundError(
        f"{p}: no VAE found; expected <folder>/vae/config.json (a diffusers pipeline) or <folder>/config.json"
    )


def load_vae(path: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """``AutoencoderKL.from_pretrained`` from a local folder only (no hub access), in eval mode on ``device``."""
    from diffusers import AutoencoderKL

    folder, sub = resolve_vae_folder(path)
    vae = AutoencoderKL.from_pretrained(str(folder), subfolder=sub, local_files_only=True, torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


def _scale_shift(vae) -> tuple[float, float]:
    cfg = vae.config
    scale = getattr(cfg, "scaling_factor", None)
    if scale is None:
        raise ValueError("VAE config has no scaling_factor")
    shift = getattr(cfg, "shift_factor", None)
    return float(scale), float(shift or 0.0)


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """Normalised latents (z − shift)·scale of ``pixels`` ∈ [−1, 1] (B, 3, R, R); z = μ + σ·ε_i per sample with
    ε_i drawn on CPU from ``generators[i]``, or z = μ when ``generators`` is None."""
    scale, shift = _scale_shift(vae)
    param = next(vae.parameters())
    dist = vae.encode(pixels.to(device=param.device, dtype=param.dtype)).latent_dist
    z = dist.mean
    if generators is not None:
        if len(generators) != z.shape[0]:
            raise ValueError(f"need one generator per sample, got {len(generators)} for {z.shape[0]}")
        eps = torch.stack([torch.randn(z.shape[1:], generator=g) for g in generators]).to(z.device, z.dtype)
        z = z + dist.std * eps
    return (z - shift) * scale


def _vae_identity(vae, vae_path: str | os.PathLike[str] | None) -> str:
    if vae_path is not None:
        return str(Path(vae_path).resolve())
    cfg = json.dumps(dict(vae.config), sort_keys=True, default=str)
    return "config:" + hashlib.sha256(cfg.encode()).hexdigest()[:16]


def _latent_shape(vae, resolution: int) -> tuple[int, int, int]:
    factor = vae_factor(vae.config)
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE downscale factor {factor}")
    return (int(vae.config.latent_channels), resolution // factor, resolution // factor)


class _BuildItems(Dataset):
    """Wraps the image data set so a bad record comes back as (index, None, message) instead of killing a worker."""

    def __init__(self, ds: ImageCaptionDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[int, dict[str, Any] | None, str | None]:
        try:
            return i, self.ds.load(i), None
        except BadSampleError as e:
            return i, None, str(e)


def _collate_list(items: list) -> list:
    return items


def _read_state(env: lmdb.Environment) -> tuple[bytes | None, dict | None]:
    with env.begin() as txn:
        shape, progress = txn.get(LATENTS_SHAPE), txn.get(BUILD_PROGRESS)
    return shape, (json.loads(bytes(progress).decode()) if progress is not None else None)


def _commit(env: lmdb.Environment, items: list[tuple[bytes, bytes]], delete: tuple[bytes, ...] = ()) -> None:
    """Put ``items`` (and delete ``delete``) in one transaction, growing the map when it is full."""
    while True:
        try:
            with env.begin(write=True) as txn:
                for k, v in items:
                    txn.put(k, v)
                for k in delete:
                    txn.delete(k)
            return
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)


def build_latent_lmdb(
    images: str | os.PathLike[str],
    vae: Any,
    out: str | os.PathLike[str],
    resolution: int,
    batch_size: int,
    device: str | torch.device | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    crop: str = "center",
    sample_posterior: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    skip_bad: bool = False,
    max_batches: int | None = None,
    progress: bool = True,
) -> BuildResult:
    """Encode every record of ``images`` into ``out`` (module docstring); resumable, refuses finished sets.

    ``vae`` is a folder (pipeline with ``vae/`` or a VAE folder) or a loaded ``AutoencoderKL``. ``skip_bad`` logs
    and skips unreadable records instead of stopping. ``max_batches`` stops after that many batches (a partial,
    resumable build; used to build in chunks and in tests).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 when given, got {max_batches}")
    out = Path(out)
    release_lmdb(out)  # a read handle of this process would block the writer (one handle per file and process)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / "data.mdb").exists():
        raise FileExistsError(f"{out}: folder is not empty and holds no LMDB; refusing to write into it")
    if (out / "data.mdb").exists():
        env0 = lmdb.open(str(out), readonly=True, lock=False)
        try:
            shape0, _ = _read_state(env0)
        finally:
            env0.close()
        if shape0 is not None:
            raise FileExistsError(
                f"{out}: already holds a finished latent set (latents_shape {bytes(shape0).decode()}); "
                "refusing to overwrite it. Delete the folder or choose another --out."
            )

    ds = ImageCaptionDataset(images, resolution, crop=crop, seed=seed)
    total = len(ds)
    vae_path = vae if isinstance(vae, (str, os.PathLike)) else None
    model = load_vae(vae_path, device, dtype) if vae_path is not None else vae
    shape = _latent_shape(model, resolution)
    nbytes = int(np.prod(shape)) * LATENT_DTYPE.itemsize
    fingerprint = {
        "source": source_fingerprint(images),
        "resolution": resolution,
        "vae": _vae_identity(model, vae_path),
        "crop": crop,
        "sample_posterior": sample_posterior,
        "seed": seed,
        "latent_shape": list(shape),
    }

    out.mkdir(parents=True, exist_ok=True)
    map_size = max(_MIN_MAP_SIZE, int(total * (nbytes + 2048) * 1.25))
    env = lmdb.open(str(out), map_size=map_size, subdir=True, readahead=False, meminit=False)
    try:
        _, state = _read_state(env)
        consumed = written = skipped = 0
        if state is not None:
            if state.get("fingerprint") != fingerprint:
                diff = [k for k in fingerprint if state.get("fingerprint", {}).get(k) != fingerprint[k]]
                raise ValueError(
                    f"{out}: holds an unfinished build with different inputs ({', '.join(diff)} changed); "
                    "run it with the original arguments to resume, or delete the folder"
                )
            consumed, written, skipped = int(state["consumed"]), int(state["written"]), int(state["skipped"])
            logger.info("resuming %s at record %d of %d (%d latents written)", out, consumed, total, written)

        loader = DataLoader(
            _BuildItems(ds),
            batch_size=batch_size,
            sampler=range(consumed, total),
            num_workers=num_workers,
            collate_fn=_collate_list,
        )
        bar = tqdm(total=total, initial=consumed, unit="img", desc=f"build-lmdb {out.name}", disable=not progress)
        batches = 0
        for items in loader:
            good = []
            for i, sample, err in items:
                if sample is None:
                    if not skip_bad:
                        raise DataError(f"{err} (use --skip-bad to skip such records)")
                    logger.warning("skipping bad record: %s", err)
                    skipped += 1
                else:
                    good.append(sample)
            puts: list[tuple[bytes, bytes]] = []
            if good:
                pixels = torch.stack([s["pixels"] for s in good])
                gens = [generator_for(seed, s["index"]) for s in good] if sample_posterior else None
                lat = encode_latents(model, pixels, gens).float().cpu()
                if tuple(lat.shape[1:]) != shape:
                    raise RuntimeError(f"VAE produced latents of shape {tuple(lat.shape[1:])}, expected {shape}")
                arr = lat.numpy().astype(LATENT_DTYPE)
                for s, a in zip(good, arr):
                    w = written
                    puts += [
                        (latent_key(w), a.tobytes()),
                        (prompt_key(w), s["caption"].encode("utf-8")),
                        (orig_size_key(w), " ".join(map(str, s["original_size"].tolist())).encode()),
                        (crop_coords_key(w), " ".join(map(str, s["crop_coords"].tolist())).encode()),
                        (record_key_key(w), s["key"].encode("utf-8")),
                    ]
                    written += 1
            consumed += len(items)
            state = {"consumed": consumed, "written": written, "skipped": skipped, "fingerprint": fingerprint}
            _commit(env, puts + [(BUILD_PROGRESS, json.dumps(state).encode())])
            bar.update(len(items))
            batches += 1
            if max_batches is not None and batches >= max_batches:
                break
        bar.close()

        finished = consumed >= total
        if finished:
            if written == 0:
                raise DataError(f"{images}: no record could be encoded ({skipped} skipped); nothing to finish in {out}")
            info = {"total": total, "written": written, "skipped": skipped, **fingerprint}
            _commit(
                env,
                [
                    (RESOLUTION, str(resolution).encode()),
                    (BUILD_INFO, json.dumps(info).encode()),
                    (PROMPTS_SHAPE, str(written).encode()),
                    (LATENTS_SHAPE, " ".join(map(str, (written, *shape))).encode()),
                ],
                delete=(BUILD_PROGRESS,),
            )
        return BuildResult(out, total, consumed, written, skipped, finished)
    finally:
        env.close()

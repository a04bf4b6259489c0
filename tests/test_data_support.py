"""Shared builders for the data tests (no tests here): generated images, JSON / JSONL sets, tiny VAE, raw LMDBs."""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lmdb
import numpy as np
import torch
from PIL import Image

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
    scaling_factor=0.13025,
)


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A reproducible random image (numpy Generator seeded explicitly)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    im = Image.fromarray(a, mode="RGB")
    return im if mode == "RGB" else im.convert(mode)


def write_images(folder: Path, n: int, size: tuple[int, int] = (40, 32), prefix: str = "img") -> list[str]:
    """``n`` PNGs of ``size`` = (w, h); returns their file names (relative to ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"{prefix}_{i:04d}.png"
        noise_image(*size, seed=i).save(folder / name)
        names.append(name)
    return names


def write_json_set(root: Path, n: int = 6, size: tuple[int, int] = (40, 32), name: str = "set.json") -> Path:
    """§13.1 JSON with relative image paths under ``root/images``."""
    names = write_images(root / "images", n, size)
    obj = {
        "keys": [f"{i:08d}" for i in range(n)],
        "image_paths": [f"images/{nm}" for nm in names],
        "prompts": [f"caption number {i}" for i in range(n)],
    }
    path = root / name
    path.write_text(json.dumps(obj))
    return path


def write_jsonl_set(root: Path, n: int = 6, size: tuple[int, int] = (40, 32), name: str = "set.jsonl") -> Path:
    names = write_images(root / "images", n, size)
    path = root / name
    with open(path, "w") as f:
        for i, nm in enumerate(names):
            f.write(
                json.dumps({"key": f"{i:08d}", "image_path": f"images/{nm}", "prompt": f"caption number {i}"}) + "\n"
            )
    return path


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):  # diffusers initialises from the global generator; leave it untouched
        torch.manual_seed(seed)
        return AutoencoderKL(**TINY_VAE).eval()


def save_tiny_vae_pipeline(root: Path, seed: int = 0) -> Path:
    """A folder shaped like a diffusers pipeline holding only ``vae/``."""
    tiny_vae(seed).save_pretrained(root / "vae")
    return root


def write_raw_lmdb(
    path: Path,
    latents: list[bytes | None],
    prompts: list[bytes | None],
    shape=(4, 8, 8),
    header: dict | None = None,
) -> Path:
    """An LMDB in DMD2's layout written by hand (entries that are None are left out)."""
    n = len(latents)
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        hdr = {b"latents_shape": f"{n} {shape[0]} {shape[1]} {shape[2]}".encode(), b"prompts_shape": str(n).encode()}
        if header is not None:
            hdr = {k.encode(): v for k, v in header.items() if v is not None}
        for k, v in hdr.items():
            txn.put(k, v)
        for i, (lat, pr) in enumerate(zip(latents, prompts)):
            if lat is not None:
                txn.put(f"latents_{i}_data".encode(), lat)
            if pr is not None:
                txn.put(f"prompts_{i}_data".encode(), pr)
    env.close()
    return path


def fp16_latents(n: int, shape=(4, 8, 8), seed: int = 0) -> list[np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).numpy().astype("<f2") for _ in range(n)]

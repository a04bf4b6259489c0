#!/usr/bin/env python
"""Loader throughput: median samples/s over several passes of ``build_dataloader`` on generated PNGs.

For each training resolution R it writes ``--num-images`` PNGs of size (⌈1.5·R⌉ × ⌈1.25·R⌉) (w × h; smooth colour
fields plus noise, so they compress like photographs rather than like pure noise) and a JSON (docs/method.md §13.1)
into a temporary folder, then times whole epochs of the loader (decode → RGB → resize shorter side + centre crop →
[−1, 1] → collate). The first pass (worker start-up, cold page cache) is reported separately and excluded from the
median. With ``--lmdb`` it also times a DMD2-layout LMDB of 4 × R/8 × R/8 float16 latents.

    python tools/bench_loader.py                       # 64 px and 1024 px, 2 workers
    python tools/bench_loader.py --sizes 512 --workers 4 --passes 7
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import lmdb
import numpy as np
import torch
from PIL import Image

from senseflow.data import ImageCaptionDataset, LatentLMDBDataset, build_dataloader


def make_png(path: Path, width: int, height: int, rng: np.random.Generator) -> None:
    """A smooth random colour field (bilinear upsampling of an 8×8 grid) plus mild noise."""
    grid = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BILINEAR
    )
    a = np.asarray(grid).astype(np.int16) + rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(path, compress_level=6)


def make_image_set(root: Path, n: int, resolution: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    w, h = -(-3 * resolution // 2), -(-5 * resolution // 4)
    (root / "images").mkdir(parents=True)
    names = []
    for i in range(n):
        names.append(f"images/{i:06d}.png")
        make_png(root / names[-1], w, h, rng)
    path = root / "set.json"
    path.write_text(json.dumps({"keys": [f"{i:06d}" for i in range(n)], "image_paths": names,
                                "prompts": [f"benchmark image {i}" for i in range(n)]}))
    return path


def make_lmdb(root: Path, n: int, resolution: int, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    shape = (4, resolution // 8, resolution // 8)
    env = lmdb.open(str(root / "lmdb"), map_size=max(1 << 26, n * int(np.prod(shape)) * 4))
    with env.begin(write=True) as txn:
        for i in range(n):
            txn.put(f"latents_{i}_data".encode(), torch.randn(shape, generator=g).numpy().astype("<f2").tobytes())
            txn.put(f"prompts_{i}_data".encode(), f"benchmark latent {i}".encode())
        txn.put(b"latents_shape", f"{n} {shape[0]} {shape[1]} {shape[2]}".encode())
        txn.put(b"prompts_shape", str(n).encode())
    env.close()
    return root / "lmdb"


def time_passes(dataset, args) -> tuple[float, list[float]]:
    loader = build_dataloader(dataset, args.batch_size, args.workers, False, args.workers > 0, args.seed, 0, 1,
                              drop_last=False)
    rates = []
    for _ in range(args.passes + 1):
        t0, n = time.perf_counter(), 0
        for batch in loader:
            n += len(batch["caption"])
        rates.append(n / (time.perf_counter() - t0))
    return rates[0], rates[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 1024])
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lmdb", action="store_true", help="also time a latent LMDB of the same size")
    args = p.parse_args()
    torch.set_num_threads(1)

    print(f"{args.num_images} samples, batch {args.batch_size}, {args.workers} workers, {args.passes} timed passes")
    print(f"{'data':>22s} {'R':>5s} {'first pass':>11s} {'median':>9s} {'min':>9s} {'max':>9s}  (samples/s)")
    with tempfile.TemporaryDirectory() as tmp:
        for r in args.sizes:
            root = Path(tmp) / f"r{r}"
            t0 = time.perf_counter()
            path = make_image_set(root, args.num_images, r, args.seed)
            gen_s = time.perf_counter() - t0
            first, rates = time_passes(ImageCaptionDataset(path, r), args)
            print(f"{'png ' + str(-(-3 * r // 2)) + 'x' + str(-(-5 * r // 4)):>22s} {r:5d} {first:11.1f} "
                  f"{statistics.median(rates):9.1f} {min(rates):9.1f} {max(rates):9.1f}  (generated in {gen_s:.1f} s)")
            if args.lmdb:
                lpath = make_lmdb(root, args.num_images, r, args.seed)
                first, rates = time_passes(LatentLMDBDataset(lpath, resolution=r), args)
                print(f"{'lmdb 4x' + str(r // 8) + 'x' + str(r // 8):>22s} {r:5d} {first:11.1f} "
                      f"{statistics.median(rates):9.1f} {min(rates):9.1f} {max(rates):9.1f}")


if __name__ == "__main__":
    main()

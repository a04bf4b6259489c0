"""``senseflow data ...``: build a latent LMDB from images, check a data set, write the shapes benchmark's scenes.

    senseflow data build-lmdb --images set.json --vae /models/sdxl --out latents_lmdb --resolution 1024 --batch-size 8
    senseflow data check set.jsonl --resolution 1024
    senseflow data shapes --out shapes_data --num-scenes 20000
    senseflow data text-cache --config configs/FLUX/flux_senseflow.yaml data.text_cache=text_cache [key=value ...]

Exit codes: 0 success (or a usable set), 2 bad input / unusable set / refusal to overwrite, 130 interrupted.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from senseflow.core.dtypes import DTYPE_NAMES, DTYPES

__all__ = ["main_data", "build_parser"]



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="senseflow data", description="Data set tools (docs/method.md §13).")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build-lmdb", help="encode images + captions into a DMD2-layout latent LMDB (resumable)")
    b.add_argument("--images", required=True, help="JSON (§13.1) or JSON Lines image-caption file")
    b.add_argument("--vae", required=True, help="diffusers folder containing vae/, or a VAE folder")
    b.add_argument("--out", required=True, help="LMDB folder to create (or to resume)")
    b.add_argument("--resolution", type=int, required=True)
    b.add_argument("--batch-size", type=int, required=True)
    b.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    b.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="VAE compute dtype")
    b.add_argument("--crop", choices=("center", "random"), default="center")
    b.add_argument("--seed", type=int, default=0, help="seed of the posterior noise (and random crops)")
    b.add_argument("--mean", action="store_true", help="store the posterior mean instead of a sample")
    b.add_argument("--num-workers", type=int, default=4, help="image decoding workers")
    b.add_argument("--skip-bad", action="store_true", help="log and skip unreadable records instead of stopping")
    b.add_argument("--max-batches", type=int, default=None, help="stop after this many batches (resumable)")
    b.add_argument("--no-progress", action="store_true")

    c = sub.add_parser("check", help="validate a JSON / JSON Lines / LMDB data set")
    c.add_argument("path")
    c.add_argument("--resolution", type=int, default=None, help="training resolution (size and latent-shape checks)")
    c.add_argument("--max-bad", type=int, default=0, help="bad records tolerated before the set counts as unusable")
    c.add_argument("--limit", type=int, default=None, help="check only the first N records")
    c.add_argument("--no-decode", action="store_true", help="read image headers only (faster; misses truncation)")
    c.add_argument("--max-aspect", type=float, default=4.0, help="warn beyond this aspect ratio")
    c.add_argument("--vae-scale-factor", type=int, default=8, help="pixels per latent cell (LMDB shape check)")
    c.add_argument("--max-listed", type=int, default=20, help="issues printed in full")

    s = sub.add_parser("shapes", help="write the shapes benchmark's seeded scenes as a JSON image-caption set")
    s.add_argument("--out", required=True, help="folder to create: dataset.json, images/, scenes.json (ground truth)")
    s.add_argument("--num-scenes", type=int, default=None, help="default: senseflow.shapes.ShapesConfig's")
    s.add_argument("--seed", type=int, default=None, help="scene seed (default: ShapesConfig's)")
    s.add_argument("--heldout", action="store_true", help="the held-out scene stream instead of the training one")

    t = sub.add_parser("text-cache", help="encode a training config's captions into data.text_cache (resumable)")
    t.add_argument("--config", required=True, help="the training config (YAML) the cache is for")
    t.add_argument("--out", default=None, help="cache folder (default: the config's data.text_cache)")
    t.add_argument("--device", default=None, help="default: the config's train.device (auto: cuda if available)")
    t.add_argument("overrides", nargs="*", help="config overrides key=value, as for senseflow train")
    return parser


def _text_cache(args: argparse.Namespace) -> int:
    import copy

    from senseflow.config import load_config, validate_paths
    from senseflow.data.text_cache import build_text_cache

    cfg = load_config(args.config, list(args.overrides))
    out = args.out if args.out is not None else cfg.data.text_cache
    if out is None:
        raise ValueError("--out: no cache folder; pass --out DIR or data.text_cache=DIR")
    checked = copy.deepcopy(cfg)
    checked.data.text_cache = None  # the folder this command writes
    validate_paths(checked)
    result = build_text_cache(checked, out, args.device)
    print(f"{result.out}: {result.captions} captions (incl. the empty prompt and {result.previews} preview prompts), "
          f"{result.encoded} encoded now; train with data.text_cache={result.out}")
    return 0


def _shapes(args: argparse.Namespace) -> int:
    from dataclasses import replace
    from pathlib import Path

    from senseflow.shapes import HELDOUT_STREAM, TRAIN_STREAM, ShapesConfig, export_json_dataset

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out}: exists and is not an empty folder (nothing written)")
    config = ShapesConfig()
    if args.num_scenes is not None:
        if args.num_scenes < 1:
            raise ValueError(f"--num-scenes must be >= 1, got {args.num_scenes}")
        config = replace(config, num_scenes=args.num_scenes)
    if args.seed is not None:
        config = replace(config, seed=args.seed)
    path = export_json_dataset(out, config, stream=HELDOUT_STREAM if args.heldout else TRAIN_STREAM)
    stream = "held-out" if args.heldout else "training"
    print(f"{path}: {config.num_scenes} scenes ({stream} stream, seed {config.seed})")
    return 0


def _build(args: argparse.Namespace) -> int:

    from senseflow.data.build_lmdb import build_latent_lmdb

    result = build_latent_lmdb(
        args.images, args.vae, args.out, args.resolution, args.batch_size, args.device,
        dtype=DTYPES[args.dtype], crop=args.crop, sample_posterior=not args.mean, seed=args.seed,
        num_workers=args.num_workers, skip_bad=args.skip_bad, max_batches=args.max_batches,
        progress=not args.no_progress,
    )
    state = "finished" if result.finished else "partial (run the same command again to continue)"
    print(f"{result.out}: {state}; {result.consumed}/{result.total} records read, {result.written} latents written, "
          f"{result.skipped} skipped")
    return 0


def _check(args: argparse.Namespace) -> int:
    from senseflow.data.check import check_dataset

    report = check_dataset(
        args.path, args.resolution, max_bad=args.max_bad, limit=args.limit, decode=not args.no_decode,
        max_aspect=args.max_aspect, vae_scale_factor=args.vae_scale_factor,
    )
    print(report.summary(args.max_listed))
    return 0 if report.usable else 2


def main_data(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``senseflow data``; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as e:
        return int(e.code or 0)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        commands = {"build-lmdb": _build, "check": _check, "shapes": _shapes, "text-cache": _text_cache}
        return commands[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; committed progress is kept (run the same command again to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main_data())

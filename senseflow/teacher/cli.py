"""``senseflow teacher train --family {sdxl,sd3,flux} --data SET --out DIR [--resolution R] [--seed S]
[key=value ...]``.

Settings come from ``configs/teacher/<family>.yaml`` (or ``--config``); ``--resolution`` and ``--seed`` are shorthands
for the keys of the same name. Re-running the same command continues an interrupted run. Every input is checked
(config keys and ranges, the data set, the output folder) before anything is written or trained; a problem is one
line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
from typing import Sequence

from senseflow.config import ConfigError
from senseflow.core.argparsing import RaisingParser
from senseflow.models.families import family_names
from senseflow.teacher.config import default_config_path, load_teacher_config

__all__ = ["build_parser", "main_teacher"]


class _Parser(RaisingParser):
    """argparse whose errors are one line (raised, printed by the ``senseflow`` command) instead of usage + exit."""

    error_type = ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="senseflow teacher", description="Train a small teacher of any family.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train a teacher from an image-caption set into a diffusers folder")
    t.add_argument("--family", required=True, choices=family_names(), help="the teacher family")
    t.add_argument("--data", required=True, help="a JSON or JSON Lines image-caption set (senseflow data check)")
    t.add_argument("--out", required=True, help="the teacher folder (new or empty, or this command's earlier run)")
    t.add_argument("--config", default=None, help="settings YAML (default: configs/teacher/<family>.yaml)")
    t.add_argument("--resolution", type=int, default=None, help="image side in pixels (key: resolution)")
    t.add_argument("--seed", type=int, default=None, help="seed of every random draw (key: seed)")
    t.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. denoiser_training.steps=500")
    return p


def main_teacher(argv: Sequence[str] | None = None) -> int:
    from senseflow.quiet import quiet_libraries
    from senseflow.teacher.train import train_teacher

    quiet_libraries()
    args = build_parser().parse_args(argv)
    overrides = [f"family={args.family}", *args.overrides]
    overrides += [f"{k}={v}" for k, v in (("resolution", args.resolution), ("seed", args.seed)) if v is not None]
    import torch

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ConfigError(f"--device {args.device!r}: expected a torch device such as cpu, cuda or cuda:1") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: this torch has no CUDA device available; use --device cpu")
    config = args.config or default_config_path(args.family)
    cfg = load_teacher_config(config, overrides)
    train_teacher(cfg, args.data, args.out, device=args.device, progress=not args.no_progress)
    return 0

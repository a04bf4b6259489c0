#!/usr/bin/env python
"""Embedded benchmark: a teacher's 28/4/2-step Euler + CFG against DMD2, SenseFlow and its ablations, same prompts.

    python tools/benchmark.py --suite {digits,shapes} --out DIR [--teacher T] [--iterations N] [--save-every K]
        [--methods NAME ...] [--seeds S ...] [--parallel P] [--clean] [key=value ...]

Every number is in configs/benchmarks/<suite>.yaml (schema: senseflow/benchmark/settings.py); ``key=value``
overrides any of it (e.g. ``suite.per_digit=20 eval.teacher_guidance=3``), the flags override the same keys after
those. Writes <out>/results.md + results.json (the suite's accuracy, FD, FD-T, NFE, ms/image; each student's final
checkpoint with both samplers of docs/method.md §16.3, re-noising and "(Euler)"), <out>/fdt_curve.png (FD-T of every
saved checkpoint, re-noising sampler), <out>/grids/<method>.png and <out>/grids/side_by_side.png. Training runs go
to <out>/work (finished ones are reused; deleted with --clean).
"""
from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

import torch

from senseflow.benchmark.runner import run_benchmark
from senseflow.benchmark.settings import load_settings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--suite", required=True, help="digits, shapes, or a path to a benchmark yaml")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--teacher", default=None, help="teacher folder (default: the suite yaml's teacher)")
    p.add_argument("--iterations", type=int, default=None,
                   help="training iterations per method (train.iterations); the cosine LR decay is stretched to match")
    p.add_argument("--save-every", type=int, default=None,
                   help="checkpoint period of the FD-T curve (train.save_every)")
    p.add_argument("--methods", nargs="+", default=None, help="a subset of the suite's methods (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="training seeds (train.seeds): all methods at the first, headline ones at the others too")
    p.add_argument("--parallel", type=int, default=None, help="training runs at once, 1 thread each (train.parallel)")
    p.add_argument("--clean", action="store_true", help="delete the training runs afterwards")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the suite yaml (anywhere on the line)")
    return p


#: a ``key=value`` override of the suite yaml (taken out of the line first, so it may follow --methods/--seeds)
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if _OVERRIDE.match(a)]
    args = build_parser().parse_args([a for a in argv if not _OVERRIDE.match(a)])
    if args.overrides:
        raise SystemExit(f"overrides must be key=value, got {args.overrides}")
    flags = [f"teacher={Path(args.teacher).resolve()}"] if args.teacher else []
    if args.iterations is not None:
        flags.append(f"train.iterations={args.iterations}")
    if args.save_every is not None:
        flags.append(f"train.save_every={args.save_every}")
    if args.parallel is not None:
        flags.append(f"train.parallel={args.parallel}")
    if args.seeds is not None:
        flags.append(f"train.seeds=[{','.join(str(s) for s in args.seeds)}]")
    try:
        settings = load_settings(args.suite, [*overrides, *flags])
        torch.set_num_threads(1)
        command = "python " + shlex.join(["tools/benchmark.py", *argv])
        run_benchmark(settings, Path(args.out).resolve(), command, methods=args.methods, clean=args.clean)
    except (ValueError, FileNotFoundError) as exc:   # a refused setting, teacher or method: one line, status 2
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    print((Path(args.out) / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Digits benchmark: teacher 28/4-step Euler vs DMD2, SenseFlow and its ablations, on the same prompts and seeds.

    python tools/benchmark_digits.py --out docs/benchmarks/digits [--iterations 800] [--save-every 100]

Writes <out>/results.md + results.json (prompt accuracy, FD, FD-T, NFE, ms/image; each student's final checkpoint
with both samplers of docs/method.md §16.3, re-noising and "(Euler)"), <out>/fdt_curve.png (FD-T of every saved
checkpoint, re-noising sampler) and <out>/grids/*.png. Training runs go to <out>/work (deleted with --clean).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from senseflow.digits.benchmark import (
    STUDENT_SAMPLERS,
    EvalSpec,
    Evaluator,
    classifier_heldout_accuracy,
    image_grid,
    plot_curves,
    write_results,
)
from senseflow.digits.demo import DEFAULT_CONFIG, _free_port, prepare_assets, repo_root, train_command
from senseflow.digits.teacher import default_teacher_path

#: name → config overrides (docs/method.md: DMD2 = no IDA, no ISG, no GAN; SenseFlow = all three)
METHODS = {
    "DMD2 (no IDA, ISG, GAN)": ["method.ida.enabled=false", "method.isg.enabled=false", "method.gan.enabled=false"],
    "SenseFlow (IDA+ISG+GAN)": [],
    "SenseFlow w/o IDA": ["method.ida.enabled=false"],
    "SenseFlow w/o ISG": ["method.isg.enabled=false"],
    # not the paper's ISG (docs/method.md §8.1 takes σ_m → σ_(k+1) with G): the guided teacher takes both moves; DMD's
    # teacher CFG is 3 instead of 4 (docs/benchmarks.md, "Where the gap is": why each of the two)
    "SenseFlow ISG-teacher (ablation)": [
        "method.isg.midpoint_model=teacher", "method.dmd.guidance.min=3", "method.dmd.guidance.max=3"],
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.split(" (")[0]).strip("_").lower()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--out", required=True)
    p.add_argument("--iterations", type=int, default=None,
                   help="training iterations per method (default: config); the cosine LR decay is stretched to match")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint period K of the FD-T curve")
    p.add_argument("--per-digit", type=int, default=20, help="evaluation images per digit")
    p.add_argument("--parallel", type=int, default=2, help="training runs at once (1 thread each)")
    p.add_argument("--teacher", default=None)
    p.add_argument("--teacher-guidance", type=float, default=None,
                   help="teacher CFG scale (default: its training record's)")
    p.add_argument("--config", default=None)
    p.add_argument("--methods", nargs="*", default=list(METHODS), help="subset of: " + ", ".join(METHODS))
    p.add_argument("--clean", action="store_true", help="delete the training runs afterwards")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    out = Path(args.out).resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    teacher = Path(args.teacher).resolve() if args.teacher else default_teacher_path()
    config = Path(args.config).resolve() if args.config else repo_root() / DEFAULT_CONFIG
    assets = prepare_assets(work)
    torch.set_num_threads(1)

    # ---- training: all methods with the same config, seed and iteration budget --------------------------------
    pending = [m for m in args.methods]
    running: list[tuple[str, subprocess.Popen, float]] = []
    train_s: dict[str, float] = {}
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            run_dir = work / slug(name)
            if (run_dir / "checkpoints" / "latest").is_file():
                print(f"[bench] {name}: reusing {run_dir}", flush=True)
                continue
            cmd = train_command(config, run_dir, teacher, assets, args.iterations,
                                [f"train.save_interval={args.save_every}", "train.keep_last=0", *METHODS[name]])
            print(f"[bench] {name}: {' '.join(cmd)}", flush=True)
            env = dict(__import__("os").environ, MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
            log = open(work / f"{slug(name)}.log", "w")
            running.append(
                (name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.perf_counter())
            )
        for item in list(running):
            name, proc, t0 = item
            if proc.poll() is not None:
                running.remove(item)
                if proc.returncode != 0:
                    raise RuntimeError(f"{name} failed ({proc.returncode}); see {work / (slug(name) + '.log')}")
                train_s[name] = time.perf_counter() - t0
                print(f"[bench] {name}: trained in {train_s[name]:.0f} s", flush=True)
        time.sleep(1)

    # ---- evaluation on one prompt/noise set ----------------------------------------------------------------
    ev = Evaluator(teacher, EvalSpec(per_digit=args.per_digit, teacher_guidance=args.teacher_guidance))
    grids = out / "grids"
    grids.mkdir(exist_ok=True)
    results, curves, euler_rows = [], {}, []
    for steps in (ev.spec.teacher_steps, *ev.spec.teacher_baselines):
        r, im = ev.evaluate_teacher(steps)
        results.append(r)
        image_grid(im, ev.digits, 8).save(grids / f"teacher_{steps}step.png")
        print(f"[bench] {r}", flush=True)
    for name in args.methods:
        ck_dir = work / slug(name) / "checkpoints"
        cks = sorted(p for p in ck_dir.glob("iter_*") if p.is_dir())
        if not cks:
            raise FileNotFoundError(f"no checkpoints under {ck_dir}")
        curve = []
        for ck in cks:
            r, im = ev.evaluate_student(ck, name)
            curve.append((int(ck.name.split("_")[1]), r.fd_teacher))
        r.extra = {"iterations": curve[-1][0], "train_seconds": train_s.get(name)}
        results.append(r)
        curves[name] = curve
        image_grid(im, ev.digits, 8).save(grids / f"{slug(name)}.png")
        print(f"[bench] {r}", flush=True)
        euler_rows.append(ev.evaluate_student(cks[-1], name + STUDENT_SAMPLERS["euler"], sampler="euler")[0])
        euler_rows[-1].extra = dict(r.extra)
        print(f"[bench] {euler_rows[-1]}", flush=True)
    results += euler_rows
    hlines = {"teacher 4-step Euler": results[1].fd_teacher, "teacher 28-step (floor)": results[0].fd_teacher}
    plot_curves(curves, hlines, out / "fdt_curve.png")
    meta = {"command": "python " + " ".join(["tools/benchmark_digits.py",
                                             *(argv if argv is not None else sys.argv[1:])]),
            "per_digit": args.per_digit, "teacher_guidance": ev.spec.teacher_guidance, "iterations": args.iterations,
            "save_every": args.save_every,
            "teacher": str(teacher), "config": str(config),
            "classifier_heldout_accuracy": classifier_heldout_accuracy(),
            "curves": curves, "total_seconds": time.perf_counter() - t_start}
    write_results(out, results, meta, stem="results")
    if args.clean:
        shutil.rmtree(work)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Digits diagnosis: which anchor step costs a student its FD-T, and how far its velocity is from the guided teacher.

    python tools/diagnose_digits.py --student RUN/checkpoints/iter_001200 [--per-digit 30] [--out diag.json]
    python tools/diagnose_digits.py --regression-steps 480 --regression-eval 120 240 480 [--regression-lr 3e-4]

Prints markdown tables (see tools/digits_diagnosis.py): with --student, FD-T when the guided teacher takes the
first j of the student's Euler steps (j = 0..4), and ‖v_G − v_T^s‖² beside ‖v_T^1 − v_T^s‖² at σ on the teacher's
guided ODE; with --regression-steps, the FD-T curve of the supervised bound (G regressed onto the guided teacher's
velocity at the anchors).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch
from digits_diagnosis import diagnosis_markdown, guided_regression, handover_fdt, velocity_errors  # tools/, this folder

from senseflow.benchmark import Evaluator
from senseflow.benchmark.settings import load_settings
from senseflow.digits.teacher import default_teacher_path

#: σ of the velocity table: the SD3.5 anchors (1, .9, .75, .5), ISG mid-points between them and below the last one
DEFAULT_SIGMAS = (1.0, 0.95, 0.9, 0.8, 0.75, 0.6, 0.5, 0.43, 0.3, 0.14)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--student", default=None, help="a checkpoint folder or student.safetensors")
    p.add_argument("--teacher", default=None, help="teacher folder (default the shipped digits teacher)")
    p.add_argument("--teacher-guidance", type=float, default=None, help="CFG scale s (default: the teacher's record)")
    p.add_argument("--per-digit", type=int, default=30, help="images per digit of the hand-over FD-T (default 30)")
    p.add_argument("--velocity-batch", type=int, default=100, help="prompts of the velocity table (default 100)")
    p.add_argument("--trajectory-steps", type=int, default=56, help="Euler steps of the guided trajectory (default 56)")
    p.add_argument("--sigmas", type=float, nargs="*", default=list(DEFAULT_SIGMAS))
    p.add_argument("--regression-steps", type=int, default=0, help="steps of the supervised bound (0: skip)")
    p.add_argument("--regression-eval", type=int, nargs="*", default=None,
                   help="steps at which the bound's Euler FD-T is scored (default: the last)")
    p.add_argument("--regression-lr", type=float, default=1e-4,
                   help="AdamW lr of the bound (cosine to 0; default 1e-4)")
    p.add_argument("--regression-batch", type=int, default=8,
                   help="batch of the bound (default 8, the digits config's)")
    p.add_argument("--seed", type=int, default=0, help="noise/prompt seed of the bound (default 0)")
    p.add_argument("--out", default=None, help="also write the numbers as JSON here")
    args = p.parse_args(argv)
    if args.student is None and args.regression_steps <= 0:
        p.error("nothing to do: give --student and/or --regression-steps")
    student_path = Path(args.student) if args.student else None
    if student_path is not None and not student_path.exists():
        p.error(f"--student {student_path}: no such file or folder")
    torch.set_num_threads(1)
    teacher = Path(args.teacher) if args.teacher else default_teacher_path()
    settings = load_settings("digits")          # the digits benchmark's prompts, noise seeds and step counts
    spec = settings.eval_spec()
    if args.teacher_guidance is not None:
        spec = replace(spec, teacher_guidance=args.teacher_guidance)
    ev = Evaluator(teacher, settings.make_suite(per_digit=args.per_digit), spec)
    report: dict = {"per_digit": args.per_digit, "teacher_guidance": ev.spec.teacher_guidance}
    if student_path is not None:
        student = ev.load_student(student_path)
        handover = handover_fdt(ev, student)
        errors = velocity_errors(ev, student, args.sigmas, args.trajectory_steps, args.velocity_batch)
        print(diagnosis_markdown(handover, errors))
        report.update(student=str(student_path), handover_fdt=handover, velocity_errors=[asdict(e) for e in errors])
    if args.regression_steps > 0:
        at = args.regression_eval or [args.regression_steps]
        _, curve = guided_regression(ev, args.regression_steps, args.regression_lr, args.regression_batch,
                                     args.seed, eval_at=at)
        print(f"supervised bound (lr {args.regression_lr:g}, batch {args.regression_batch}, cosine over "
              f"{args.regression_steps} steps): " + ", ".join(f"step {n}: FD-T {v:.1f}" for n, v in curve))
        report["regression"] = {"steps": args.regression_steps, "lr": args.regression_lr,
                                "batch": args.regression_batch, "seed": args.seed, "fdt_euler": curve}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

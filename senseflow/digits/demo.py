"""``senseflow demo``: distil the embedded digits teacher into a 4-step student on the CPU, end to end.

Steps (every path under ``--out``):

1. ``data/dataset.json`` — the digits as a docs/method.md §13.1 JSON image-caption set (:func:`export_json_dataset`);
2. ``backbones/`` — tiny random DINOv2 + CLIP-text folders for the VFM discriminator (``senseflow tiny``);
3. ``run/`` — training through the same launcher and trainer as a real run (``--trainer``, default the SD3.5
   one): ``sh exp_sd35/train_SD35_senseflow.sh 1 1 configs/SD35/digits_senseflow.yaml <out>/run key=value…``;
   with ``--trainer``, ``--teacher`` and ``--config`` any trainer distils a digits teacher of its family
   (``senseflow teacher train``, ``configs/digits/<trainer>.yaml``);
4. ``student_grid.png`` / ``teacher_grid.png`` / ``grids.png`` — rows = digits 0..9, columns = seeds;
5. ``metrics.md`` / ``metrics.json`` — prompt accuracy, FD to real digits and FD-T (see
   :mod:`senseflow.benchmark.evaluator`) for the teacher 28-step, teacher 4- and 2-step Euler (2 steps = the
   student's 4 NFE) and student 4-step samplers.
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from senseflow.launch import LAUNCHERS, free_port, repo_root, train_command

__all__ = ["main_demo", "repo_root", "prepare_assets", "train_command", "run_training", "evaluate_run"]

DEFAULT_CONFIG = "configs/SD35/digits_senseflow.yaml"


def prepare_assets(out: Path) -> dict[str, Path]:
    """Write the digits JSON set and the tiny discriminator backbones under ``out`` (kept if already there): the
    digits suite's training assets (:meth:`senseflow.benchmark.DigitsSuite.prepare_assets`)."""
    from senseflow.benchmark.settings import load_settings

    return load_settings("digits").make_suite().prepare_assets(out)


def run_training(cmd: Sequence[str], log_path: Path) -> float:
    """Run the launcher; its tqdm progress bar goes to the terminal, everything is also logged. Returns seconds."""
    env = dict(os.environ, MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())), HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        stdout = proc.stdout
        assert isinstance(stdout, io.BufferedReader)  # a pipe in binary mode
        for chunk in iter(lambda: stdout.read1(4096), b""):
            log.write(chunk.decode(errors="replace"))
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"training failed with exit code {rc}; see {log_path}")
    return time.perf_counter() - t0


def latest_student(run_dir: Path) -> Path:
    """The weights file of the run's newest checkpoint: ``student_ema.safetensors`` when the run kept an EMA of G,
    else ``student.safetensors`` (the choice :func:`senseflow.checkpoint_io.resolve_student_source` makes)."""
    from senseflow.checkpoint_io import resolve_student_source

    ck = run_dir / "checkpoints"
    if not ck.is_dir():
        raise FileNotFoundError(f"no checkpoints folder under {run_dir}")
    source = resolve_student_source(ck if (ck / "latest").is_file() else max(ck.glob("iter_*"), default=ck))
    if source.kind != "safetensors":
        raise FileNotFoundError(f"no student.safetensors in the newest checkpoint under {ck}")
    return source.path


def evaluate_run(out: Path, teacher: Path, student: Path, per_digit: int | None = None, columns: int | None = None,
                 meta: dict | None = None, teacher_guidance: float | None = None, label: str = "SenseFlow") -> dict:
    """Grids and the metrics table of the teacher's reference sampler (28 steps), its Euler baselines (4 steps; 2
    steps = the student's 4 NFE) and the 4-step student with each of its two samplers (the grid shows the
    re-noising sampler, "Ours"), with the digits benchmark's settings (``configs/benchmarks/digits.yaml``: prompts,
    noise seeds, step counts); ``per_digit``, ``columns`` and ``teacher_guidance`` replace the yaml's when given."""
    from dataclasses import replace

    from PIL import Image

    from senseflow.benchmark import Evaluator, write_results
    from senseflow.benchmark.settings import load_settings

    settings = load_settings("digits")
    per_digit = int(settings.suite["per_digit"]) if per_digit is None else per_digit
    columns = int(settings.suite["grid_columns"]) if columns is None else columns
    suite = settings.make_suite(per_digit=per_digit, grid_columns=min(columns, per_digit))
    spec = settings.eval_spec()
    if teacher_guidance is not None:
        spec = replace(spec, teacher_guidance=teacher_guidance)
    ev = Evaluator(teacher, suite, spec)
    r28, im28 = ev.evaluate_teacher(ev.spec.teacher_steps)
    baselines = [ev.evaluate_teacher(n)[0] for n in ev.spec.teacher_baselines]
    rs, ims = ev.evaluate_student(student, f"{label} student 4-step")
    re, _ = ev.evaluate_student(student, f"{label} student 4-step (Euler)", sampler="euler")
    g_s = suite.grid(ims)
    g_t = suite.grid(im28)
    g_s.save(out / "student_grid.png")
    g_t.save(out / "teacher_grid.png")
    both = Image.new("RGB", (g_s.width + g_t.width + 8, g_s.height), "white")
    both.paste(g_s, (0, 0))
    both.paste(g_t, (g_s.width + 8, 0))
    both.save(out / "grids.png")
    heldout = suite.heldout_accuracy()
    meta = dict(meta or {}, per_digit=per_digit, seed=spec.seed, teacher=str(teacher), student=str(student),
                teacher_guidance=ev.spec.teacher_guidance, classifier_heldout_accuracy=heldout)
    write_results(out, [r28, *baselines, rs, re], meta, accuracy_name=suite.accuracy_name,
                  note=suite.heldout_note(heldout))
    return meta


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="senseflow demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--iterations", type=int, default=None,
                   help="training iterations (default: the config's); the cosine LR decay is stretched to match")
    p.add_argument("--samples-per-digit", type=int, default=None,
                   help="evaluation images per digit (default: suite.per_digit of configs/benchmarks/digits.yaml, "
                        "30: FD-T noise floor ≈ 3.5, docs/benchmarks.md)")
    p.add_argument("--grid-columns", type=int, default=None,
                   help="seeds shown per digit in the grids (default: suite.grid_columns of the same yaml)")
    p.add_argument("--config", default=None, help=f"training config (default {DEFAULT_CONFIG} of the checkout)")
    p.add_argument("--trainer", default="sd35_senseflow", choices=sorted(LAUNCHERS),
                   help="the trainer (and its launcher) that distils the teacher (default sd35_senseflow)")
    p.add_argument("--teacher", default=None,
                   help="teacher folder (default the shipped senseflow/assets/digits_teacher)")
    p.add_argument("--teacher-guidance", type=float, default=None,
                   help="teacher guidance scale of the evaluation (default: the one in the teacher's card or "
                        "training record, 4 for the shipped one)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (OMP_NUM_THREADS) of training and evaluation (default 1: on a shared 2-core "
                        "machine 2 threads oversubscribe and run ~5x slower)")
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides for the training run")
    return p


def main_demo(argv: Sequence[str]) -> int:
    """Entry point of ``senseflow demo``; returns the exit status."""
    import torch

    from senseflow.digits.teacher import default_teacher_path

    args = build_parser().parse_args(list(argv))
    if args.samples_per_digit is not None and args.samples_per_digit < 2:
        raise ValueError(f"--samples-per-digit must be ≥ 2, got {args.samples_per_digit} (the grids and FD need "
                         "several seeds per digit)")
    t_start = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    teacher = Path(args.teacher).resolve() if args.teacher else default_teacher_path()
    if not (teacher / "model_index.json").is_file():
        raise FileNotFoundError(f"{teacher / 'model_index.json'} not found: expected the digits teacher folder")
    config = Path(args.config).resolve() if args.config else repo_root() / DEFAULT_CONFIG
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found: expected a training YAML")
    print(f"[demo] writing data set and discriminator backbones under {out}", flush=True)
    assets = prepare_assets(out)
    run_dir = out / "run"
    cmd = train_command(config, run_dir, teacher, assets, args.iterations, args.overrides, args.trainer)
    print("[demo] " + " ".join(cmd), flush=True)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    train_s = run_training(cmd, out / "train.log")
    print(f"[demo] training took {train_s:.0f} s; evaluating", flush=True)
    torch.set_num_threads(max(1, args.threads))
    t_eval = time.perf_counter()
    meta = evaluate_run(out, teacher, latest_student(run_dir), args.samples_per_digit, args.grid_columns,
                        meta={"train_seconds": train_s, "command": cmd}, teacher_guidance=args.teacher_guidance,
                        label="SenseFlow" if args.trainer.endswith("senseflow") else "DMD2")
    meta["eval_seconds"] = time.perf_counter() - t_eval
    meta["total_seconds"] = time.perf_counter() - t_start
    import json

    data = json.loads((out / "metrics.json").read_text())
    data["meta"].update(meta)
    (out / "metrics.json").write_text(json.dumps(data, indent=1))
    print((out / "metrics.md").read_text())
    print(f"[demo] done in {meta['total_seconds']:.0f} s: {out / 'grids.png'} (student | teacher 28-step), "
          f"{out / 'metrics.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main_demo(sys.argv[1:]))

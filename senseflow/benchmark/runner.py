"""Run a benchmark: train every method, score every checkpoint, write the table, the FD-T curve and the grids.

1. the suite's training assets under ``<out>/work`` (kept between calls);
2. every run (:meth:`BenchmarkSettings.runs`) through its trainer's launcher, ``parallel`` at a time with
   ``OMP_NUM_THREADS=1``, checkpoints every ``save_every`` iterations; a run is reused only when it is finished
   with the intended settings (:func:`finished_run`: ``checkpoints/latest`` names ``iter_<iterations>`` and the run's
   ``config.yaml`` holds the intended seed, iterations and overrides), otherwise its command is launched again (the
   trainer resumes a run of the same config and refuses a changed one);
3. on the suite's shared prompt/noise set (:class:`~senseflow.benchmark.evaluator.Evaluator`): the teacher's Euler +
   CFG rows at ``eval.teacher_steps``, every saved checkpoint of every run with the re-noising sampler (the FD-T
   curve), the last one also with the Euler sampler;
4. ``results.md`` / ``results.json`` (rows, the command, the settings, the metric network's held-out accuracy, the
   curves, seconds), ``fdt_curve.png``, ``grids/<run>.png``, ``grids/teacher_<K>step.png`` and
   ``grids/side_by_side.png`` (rows = the same prompts, one column per method).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from senseflow.benchmark.evaluator import STUDENT_SAMPLERS, Evaluator, recorded_guidance, teacher_row_name
from senseflow.benchmark.report import MethodResult, plot_curves, write_results
from senseflow.benchmark.settings import BenchmarkSettings, Run
from senseflow.launch import free_port, train_command

__all__ = ["train_runs", "run_benchmark", "checkpoints", "finished_run"]


def _log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def train_runs(runs: Sequence[Run], work: Path, teacher: Path, assets: dict[str, Path], iterations: int | None,
               save_every: int, parallel: int, log: Callable[[str], None] = _log) -> dict[str, dict]:
    """Train ``runs`` (``parallel`` subprocesses at a time, one thread each) into ``work/<slug>``; returns, per run
    name, its command line and training seconds (None when an earlier run was reused). A failed run stops the rest
    and raises with its log's path."""
    pending = list(runs)
    running: list[tuple[Run, subprocess.Popen[bytes], list[str], float]] = []
    done: dict[str, dict[str, Any]] = {}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                run = pending.pop(0)
                run_dir = work / run.slug
                cmd = train_command(run.method.config, run_dir, teacher, assets, iterations,
                                    [f"train.save_interval={save_every}", "train.keep_last=0",
                                     f"experiment.seed={run.seed}", *run.method.overrides], run.method.trainer)
                if finished_run(run_dir, cmd):
                    log(f"{run.name}: reusing {run_dir}")
                    done[run.name] = {"command": cmd, "train_seconds": None, "reused": True}
                    continue
                log(f"{run.name}: {' '.join(cmd)}")
                env = dict(os.environ, MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
                with open(work / f"{run.slug}.log", "w") as fh:
                    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
                running.append((run, proc, cmd, time.perf_counter()))
            for item in list(running):
                run, proc, cmd, t0 = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                if proc.returncode != 0:
                    raise RuntimeError(f"{run.name} failed ({proc.returncode}); see {work / (run.slug + '.log')}")
                done[run.name] = {"command": cmd, "train_seconds": time.perf_counter() - t0, "reused": False}
                log(f"{run.name}: trained in {done[run.name]['train_seconds']:.0f} s")
            if running:
                time.sleep(0.5)
    finally:
        for _, proc, _, _ in running:      # only after a failure: stop the runs this call started
            proc.terminate()
            proc.wait()
    return done


#: the launcher arguments before the ``key=value`` overrides: sh LAUNCHER NODES GPUS CONFIG RUN_DIR
_LAUNCHER_ARGS = 6


def finished_run(run_dir: Path, cmd: Sequence[str]) -> bool:
    """Whether ``run_dir`` holds the finished run of the launcher command ``cmd`` (:func:`train_command`): its
    ``config.yaml`` (the resolved config the trainer saves) agrees with the config ``cmd`` trains on every key that
    ``cmd`` overrides (experiment.seed, train.iterations, the method's overrides, …) and on ``train.iterations``, and
    ``checkpoints/latest`` names the checkpoint of the last iteration (``iter_<iterations:06d>``)."""
    from omegaconf import OmegaConf

    from senseflow.config import load_config, resolved_yaml

    saved_path, pointer = run_dir / "config.yaml", run_dir / "checkpoints" / "latest"
    if not (saved_path.is_file() and pointer.is_file()):
        return False
    overrides = list(cmd[_LAUNCHER_ARGS:])
    intended = OmegaConf.create(resolved_yaml(load_config(cmd[_LAUNCHER_ARGS - 2], overrides)))
    saved = OmegaConf.load(saved_path)
    keys = dict.fromkeys([o.split("=", 1)[0] for o in overrides] + ["experiment.seed", "train.iterations"])
    for key in keys:
        if OmegaConf.select(saved, key, default=None) != OmegaConf.select(intended, key, default=None):
            return False
    return pointer.read_text().strip() == f"iter_{int(intended.train.iterations):06d}"


def _fd_teacher(r: MethodResult) -> float:
    """The FD-T of a row the evaluator scored (it builds the reference set first, so every row has one)."""
    if r.fd_teacher is None:
        raise RuntimeError(f"{r.name}: scored without the FD-T reference set")
    return r.fd_teacher


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's saved checkpoints ``iter_*``, oldest first."""
    cks = sorted(p for p in (run_dir / "checkpoints").glob("iter_*") if p.is_dir())
    if not cks:
        raise FileNotFoundError(f"no checkpoints under {run_dir / 'checkpoints'}")
    return cks


def run_benchmark(settings: BenchmarkSettings, out: Path, command: str, methods: Sequence[str] | None = None,
                  clean: bool = False, log: Callable[[str], None] = _log) -> dict:
    """Steps 1-4 of the module doc into ``out``; returns results.json's content."""
    t_start = time.perf_counter()
    teacher = Path(settings.teacher)
    if not (teacher / "model_index.json").is_file():
        raise FileNotFoundError(f"{teacher / 'model_index.json'} not found: no teacher there (pass --teacher)")
    suite = settings.make_suite()
    runs = settings.runs(methods)
    spec = settings.eval_spec()
    if spec.teacher_guidance is None:      # the teacher's record, read before any training
        spec = replace(spec, teacher_guidance=recorded_guidance(teacher))
    out = Path(out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    assets = suite.prepare_assets(work)

    # ---- training: every run with its config, the same iteration budget and checkpoint period ---------------
    trained = train_runs(runs, work, teacher, assets, settings.iterations, settings.save_every, settings.parallel,
                         log)

    # ---- evaluation on one prompt/noise set ------------------------------------------------------------------
    ev = Evaluator(teacher, suite, spec)
    grids = out / "grids"
    grids.mkdir(exist_ok=True)
    results: list[MethodResult] = []
    finals: dict = {}
    hlines: dict[str, float] = {}
    for steps in settings.teacher_steps:
        r, im = ev.evaluate_teacher(steps)
        r.extra["teacher_steps"] = steps
        results.append(r)
        suite.grid(im).save(grids / f"teacher_{steps}step.png")
        if steps == ev.spec.teacher_steps:
            finals[f"teacher {steps}-step"] = im
        hlines[f"teacher {steps}-step" + (" (floor)" if steps == ev.spec.teacher_steps else "")] = _fd_teacher(r)
        log(str(r))
    curves: dict[str, list[tuple[int, float]]] = {}
    euler_rows = []
    for run in runs:
        cks = checkpoints(work / run.slug)
        curve = []
        for ck in cks:
            r, im = ev.evaluate_student(ck, run.name)
            curve.append((int(ck.name.split("_")[1]), _fd_teacher(r)))
        r.extra.update(method=run.method.name, iterations=curve[-1][0], seed=run.seed,
                       train_seconds=trained[run.name]["train_seconds"])
        results.append(r)
        curves[run.name] = curve
        finals[run.name] = im
        suite.grid(im).save(grids / f"{run.slug}.png")
        log(str(r))
        e, _ = ev.evaluate_student(cks[-1], run.name + STUDENT_SAMPLERS["euler"], sampler="euler")
        e.extra.update(method=run.method.name + STUDENT_SAMPLERS["euler"], iterations=curve[-1][0], seed=run.seed,
                       train_seconds=trained[run.name]["train_seconds"])
        euler_rows.append(e)
        log(str(e))
    results += euler_rows
    suite.comparison(finals).save(grids / "side_by_side.png")
    plot_curves(curves, hlines, out / "fdt_curve.png",
                title=f"{settings.suite_kind}: FD-T to the teacher's {ev.spec.teacher_steps}-step samples over "
                      "training (re-noising sampler)")
    heldout = suite.heldout_accuracy()
    meta = {"command": command, "suite": settings.suite_kind, "settings": settings.raw, "teacher": str(teacher),
            "teacher_guidance": ev.spec.teacher_guidance, "teacher_rows": [teacher_row_name(k)
                                                                           for k in settings.teacher_steps],
            "accuracy_name": suite.accuracy_name, "metric_heldout_accuracy": heldout,
            "prompts": len(ev.prompts),
            "runs": {r.name: {"method": r.method.name, "seed": r.seed, "folder": r.slug, **trained[r.name]}
                     for r in runs},
            "curves": curves, "total_seconds": time.perf_counter() - t_start}
    write_results(out, results, meta, stem="results", accuracy_name=suite.accuracy_name,
                  note=suite.heldout_note(heldout), reference=f"teacher {ev.spec.teacher_steps}",
                  parts=suite.table_parts)
    if clean:
        shutil.rmtree(work)
    return json.loads((out / "results.json").read_text())

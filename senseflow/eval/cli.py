"""``senseflow eval``: prompts → (student samples, teacher references) → metrics → ``metrics.json`` + ``table.md``.

    senseflow eval --config configs/eval/sdxl.yaml [key=value ...] [--limit N] [--generate-only] [--no-progress]
    senseflow eval convert-openclip --checkpoint HPS_v2.1_compressed.pt --base CLIP-ViT-H-14-folder --out DIR
    senseflow eval convert-imagereward --checkpoint ImageReward.pt --tokenizer bert-base-uncased-folder --out DIR
    senseflow eval build-tiny-models --out DIR       (tiny random metric models for CPU demos and tests)

A run writes into ``output_dir``: ``prompts.txt`` / ``prompts.json`` (the resolved prompt set), ``samples/`` and
``reference/`` (unless other folders are configured), ``metrics.json`` and ``table.md``. Generation is resumable:
rerunning the same command after an interruption only produces the missing images. With ``--limit N`` each folder
gets at most N new images and metrics wait until every image exists. Bad input prints one line
``senseflow eval: error: ...`` and exits with 2; a metric that failed (not skipped) makes the exit code 1.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from senseflow.core.argparsing import RaisingParser

__all__ = ["main_eval", "run_eval", "EvalOutcome"]

PROG = "senseflow eval"


class EvalOutcome:
    """What :func:`run_eval` did: generation results, metric results (None when generation is unfinished)."""

    def __init__(self) -> None:
        self.student: Any = None
        self.reference: Any = None
        self.results: dict[str, Any] | None = None
        self.report: tuple[Path, Path] | None = None

    @property
    def exit_code(self) -> int:
        if self.results and any(r.status == "error" for r in self.results.values()):
            return 1
        return 0


def run_eval(cfg, progress: bool = True, generate_only: bool = False,
             log: Callable[[str], None] | None = None) -> EvalOutcome:
    """Run an evaluation described by an :class:`senseflow.eval.config.EvalConfig`."""
    from senseflow.checkpoint_io import resolve_student_source
    from senseflow.eval.generate import (
        StudentSettings,
        TeacherSettings,
        generate_teacher_reference,
        resolve_device,
        run_student,
    )
    from senseflow.eval.images import indexed_images
    from senseflow.eval.metrics import EvalInputs, compute_metrics
    from senseflow.eval.prompts import load_prompt_set
    from senseflow.eval.report import markdown_table, write_report
    from senseflow.inference import SPECS
    from senseflow.models.families import family_names

    log = log or (lambda s: print(s, file=sys.stderr))
    g, s = cfg.generation, cfg.generation.student
    if s.checkpoint:  # a student that cannot be read safely is refused before anything is written or logged
        if not s.spec or not g.teacher:
            raise ValueError("generation.student.checkpoint needs generation.student.spec and generation.teacher")
        resolve_student_source(s.checkpoint)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    p = cfg.prompts
    prompts = load_prompt_set(p.source, p.path, p.num, p.seed, p.key, p.caption)
    prompts_txt, _ = prompts.write(out)
    log(f"prompts: {len(prompts)} ({prompts.description})")
    samples_dir = Path(cfg.images.samples) if cfg.images.samples else out / "samples"
    reference_dir = Path(cfg.images.reference) if cfg.images.reference else out / "reference"
    outcome = EvalOutcome()

    if s.checkpoint:
        settings = StudentSettings(spec=s.spec, teacher=g.teacher, checkpoint=s.checkpoint,
                                   student_config=s.student_config, sampler=s.sampler, steps=s.steps, seed=g.seed,
                                   height=g.height, width=g.width, batch_size=g.batch_size, device=g.device,
                                   dtype=g.dtype)
        outcome.student = run_student(settings, prompts_txt, len(prompts), samples_dir, limit=g.limit,
                                      progress=progress)
        log(f"student samples: {len(outcome.student.written)} written, {len(outcome.student.skipped)} already "
            f"there, {len(outcome.student.remaining)} missing ({samples_dir})")
    elif not samples_dir.is_dir():
        raise FileNotFoundError(f"samples folder not found: {samples_dir} (set images.samples to a folder of "
                                "NNNNN.png images, or generation.student.checkpoint to generate them)")

    r = g.reference
    if r.enabled and g.teacher:
        spec_family = SPECS[s.spec].family if s.spec in SPECS else s.spec if s.spec in family_names() else None
        family = g.family or spec_family
        if family is None:
            raise ValueError(f"generation.family ({' | '.join(family_names())}) is needed to generate teacher "
                             "references")
        tsettings = TeacherSettings(teacher=g.teacher, family=family, steps=r.steps, guidance_scale=r.guidance_scale,
                                    seed=g.seed if r.seed is None else r.seed, height=g.height, width=g.width,
                                    batch_size=r.batch_size or g.batch_size, device=g.device, dtype=g.dtype,
                                    pipeline_kwargs=dict(r.pipeline_kwargs))
        outcome.reference = generate_teacher_reference(tsettings, prompts.prompts, reference_dir, limit=g.limit,
                                                       progress=progress)
        log(f"teacher references: {len(outcome.reference.written)} written, {len(outcome.reference.skipped)} "
            f"already there, {len(outcome.reference.remaining)} missing ({reference_dir})")

    unfinished = [x for x in (outcome.student, outcome.reference) if x is not None and not x.complete]
    if unfinished:
        log("generation is not finished (limit reached); rerun the same command to continue")
        return outcome
    if generate_only:
        return outcome

    indices = range(len(prompts))
    samples = indexed_images(samples_dir, indices)
    if len(samples) < len(prompts):
        log(f"warning: {samples_dir} has images for {len(samples)} of {len(prompts)} prompts; scoring those")
    reference = indexed_images(reference_dir, indices) if reference_dir.is_dir() else None
    inputs = EvalInputs(samples=samples, prompts=prompts, reference=reference,
                        device=resolve_device(cfg.metrics.device), progress=progress)
    outcome.results = compute_metrics(cfg.metrics, inputs, log=log)
    meta = {"name": cfg.name, "prompts": {"description": prompts.description, "count": len(prompts)},
            "samples": str(samples_dir), "n_samples": len(samples),
            "reference": str(reference_dir) if reference is not None else None,
            "n_reference": len(reference) if reference is not None else 0,
            "generation": {"student": vars(s), "teacher": g.teacher, "seed": g.seed, "height": g.height,
                           "width": g.width, "reference": {k: v for k, v in vars(r).items()}}}
    outcome.report = write_report(out, outcome.results, meta, cfg.table.row, cfg.table.block, cfg.table.title,
                                  len(prompts))
    log(f"wrote {outcome.report[0]} and {outcome.report[1]}")
    print(markdown_table(outcome.results, cfg.table.row, cfg.table.block, cfg.table.title, len(prompts)))
    return outcome


def _convert_openclip(argv: Sequence[str]) -> int:
    from senseflow.eval.openclip import convert_openclip_checkpoint

    p = RaisingParser(prog=f"{PROG} convert-openclip",
                description="Convert an OpenCLIP checkpoint (e.g. HPSv2) into a transformers CLIPModel folder.")
    p.add_argument("--checkpoint", required=True, help="OpenCLIP .pt/.pth (a state dict or {'state_dict': ...})")
    p.add_argument("--base", required=True, help="a transformers CLIPModel folder of the same architecture")
    p.add_argument("--out", required=True, help="output folder")
    a = p.parse_args(list(argv))
    print(f"wrote {convert_openclip_checkpoint(a.checkpoint, a.base, a.out)}")
    return 0


def _convert_imagereward(argv: Sequence[str]) -> int:
    from senseflow.eval.image_reward import convert_imagereward_checkpoint

    p = RaisingParser(prog=f"{PROG} convert-imagereward",
                description="Convert the released ImageReward.pt into a local ImageReward folder.")
    p.add_argument("--checkpoint", required=True, help="ImageReward.pt (state dict)")
    p.add_argument("--tokenizer", required=True, help="a local bert-base-uncased tokenizer folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--head-dim", type=int, default=64, help="attention head width of both towers (default 64, as "
                   "BLIP's ViT-L and BERT-base)")
    a = p.parse_args(list(argv))
    print(f"wrote {convert_imagereward_checkpoint(a.checkpoint, a.tokenizer, a.out, head_dim=a.head_dim)}")
    return 0


def _build_tiny_models(argv: Sequence[str]) -> int:
    from senseflow.eval.tiny_models import build_tiny_metric_models

    p = RaisingParser(prog=f"{PROG} build-tiny-models",
                description="Write tiny random metric models (FID Inception, CLIP, ImageReward) for CPU demos.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(list(argv))
    for name, path in build_tiny_metric_models(a.out, seed=a.seed).items():
        print(f"{name}: {path}")
    return 0


def _run(argv: Sequence[str]) -> int:
    from senseflow.eval.config import load_eval_config, to_yaml

    p = RaisingParser(prog=PROG, description="Evaluate a distilled student (docs/method.md §19): generation + metrics.")
    p.add_argument("--config", "--config_path", dest="config", help="eval YAML (configs/eval/*.yaml)")
    p.add_argument("--limit", type=int, default=None, help="generate at most N new images per folder, then stop")
    p.add_argument("--generate-only", action="store_true", help="generate the images, compute no metric")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. prompts.num=100 output_dir=runs/x")
    a = p.parse_intermixed_args(list(argv))
    overrides = list(a.overrides) + ([f"generation.limit={a.limit}"] if a.limit is not None else [])
    cfg = load_eval_config(a.config, overrides)
    if a.print_config:
        print(to_yaml(cfg), end="")
        return 0
    return run_eval(cfg, progress=not a.no_progress, generate_only=a.generate_only).exit_code


def main_eval(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``senseflow eval``; returns the exit code (0 ok, 1 a metric failed, 2 bad input)."""
    import senseflow.quiet  # noqa: F401  (drops transformers' torchvision notice before it is logged)

    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"convert-openclip": _convert_openclip, "convert-imagereward": _convert_imagereward,
                "build-tiny-models": _build_tiny_models}
    try:
        if argv and argv[0] in commands:
            return commands[argv[0]](argv[1:])
        return _run(argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2

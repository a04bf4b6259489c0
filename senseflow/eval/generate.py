"""Resumable image generation for an evaluation: the student's few-step samples and the teacher's references.

Both writers produce ``<folder>/{index:05d}.png`` for prompt ``index`` and are resumable: a prompt whose PNG is
already complete (:func:`senseflow.eval.images.is_complete_png`) is skipped, and every PNG is written to a
temporary file then renamed, so an interrupted run leaves no half-written image under a final name. Rerunning
after a kill continues with the missing prompts only. Each folder holds ``generation.json``, the settings that made
its images and a digest of the prompt list; a rerun with other settings or other prompts into the same folder is
refused (images of two settings never mix, and image i always belongs to prompt i).

* **Student** (docs/method.md §16.3): the code path of :mod:`senseflow.inference` (same checks through
  :func:`senseflow.inference.prepare`, same runtime, same samplers). Prompt i draws its initial noise and its
  re-noising noise from ``prompt_generator(seed, i)`` = ``torch.Generator().manual_seed(seed + i)``, so an image
  depends on (seed, i) only, not on the batch composition, and a resumed run yields the images an uninterrupted
  run would have.
* **Teacher reference** ("FID-T" compares with teacher samples, §19): the stock diffusers pipeline of the teacher
  folder (``StableDiffusionXLPipeline`` / ``StableDiffusion3Pipeline`` / ``FluxPipeline``) with its own many-step
  settings: ``steps`` and ``guidance_scale`` from the config (``null`` = the pipeline's default), extra call
  arguments from ``pipeline_kwargs``; prompt i uses the generator seeded ``seed + i``.

``limit`` stops after that many new images (a test hook, and a way to generate in slices).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from senseflow.eval.images import image_path, is_complete_png, save_png_atomic
from senseflow.inference import resolve_device, resolve_dtype  # one device/dtype rule for all entry points

__all__ = ["GenerationResult", "StudentSettings", "TeacherSettings", "plan_student", "pending", "generate_student",
           "run_student", "load_teacher_pipeline", "generate_teacher_reference", "check_record", "prompts_digest",
           "resolve_device", "resolve_dtype"]

RECORD = "generation.json"


@dataclass
class GenerationResult:
    """What one call did: images written now, prompts skipped because their PNG existed, prompts still missing."""

    folder: Path
    written: list[int]
    skipped: list[int]
    remaining: list[int]

    @property
    def complete(self) -> bool:
        return not self.remaining


@dataclass
class StudentSettings:
    """The student's generation settings (config section ``generation.student`` plus the shared ones)."""

    spec: str
    teacher: str
    checkpoint: str
    student_config: str | None = None
    sampler: str = "stochastic"
    steps: int = 4
    seed: int = 0
    height: int = 1024
    width: int = 1024
    batch_size: int = 4
    device: str = "auto"
    dtype: str = "auto"


@dataclass
class TeacherSettings:
    """The teacher's reference settings (config section ``generation.teacher_reference``)."""

    teacher: str
    family: str
    steps: int
    guidance_scale: float | None = None
    seed: int = 0
    height: int = 1024
    width: int = 1024
    batch_size: int = 4
    device: str = "auto"
    dtype: str = "auto"
    pipeline_kwargs: Mapping[str, Any] | None = None


def check_record(folder: Path, record: Mapping[str, Any]) -> None:
    """Write ``folder/generation.json`` or check that the existing one holds the same settings."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RECORD
    record = json.loads(json.dumps(record))  # normalise (tuples → lists, paths → str)
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
        if diff:
            k = diff[0]
            raise ValueError(f"{folder} holds images made with other settings ({k}: {old.get(k)!r} there, "
                             f"{record.get(k)!r} now); use another folder or empty this one")
        return
    path.write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")


def pending(folder: Path, indices: Sequence[int]) -> tuple[list[int], list[int]]:
    """(missing, done): prompt indices whose PNG is not complete yet, and those that are."""
    missing: list[int] = []
    done: list[int] = []
    for i in indices:
        (done if is_complete_png(image_path(folder, i)) else missing).append(int(i))
    return missing, done


def prompts_digest(prompts: Sequence[str]) -> str:
    """SHA-256 of the prompt list (one per line): image i of a folder belongs to prompt i of exactly this list."""
    import hashlib

    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


def _student_record(s: StudentSettings, prompts: Sequence[str]) -> dict[str, Any]:
    return {"kind": "student", "prompts_sha256": prompts_digest(prompts), "spec": s.spec,
            "checkpoint": str(Path(s.checkpoint).resolve()), "teacher": str(Path(s.teacher).resolve()),
            "student_config": s.student_config, "sampler": s.sampler,
            "steps": s.steps, "seed": s.seed, "height": s.height, "width": s.width}


def plan_student(settings: StudentSettings, prompts_file: Path, num_prompts: int, output_dir: Path):
    """Check everything and return a :class:`senseflow.inference.Plan` (no weights loaded)."""
    from senseflow.inference import SPECS, get_spec, prepare
    from senseflow.models.families import family_names

    names = [*SPECS, *(f for f in family_names() if f not in SPECS)]  # a script's spec, or a family's default
    if settings.spec not in names:
        raise ValueError(f"generation.student.spec {settings.spec!r} is not one of: {', '.join(names)}")
    spec = get_spec(settings.spec)
    args = argparse.Namespace(**{
        spec.teacher_flag: settings.teacher, "checkpoint": settings.checkpoint, "output_dir": str(output_dir),
        "prompts_file": str(prompts_file), "start_idx": 0, "num_prompts": num_prompts,
        "batch_size": settings.batch_size, spec.config_flag: settings.student_config, "sampler": settings.sampler,
        "steps": settings.steps, "seed": settings.seed, "height": settings.height, "width": settings.width,
        "device": settings.device, "dtype": settings.dtype})
    return prepare(args, spec)


def _bar(total: int, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=desc, disable=not progress, file=sys.stderr)


@torch.no_grad()
def generate_student(plan: Any, family: Any, student: nn.Module, limit: int | None = None,
                     progress: bool = True, record: Mapping[str, Any] | None = None) -> GenerationResult:
    """Sample the plan's prompts that have no complete PNG yet (at most ``limit`` of them), batch by batch."""
    from senseflow.inference import student_images

    folder = Path(plan.output_dir)
    if record is not None:
        check_record(folder, record)
    texts_by_index = dict(plan.items)
    missing, done = pending(folder, list(texts_by_index))
    todo = missing if limit is None else missing[: max(0, int(limit))]
    written: list[int] = []
    if todo:
        bar = _bar(len(todo), f"student ({plan.spec.title})", progress)
        for indices, images in student_images(plan, family, student, [(i, texts_by_index[i]) for i in todo]):
            for i, img in zip(indices, images):
                save_png_atomic(img, image_path(folder, i))
                written.append(i)
            bar.update(len(indices))
        bar.close()
    remaining = [i for i in missing if i not in set(written)]
    return GenerationResult(folder, written, done, remaining)


def run_student(settings: StudentSettings, prompts_file: Path, num_prompts: int, output_dir: Path,
                limit: int | None = None, progress: bool = True) -> GenerationResult:
    """Plan, then load the runtime only when some image is missing, then :func:`generate_student`."""
    from senseflow.inference import load_runtime

    plan = plan_student(settings, prompts_file, num_prompts, output_dir)
    record = _student_record(settings, [t for _, t in plan.items])
    check_record(Path(output_dir), record)
    missing, done = pending(Path(output_dir), [i for i, _ in plan.items])
    if not missing or limit == 0:
        return GenerationResult(Path(output_dir), [], done, missing)
    family, student = load_runtime(plan)
    return generate_student(plan, family, student, limit=limit, progress=progress, record=record)


def _teacher_record(s: TeacherSettings, prompts: Sequence[str]) -> dict[str, Any]:
    return {"kind": "teacher_reference", "prompts_sha256": prompts_digest(prompts),
            "teacher": str(Path(s.teacher).resolve()), "family": s.family,
            "steps": s.steps, "guidance_scale": s.guidance_scale, "seed": s.seed, "height": s.height,
            "width": s.width, "pipeline_kwargs": dict(s.pipeline_kwargs or {})}


def load_teacher_pipeline(settings: TeacherSettings) -> Any:
    """The stock diffusers pipeline of the teacher folder, loaded offline, on the run's device and dtype."""
    import diffusers

    from senseflow.inference import check_teacher_folder, pipeline_classes
    from senseflow.quiet import quiet_libraries

    classes = pipeline_classes()
    if settings.family not in classes:
        raise ValueError(f"teacher family {settings.family!r} is not one of: {', '.join(classes)}")
    check_teacher_folder(settings.teacher, settings.family)
    quiet_libraries()
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    cls = getattr(diffusers, classes[settings.family])
    pipe = cls.from_pretrained(str(settings.teacher), dtype=dtype, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate_teacher_reference(settings: TeacherSettings, prompts: Sequence[str], output_dir: Path,
                               limit: int | None = None, progress: bool = True,
                               pipeline: Any | None = None,
                               on_batch: Callable[[list[int]], None] | None = None) -> GenerationResult:
    """Teacher samples of the prompts without a complete PNG in ``output_dir`` (cached across runs)."""
    from senseflow.inference import prompt_generator

    folder = Path(output_dir)
    check_record(folder, _teacher_record(settings, prompts))
    missing, done = pending(folder, range(len(prompts)))
    todo = missing if limit is None else missing[: max(0, int(limit))]
    written: list[int] = []
    if todo:
        pipe = pipeline if pipeline is not None else load_teacher_pipeline(settings)
        kwargs: dict[str, Any] = {"num_inference_steps": int(settings.steps), "height": settings.height,
                                  "width": settings.width, "output_type": "pil", **dict(settings.pipeline_kwargs or {})}
        if settings.guidance_scale is not None:
            kwargs["guidance_scale"] = float(settings.guidance_scale)
        bar = _bar(len(todo), f"teacher reference ({settings.family}, {settings.steps} steps)", progress)
        for start in range(0, len(todo), settings.batch_size):
            indices = todo[start:start + settings.batch_size]
            gens = [prompt_generator(settings.seed, i) for i in indices]
            images = pipe(prompt=[prompts[i] for i in indices], generator=gens, **kwargs).images
            for i, img in zip(indices, images):
                save_png_atomic(img.convert("RGB"), image_path(folder, i))
                written.append(i)
            if on_batch is not None:
                on_batch(indices)
            bar.update(len(indices))
        bar.close()
    remaining = [i for i in missing if i not in set(written)]
    return GenerationResult(folder, written, done, remaining)

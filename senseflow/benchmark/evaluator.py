"""Evaluation of a teacher and its distilled students on one fixed prompt/noise set (benchmark and demo).

A suite (:mod:`senseflow.benchmark.suites`) supplies N prompts c_j, an accuracy metric and the Fréchet distances.
For each method m we draw N images x_m(ε_j, c_j) with the SAME initial noises ε_j ~ N(0, I) (one
``torch.Generator`` seeded with ``seed``), then report

* accuracy: the suite's (digits: prompt accuracy, mean over j of [argmax classifier(x_m,j) = digit_j]; shapes:
  compositional accuracy, the share of samples whose every stated object and relation the reader reads back);
* FD: Fréchet distance ‖μ_m − μ_r‖² + tr(Σ_m + Σ_r − 2(Σ_m Σ_r)^½) between the suite's metric-network features of
  x_m and of the real images;
* FD-T: the same distance to a REFERENCE set of teacher K-step samples (K = ``teacher_steps``, the benchmark
  yaml's ``eval.teacher_steps[0]``, 28 by default) drawn from independent noise (seed
  ``reference_seed``), i.e. a distance between distributions: with shared noise the deterministic teacher Euler
  samplers would match the reference sample by sample, which FD-T is not meant to reward. The teacher's own
  K-step FD-T is then the finite-sample noise floor;
* NFE per image: network evaluations (CFG counts 2 per step, FLUX's embedded guidance 1) and the measured wall time
  per image.

Samplers (docs/method.md §16.3): the teacher uses the deterministic Euler ODE sampler on the shifted grid
σ = s₃(1 − k/K) with CFG u + s·(c − u); the student uses, without guidance, on its anchors
σ_k = s₃(1 − k/4) = 1, .9, .75, .5, either the 4-step re-noising sampler ("Ours") or the 4-step Euler ODE
sampler ("Ours (Euler)"); the paper's Table 1 reports both.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from senseflow.benchmark.report import MethodResult
from senseflow.core.anchors import make_anchors

if TYPE_CHECKING:
    from senseflow.benchmark.suites import Suite

__all__ = ["EvalSpec", "Evaluator", "STUDENT_SAMPLERS", "recorded_guidance", "teacher_row_name"]

#: the student's samplers of docs/method.md §16.3 and the suffix of their result rows ("Ours" / "Ours (Euler)")
STUDENT_SAMPLERS: dict[str, str] = {"stochastic": "", "euler": " (Euler)"}


def teacher_row_name(steps: int) -> str:
    """The result row of the teacher's K-step Euler sampler with guidance (2K NFE with CFG)."""
    return f"teacher {steps}-step Euler + CFG"


@dataclass(kw_only=True)
class EvalSpec:
    """How the shared set is sampled: noise seed ``seed``, the teacher's CFG scale and step counts, the student's
    steps; the prompts come from the suite. The values are the ``eval`` section of
    ``configs/benchmarks/<suite>.yaml`` (:meth:`senseflow.benchmark.settings.BenchmarkSettings.eval_spec`)."""

    seed: int                          # the shared initial noise of every method
    teacher_guidance: float | None     # teacher CFG scale s; None: the one its training record was evaluated at
    teacher_steps: int                 # the reference sampler of FD-T
    student_steps: int                 # §16.3
    #: teacher Euler step counts scored beside the reference (e.g. the student's steps, and half of them: the
    #: student's NFE, since CFG costs 2 evaluations per step)
    teacher_baselines: tuple[int, ...]
    batch_size: int
    reference_seed: int                # independent noise of the FD-T reference set
    resolution: int                    # pixels (the teacher's training resolution)
    #: T5 length of SD3/FLUX-family teachers; None: the family's default
    t5_max_length: int | None = None

    def __post_init__(self) -> None:
        if any(int(n) < 1 for n in (self.teacher_steps, self.student_steps, *self.teacher_baselines)):
            raise ValueError(f"EvalSpec step counts must be ≥ 1, got teacher {self.teacher_steps}, baselines "
                             f"{self.teacher_baselines}, student {self.student_steps}")
        if self.batch_size < 1:
            raise ValueError(f"EvalSpec.batch_size must be ≥ 1, got {self.batch_size}")


def recorded_guidance(teacher_path: str | Path) -> float:
    """The CFG scale s the teacher is sampled with: ``generation.guidance_scale`` of its ``teacher_card.json``
    (teachers of ``senseflow teacher train``) or ``evaluation.settings.guidance_scale`` of the shipped digits
    teacher's training record. The demo and the benchmark sample the teacher with it."""
    from senseflow.digits.teacher import TEACHER_RECORD
    from senseflow.teacher.train import CARD

    folder = Path(teacher_path)
    try:
        if (folder / CARD).is_file():
            return float(json.loads((folder / CARD).read_text())["generation"]["guidance_scale"])
        return float(json.loads((folder / TEACHER_RECORD).read_text())["evaluation"]["settings"]["guidance_scale"])
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        raise ValueError(f"{folder} holds neither {CARD} nor {TEACHER_RECORD} with the teacher's guidance scale: "
                         f"pass it explicitly (--teacher-guidance)") from None


class Evaluator:
    """Loads the teacher family once; samples teacher sets and student checkpoints on the suite's shared set."""

    def __init__(self, teacher_path: str | Path, suite: "Suite", spec: EvalSpec) -> None:
        from senseflow.method.sampling import initial_noise
        from senseflow.models.families import build_family, family_of_folder

        if spec.teacher_guidance is None:
            spec = replace(spec, teacher_guidance=recorded_guidance(teacher_path))
        self.spec = spec
        self.teacher_path = Path(teacher_path)
        self.suite = suite
        self.prompts: list[str] = list(suite.prompts)
        res = spec.resolution
        self.family = build_family({"family": family_of_folder(teacher_path), "path": str(teacher_path),
                                    "t5_max_length": spec.t5_max_length, "resolution": res})
        self.teacher = self.family.load_denoiser(dtype=torch.float32).eval().requires_grad_(False)
        self.schedule = self.family.schedule(res, res)
        with torch.no_grad():
            self.cond = self.family.encode_prompts(self.prompts)
        shape = (len(self.prompts), *self.family.latent_shape(res, res))
        self.noise = initial_noise(shape, torch.Generator().manual_seed(spec.seed), "cpu")
        self.reference_noise = initial_noise(shape, torch.Generator().manual_seed(spec.reference_seed), "cpu")
        self.reference: Tensor | None = None

    def anchors(self, steps: int) -> Tensor:
        """K evenly spaced anchors of the teacher's schedule (flow: σ = shift(1 − k/K), SD3.5 1, .9, .75, .5 for
        K = 4; DDPM: t = 999, 749, 499, 249), the student's for K = 4."""
        return make_anchors(self.schedule, steps)

    @torch.no_grad()
    def sample_set(self, sample, noise: Tensor | None = None) -> tuple[Tensor, float]:
        """Sample in batches with ``sample(cond, latents, gen)``; return pixels in [−1, 1] and seconds per image."""
        noise = self.noise if noise is None else noise
        out, t0 = [], time.perf_counter()
        b = self.spec.batch_size
        for i in range(0, len(self.prompts), b):
            gen = torch.Generator().manual_seed(self.spec.seed + 1 + i)   # re-noising draws (student sampler only)
            lat = sample(self.cond.index(slice(i, i + b)), noise[i : i + b], gen)
            out.append(self.family.decode_latents(lat).clamp(-1, 1))
        return torch.cat(out), (time.perf_counter() - t0) / len(self.prompts)

    def teacher_images(self, steps: int, noise: Tensor | None = None) -> tuple[Tensor, float]:
        """Teacher Euler ODE with the family's guidance (:meth:`teacher_nfe` evaluations)."""
        from senseflow.method.sampling import sample_euler

        anchors = self.anchors(steps)
        return self.sample_set(lambda c, x, g: sample_euler(self.family, self.teacher, c, anchors, latents=x,
                                                      guidance_scale=self.spec.teacher_guidance), noise)

    def build_reference(self) -> Tensor:
        """The FD-T reference: teacher ``teacher_steps``-step samples of the same prompts from independent noise."""
        if self.reference is None:
            self.reference, _ = self.teacher_images(self.spec.teacher_steps, self.reference_noise)
        return self.reference

    def student_images(self, student: nn.Module, sampler: str = "stochastic") -> tuple[Tensor, float]:
        """Student 4-step sampler without guidance (1 NFE per step), docs/method.md §16.3: ``stochastic`` ("Ours",
        re-noising x̂₀ with fresh ε at each anchor) or ``euler`` ("Ours (Euler)", x ← x + (σ_{k+1} − σ_k)·v), taken
        from :data:`senseflow.method.sampling.SAMPLERS` (the Euler sampler draws nothing: ``g`` is unused by it)."""
        from senseflow.method.sampling import get_sampler

        if sampler not in STUDENT_SAMPLERS:
            raise ValueError(f"student sampler {sampler!r} is not one of {', '.join(STUDENT_SAMPLERS)}")
        sample = get_sampler(sampler)
        anchors = self.anchors(self.spec.student_steps)
        return self.sample_set(lambda c, x, g: sample(self.family, student, c, anchors, g, latents=x))

    def load_student(self, weights: str | Path) -> nn.Module:
        """G's architecture (the teacher's denoiser config with the family's student overrides) with a
        ``.safetensors`` file or a checkpoint folder's weights loaded (``student_ema.safetensors`` when the run kept
        an EMA, else ``student.safetensors``), through :func:`senseflow.checkpoint_io.load_student`: keys and shapes
        are checked before any weight is read, the family's ``student_ignore_prefixes`` honoured."""
        from senseflow.checkpoint_io import checked_student_config, load_student, resolve_student_source

        weights = Path(weights)
        source = resolve_student_source(weights) if weights.exists() else None
        if source is None or source.kind != "safetensors":
            raise FileNotFoundError(f"{weights}: expected a student.safetensors written by the trainer")
        fam = type(self.family)
        cfg_path = self.teacher_path / fam.denoiser_subfolder / "config.json"
        config = checked_student_config(cfg_path, fam, f"the {fam.name} teacher needs a {fam.denoiser_class_name}")
        return load_student(source, config, dtype=torch.float32, ignore_prefixes=fam.student_ignore_prefixes,
                            fallback_class=fam.denoiser_class_name, where=f"the {fam.name} student ({cfg_path})")

    def score(self, name: str, images: Tensor, seconds: float, nfe: int) -> MethodResult:
        """The suite's accuracy (its parts go to ``extra``), FD to real images and FD-T (once the reference
        exists)."""
        report = self.suite.accuracy_report(images)
        accuracy = float(report.pop("accuracy"))
        fdt = self.suite.fd_between(images, self.reference) if self.reference is not None else None
        return MethodResult(name, accuracy, self.suite.fd_to_real(images), fdt, nfe, seconds, extra=report)

    def teacher_nfe(self, steps: int) -> int:
        """Network evaluations of the teacher's ``steps``-step sampler: 2 per step with classifier-free guidance
        (conditional + unconditional), 1 with a distilled guidance input (FLUX's ``guidance_kind`` "embedding")."""
        per_step = {"cfg": 2, "embedding": 1}
        kind = self.family.guidance_kind
        if kind not in per_step:
            raise ValueError(f"teacher family {self.family.name!r}: unknown guidance_kind {kind!r}")
        return per_step[kind] * steps

    def evaluate_teacher(self, steps: int, name: str | None = None) -> tuple[MethodResult, Tensor]:
        self.build_reference()
        images, sec = self.teacher_images(steps)
        return self.score(name or teacher_row_name(steps), images, sec, self.teacher_nfe(steps)), images

    def evaluate_student(self, weights: str | Path | nn.Module, name: str,
                         sampler: str = "stochastic") -> tuple[MethodResult, Tensor]:
        self.build_reference()
        student = weights if isinstance(weights, nn.Module) else self.load_student(weights)
        images, sec = self.student_images(student, sampler)
        return self.score(name, images, sec, self.spec.student_steps), images

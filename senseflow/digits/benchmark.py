"""Evaluation of digits teachers and distilled students on one fixed prompt/noise set (demo and benchmark).

For each method m we draw N = 10·n images x_m(ε_j, c_j) with digit prompts c_j = template(j mod 10) and the SAME
initial noises ε_j ~ N(0, I) (one ``torch.Generator`` seeded with ``seed``), then report

* prompt accuracy: mean over j of [argmax classifier(x_m,j) = digit_j];
* FD: Fréchet distance ‖μ_m − μ_r‖² + tr(Σ_m + Σ_r − 2(Σ_m Σ_r)^½) between the classifier's penultimate features of
  x_m and of the real digits;
* FD-T: the same distance to a REFERENCE set of teacher 28-step samples drawn from independent noise (seed
  ``reference_seed``), i.e. a distance between distributions: with shared noise the deterministic teacher Euler
  samplers would match the reference sample by sample, which FD-T is not meant to reward. The teacher's own
  28-step FD-T is then the finite-sample noise floor;
* NFE per image: network evaluations (CFG counts 2 per step) and the measured wall time per image.

Samplers (docs/method.md §16.3): the teacher uses the deterministic Euler ODE sampler on the shifted grid
σ = s₃(1 − k/K) with CFG u + s·(c − u); the student uses, without guidance, on its anchors
σ_k = s₃(1 − k/4) = 1, .9, .75, .5, either the 4-step re-noising sampler ("Ours") or the 4-step Euler ODE
sampler ("Ours (Euler)"); the paper's Table 1 reports both.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "EvalSpec",
    "MethodResult",
    "Evaluator",
    "image_grid",
    "results_markdown",
    "write_results",
    "plot_curves",
    "classifier_heldout_accuracy",
    "STUDENT_SAMPLERS",
    "recorded_guidance",
]

#: the student's samplers of docs/method.md §16.3 and the suffix of their result rows ("Ours" / "Ours (Euler)")
STUDENT_SAMPLERS: dict[str, str] = {"stochastic": "", "euler": " (Euler)"}


@dataclass
class EvalSpec:
    """The shared prompt/noise set: ``per_digit`` images per digit, prompts from ``template``, noise seed ``seed``."""

    per_digit: int = 20
    seed: int = 0
    template: str = "a handwritten digit {word}"
    teacher_guidance: float | None = None  # teacher CFG scale s; None: the one its training record was evaluated at
    teacher_steps: int = 28            # the reference sampler (SD3.5 default step count)
    student_steps: int = 4             # §16.3
    #: teacher Euler step counts scored beside the reference: 4 = the student's steps (8 NFE with CFG), 2 = the
    #: student's 4 NFE (CFG costs 2 evaluations per step)
    teacher_baselines: tuple[int, ...] = (4, 2)
    batch_size: int = 100
    reference_seed: int = 10_000       # independent noise of the FD-T reference set

    def __post_init__(self) -> None:
        if self.per_digit < 1:
            raise ValueError(f"EvalSpec.per_digit must be ≥ 1, got {self.per_digit}")
        if any(int(n) < 1 for n in self.teacher_baselines):
            raise ValueError(f"EvalSpec.teacher_baselines must hold step counts ≥ 1, got {self.teacher_baselines}")

    @property
    def digits(self) -> list[int]:
        """digit_j = j mod 10 for j < 10·per_digit (every digit equally often)."""
        return [j % 10 for j in range(10 * self.per_digit)]


@dataclass
class MethodResult:
    name: str
    prompt_accuracy: float
    fd_real: float
    fd_teacher: float | None
    nfe: int
    seconds_per_image: float
    extra: dict = field(default_factory=dict)


def recorded_guidance(teacher_path: str | Path) -> float:
    """The CFG scale s the teacher is sampled with: ``generation.guidance_scale`` of its ``teacher_card.json``
    (teachers of ``senseflow teacher train``) or ``evaluation.settings.guidance_scale`` of the shipped digits
    teacher's training record. The demo and the benchmark sample the teacher with it."""
    import json

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
    """Loads the teacher family once; samples teacher grids and student checkpoints on the shared set."""

    def __init__(self, teacher_path: str | Path, spec: EvalSpec, t5_max_length: int = 77, resolution: int = 32) -> None:
        from senseflow.digits.data import caption
        from senseflow.method.sampling import initial_noise
        from senseflow.models.families import build_family, family_of_folder

        if spec.teacher_guidance is None:
            spec = replace(spec, teacher_guidance=recorded_guidance(teacher_path))
        self.spec = spec
        self.family = build_family({"family": family_of_folder(teacher_path), "path": str(teacher_path),
                                    "t5_max_length": t5_max_length, "resolution": resolution})
        self.teacher = self.family.load_denoiser(dtype=torch.float32).eval().requires_grad_(False)
        self.schedule = self.family.schedule(resolution, resolution)
        self.digits = spec.digits
        with torch.no_grad():
            self.cond = self.family.encode_prompts([caption(d, spec.template) for d in self.digits])
        shape = (len(self.digits), *self.family.latent_shape(resolution, resolution))
        self.noise = initial_noise(shape, torch.Generator().manual_seed(spec.seed), "cpu")
        self.reference_noise = initial_noise(shape, torch.Generator().manual_seed(spec.reference_seed), "cpu")
        self.reference: Tensor | None = None

    def anchors(self, steps: int) -> Tensor:
        """K evenly spaced anchors of the teacher's schedule (flow: σ = shift(1 − k/K), SD3.5 1, .9, .75, .5 for
        K = 4; DDPM: t = 999, 749, 499, 249), the student's for K = 4."""
        from senseflow.method.sampling import make_anchors

        return make_anchors(self.schedule, steps)

    @torch.no_grad()
    def sample_set(self, sample, noise: Tensor | None = None) -> tuple[Tensor, float]:
        """Sample in batches with ``sample(cond, latents, gen)``; return pixels in [−1, 1] and seconds per image."""
        noise = self.noise if noise is None else noise
        out, t0 = [], time.perf_counter()
        b = self.spec.batch_size
        for i in range(0, len(self.digits), b):
            gen = torch.Generator().manual_seed(self.spec.seed + 1 + i)   # re-noising draws (student sampler only)
            lat = sample(self.cond.index(slice(i, i + b)), noise[i : i + b], gen)
            out.append(self.family.decode_latents(lat).clamp(-1, 1))
        return torch.cat(out), (time.perf_counter() - t0) / len(self.digits)

    def teacher_images(self, steps: int, noise: Tensor | None = None) -> tuple[Tensor, float]:
        """Teacher Euler ODE with CFG (2 NFE per step)."""
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
        re-noising x̂₀ with fresh ε at each anchor) or ``euler`` ("Ours (Euler)", x ← x + (σ_{k+1} − σ_k)·v)."""
        from senseflow.method.sampling import sample_euler, sample_stochastic

        anchors = self.anchors(self.spec.student_steps)
        if sampler == "stochastic":
            return self.sample_set(lambda c, x, g: sample_stochastic(self.family, student, c, anchors, g, latents=x))
        if sampler == "euler":
            return self.sample_set(lambda c, x, g: sample_euler(self.family, student, c, anchors, latents=x))
        raise ValueError(f"student sampler {sampler!r} is not one of {', '.join(STUDENT_SAMPLERS)}")

    def load_student(self, weights: str | Path) -> nn.Module:
        """G's architecture (a copy of the teacher) with a ``.safetensors`` file or a checkpoint folder's weights
        loaded (``student_ema.safetensors`` when the run kept an EMA, else ``student.safetensors``)."""
        from safetensors.torch import load_file

        from senseflow.checkpoint_io import resolve_student_source

        weights = Path(weights)
        source = resolve_student_source(weights) if weights.exists() else None
        if source is None or source.kind != "safetensors":
            raise FileNotFoundError(f"{weights}: expected a student.safetensors written by the trainer")
        weights = source.path
        student = self.family.build_student(self.teacher)
        student.load_state_dict(load_file(str(weights)), strict=True)
        return student.eval().requires_grad_(False)

    def score(self, name: str, images: Tensor, seconds: float, nfe: int) -> MethodResult:
        from senseflow.digits.metrics import fd_between, fd_to_real, prompt_accuracy

        fdt = fd_between(images, self.reference) if self.reference is not None else None
        return MethodResult(name, prompt_accuracy(images, self.digits), fd_to_real(images), fdt, nfe, seconds)

    def evaluate_teacher(self, steps: int, name: str | None = None) -> tuple[MethodResult, Tensor]:
        self.build_reference()
        images, sec = self.teacher_images(steps)
        return self.score(name or f"teacher {steps}-step Euler + CFG", images, sec, 2 * steps), images

    def evaluate_student(self, weights: str | Path | nn.Module, name: str,
                         sampler: str = "stochastic") -> tuple[MethodResult, Tensor]:
        self.build_reference()
        student = weights if isinstance(weights, nn.Module) else self.load_student(weights)
        images, sec = self.student_images(student, sampler)
        return self.score(name, images, sec, self.spec.student_steps), images


def image_grid(images: Tensor, digits: Sequence[int], columns: int, scale: int = 2):
    """A PIL grid: row d holds the first ``columns`` images prompted with digit d (pixels in [−1, 1])."""
    from PIL import Image

    digits = list(digits)
    _, _, h, w = images.shape
    grid = Image.new("RGB", (columns * w * scale, 10 * h * scale), "white")
    for d in range(10):
        idx = [j for j, v in enumerate(digits) if v == d][:columns]
        for c, j in enumerate(idx):
            arr = ((images[j].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            grid.paste(
                Image.fromarray(arr).resize((w * scale, h * scale), Image.NEAREST), (c * w * scale, d * h * scale)
            )
    return grid


def results_markdown(results: Sequence[MethodResult], classifier_accuracy: float | None = None) -> str:
    """A markdown table of the results (accuracy in %, FD, FD-T, NFE, ms per image)."""
    lines = ["| method | prompt accuracy | FD (real) | FD-T (teacher 28) | NFE/image | ms/image |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        fdt = "—" if r.fd_teacher is None else f"{r.fd_teacher:.1f}"
        lines.append(f"| {r.name} | {100 * r.prompt_accuracy:.1f}% | {r.fd_real:.1f} | {fdt} | {r.nfe} | "
                     f"{1000 * r.seconds_per_image:.2f} |")
    if classifier_accuracy is not None:
        lines.append(f"\nClassifier held-out accuracy on real digits: {100 * classifier_accuracy:.1f}%.")
    return "\n".join(lines) + "\n"


def write_results(
    out_dir: str | Path, results: Sequence[MethodResult], meta: dict, stem: str = "metrics"
) -> tuple[Path, Path]:
    """``<stem>.json`` ({"meta", "results"}) and ``<stem>.md`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    j = out / f"{stem}.json"
    j.write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=1))
    m = out / f"{stem}.md"
    m.write_text(results_markdown(results, meta.get("classifier_heldout_accuracy")))
    return j, m


def classifier_heldout_accuracy() -> float:
    """Accuracy of the shipped classifier on the held-out real digits (the ceiling of prompt accuracy)."""
    from senseflow.digits.classifier import accuracy, load_classifier
    from senseflow.digits.data import DigitsDataConfig, load_digits_data

    model = load_classifier()
    images, labels = load_digits_data(DigitsDataConfig(resolution=model.config.resolution)).subset("heldout")
    return float(accuracy(model, images, labels))


_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def plot_curves(curves: dict[str, list[tuple[int, float]]], hlines: dict[str, float], path: str | Path,
                title: str = "FD-T over training iterations", size: tuple[int, int] = (720, 440)):
    """Draw ``curves`` (name → [(iteration, value)]) and horizontal reference lines with PIL; save a PNG."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 60, 190, 30, 40
    img = Image.new("RGB", size, "white")
    dr = ImageDraw.Draw(img)
    xs = [x for c in curves.values() for x, _ in c] or [0, 1]
    ys = [y for c in curves.values() for _, y in c] + list(hlines.values()) or [0, 1]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = 0.0, max(ys) * 1.05

    def px(x):
        return left + (x - x0) / (x1 - x0) * (w - left - right)

    def py(y):
        return h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)

    dr.rectangle([left, top, w - right, h - bottom], outline="black")
    for k in range(5):
        yv = y0 + k * (y1 - y0) / 4
        dr.text((5, py(yv) - 6), f"{yv:.0f}", fill="black")
        xv = x0 + k * (x1 - x0) / 4
        dr.text((px(xv) - 10, h - bottom + 5), f"{xv:.0f}", fill="black")
    dr.text((left, 8), title, fill="black")
    dr.text((w - right - 60, h - 15), "iteration", fill="black")
    items = list(curves.items()) + [(k, None) for k in hlines]
    for i, (name, pts) in enumerate(items):
        col = _COLORS[i % len(_COLORS)]
        if pts is None:
            y = py(hlines[name])
            for xx in range(left, w - right, 8):
                dr.line([xx, y, xx + 4, y], fill=col, width=2)
        else:
            pts = sorted(pts)
            dr.line([(px(x), py(y)) for x, y in pts], fill=col, width=2) if len(pts) > 1 else None
            for x, y in pts:
                dr.ellipse([px(x) - 2, py(y) - 2, px(x) + 2, py(y) + 2], fill=col)
        dr.line([w - right + 10, top + 10 + 18 * i, w - right + 30, top + 10 + 18 * i], fill=col, width=3)
        dr.text((w - right + 35, top + 4 + 18 * i), name[:24], fill="black")
    img.save(path)
    return img

"""Runs the configured metrics over an image folder and a prompt set; one :class:`MetricResult` per metric.

A metric is ``ok`` (a value), ``skipped`` (disabled, its model not configured or not found on disk, or its input
missing, e.g. no reference images for FID-T; the message says which) or ``error`` (its model exists but failed).
A skipped metric is never estimated, and one metric's failure does not stop the others.

Columns (docs/method.md §19.1): FID-T, Patch FID-T (vs teacher samples; lower is better), CLIP, HPSv2, Pick,
ImageReward (means over the prompts; higher is better), plus the digits backend of the demo.
"""
from __future__ import annotations

import sys
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from senseflow.eval.config import CLIPMetricConfig, MetricsConfig
from senseflow.eval.images import batched, load_rgb
from senseflow.eval.prompts import PromptSet

__all__ = ["METRICS", "MetricResult", "EvalInputs", "SkipMetric", "compute_metrics"]

#: metric names in table order
METRICS: tuple[str, ...] = ("fid_t", "patch_fid_t", "clip", "hpsv2", "pickscore", "imagereward", "digits")


class SkipMetric(Exception):
    """Raised inside a metric to skip it with a message (e.g. no reference images)."""


@dataclass
class MetricResult:
    name: str
    status: str
    value: float | None = None
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalInputs:
    """``samples`` / ``reference``: {prompt index: PNG path}; ``reference`` None when there is none."""

    samples: dict[int, Path]
    prompts: PromptSet
    reference: dict[int, Path] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = False


def _need_model(path: str | None, key: str) -> Path:
    if not path:
        raise SkipMetric(f"no model configured ({key})")
    p = Path(path)
    if not p.exists():
        raise SkipMetric(f"model not found: {p} ({key})")
    return p


def _need_reference(inputs: EvalInputs) -> dict[int, Path]:
    if not inputs.reference or len(inputs.reference) < 2:
        raise SkipMetric("needs at least 2 reference (teacher) images; none generated or given")
    if len(inputs.samples) < 2:
        raise SkipMetric("needs at least 2 sample images")
    return inputs.reference


class _Runner:
    def __init__(self, cfg: MetricsConfig, inputs: EvalInputs) -> None:
        self.cfg, self.inputs = cfg, inputs
        self._inception: dict[Path, Any] = {}

    # ---- FID ----------------------------------------------------------------------------------------------
    def _inception_model(self, path: Path):
        from senseflow.eval.inception import load_fid_inception

        if path not in self._inception:
            self._inception[path] = load_fid_inception(path, self.inputs.device)
        return self._inception[path]

    def fid_t(self) -> MetricResult:
        from senseflow.eval.fid import fid_between, folder_stats

        c = self.cfg.fid_t
        ref = _need_reference(self.inputs)
        net = self._inception_model(_need_model(c.weights, "metrics.fid_t.weights"))
        a = folder_stats(list(self.inputs.samples.values()), net.features, c.batch_size,
                         progress=self.inputs.progress, desc="FID-T samples")
        b = folder_stats(list(ref.values()), net.features, c.batch_size, progress=self.inputs.progress,
                         desc="FID-T reference")
        return MetricResult("fid_t", "ok", fid_between(a, b), details={"n_samples": a.n, "n_reference": b.n,
                                                                      "feature_dim": net.feature_dim})

    def patch_fid_t(self) -> MetricResult:
        from senseflow.eval.fid import fid_between, fixed_crops, folder_stats

        c = self.cfg.patch_fid_t
        ref = _need_reference(self.inputs)
        weights = c.weights or self.cfg.fid_t.weights
        net = self._inception_model(_need_model(weights, "metrics.patch_fid_t.weights (or metrics.fid_t.weights)"))

        def crops(x):
            return fixed_crops(x, c.patch_size, c.layout, c.grid)

        a = folder_stats(list(self.inputs.samples.values()), net.features, c.batch_size, crops,
                         self.inputs.progress, "patch FID-T samples")
        b = folder_stats(list(ref.values()), net.features, c.batch_size, crops, self.inputs.progress,
                         "patch FID-T reference")
        return MetricResult("patch_fid_t", "ok", fid_between(a, b),
                            details={"n_sample_patches": a.n, "n_reference_patches": b.n,
                                     "patch_size": c.patch_size, "layout": c.layout,
                                     "grid": c.grid if c.layout == "grid" else 1})

    # ---- prompt–image scores -------------------------------------------------------------------------------
    def _pairwise(self, name: str, score: Callable[[list, list[str]], torch.Tensor], batch_size: int) -> MetricResult:
        from tqdm import tqdm

        idx = sorted(self.inputs.samples)
        if not idx:
            raise SkipMetric("no sample images")
        values: list[float] = []
        bar = tqdm(total=len(idx), unit="img", desc=name, disable=not self.inputs.progress, leave=False)
        for chunk in batched(idx, batch_size):
            images = [load_rgb(self.inputs.samples[i]) for i in chunk]
            values.extend(score(images, [self.inputs.prompts.prompts[i] for i in chunk]).tolist())
            bar.update(len(chunk))
        bar.close()
        v = np.asarray(values, np.float64)
        return MetricResult(name, "ok", float(v.mean()), details={"n": int(v.size), "std": float(v.std())})

    def _clip_like(self, name: str, c: CLIPMetricConfig, use_logit_scale: bool, what: str) -> MetricResult:
        from senseflow.eval.clip_score import CLIPScorer

        folder = _need_model(c.model, f"metrics.{name}.model")
        if c.processor and not Path(c.processor).exists():
            raise SkipMetric(f"processor folder not found: {c.processor} (metrics.{name}.processor)")
        scorer = CLIPScorer(folder, use_logit_scale=use_logit_scale, processor_folder=c.processor,
                            device=self.inputs.device, what=what)
        return self._pairwise(name, scorer.score, c.batch_size)

    def clip(self) -> MetricResult:
        return self._clip_like("clip", self.cfg.clip, False, "CLIP")

    def hpsv2(self) -> MetricResult:
        return self._clip_like("hpsv2", self.cfg.hpsv2, False, "HPSv2")

    def pickscore(self) -> MetricResult:
        return self._clip_like("pickscore", self.cfg.pickscore, True, "PickScore")

    def imagereward(self) -> MetricResult:
        from senseflow.eval.image_reward import ImageRewardScorer

        c = self.cfg.imagereward
        scorer = ImageRewardScorer(_need_model(c.model, "metrics.imagereward.model"), device=self.inputs.device)
        return self._pairwise("imagereward", scorer.score, c.batch_size)

    # ---- digits ----------------------------------------------------------------------------------------------
    def digits(self) -> MetricResult:
        from senseflow.eval.digits_backend import digits_available, digits_metrics

        c = self.cfg.digits
        if not digits_available():
            raise SkipMetric("senseflow.digits is not available")
        if c.classifier and not Path(c.classifier).exists():
            raise SkipMetric(f"classifier not found: {c.classifier} (metrics.digits.classifier)")
        if not self.inputs.samples:
            raise SkipMetric("no sample images")
        out = digits_metrics(self.inputs.samples, self.inputs.prompts.prompts, self.inputs.prompts.meta,
                             self.inputs.reference, c.classifier, c.real_split)
        return MetricResult("digits", "ok", out["accuracy"], details=out)


def compute_metrics(cfg: MetricsConfig, inputs: EvalInputs, only: Sequence[str] | None = None,
                    log: Callable[[str], None] | None = None) -> dict[str, MetricResult]:
    """Every metric of :data:`METRICS` (or of ``only``), in order; each one's outcome is logged in one line."""
    log = log or (lambda s: print(s, file=sys.stderr))
    runner = _Runner(cfg, inputs)
    results: dict[str, MetricResult] = {}
    for name in (only or METRICS):
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r} (known: {', '.join(METRICS)})")
        section = getattr(cfg, name)
        try:
            if not section.enabled:
                raise SkipMetric(f"disabled (metrics.{name}.enabled = false)")
            res = getattr(runner, name)()
        except SkipMetric as skip:
            res = MetricResult(name, "skipped", message=str(skip))
        except FileNotFoundError as exc:
            res = MetricResult(name, "skipped", message=str(exc).splitlines()[0])
        except Exception as exc:  # one metric's failure must not stop the others
            detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
            res = MetricResult(name, "error", message=detail)
        results[name] = res
        if res.status == "ok":
            log(f"metric {name}: {res.value}" if res.value is not None else f"metric {name}: done")
        else:
            log(f"metric {name}: {res.status} ({res.message})")
    return results

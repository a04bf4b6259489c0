"""Suites: what differs between the embedded benchmarks (digits, shapes); everything else is shared.

A suite fixes

* the evaluation **prompts** (digits: "a handwritten digit {word}", ``per_digit`` times each digit, digit_j = j mod
  10; shapes: the captions of the first ``num_prompts`` held-out scenes, ``generate_scenes(n, stream=HELDOUT_STREAM)``);
* the **accuracy** metric (digits: prompt accuracy, the shipped classifier's label equals the prompted digit;
  shapes: compositional accuracy, the shipped reader reads back every object and relation the caption states —
  :func:`senseflow.shapes.compositional_report` against the scene's ground truth);
* the Fréchet distances of its metric network's features: **FD** to the real images (digits: all real digits;
  shapes: ``real_count`` real held-out scenes) and **FD between** two image sets (FD-T);
* the metric network's own **held-out accuracy** (the ceiling of the accuracy column: the classifier on held-out
  real digits; the reader on the real held-out scenes of the evaluation prompts);
* the **grid layout** (digits: one row per digit; shapes: the first ``grid_prompts`` prompts, ``grid_columns`` per
  row) and the rows of the side-by-side comparison (the first ``compare_rows`` prompts);
* the **training assets** every method of the suite needs (its JSON image-caption set and the tiny DINOv2 / CLIP
  backbones of the VFM discriminator).

Each suite's settings are the ``suite:`` section of ``configs/benchmarks/<kind>.yaml`` (:func:`build_suite`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import numpy as np
from torch import Tensor

from senseflow.benchmark.report import comparison_grid, image_grid

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = ["Suite", "DigitsSuite", "ShapesSuite", "SUITES", "build_suite", "classifier_heldout_accuracy"]


@dataclass(kw_only=True)
class Suite(ABC):
    """The benchmark-specific parts (see the module doc). Subclasses are dataclasses of their settings."""

    kind: ClassVar[str]
    #: the accuracy column's name in the results table
    accuracy_name: ClassVar[str]
    #: the accuracy's parts shown as table columns: (column, key of :meth:`accuracy_report`), shares in [0, 1]
    table_parts: ClassVar[tuple[tuple[str, str], ...]] = ()

    grid_columns: int          # images per row of grids/<method>.png
    compare_rows: int          # prompts (rows) of grids/side_by_side.png
    grid_scale: int            # pixel upscaling of the grids (side by side: one more)

    def __post_init__(self) -> None:
        for f in ("grid_columns", "compare_rows", "grid_scale"):
            if getattr(self, f) < 1:
                raise ValueError(f"suite.{f} must be ≥ 1, got {getattr(self, f)}")

    @property
    @abstractmethod
    def prompts(self) -> list[str]:
        """The N evaluation prompts; image j of every method is prompted with prompts[j]."""

    @abstractmethod
    def accuracy_report(self, images: Tensor) -> dict[str, float]:
        """``{"accuracy": share of images that satisfy their prompt, ...parts}`` of images 0..N−1."""

    @abstractmethod
    def real_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(μ, Σ) of the metric network's features of the real images (computed once)."""

    @abstractmethod
    def feature_stats(self, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(μ, Σ) of the metric network's features of ``images``."""

    @abstractmethod
    def heldout_accuracy(self) -> float:
        """The metric network's accuracy on real held-out images (the ceiling of the accuracy column)."""

    @abstractmethod
    def heldout_note(self, accuracy: float) -> str:
        """The sentence under the results table that states :meth:`heldout_accuracy`."""

    @abstractmethod
    def grid_rows(self) -> list[list[int]]:
        """Image indices of each row of a method's grid."""

    @abstractmethod
    def prepare_assets(self, work: Path) -> dict[str, Path]:
        """Write (or keep) what training needs under ``work``: ``{"data": dataset.json, "dino": …, "clip": …}``."""

    def fd_to_real(self, images: Tensor) -> float:
        """FD between the features of ``images`` and of the real images."""
        from senseflow.eval.frechet import frechet_distance

        return frechet_distance(*self.feature_stats(images), *self.real_stats())

    def fd_between(self, images: Tensor, reference: Tensor) -> float:
        """FD between the features of two image sets (FD-T when ``reference`` holds teacher samples)."""
        from senseflow.eval.frechet import frechet_distance

        return frechet_distance(*self.feature_stats(images), *self.feature_stats(reference))

    def compare_indices(self) -> list[int]:
        """The prompts (rows) of the side-by-side comparison: the first ``compare_rows``."""
        return list(range(min(self.compare_rows, len(self.prompts))))

    def grid(self, images: Tensor) -> PILImage:
        """A method's grid (PIL image) in the suite's layout."""
        return image_grid(images, self.grid_rows(), self.grid_scale)

    def comparison(self, columns: Mapping[str, Tensor]) -> PILImage:
        """Side by side: rows = :meth:`compare_indices`, one column per method, method names on top."""
        return comparison_grid(columns, self.compare_indices(), self.grid_scale + 1)


def classifier_heldout_accuracy() -> float:
    """Accuracy of the shipped classifier on the held-out real digits (the ceiling of prompt accuracy)."""
    from senseflow.digits.classifier import accuracy, load_classifier
    from senseflow.digits.data import DigitsDataConfig, load_digits_data

    model = load_classifier()
    images, labels = load_digits_data(DigitsDataConfig(resolution=model.config.resolution)).subset("heldout")
    return float(accuracy(model, images, labels))


@dataclass(kw_only=True)
class DigitsSuite(Suite):
    """The digits: ``per_digit`` prompts ``template`` per digit, scored by the shipped classifier."""

    kind: ClassVar[str] = "digits"
    accuracy_name: ClassVar[str] = "prompt accuracy"

    per_digit: int             # evaluation prompts per digit
    template: str              # the prompt of digit d: template.format(word=<d in words>)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.per_digit < 1:
            raise ValueError(f"suite.per_digit must be ≥ 1, got {self.per_digit}")

    @property
    def digits(self) -> list[int]:
        """digit_j = j mod 10 for j < 10·per_digit (every digit equally often)."""
        return [j % 10 for j in range(10 * self.per_digit)]

    @cached_property
    def _prompts(self) -> list[str]:
        from senseflow.digits.data import caption

        return [caption(d, self.template) for d in self.digits]

    @property
    def prompts(self) -> list[str]:
        return self._prompts

    def accuracy_report(self, images: Tensor) -> dict[str, float]:
        from senseflow.digits.metrics import prompt_accuracy

        return {"accuracy": prompt_accuracy(images, self.digits)}

    def feature_stats(self, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
        from senseflow.digits.metrics import feature_stats

        return feature_stats(images)

    @cached_property
    def _real(self) -> tuple[np.ndarray, np.ndarray]:
        from senseflow.digits.metrics import real_feature_stats

        return real_feature_stats("all")

    def real_stats(self) -> tuple[np.ndarray, np.ndarray]:
        return self._real

    def heldout_accuracy(self) -> float:
        return classifier_heldout_accuracy()

    def heldout_note(self, accuracy: float) -> str:
        return f"Classifier held-out accuracy on real digits: {100 * accuracy:.1f}%."

    def grid_rows(self) -> list[list[int]]:
        digits = self.digits
        return [[j for j, v in enumerate(digits) if v == d][: self.grid_columns] for d in range(10)]

    def prepare_assets(self, work: Path) -> dict[str, Path]:
        from senseflow.digits.data import export_json_dataset
        from senseflow.launch import discriminator_backbones

        data = work / "data" / "dataset.json"
        if not data.is_file():
            export_json_dataset(work / "data")
        return {"data": data, **discriminator_backbones(work)}


@dataclass(kw_only=True)
class ShapesSuite(Suite):
    """The shapes: the captions of ``num_prompts`` held-out scenes, scored by the shipped reader."""

    kind: ClassVar[str] = "shapes"
    accuracy_name: ClassVar[str] = "compositional accuracy"
    table_parts: ClassVar[tuple[tuple[str, str], ...]] = (
        ("objects", "object_accuracy"), ("relations", "relation_accuracy"),
        ("wrong colour", "object_wrong_colour"), ("missing", "object_missing"))

    num_prompts: int           # held-out scenes whose captions are the prompts
    real_count: int            # real held-out scenes of the FD to real images
    train_scenes: int          # scenes of the training set (ShapesConfig.num_scenes of the export)
    scenes_seed: int           # ShapesConfig.seed of the training set and the held-out scenes
    grid_prompts: int          # prompts shown in grids/<method>.png (grid_columns per row)

    def __post_init__(self) -> None:
        super().__post_init__()
        for f in ("num_prompts", "real_count", "train_scenes", "grid_prompts"):
            if getattr(self, f) < 1:
                raise ValueError(f"suite.{f} must be ≥ 1, got {getattr(self, f)}")

    @property
    def scenes_config(self):
        from senseflow.shapes import ShapesConfig

        return ShapesConfig(num_scenes=self.train_scenes, seed=self.scenes_seed)

    @cached_property
    def heldout(self):
        """The held-out scenes (images, ground truth, captions) of the evaluation prompts."""
        from senseflow.shapes import HELDOUT_STREAM, generate_scenes

        return generate_scenes(self.num_prompts, self.scenes_config, stream=HELDOUT_STREAM)

    @property
    def prompts(self) -> list[str]:
        return self.heldout.captions

    def accuracy_report(self, images: Tensor) -> dict[str, float]:
        from senseflow.shapes import compositional_report

        report = compositional_report(images, self.heldout.scenes)
        return {"accuracy": report["compositional_accuracy"],
                **{k: report[k] for k in ("object_accuracy", "relation_accuracy", "object_wrong_colour",
                                          "object_wrong_shape", "object_missing")}}

    def feature_stats(self, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
        from senseflow.shapes.reader import feature_stats

        return feature_stats(images)

    @cached_property
    def _real(self) -> tuple[np.ndarray, np.ndarray]:
        from senseflow.shapes.reader import real_feature_stats

        return real_feature_stats(self.real_count, data_config=self.scenes_config)

    def real_stats(self) -> tuple[np.ndarray, np.ndarray]:
        return self._real

    def heldout_accuracy(self) -> float:
        return float(self.accuracy_report(self.heldout.images)["accuracy"])

    def heldout_note(self, accuracy: float) -> str:
        return (f"Reader compositional accuracy on the {self.num_prompts} real held-out scenes of these prompts: "
                f"{100 * accuracy:.1f}%.")

    def grid_rows(self) -> list[list[int]]:
        n, c = min(self.grid_prompts, self.num_prompts), self.grid_columns
        return [list(range(i, min(i + c, n))) for i in range(0, n, c)]

    def prepare_assets(self, work: Path) -> dict[str, Path]:
        """The training stream's ``train_scenes`` scenes as a JSON set under ``work/data`` (re-exported when the
        kept one differs in its ShapesConfig or its stream) and the tiny backbones."""
        import json
        import shutil

        from senseflow.launch import discriminator_backbones
        from senseflow.shapes import TRAIN_STREAM, export_json_dataset
        from senseflow.shapes.scenes import load_scenes_json

        data = work / "data" / "dataset.json"
        scenes = work / "data" / "scenes.json"
        if not (data.is_file() and scenes.is_file() and load_scenes_json(scenes)[0] == self.scenes_config
                and json.loads(scenes.read_text()).get("stream") == TRAIN_STREAM):
            shutil.rmtree(work / "data", ignore_errors=True)
            export_json_dataset(work / "data", self.scenes_config, stream=TRAIN_STREAM)
        return {"data": data, **discriminator_backbones(work)}


SUITES: dict[str, type[Suite]] = {s.kind: s for s in (DigitsSuite, ShapesSuite)}


def build_suite(kind: str, settings: Mapping[str, Any] | None = None) -> Suite:
    """The suite ``kind`` with ``settings`` (the yaml's ``suite:`` section without ``kind``)."""
    if kind not in SUITES:
        raise ValueError(f"suite.kind {kind!r} is not one of {', '.join(SUITES)}")
    cls = SUITES[kind]
    settings = dict(settings or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"suite ({kind}): unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    missing = sorted(known - set(settings))
    if missing:
        raise ValueError(f"suite ({kind}): missing setting(s) {', '.join(missing)}")
    return cls(**settings)

"""The evaluation config (``configs/eval/*.yaml``): schema, defaults and loading.

A YAML file is merged onto :class:`EvalConfig` (unknown keys and wrong types are errors naming the key), then
``key=value`` overrides from the command line. Every path and protocol number of an evaluation lives here; see
docs/evaluation.md for the meaning of each section.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["PromptsConfig", "StudentGenConfig", "ReferenceGenConfig", "GenerationConfig", "ImagesConfig",
           "FIDConfig", "PatchFIDConfig", "CLIPMetricConfig", "ImageRewardConfig", "DigitsMetricConfig",
           "MetricsConfig", "TableConfig", "EvalConfig", "load_eval_config", "to_yaml", "TABLE_BLOCKS"]

#: blocks of the paper's Table 1 (docs/method.md §19.1)
TABLE_BLOCKS: tuple[str, ...] = ("sdxl", "sd35", "flux")


@dataclass
class PromptsConfig:
    """``source``: text | json | coco; ``num``: how many (null = all); ``seed`` and ``caption`` (first | random)
    choose the COCO subset; ``key``: the prompt field of JSON objects."""

    source: str = "text"
    path: Optional[str] = None
    num: Optional[int] = None
    seed: int = 0
    key: str = "prompt"
    caption: str = "first"


@dataclass
class StudentGenConfig:
    """The student to sample: inference spec (flux, sdxl, sdxl-dmd2, sd35-medium, sd35-large), its checkpoint,
    an optional student config JSON, the sampler (stochastic | euler) and the step count. No checkpoint: the
    samples folder must already hold the images."""

    spec: Optional[str] = None
    checkpoint: Optional[str] = None
    student_config: Optional[str] = None
    sampler: str = "stochastic"
    steps: int = 4


@dataclass
class ReferenceGenConfig:
    """The teacher's reference images, made by its stock diffusers pipeline: ``steps``, ``guidance_scale`` (null =
    the pipeline's default), extra call arguments; ``seed`` / ``batch_size`` null = those of ``generation``."""

    enabled: bool = True
    steps: int = 50
    guidance_scale: Optional[float] = None
    seed: Optional[int] = None
    batch_size: Optional[int] = None
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class GenerationConfig:
    """Shared generation settings; ``family`` (a registered teacher family: sdxl | sd3 | flux …) defaults to the
    student spec's family; ``limit`` stops each folder after that many new images (resume later)."""

    teacher: Optional[str] = None
    family: Optional[str] = None
    seed: int = 0
    height: int = 1024
    width: int = 1024
    batch_size: int = 4
    device: str = "auto"
    dtype: str = "auto"
    limit: Optional[int] = None
    student: StudentGenConfig = field(default_factory=StudentGenConfig)
    reference: ReferenceGenConfig = field(default_factory=ReferenceGenConfig)


@dataclass
class ImagesConfig:
    """Image folders (``NNNNN.png`` per prompt index); null = ``<output_dir>/samples`` and
    ``<output_dir>/reference``. A reference folder may be a cache shared by several runs."""

    samples: Optional[str] = None
    reference: Optional[str] = None


@dataclass
class FIDConfig:
    """FID-T; ``weights``: local FID Inception weights file (pt_inception-2015-12-05-*.pth or .safetensors)."""

    enabled: bool = True
    weights: Optional[str] = None
    batch_size: int = 32


@dataclass
class PatchFIDConfig:
    """Patch FID-T; ``weights`` null = FID-T's; crops of ``patch_size`` at ``layout`` (center | grid of
    ``grid``×``grid``)."""

    enabled: bool = True
    weights: Optional[str] = None
    patch_size: int = 299
    layout: str = "center"
    grid: int = 2
    batch_size: int = 32


@dataclass
class CLIPMetricConfig:
    """A CLIPModel-based score; ``model``: local CLIPModel folder; ``processor``: folder with the image processor
    and tokenizer when the model folder lacks them."""

    enabled: bool = True
    model: Optional[str] = None
    processor: Optional[str] = None
    batch_size: int = 32


@dataclass
class ImageRewardConfig:
    """ImageReward; ``model``: a folder converted by ``senseflow eval convert-imagereward``."""

    enabled: bool = True
    model: Optional[str] = None
    batch_size: int = 16


@dataclass
class DigitsMetricConfig:
    """Digits demo metrics; ``classifier`` null = the shipped classifier; ``real_split`` null = no FD-real."""

    enabled: bool = False
    classifier: Optional[str] = None
    real_split: Optional[str] = "heldout"


@dataclass
class MetricsConfig:
    device: str = "auto"
    fid_t: FIDConfig = field(default_factory=FIDConfig)
    patch_fid_t: PatchFIDConfig = field(default_factory=PatchFIDConfig)
    clip: CLIPMetricConfig = field(default_factory=CLIPMetricConfig)
    hpsv2: CLIPMetricConfig = field(default_factory=CLIPMetricConfig)
    pickscore: CLIPMetricConfig = field(default_factory=CLIPMetricConfig)
    imagereward: ImageRewardConfig = field(default_factory=ImageRewardConfig)
    digits: DigitsMetricConfig = field(default_factory=DigitsMetricConfig)


@dataclass
class TableConfig:
    """``block``: which Table-1 block to print beside ours (sdxl | sd35 | flux | null); ``row``: our row's name."""

    block: Optional[str] = None
    row: str = "Ours (this run)"
    title: str = "COCO-5K, 4 steps"


@dataclass
class EvalConfig:
    name: str = "eval"
    output_dir: Optional[str] = None
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    table: TableConfig = field(default_factory=TableConfig)


def _check(cfg: EvalConfig, label: str) -> None:
    def need(ok: bool, key: str, expected: str, value: Any) -> None:
        if not ok:
            raise ValueError(f"{label}: {key} = {value!r} is invalid (expected {expected})")

    from senseflow.eval.fid import PATCH_LAYOUTS
    from senseflow.eval.prompts import SOURCES
    from senseflow.models.families import family_names

    need(cfg.prompts.source in SOURCES, "prompts.source", " | ".join(SOURCES), cfg.prompts.source)
    need(cfg.prompts.path is not None, "prompts.path", "a prompt file", cfg.prompts.path)
    need(cfg.output_dir is not None, "output_dir", "a folder for prompts, images and results", cfg.output_dir)
    g = cfg.generation
    need(g.student.sampler in ("stochastic", "euler"), "generation.student.sampler", "stochastic | euler",
         g.student.sampler)
    families = family_names()
    need(g.family in (None, *families), "generation.family", " | ".join(families) + " | null", g.family)
    for key in ("height", "width", "batch_size"):
        need(getattr(g, key) >= 1, f"generation.{key}", "a positive integer", getattr(g, key))
    need(g.limit is None or g.limit >= 0, "generation.limit", "null or >= 0", g.limit)
    need(g.reference.steps >= 1, "generation.reference.steps", "a positive integer", g.reference.steps)
    m = cfg.metrics
    need(m.patch_fid_t.layout in PATCH_LAYOUTS, "metrics.patch_fid_t.layout", " | ".join(PATCH_LAYOUTS),
         m.patch_fid_t.layout)
    need(m.patch_fid_t.patch_size >= 1, "metrics.patch_fid_t.patch_size", "a positive integer",
         m.patch_fid_t.patch_size)
    need(m.patch_fid_t.grid >= 1, "metrics.patch_fid_t.grid", "a positive integer", m.patch_fid_t.grid)
    need(cfg.table.block in (None, *TABLE_BLOCKS), "table.block", " | ".join(TABLE_BLOCKS) + " | null",
         cfg.table.block)


def load_eval_config(path: str | Path | None, overrides: Sequence[str] = ()) -> EvalConfig:
    """Defaults ← YAML file (if given) ← ``key=value`` overrides; raises FileNotFoundError / ValueError."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    label = str(path) if path is not None else "eval config"
    base = OmegaConf.structured(EvalConfig)
    try:
        layers = [base]
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"eval config not found: {path}")
            data = OmegaConf.load(str(path))
            if data is None:
                data = OmegaConf.create({})
            layers.append(data)
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not key=value")
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        msg = str(exc).splitlines()[0]
        raise ValueError(f"{label}: {key + ': ' if key else ''}{msg}") from None
    cfg: EvalConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    _check(cfg, label)
    return cfg


def to_yaml(cfg: EvalConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))

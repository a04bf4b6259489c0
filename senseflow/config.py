"""Configuration: a typed schema, YAML loading with inheritance, ``key=value`` overrides and validation.

Every number of the method lives here or in ``configs/*.yaml`` (docs/method.md, decision 1); the code reads
it from the object that :func:`load_config` returns. Comments cite docs/method.md as "§N" and "decision N".
The schema is a tree of dataclasses (OmegaConf structured configs) whose sections are ``experiment``,
``teacher``, ``schedule``, ``method``, ``discriminator``, ``optimizer``, ``train``, ``data`` and ``dist``. Defaults
are the SD3.5-Medium preset values or neutral ones.

Loading, in order (every failure is a :class:`ConfigError` with a one-line message naming the key and the file):

1. the YAML file and, recursively, the files named by its top-level ``defaults:`` (a path, or a list of paths,
   relative to the including file), base files first;
2. the command-line overrides (``method.gd=10 train.iterations=20``, values parsed as YAML);
3. each layer is checked for unknown keys (the message proposes the closest valid key) and merged onto the schema
   (wrong types are rejected), then required keys and value ranges / enum choices are checked.

Paths are checked separately by :func:`validate_paths`, so a config can be inspected (``--dry-run``,
``senseflow config``) on a machine without the models; trainers call it before any model loads.

The returned object is a plain :class:`SenseFlowConfig` dataclass (nested dataclasses, plain lists), e.g.
``cfg.method.isg.weight`` is λ_ISG; a timestep section converts to the method's sampler with
``TimestepSampler(**dataclasses.asdict(cfg.method.dmd.timestep))``.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import math
import os
import re
import sys
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = [
    "ConfigError",
    "FAMILY_GUIDANCE",
    "SenseFlowConfig",
    "ExperimentConfig",
    "TeacherConfig",
    "ScheduleConfig",
    "TimestepSamplerConfig",
    "GuidanceConfig",
    "DMDConfig",
    "FakeConfig",
    "IDAConfig",
    "ISGConfig",
    "GANConfig",
    "DMD2ClsConfig",
    "MethodConfig",
    "DiscriminatorConfig",
    "OptimizerConfig",
    "EMAConfig",
    "TrainConfig",
    "DataConfig",
    "DistConfig",
    "load_config",
    "validate",
    "validate_paths",
    "resolved_yaml",
    "save_resolved",
    "schema_keys",
    "main_config_check",
]


class ConfigError(ValueError):
    """A bad configuration. The message is always one line (the CLI prints it and exits with status 2)."""

    def __init__(self, message: str) -> None:
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", str(message)).strip())


# ---------------------------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ExperimentConfig:
    name: str = "senseflow"
    seed: int = 71801  # §3.5
    output_dir: str | None = None  # run folder; None = given on the command line


@dataclass
class TeacherConfig:
    family: str = "sd3"  # sdxl | sd3 | flux
    path: str = MISSING  # local diffusers folder with model_index.json
    student_path: str | None = None  # explicit initial weights for G and F (FLUX: decision 4 makes it optional)
    dtype: str = "bfloat16"  # frozen teacher T (§3.3)
    vae_dtype: str = "float32"
    text_encoder_dtype: str = "float32"
    clip_max_length: int = 77  # §12
    t5_max_length: int = 77  # §12: SD3.5 77, FLUX 512
    resolution: int = 1024  # generation resolution in pixels (§2)


@dataclass
class ScheduleConfig:
    """Generator anchors τ₀ > τ₁ > … (§4.1): grid indices, or an explicit τ list that wins when set."""

    anchor_indices: list[int] = field(default_factory=lambda: [999, 749, 499, 249])
    anchors: list[float] | None = None  # explicit σ (flow) or t (DDPM)

    def num_steps(self) -> int:
        """Number of generator steps K (4 for every preset)."""
        return len(self.anchors if self.anchors is not None else self.anchor_indices)


@dataclass
class TimestepSamplerConfig:
    """Fields of :class:`senseflow.method.schedules.TimestepSampler` (grid index i, then τ)."""

    kind: str = "uniform"  # uniform | logit_normal
    low: int = 20
    high: int = 980
    mean: float = 0.0
    std: float = 1.0
    apply_shift: bool = True


@dataclass
class GuidanceConfig:
    """Teacher guidance scale s ~ U(min, max) drawn once per call. ``kind`` states how the teacher family guides and
    must match it (:data:`FAMILY_GUIDANCE`): ``cfg`` = classifier-free guidance (SDXL, SD3.5), ``embedding`` =
    FLUX.1-dev's distilled guidance input."""

    kind: str = "cfg"  # cfg | embedding: must be the teacher family's (FAMILY_GUIDANCE)
    min: float = 2.0
    max: float = 8.0


@dataclass
class DMDConfig:
    weight: float = 1.0  # §10
    timestep: TimestepSamplerConfig = field(default_factory=TimestepSamplerConfig)  # §5
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)  # §5
    normalizer_eps: float = 1e-8  # guards the per-sample normaliser mean|x̂₀ − x_r| (§17.12)


@dataclass
class FakeConfig:
    timestep: TimestepSamplerConfig = field(
        default_factory=lambda: TimestepSamplerConfig(kind="logit_normal", low=0, high=999)
    )  # §6


@dataclass
class IDAConfig:
    enabled: bool = True
    lam: float = 0.98  # φ ← λ·φ + (1 − λ)·θ (§7)


@dataclass
class ISGConfig:
    enabled: bool = True
    weight: float = 0.5  # λ_ISG (§8)
    loss: str = "pseudo_huber"  # pseudo_huber | l2 (decision 3)
    huber_c: float = 1e-3
    guidance: GuidanceConfig = field(default_factory=lambda: GuidanceConfig(kind="cfg", min=2.0, max=4.0))
    margin: int = 50  # mid-point margin from both segment ends
    margin_space: str = "index"  # index (grid index) | timestep (units of the net timestep: 1000σ or DDPM t)
    last_segment_end: str = "zero"  # zero | grid_start (reference SD3.5: σ₄ = first grid σ, §8.1)
    sdxl_mode: str = "intended"  # intended | reference (§8.2, decision 3); SDXL only: other families need intended
    midpoint_model: str = "generator"  # generator (§8, the paper) | teacher (ablation: two-step teacher target)


@dataclass
class GANConfig:
    enabled: bool = True
    weight: float = 0.1  # gan_weight (§10)
    time_weight: str = "paper"  # paper | reference (§10, decision 3)


@dataclass
class DMD2ClsConfig:
    """DMD2's classifier on the fake UNet bottleneck (§11), SDXL only."""

    enabled: bool = False
    gen_weight: float = 5e-3
    guidance_weight: float = 1e-2
    timestep: TimestepSamplerConfig = field(default_factory=lambda: TimestepSamplerConfig(low=0, high=999))


@dataclass
class MethodConfig:
    name: str = "senseflow"  # senseflow | dmd2
    gd: int = 5  # TTUR: GD fake-score (and D) updates per generator update (§1.3)
    backward_simulation_prob: float = 0.5  # §4.2
    dmd: DMDConfig = field(default_factory=DMDConfig)
    fake: FakeConfig = field(default_factory=FakeConfig)
    ida: IDAConfig = field(default_factory=IDAConfig)
    isg: ISGConfig = field(default_factory=ISGConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    dmd2_cls: DMD2ClsConfig = field(default_factory=DMD2ClsConfig)


@dataclass
class DiscriminatorConfig:
    """VFM discriminator (§9): frozen DINOv2 + CLIP text, trainable heads."""

    dino_path: str | None = None  # local transformers Dinov2Model folder (decision 5)
    clip_path: str | None = None  # local transformers CLIP folder (text model with projection)
    hooks: list[int] = field(default_factory=lambda: [2, 5, 8, 10, 14, 19, 23])
    hook_patch: bool = True  # also use the patch embedding before block 0 (8 maps in all)
    cmap_dim: int = 64
    downsample: int = 3  # stride-2 convolutions per head
    kernel_size: int = 3  # k of the residual basic blocks (the first basic block is 1×1)
    virtual_batch: int = 8  # BatchNormLocal group size
    diffaug: list[str] = field(default_factory=lambda: ["color", "translation", "cutout"])
    translation_ratio: float = 0.125
    cutout_ratio: float = 0.2
    resolution: int | None = None  # None = judge at the generation resolution


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # adamw | adamw8bit
    lr_generator: float = 1e-6
    lr_fake: float = 1e-6
    lr_discriminator: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0  # max grad norm for all players; null = no clipping
    warmup_steps: int = 500  # linear warm-up from lr_start to the player's lr
    lr_start: float = 1e-6
    decay: str = "none"  # none | cosine (after the warm-up; ours, the reference is constant)
    decay_steps: int = 0  # cosine: iterations from the end of the warm-up to lr_end_factor·lr
    lr_end_factor: float = 0.0  # cosine: final LR as a fraction of the player's lr


@dataclass
class EMAConfig:
    enabled: bool = False
    decay: float = 0.999
    warmup: float = 0.0  # d_n = min(decay, (1 + n)/(warmup + n)) after the n-th G step; 0: the constant decay


@dataclass
class TrainConfig:
    iterations: int = 10_000_000
    batch_size: int = 1  # per process
    grad_accum: int = 1
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    gradient_checkpointing: bool = True
    ema: EMAConfig = field(default_factory=EMAConfig)
    log_interval: int = 15
    preview_interval: int = 500  # 0 = no previews
    preview_prompts: list[str] = field(default_factory=list)
    save_interval: int = 3000
    keep_last: int = 3  # checkpoints kept; 0 = keep all
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class DataConfig:
    path: str = MISSING
    kind: str = "auto"  # auto | json | jsonl | lmdb
    resolution: int = 1024
    crop: str = "center"  # center | random
    num_workers: int = 4
    pin_memory: bool = True
    persistent_workers: bool = True
    max_bad_samples: int = 100


@dataclass
class DistConfig:
    strategy: str = "auto"  # auto | none | ddp | fsdp
    hsdp: bool = False
    cpu_offload: bool = False
    backend: str = "auto"  # auto | nccl | gloo


@dataclass
class SenseFlowConfig:
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dist: DistConfig = field(default_factory=DistConfig)


#: how each teacher family's guided prediction works (``TeacherFamily.guided_predict``): classifier-free guidance
#: u + s·(c − u) for SDXL and SD3.5, the distilled guidance embedding for FLUX.1-dev. ``method.*.guidance.kind`` must
#: name it (checked by :func:`validate`, so a mismatch fails before any model loads).
FAMILY_GUIDANCE: dict[str, str] = {"sdxl": "cfg", "sd3": "cfg", "flux": "embedding"}


# ---------------------------------------------------------------------------------------------------------------
# Schema introspection
# ---------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_type(path: str, schema: type) -> Any:
    """Type hint of a dotted schema key (``method.isg.weight``); list items ``key[0]`` give the item type."""
    tp: Any = schema
    for part in path.split("."):
        name, _, index = part.partition("[")
        tp = _hints(tp)[name]
        if index:
            tp = _strip_optional(tp)
            tp = typing.get_args(tp)[0]
    return tp


def _strip_optional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if type(None) in typing.get_args(tp) and len(args) == 1 else tp


def _describe_type(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if tp in names:
        return names[tp]
    if _is_section(tp):
        return "a section (mapping) with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    if type(None) in typing.get_args(tp):
        return _describe_type(_strip_optional(tp)) + " or null"
    if typing.get_origin(tp) is list:
        item = typing.get_args(tp)[0]
        plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(item, "values")
        return f"a list of {plural}"
    return str(tp)


def schema_keys(cls: type = SenseFlowConfig, prefix: str = "") -> list[str]:
    """Every leaf key of the schema in dotted form, in declaration order."""
    out: list[str] = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        out.extend(schema_keys(tp, key + ".") if _is_section(tp) else [key])
    return out


def _suggest(name: str, cls: type, prefix: str, schema: type) -> str:
    """A ' (did you mean ...?)' hint: a sibling key first, then the same name elsewhere, then any close key."""
    siblings = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    all_keys = schema_keys(schema)
    sections = sorted({k.rsplit(".", i)[0] for k in all_keys for i in range(1, k.count(".") + 1)})
    candidates = all_keys + sections
    same_leaf = [k for k in candidates if k.rsplit(".", 1)[-1] == name]
    if same_leaf:
        return f" (did you mean '{same_leaf[0]}'?)"
    close = difflib.get_close_matches(prefix + name, candidates, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{close[0]}'?)"
    where = f"under '{prefix[:-1]}'" if prefix else "at the top level"
    return f" (valid keys {where}: {', '.join(siblings)})"


def _check_keys(data: dict, cls: type, prefix: str, label: str, sources: dict[str, str], schema: type) -> None:
    """Reject keys that the schema does not have; record which layer set each leaf in ``sources``."""
    fields = _hints(cls)
    for key, value in data.items():
        if not isinstance(key, str) or key not in fields:
            raise ConfigError(f"{label}: unknown key '{prefix}{key}'{_suggest(str(key), cls, prefix, schema)}")
        tp = fields[key]
        if _is_section(tp):
            if value is None:  # an empty section (all its lines commented out) sets nothing
                data[key] = value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"{label}: {prefix}{key} = {value!r}: expected {_describe_type(tp)}")
            _check_keys(value, tp, f"{prefix}{key}.", label, sources, schema)
        else:
            sources[f"{prefix}{key}"] = label


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def _display(path: Path) -> str:
    try:
        rel = os.path.relpath(path)
        return rel if not rel.startswith("..") else str(path)
    except ValueError:
        return str(path)


def _read_yaml(path: Path) -> dict:
    label = _display(path)
    if not path.is_file():
        raise ConfigError(f"config file {label} not found")
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml and OmegaConf parse errors
        raise ConfigError(f"{label}: cannot parse YAML: {exc}") from exc
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{label}: expected a mapping of sections at the top level, got a list")
    return OmegaConf.to_container(node, resolve=False)  # type: ignore[return-value]


def _layers(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple[str, dict]]:
    """(label, mapping) of ``path`` and its ``defaults`` ancestors, in merge order (bases first)."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(_display(p) for p in (*chain, path))
        raise ConfigError(f"config files inherit from each other in a cycle: {cycle}")
    data = _read_yaml(path)
    label = _display(path)
    bases = data.pop("defaults", None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    elif not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise ConfigError(f"{label}: 'defaults' must be a path (or a list of paths) to another YAML file")
    layers: list[tuple[str, dict]] = []
    for base in bases:
        base_path = (path.parent / base).resolve()
        if not base_path.is_file():
            raise ConfigError(f"{label}: defaults file '{base}' not found (looked for {_display(base_path)})")
        layers.extend(_layers(base_path, (*chain, path)))
    layers.append((label, data))
    return layers


def _parse_override(item: str, schema: type) -> dict:
    label = f"command-line override '{item}'"
    key, sep, _ = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{label}: expected key=value, e.g. method.gd=10")
    cls: Any = schema
    parts = key.split(".")
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i]) + ("." if i else "")
        if typing.get_origin(cls) is dict:  # a free-form mapping: its keys are checked by whoever reads it
            break
        if not _is_section(cls):
            raise ConfigError(f"{label}: '{prefix[:-1]}' is a value, not a section")
        if part not in _hints(cls):
            raise ConfigError(f"{label}: unknown key '{prefix}{part}'{_suggest(part, cls, prefix, schema)}")
        cls = _hints(cls)[part]
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)  # type: ignore[return-value]
    except Exception as exc:
        raise ConfigError(f"{label}: cannot parse the value: {exc}") from exc


def _type_error(label: str, exc: OmegaConfBaseException, schema: type) -> ConfigError:
    key = str(getattr(exc, "full_key", "") or "")
    detail = str(getattr(exc, "msg", None) or exc).splitlines()[0]
    try:
        expected = _describe_type(_field_type(key, schema)) if key else ""
    except (KeyError, IndexError):
        expected = ""
    where = f" {key}" if key else ""
    return ConfigError(f"{label}:{where} has a wrong type: {detail}" + (f"; expected {expected}" if expected else ""))


def load_structured(path: str | os.PathLike, overrides: Sequence[str], schema: type) -> tuple[Any, dict[str, str]]:
    """Load ``path`` (with its ``defaults`` chain) into the dataclass ``schema``, applying ``key=value`` overrides.

    Unknown keys (with a "did you mean" hint), wrong types and missing required keys raise :class:`ConfigError`
    naming the file or override. Returns the schema object and, per leaf key, the layer that set it.
    """
    layers = _layers(Path(path))
    layers += [(f"command-line override '{item}'", _parse_override(item, schema)) for item in overrides]
    sources: dict[str, str] = {}
    merged = OmegaConf.structured(schema)
    for label, data in layers:
        _check_keys(data, schema, "", label, sources, schema)
        try:
            merged = OmegaConf.merge(merged, data)
        except OmegaConfBaseException as exc:
            raise _type_error(label, exc, schema) from exc
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        key = missing[0]
        raise ConfigError(
            f"{key} is required but not set in {_display(Path(path))} or its defaults (add it to the YAML or "
            f"pass {key}=... on the command line)"
        )
    try:
        return OmegaConf.to_object(merged), sources
    except OmegaConfBaseException as exc:
        raise _type_error(_display(Path(path)), exc, schema) from exc


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> SenseFlowConfig:
    """Load ``path`` (with its ``defaults`` chain), apply ``key=value`` overrides, check keys, types and ranges.

    Paths are not checked here; call :func:`validate_paths` before loading models. Raises :class:`ConfigError`.
    """
    cfg, sources = load_structured(path, overrides, SenseFlowConfig)
    validate(cfg, sources)
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    check: Callable[[Any], bool]
    expected: str
    choices: tuple[str, ...] = ()


def _one_of(*choices: str) -> _Rule:
    return _Rule(lambda v: v in choices, "one of: " + ", ".join(choices), choices)


def _at_least(lo: float, what: str = "a number", note: str = "") -> _Rule:
    return _Rule(lambda v: v >= lo, f"{what} >= {lo:g}" + (f" ({note})" if note else ""))


def _positive(what: str = "a number") -> _Rule:
    return _Rule(lambda v: v > 0, f"{what} > 0")


def _between(lo: float, hi: float) -> _Rule:
    return _Rule(lambda v: lo <= v <= hi, f"a number in [{lo:g}, {hi:g}]")


_DTYPES = ("float32", "bfloat16", "float16")
_NON_NEGATIVE_INT = _at_least(0, "an integer")


def _sampler_rules(prefix: str) -> dict[str, _Rule]:
    return {
        f"{prefix}.kind": _one_of("uniform", "logit_normal"),
        f"{prefix}.low": _NON_NEGATIVE_INT,
        f"{prefix}.std": _positive(),
    }


def _guidance_rules(prefix: str) -> dict[str, _Rule]:
    return {f"{prefix}.kind": _one_of("cfg", "embedding"), f"{prefix}.min": _at_least(0)}


_RULES: dict[str, _Rule] = {
    "experiment.name": _Rule(lambda v: bool(v.strip()), "a non-empty name"),
    "experiment.seed": _NON_NEGATIVE_INT,
    "teacher.family": _one_of("sdxl", "sd3", "flux"),
    "teacher.dtype": _one_of(*_DTYPES),
    "teacher.vae_dtype": _one_of(*_DTYPES),
    "teacher.text_encoder_dtype": _one_of(*_DTYPES),
    "teacher.clip_max_length": _at_least(1, "an integer"),
    "teacher.t5_max_length": _at_least(1, "an integer"),
    "teacher.resolution": _positive("an integer"),
    "method.name": _one_of("senseflow", "dmd2"),
    "method.gd": _at_least(1, "an integer", "TTUR ratio GD: fake-score updates per generator update"),
    "method.backward_simulation_prob": _between(0, 1),
    "method.dmd.weight": _at_least(0),
    "method.dmd.normalizer_eps": _positive(),
    **_sampler_rules("method.dmd.timestep"),
    **_guidance_rules("method.dmd.guidance"),
    **_sampler_rules("method.fake.timestep"),
    "method.ida.lam": _between(0, 1),
    "method.isg.weight": _at_least(0),
    "method.isg.loss": _one_of("pseudo_huber", "l2"),
    "method.isg.huber_c": _positive(),
    **_guidance_rules("method.isg.guidance"),
    "method.isg.margin": _NON_NEGATIVE_INT,
    "method.isg.margin_space": _one_of("index", "timestep"),
    "method.isg.last_segment_end": _one_of("zero", "grid_start"),
    "method.isg.sdxl_mode": _one_of("intended", "reference"),
    "method.isg.midpoint_model": _one_of("generator", "teacher"),
    "method.gan.weight": _at_least(0),
    "method.gan.time_weight": _one_of("paper", "reference"),
    "method.dmd2_cls.gen_weight": _at_least(0),
    "method.dmd2_cls.guidance_weight": _at_least(0),
    **_sampler_rules("method.dmd2_cls.timestep"),
    "discriminator.cmap_dim": _at_least(1, "an integer"),
    "discriminator.downsample": _NON_NEGATIVE_INT,
    "discriminator.kernel_size": _Rule(lambda v: v >= 1 and v % 2 == 1, "an odd integer >= 1"),
    "discriminator.virtual_batch": _at_least(1, "an integer"),
    "discriminator.translation_ratio": _between(0, 1),
    "discriminator.cutout_ratio": _between(0, 1),
    "discriminator.resolution": _Rule(lambda v: v is None or v > 0, "null or an integer > 0"),
    "optimizer.name": _one_of("adamw", "adamw8bit"),
    "optimizer.lr_generator": _at_least(0),
    "optimizer.lr_fake": _at_least(0),
    "optimizer.lr_discriminator": _at_least(0),
    "optimizer.lr_start": _at_least(0),
    "optimizer.betas": _Rule(lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "optimizer.eps": _positive(),
    "optimizer.weight_decay": _at_least(0),
    "optimizer.grad_clip": _Rule(lambda v: v is None or v > 0, "null (no clipping) or a number > 0"),
    "optimizer.warmup_steps": _NON_NEGATIVE_INT,
    "optimizer.decay": _one_of("none", "cosine"),
    "optimizer.decay_steps": _NON_NEGATIVE_INT,
    "optimizer.lr_end_factor": _between(0, 1),
    "train.iterations": _NON_NEGATIVE_INT,
    "train.batch_size": _at_least(1, "an integer"),
    "train.grad_accum": _at_least(1, "an integer"),
    "train.mixed_precision": _one_of("auto", "bf16", "fp32"),
    "train.ema.decay": _Rule(lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "train.ema.warmup": _Rule(lambda v: v >= 0, "a number >= 0 (0: no warm-up)"),
    "train.log_interval": _at_least(1, "an integer"),
    "train.preview_interval": _NON_NEGATIVE_INT,
    "train.save_interval": _at_least(1, "an integer"),
    "train.keep_last": _NON_NEGATIVE_INT,
    "train.device": _one_of("auto", "cpu", "cuda"),
    "data.kind": _one_of("auto", "json", "jsonl", "lmdb"),
    "data.resolution": _positive("an integer"),
    "data.crop": _one_of("center", "random"),
    "data.num_workers": _NON_NEGATIVE_INT,
    "data.max_bad_samples": _NON_NEGATIVE_INT,
    "dist.strategy": _one_of("auto", "none", "ddp", "fsdp"),
    "dist.backend": _one_of("auto", "nccl", "gloo"),
}


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _fail(key: str, value: Any, expected: str, sources: dict[str, str], choices: Sequence[str] = ()) -> None:
    origin = sources.get(key, "schema default")
    hint = ""
    if choices and isinstance(value, str):
        close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(f"{key} = {value!r} (from {origin}): expected {expected}{hint}")


def validate(cfg: SenseFlowConfig, sources: dict[str, str] | None = None) -> None:
    """Check value ranges, enum choices and cross-key consistency; raise :class:`ConfigError` on the first problem.

    ``sources`` maps dotted keys to the file or override that set them (used to name the origin in messages).
    """
    src = sources or {}
    for key, rule in _RULES.items():
        value = _get(cfg, key)
        if not rule.check(value):
            _fail(key, value, rule.expected, src, rule.choices)

    def need(ok: bool, key: str, expected: str) -> None:
        if not ok:
            _fail(key, _get(cfg, key), expected, src)

    augment = ("color", "translation", "cutout")
    need(all(item in augment for item in cfg.discriminator.diffaug), "discriminator.diffaug",
         "a list of: " + ", ".join(augment))
    hooks = cfg.discriminator.hooks
    need(bool(hooks) and all(h >= 0 for h in hooks) and len(set(hooks)) == len(hooks),
         "discriminator.hooks", "a non-empty list of distinct block indices >= 0")

    for prefix in ("method.dmd.timestep", "method.fake.timestep", "method.dmd2_cls.timestep"):
        sampler = _get(cfg, prefix)
        need(sampler.high >= sampler.low, f"{prefix}.high", f"an integer >= {prefix}.low ({sampler.low})")
    for prefix in ("method.dmd.guidance", "method.isg.guidance"):
        guidance = _get(cfg, prefix)
        need(guidance.max >= guidance.min, f"{prefix}.max", f"a number >= {prefix}.min ({guidance.min:g})")
        kind = FAMILY_GUIDANCE[cfg.teacher.family]
        why = ("FLUX.1-dev teachers guide with their distilled guidance embedding, not CFG" if kind == "embedding"
               else "only FLUX teachers have a guidance embedding")
        need(guidance.kind == kind, f"{prefix}.kind", f"'{kind}' for teacher.family={cfg.teacher.family} ({why})")
    need(cfg.method.isg.sdxl_mode == "intended" or cfg.teacher.family == "sdxl", "method.isg.sdxl_mode",
         f"'intended' for teacher.family={cfg.teacher.family} (the 'reference' reduction is the SDXL trainer's, §8.2)")

    need(cfg.optimizer.decay != "cosine" or cfg.optimizer.decay_steps > 0, "optimizer.decay",
         "'none' unless optimizer.decay_steps > 0 (cosine decays over that many iterations after the warm-up)")
    _validate_schedule(cfg, need)
    need(not cfg.method.dmd2_cls.enabled or cfg.teacher.family == "sdxl", "method.dmd2_cls.enabled",
         f"false for teacher.family={cfg.teacher.family} (the DMD2 classifier sits on the SDXL UNet bottleneck)")
    need(cfg.data.resolution == cfg.teacher.resolution, "data.resolution",
         f"the same value as teacher.resolution ({cfg.teacher.resolution}): real latents are generator inputs")
    need(not cfg.dist.hsdp or cfg.dist.strategy in ("auto", "fsdp"), "dist.hsdp",
         f"false with dist.strategy={cfg.dist.strategy} (hybrid sharding needs FSDP)")
    need(not cfg.dist.cpu_offload or cfg.dist.strategy in ("auto", "fsdp"), "dist.cpu_offload",
         f"false with dist.strategy={cfg.dist.strategy} (CPU offload needs FSDP)")


def _validate_schedule(cfg: SenseFlowConfig, need: Callable[[bool, str, str], None]) -> None:
    """Anchors strictly decreasing; every ISG segment leaves room for a mid-point (when checkable without the
    teacher's scheduler: grid indices, DDPM timesteps, or explicit flow anchors in timestep units)."""
    sched, flow = cfg.schedule, cfg.teacher.family != "sdxl"
    idx = sched.anchor_indices
    need(bool(idx) and all(i >= 0 for i in idx) and all(a > b for a, b in zip(idx, idx[1:])),
         "schedule.anchor_indices", "a non-empty, strictly decreasing list of grid indices >= 0")
    if sched.anchors is not None:
        a = sched.anchors
        decreasing = bool(a) and all(x > y for x, y in zip(a, a[1:]))
        if flow:
            need(decreasing and all(0 < x <= 1 for x in a), "schedule.anchors",
                 "null or a strictly decreasing list of sigmas in (0, 1]")
        else:
            need(decreasing and all(x >= 0 and float(x).is_integer() for x in a), "schedule.anchors",
                 "null or a strictly decreasing list of integer DDPM timesteps >= 0")

    isg = cfg.method.isg
    if not isg.enabled:
        return
    points: list[float] | None = None
    if sched.anchors is None and (isg.margin_space == "index" or not flow):
        points = [float(i) for i in idx]
    elif sched.anchors is not None and isg.margin_space == "timestep":
        points = [1000.0 * x if flow else float(x) for x in sched.anchors]
    if points is None:
        return
    ends = points + [0.0]
    for k in range(len(points)):
        lo, hi = ends[k + 1] + isg.margin, ends[k] - isg.margin
        need(math.floor(hi) >= math.ceil(lo), "method.isg.margin",
             f"a margin that leaves a mid-point inside segment {k} ({ends[k]:g} -> {ends[k + 1]:g})")


_PLACEHOLDER_HINT = " (still the preset's placeholder: pass {key}=... on the command line)"


def validate_paths(cfg: SenseFlowConfig) -> None:
    """Check every path the run needs exists, before any model loads; one :class:`ConfigError` lists them all.

    teacher.path must be a diffusers folder with ``model_index.json``; teacher.student_path, when set, must exist;
    data.path must exist (a folder for ``lmdb``, a file for ``json``/``jsonl``); with the GAN enabled,
    discriminator.dino_path and clip_path must be local transformers folders with ``config.json``.
    """
    problems: list[str] = []

    def report(key: str, value: str | None, expected: str) -> None:
        hint = _PLACEHOLDER_HINT.format(key=key) if value and value.startswith("/path/to/") else ""
        problems.append(f"{key} = {value!r}: expected {expected}{hint}")

    teacher = Path(cfg.teacher.path)
    if not teacher.is_dir():
        report("teacher.path", cfg.teacher.path, "an existing local diffusers folder")
    elif not (teacher / "model_index.json").is_file():
        report("teacher.path", cfg.teacher.path, "a diffusers folder containing model_index.json (not found)")
    if cfg.teacher.student_path is not None and not Path(cfg.teacher.student_path).exists():
        report("teacher.student_path", cfg.teacher.student_path, "an existing folder (or null)")

    data, kind = Path(cfg.data.path), cfg.data.kind
    if not data.exists():
        report("data.path", cfg.data.path, "an existing dataset (a JSON/JSONL file or an LMDB folder)")
    elif kind == "lmdb" and not data.is_dir():
        report("data.path", cfg.data.path, "an LMDB folder for data.kind=lmdb")
    elif kind in ("json", "jsonl") and not data.is_file():
        report("data.path", cfg.data.path, f"a file for data.kind={kind}")

    if cfg.method.gan.enabled:
        for key in ("discriminator.dino_path", "discriminator.clip_path"):
            value = _get(cfg, key)
            if value is None:
                report(key, value, "a local transformers folder (required while method.gan.enabled is true)")
            elif not (Path(value) / "config.json").is_file():
                report(key, value, "an existing local transformers folder with config.json")
    if problems:
        raise ConfigError("missing paths: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------


def resolved_yaml(cfg: SenseFlowConfig | DictConfig) -> str:
    """The complete resolved config as YAML (``--dry-run``); loading it back gives an equal config."""
    node = cfg if isinstance(cfg, (DictConfig, ListConfig)) else OmegaConf.structured(cfg)
    return OmegaConf.to_yaml(node, resolve=True)


def save_resolved(cfg: SenseFlowConfig, run_dir: str | os.PathLike) -> Path:
    """Write ``run_dir/config.yaml`` (atomically) and return its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / "config.yaml"
    text = "# Resolved SenseFlow config (senseflow.config.save_resolved); reload with load_config(this file).\n"
    text += resolved_yaml(cfg)
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".config.", suffix=".yaml.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def main_config_check(argv: Sequence[str] | None = None) -> int:
    """``senseflow config <yaml> [key=value ...] [--check-paths]``: print the resolved config; 2 on a bad one."""
    parser = argparse.ArgumentParser(prog="senseflow config", description="Print the resolved training config.")
    parser.add_argument("config", help="YAML file, e.g. configs/SD35/sd35_senseflow.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method.gd=10")
    parser.add_argument("--check-paths", action="store_true", help="also check that every path exists")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.check_paths:
            validate_paths(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(resolved_yaml(cfg))
    return 0

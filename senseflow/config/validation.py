"""Validation of a loaded :class:`SenseFlowConfig`: value ranges, enum choices, cross-key consistency, paths.

Per-field rules are checked in schema declaration order: the choices of a field come from the schema (declared
with :func:`senseflow.config.schema.choice`), its range from :data:`_RANGES` below. Then the rules that relate
several keys. Every failure is a one-line :class:`ConfigError` naming the key, its value and where it was set.
"""
from __future__ import annotations

import difflib
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from senseflow.config.errors import ConfigError
from senseflow.config.introspection import field_type, schema_choices, schema_keys, strip_optional
from senseflow.config.schema import SenseFlowConfig

__all__ = ["validate", "validate_paths"]


@dataclass(frozen=True)
class _Rule:
    check: Callable[[Any], bool]
    expected: str
    choices: tuple[str, ...] = ()


def _one_of(*choices: str) -> _Rule:
    return _Rule(lambda v: v in choices, "one of: " + ", ".join(choices), choices)


def _all_of(*choices: str) -> _Rule:
    return _Rule(lambda v: all(item in choices for item in v), "a list of: " + ", ".join(choices), choices)


def _asked(make: Callable[..., _Rule], choices: Callable[[], tuple[str, ...]]) -> Callable[[], _Rule]:
    """A rule whose choices are asked for when a config is checked (teacher families registered at run time)."""
    return lambda: make(*choices())


def _at_least(lo: float, what: str = "a number", note: str = "") -> _Rule:
    return _Rule(lambda v: v >= lo, f"{what} >= {lo:g}" + (f" ({note})" if note else ""))


def _positive(what: str = "a number") -> _Rule:
    return _Rule(lambda v: v > 0, f"{what} > 0")


def _between(lo: float, hi: float) -> _Rule:
    return _Rule(lambda v: lo <= v <= hi, f"a number in [{lo:g}, {hi:g}]")


_NON_NEGATIVE_INT = _at_least(0, "an integer")


def _sampler_ranges(prefix: str) -> dict[str, _Rule]:
    return {f"{prefix}.low": _NON_NEGATIVE_INT, f"{prefix}.std": _positive()}


def _lora_ranges(prefix: str) -> dict[str, _Rule]:
    """One player's LoRA adapter (docs/method.md §3.8): rank 0 = full weights."""
    return {
        f"{prefix}.rank": _at_least(0, "an integer", "0: full-weight training"),
        f"{prefix}.alpha": _Rule(lambda v: v is None or v > 0, "null (alpha = rank) or a number > 0"),
        f"{prefix}.target_modules": _Rule(
            lambda v: v is None or (len(v) > 0 and all(isinstance(t, str) and t.strip() for t in v)),
            "null (the family's default) or a non-empty list of module-name patterns"),
        f"{prefix}.dropout": _Rule(lambda v: 0 <= v < 1, "a number in [0, 1)"),
    }


#: the range of every numeric (or free-text) field that has one; choices are declared in the schema
_RANGES: dict[str, _Rule] = {
    "experiment.name": _Rule(lambda v: bool(v.strip()), "a non-empty name"),
    "experiment.seed": _NON_NEGATIVE_INT,
    "teacher.clip_max_length": _at_least(1, "an integer"),
    "teacher.t5_max_length": _at_least(1, "an integer"),
    "teacher.resolution": _positive("an integer"),
    **_lora_ranges("model.lora.student"),
    **_lora_ranges("model.lora.fake"),
    "method.gd": _at_least(1, "an integer", "TTUR ratio GD: fake-score updates per generator update"),
    "method.backward_simulation_prob": _between(0, 1),
    "method.dmd.weight": _at_least(0),
    "method.dmd.normalizer_eps": _positive(),
    **_sampler_ranges("method.dmd.timestep"),
    "method.dmd.guidance.min": _at_least(0),
    **_sampler_ranges("method.fake.timestep"),
    "method.ida.lam": _between(0, 1),
    "method.isg.weight": _at_least(0),
    "method.isg.huber_c": _positive(),
    "method.isg.guidance.min": _at_least(0),
    "method.isg.margin": _NON_NEGATIVE_INT,
    "method.gan.weight": _at_least(0),
    "method.dmd2_cls.gen_weight": _at_least(0),
    "method.dmd2_cls.guidance_weight": _at_least(0),
    **_sampler_ranges("method.dmd2_cls.timestep"),
    "discriminator.cmap_dim": _at_least(1, "an integer"),
    "discriminator.downsample": _NON_NEGATIVE_INT,
    "discriminator.kernel_size": _Rule(lambda v: v >= 1 and v % 2 == 1, "an odd integer >= 1"),
    "discriminator.virtual_batch": _at_least(1, "an integer"),
    "discriminator.translation_ratio": _between(0, 1),
    "discriminator.cutout_ratio": _between(0, 1),
    "discriminator.resolution": _Rule(lambda v: v is None or v > 0, "null or an integer > 0"),
    "optimizer.lr_generator": _at_least(0),
    "optimizer.lr_fake": _at_least(0),
    "optimizer.lr_discriminator": _at_least(0),
    "optimizer.lr_start": _at_least(0),
    "optimizer.betas": _Rule(lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "optimizer.eps": _positive(),
    "optimizer.weight_decay": _at_least(0),
    "optimizer.grad_clip": _Rule(lambda v: v is None or v > 0, "null (no clipping) or a number > 0"),
    "optimizer.warmup_steps": _NON_NEGATIVE_INT,
    "optimizer.decay_steps": _NON_NEGATIVE_INT,
    "optimizer.lr_end_factor": _between(0, 1),
    "train.iterations": _NON_NEGATIVE_INT,
    "train.batch_size": _at_least(1, "an integer"),
    "train.grad_accum": _at_least(1, "an integer"),
    "train.ema.decay": _Rule(lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "train.ema.warmup": _Rule(lambda v: v >= 0, "a number >= 0 (0: no warm-up)"),
    "train.log_interval": _at_least(1, "an integer"),
    "train.preview_interval": _NON_NEGATIVE_INT,
    "train.save_interval": _at_least(1, "an integer"),
    "train.keep_last": _NON_NEGATIVE_INT,
    "data.resolution": _positive("an integer"),
    "data.num_workers": _NON_NEGATIVE_INT,
    "data.max_bad_samples": _NON_NEGATIVE_INT,
}


def _field_rules() -> dict[str, _Rule | Callable[[], _Rule]]:
    """Dotted key -> its rule (a choice from the schema, or a range), in schema declaration order; a rule whose
    choices the schema gives as a callable is made when a config is checked."""
    keys, choices = schema_keys(), schema_choices()
    for key in _RANGES:
        if key not in keys or key in choices:
            raise AssertionError(f"range rule for {key}: not a schema key, or one with choices")
    rules: dict[str, _Rule | Callable[[], _Rule]] = {}
    for key in keys:
        if key in choices:
            is_list = typing.get_origin(strip_optional(field_type(key, SenseFlowConfig))) is list
            make = _all_of if is_list else _one_of
            allowed = choices[key]
            rules[key] = _asked(make, allowed) if callable(allowed) else make(*allowed)
        elif key in _RANGES:
            rules[key] = _RANGES[key]
    return rules


_RULES: dict[str, _Rule | Callable[[], _Rule]] = _field_rules()


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
        rule = rule if isinstance(rule, _Rule) else rule()
        value = _get(cfg, key)
        if not rule.check(value):
            _fail(key, value, rule.expected, src, rule.choices)

    def need(ok: bool, key: str, expected: str) -> None:
        if not ok:
            _fail(key, _get(cfg, key), expected, src)

    from senseflow.models.families import get_family

    family = get_family(cfg.teacher.family)  # a registered name (checked above): its guidance and schedule kinds
    hooks = cfg.discriminator.hooks
    need(bool(hooks) and all(h >= 0 for h in hooks) and len(set(hooks)) == len(hooks),
         "discriminator.hooks", "a non-empty list of distinct block indices >= 0")

    for prefix in ("method.dmd.timestep", "method.fake.timestep", "method.dmd2_cls.timestep"):
        sampler = _get(cfg, prefix)
        need(sampler.high >= sampler.low, f"{prefix}.high", f"an integer >= {prefix}.low ({sampler.low})")
    for prefix in ("method.dmd.guidance", "method.isg.guidance"):
        guidance = _get(cfg, prefix)
        need(guidance.max >= guidance.min, f"{prefix}.max", f"a number >= {prefix}.min ({guidance.min:g})")
        expected = family.guidance_kind_expectation(str(guidance.kind))  # the kinds the family can run
        need(expected is None, f"{prefix}.kind", expected or "")
    need(cfg.method.isg.sdxl_mode == "intended" or family.schedule_kind == "ddpm", "method.isg.sdxl_mode",
         f"'intended' for teacher.family={cfg.teacher.family} (the 'reference' reduction is the SDXL trainer's, §8.2)")

    need(cfg.optimizer.decay != "cosine" or cfg.optimizer.decay_steps > 0, "optimizer.decay",
         "'none' unless optimizer.decay_steps > 0 (cosine decays over that many iterations after the warm-up)")
    _validate_schedule(cfg, need, family.schedule_kind == "flow")
    need(not cfg.method.dmd2_cls.enabled or family.unet_bottleneck, "method.dmd2_cls.enabled",
         f"false for teacher.family={cfg.teacher.family} (the DMD2 classifier sits on the SDXL UNet bottleneck)")
    need(cfg.data.resolution == cfg.teacher.resolution, "data.resolution",
         f"the same value as teacher.resolution ({cfg.teacher.resolution}): real latents are generator inputs")
    _validate_lora(cfg, need)
    need(not cfg.dist.hsdp or cfg.dist.strategy in ("auto", "fsdp"), "dist.hsdp",
         f"false with dist.strategy={cfg.dist.strategy} (hybrid sharding needs FSDP)")
    need(not cfg.dist.cpu_offload or cfg.dist.strategy in ("auto", "fsdp"), "dist.cpu_offload",
         f"false with dist.strategy={cfg.dist.strategy} (CPU offload needs FSDP)")


def _validate_lora(cfg: SenseFlowConfig, need: Callable[[bool, str, str], None]) -> None:
    """LoRA players (docs/method.md §3.8): adapters start on the teacher's own weights; IDA mixes two adapters of one
    shape (equal rank, alpha and targets) or two full copies; DMD2's classifier hooks a full fake UNet."""
    g, f = cfg.model.lora.student, cfg.model.lora.fake
    if g.rank == 0 and f.rank == 0:
        return
    key = "model.lora.student.rank" if g.rank > 0 else "model.lora.fake.rank"
    need(cfg.teacher.student_path is None, "teacher.student_path",
         f"null with {key} > 0 (LoRA adapters start on the teacher's own weights)")
    if cfg.method.ida.enabled and (g.rank == 0) != (f.rank == 0):
        need(False, "model.lora.fake.rank" if f.rank == 0 else "model.lora.student.rank",
             f"{g.rank if f.rank == 0 else f.rank} (IDA mixes G into F: both adapters of one rank, or both full "
             "weights; or method.ida.enabled=false)")
    if cfg.method.ida.enabled and g.rank > 0 and f.rank > 0:
        need(f.rank == g.rank, "model.lora.fake.rank", f"{g.rank}, the student's rank (IDA mixes the two adapters)")
        need(f.alpha == g.alpha, "model.lora.fake.alpha",
             f"{g.alpha}, the student's alpha (IDA mixes the two adapters)")
        same = (None if f.target_modules is None else list(f.target_modules)) == (
            None if g.target_modules is None else list(g.target_modules))
        need(same, "model.lora.fake.target_modules",
             f"{g.target_modules}, the student's (IDA mixes the two adapters layer by layer)")
    need(f.rank == 0 or not cfg.method.dmd2_cls.enabled, "model.lora.fake.rank",
         "0 with method.dmd2_cls.enabled (the DMD2 classifier hooks a full fake-score UNet)")


def _validate_schedule(cfg: SenseFlowConfig, need: Callable[[bool, str, str], None], flow: bool) -> None:
    """Anchors strictly decreasing (sigmas for a ``flow`` family, else DDPM timesteps); every ISG segment leaves room
    for a mid-point (when checkable without the teacher's scheduler: grid indices, DDPM timesteps, or explicit flow
    anchors in timestep units)."""
    sched = cfg.schedule
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


def _missing_components(teacher: Path) -> list[str]:
    """The component folders of a diffusers teacher that are absent: ``vae/config.json`` (every family encodes and
    decodes with it) and the folder of every component its ``model_index.json`` names."""
    needed = ["vae"]
    try:
        index = json.loads((teacher / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    if isinstance(index, dict):  # "name": ["library", "Class"] per component; null for an absent optional one
        needed += [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[:1] != [None]
                   and k not in needed]
    absent = []
    for name in needed:
        folder = teacher / name
        if not folder.is_dir() or (name == "vae" and not (folder / "config.json").is_file()):
            absent.append(f"{name}/config.json" if name == "vae" else f"{name}/")
    return absent


_PLACEHOLDER_HINT = " (still the preset's placeholder: pass {key}=... on the command line)"


def validate_paths(cfg: SenseFlowConfig) -> None:
    """Check every path the run needs exists, before any model loads; one :class:`ConfigError` lists them all.

    teacher.path must be a diffusers folder with ``model_index.json``, ``vae/config.json`` and a folder for every
    component its ``model_index.json`` lists; teacher.student_path, when set, must exist;
    data.path must exist (a folder for ``lmdb``, a file for ``json``/``jsonl``); data.text_cache, when set, must be a
    text cache folder (``index.json``); with the GAN enabled,
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
    else:
        absent = _missing_components(teacher)
        if absent:
            report("teacher.path", cfg.teacher.path, f"a diffusers folder with {' and '.join(absent)} (not found)")
    if cfg.teacher.student_path is not None and not Path(cfg.teacher.student_path).exists():
        report("teacher.student_path", cfg.teacher.student_path, "an existing folder (or null)")

    data, kind = Path(cfg.data.path), cfg.data.kind
    if not data.exists():
        report("data.path", cfg.data.path, "an existing dataset (a JSON/JSONL file or an LMDB folder)")
    elif kind == "lmdb" and not data.is_dir():
        report("data.path", cfg.data.path, "an LMDB folder for data.kind=lmdb (for a JSON or JSONL image set pass "
               "data.kind=auto)")
    elif kind in ("json", "jsonl") and not data.is_file():
        report("data.path", cfg.data.path, f"a file for data.kind={kind}")
    if cfg.data.text_cache is not None and not (Path(cfg.data.text_cache) / "index.json").is_file():
        report("data.text_cache", cfg.data.text_cache, "a folder written by senseflow data text-cache (or null)")

    if cfg.method.gan.enabled:
        for key in ("discriminator.dino_path", "discriminator.clip_path"):
            value = _get(cfg, key)
            if value is None:
                report(key, value, "a local transformers folder (required while method.gan.enabled is true)")
            elif not (Path(value) / "config.json").is_file():
                report(key, value, "an existing local transformers folder with config.json")
    if problems:
        raise ConfigError("missing paths: " + "; ".join(problems))

"""Teacher families: one adapter per teacher architecture, found by name through one registry.

``get_family("flux")`` returns the class; ``build_family(spec, device)`` builds one from a teacher config
(``senseflow.config.TeacherConfig`` or any object/mapping with the same fields) or from a name plus keyword
arguments. SD3.5 Medium and Large are one family (``sd3``, aliases ``sd35``, ``sd35-medium`` …).

The registry holds the shipped families (:data:`FAMILY_NAMES`, in the order messages list them), then every other
module of this package that defines a :class:`TeacherFamily` subclass with its own ``name`` (so adding a family is
adding its module, docs/adding_a_teacher.md), then the classes given to :func:`register_family` at run time.
:func:`family_names` lists them all.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import json
import pkgutil
from pathlib import Path
from typing import Any, Mapping

import torch

from senseflow.core.dtypes import parse_dtype
from senseflow.core.family import TeacherFamily

__all__ = ["FAMILY_NAMES", "GUIDANCE_KEYS", "family_names", "get_family", "register_family",
           "unregister_family", "build_family", "family_of_folder", "guidance_problem", "check_guidance_kinds"]

#: the config keys that say how the teacher is guided (DMD's real score, ISG's teacher calls)
GUIDANCE_KEYS: tuple[str, ...] = ("method.dmd.guidance.kind", "method.isg.guidance.kind")

#: the shipped families: registry name → "module:Class", in the order messages list them
_BUILTIN: dict[str, str] = {
    "sdxl": "senseflow.models.families.sdxl:SDXLFamily",
    "sd3": "senseflow.models.families.sd3:SD3Family",
    "flux": "senseflow.models.families.flux:FluxFamily",
}
FAMILY_NAMES: tuple[str, ...] = tuple(_BUILTIN)
#: modules of this package that hold shared machinery, not a family
_NOT_FAMILIES = frozenset({"loading"})

_registered: dict[str, type[TeacherFamily]] = {}   # register_family
_loaded: dict[str, type[TeacherFamily]] | None = None  # name → class of every family, once looked up


def _own_families(module: Any) -> list[type[TeacherFamily]]:
    """The concrete TeacherFamily subclasses a module defines, each with its own ``name``."""
    return [c for c in vars(module).values() if inspect.isclass(c) and issubclass(c, TeacherFamily)
            and c.__module__ == module.__name__ and "name" in vars(c) and not inspect.isabstract(c)]


def _families() -> dict[str, type[TeacherFamily]]:
    """Every family by registry name: shipped, found in this package, registered at run time (in that order)."""
    global _loaded
    if _loaded is None:
        found: dict[str, type[TeacherFamily]] = {}
        for name, target in _BUILTIN.items():
            module_name, class_name = target.split(":")
            found[name] = getattr(importlib.import_module(module_name), class_name)
        shipped = {t.split(":")[0] for t in _BUILTIN.values()}
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
            module = f"{__name__}.{info.name}"
            if info.name in _NOT_FAMILIES or module in shipped:
                continue
            for family in _own_families(importlib.import_module(module)):
                found.setdefault(family.name, family)
        _loaded = found
    return {**_loaded, **_registered}


def family_names() -> tuple[str, ...]:
    """Registry names of every family (:data:`FAMILY_NAMES` first, then found and registered ones)."""
    return tuple(_families())


def _aliases() -> dict[str, str]:
    """Alias → family name, from the aliases each family declares itself (a subclass does not inherit its base's)."""
    out: dict[str, str] = {}
    for name, cls in _families().items():
        for alias in vars(cls).get("aliases", ()):
            out.setdefault(alias.lower(), name)
    return out


def register_family(cls: type[TeacherFamily]) -> type[TeacherFamily]:
    """Add a family class under its ``name`` (and its ``aliases``) for this process; usable as a decorator.

    Refuses a name or alias that is already taken (by a shipped family too)."""
    if not (inspect.isclass(cls) and issubclass(cls, TeacherFamily)) or not isinstance(vars(cls).get("name"), str):
        raise TypeError(f"{cls!r} is not a TeacherFamily subclass with its own 'name'")
    taken = {*_families(), *_aliases()}
    clash = [n for n in (cls.name, *vars(cls).get("aliases", ())) if n.lower() in taken]
    if clash:
        raise ValueError(f"teacher family name {clash[0]!r} is already registered")
    _registered[cls.name.lower()] = cls
    return cls


def unregister_family(name: str) -> None:
    """Remove a family added by :func:`register_family` (shipped families stay)."""
    if name.lower() not in _registered:
        raise ValueError(f"teacher family {name!r} was not added by register_family")
    del _registered[name.lower()]


def get_family(name: str) -> type[TeacherFamily]:
    """The family class registered as ``name`` or one of its aliases (``sdxl``, ``sd3``/``sd35``, ``flux`` …)."""
    families, aliases = _families(), _aliases()
    key = aliases.get(str(name).lower(), str(name).lower())
    if key not in families:
        close = difflib.get_close_matches(str(name), [*families, *aliases], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown teacher family {name!r}: expected one of {', '.join(families)}{hint}")
    return families[key]


def family_of_folder(path: str | Path) -> str:
    """The family whose stock pipeline class a diffusers folder's ``model_index.json`` names (the first registered
    one when several families share a pipeline class)."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found: expected a diffusers pipeline folder")
    name = json.loads(index.read_text()).get("_class_name")
    for family, cls in _families().items():
        if getattr(cls, "pipeline_class_name", None) == name:
            return family
    raise ValueError(f"{index}: pipeline class {name!r} is not one of a known family's")


def _field(spec: Any, key: str, default: Any = None) -> Any:
    if isinstance(spec, Mapping):
        return spec.get(key, default)
    return getattr(spec, key, default)


def build_family(spec: Any, device: torch.device | str = "cpu", **overrides: Any) -> TeacherFamily:
    """A family instance from a teacher config or a family name.

    ``spec`` is either a name (then ``path`` and the other constructor arguments come as keywords) or an
    object/mapping with the fields of ``TeacherConfig``: ``family``, ``path``, ``student_path``, ``dtype``
    (denoiser), ``vae_dtype``, ``text_encoder_dtype``, ``clip_max_length``, ``t5_max_length`` (SD3/FLUX),
    ``resolution`` (SDXL micro-conditioning target size). Keyword ``overrides`` win over ``spec``'s fields.
    """
    if isinstance(spec, str):
        cls = get_family(spec)
        return cls(device=device, **overrides)
    name = _field(spec, "family")
    if name is None:
        raise ValueError("teacher config has no 'family' (expected one of " + ", ".join(family_names()) + ")")
    cls = get_family(name)
    kwargs: dict[str, Any] = {
        "path": _field(spec, "path"),
        "denoiser_dtype": parse_dtype(_field(spec, "dtype", "float32"), "teacher.dtype"),
        "vae_dtype": parse_dtype(_field(spec, "vae_dtype", "float32"), "teacher.vae_dtype"),
        "text_dtype": parse_dtype(_field(spec, "text_encoder_dtype", "float32"), "teacher.text_encoder_dtype"),
        "clip_max_length": int(_field(spec, "clip_max_length", 77)),
        "student_path": _field(spec, "student_path"),
    }
    if kwargs["path"] is None:
        raise ValueError("teacher config has no 'path' (a local diffusers folder)")
    accepted = inspect.signature(cls.__init__).parameters
    for key in ("t5_max_length", "resolution"):  # family-specific: SD3/FLUX T5 length, SDXL target size
        if key in accepted and _field(spec, key) is not None:
            kwargs[key] = int(_field(spec, key))
    kwargs.update(overrides)
    return cls(device=device, **kwargs)


def _dotted(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = _field(node, part)
    return node


def guidance_problem(cfg: Any) -> str | None:
    """One line saying why the config's guidance kinds (:data:`GUIDANCE_KEYS`) cannot run on its teacher, or None.

    Reads only the config and the teacher's denoiser ``config.json`` (no weights), so it runs before any network
    loads: a kind the family cannot guide with is named with the kinds it can; a kind that does not fit the teacher
    folder (FLUX: ``embedding`` without a guidance embedder, ``cfg`` with one) is named with the overrides that
    fit. A missing teacher folder or ``config.json`` is left to the folder checks (None here).
    """
    family = get_family(str(_dotted(cfg, "teacher.family")))
    kinds = {key: str(_dotted(cfg, key)) for key in GUIDANCE_KEYS}
    for key, kind in kinds.items():
        expected = family.guidance_kind_expectation(kind)
        if expected is not None:
            return f"{key} = {kind!r}: expected {expected}"
    teacher = _dotted(cfg, "teacher.path")
    if teacher is None:
        return None
    config_file = Path(str(teacher)).expanduser() / family.denoiser_subfolder / "config.json"
    if not config_file.is_file():
        return None
    try:
        denoiser_config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"teacher.path: {config_file} is not readable JSON ({e})"
    need, why = family.teacher_guidance(denoiser_config)
    wrong = [key for key, kind in kinds.items() if kind != need]
    if not wrong:
        return None
    overrides = " ".join(f"{key}={need}" for key in wrong)
    return (f"{wrong[0]} = {kinds[wrong[0]]!r} does not fit the teacher: {config_file} {why}; "
            f"override {overrides}")


def check_guidance_kinds(cfg: Any) -> None:
    """Raise ``ValueError`` with :func:`guidance_problem`'s line when the config's guidance kinds do not fit its
    teacher family and folder (reads configs only; meant for the pre-flight, before any network loads)."""
    problem = guidance_problem(cfg)
    if problem is not None:
        raise ValueError(problem)

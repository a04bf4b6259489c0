"""Teacher families: one adapter per teacher architecture, found by name.

``get_family("flux")`` returns the class; ``build_family(spec, device)`` builds one from a teacher config
(``senseflow.config.TeacherConfig`` or any object/mapping with the same fields) or from a name plus keyword
arguments. SD3.5 Medium and Large are one family (``sd3``, alias ``sd35``).
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import json
from pathlib import Path
from typing import Any, Mapping

import torch

from senseflow.models.families.base import Condition, TeacherFamily

__all__ = ["Condition", "TeacherFamily", "FAMILY_NAMES", "get_family", "build_family", "family_of_folder"]

#: registry names (and aliases) → module and class
_REGISTRY: dict[str, tuple[str, str]] = {
    "sdxl": ("senseflow.models.families.sdxl", "SDXLFamily"),
    "sd3": ("senseflow.models.families.sd3", "SD3Family"),
    "flux": ("senseflow.models.families.flux", "FluxFamily"),
}
_ALIASES = {"sd35": "sd3", "sd3.5": "sd3", "sd35-medium": "sd3", "sd35-large": "sd3"}
FAMILY_NAMES: tuple[str, ...] = tuple(_REGISTRY)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def get_family(name: str) -> type[TeacherFamily]:
    """The family class registered as ``name`` (``sdxl``, ``sd3``/``sd35``, ``flux``)."""
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in _REGISTRY:
        close = difflib.get_close_matches(str(name), [*_REGISTRY, *_ALIASES], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown teacher family {name!r}: expected one of {', '.join(_REGISTRY)}{hint}")
    module, cls = _REGISTRY[key]
    return getattr(importlib.import_module(module), cls)


def family_of_folder(path: str | Path) -> str:
    """The family whose stock pipeline class a diffusers folder's ``model_index.json`` names."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found: expected a diffusers pipeline folder")
    name = json.loads(index.read_text()).get("_class_name")
    for family in _REGISTRY:
        if getattr(get_family(family), "pipeline_class_name", None) == name:
            return family
    raise ValueError(f"{index}: pipeline class {name!r} is not one of a known family's")


def _dtype(value: Any, key: str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if str(value) not in _DTYPES:
        raise ValueError(f"teacher.{key}: {value!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[str(value)]


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
        raise ValueError("teacher config has no 'family' (expected one of " + ", ".join(_REGISTRY) + ")")
    cls = get_family(name)
    kwargs: dict[str, Any] = {
        "path": _field(spec, "path"),
        "denoiser_dtype": _dtype(_field(spec, "dtype", "float32"), "dtype"),
        "vae_dtype": _dtype(_field(spec, "vae_dtype", "float32"), "vae_dtype"),
        "text_dtype": _dtype(_field(spec, "text_encoder_dtype", "float32"), "text_encoder_dtype"),
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

"""Teacher guidance: the scale s of a guided teacher call and the call itself (docs/method.md §5, §8).

A guidance scale is either fixed (``min == max``: SDXL DMD s = 8, SD3.5-Large ISG s = 5) or drawn as
s ~ U(min, max) once per use and shared by the batch and by every rank (decision 2: it comes from ``shared_gen``).
What "guided" means is the family's business (:meth:`TeacherFamily.guided_predict`), in the kind the config names
(``method.dmd.guidance.kind``, ``method.isg.guidance.kind``): classifier-free guidance u + s·(c − u) (``cfg``: SDXL,
SD3.5, a de-distilled FLUX) or the distilled-guidance embedding (``embedding``: FLUX.1-dev).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from senseflow.core.condition import Condition
from senseflow.core.family import TeacherFamily

__all__ = ["draw_guidance_scale", "guided_prediction", "guidance_kind"]


def draw_guidance_scale(spec_min: float, spec_max: float, shared_gen: torch.Generator) -> float:
    """s = spec_min if spec_min == spec_max, else s ~ U(spec_min, spec_max) drawn from ``shared_gen``.

    Nothing is drawn for a fixed scale, so switching a range to a constant does not shift later shared draws
    of an iteration that had none before (the draw order is a property of the config, identical on every rank).
    """
    lo, hi = float(spec_min), float(spec_max)
    if hi < lo:
        raise ValueError(f"guidance scale range: min={lo} must not exceed max={hi}")
    if lo == hi:
        return lo
    u = torch.rand((), generator=shared_gen, dtype=torch.float64).item()
    return lo + (hi - lo) * u


def guided_prediction(
    family: TeacherFamily, teacher: nn.Module, x: Tensor, tau: Tensor, cond: Condition, scale: float,
    kind: str | None = None,
) -> Tensor:
    """The teacher's guided raw prediction (v or ε) at (x, τ): ``family.guided_predict`` with scale s, in guidance
    ``kind`` (None: the teacher folder's own kind)."""
    if kind is None:
        return family.guided_predict(teacher, x, tau, cond, scale)
    return family.guided_predict(teacher, x, tau, cond, scale, kind=kind)


def guidance_kind(section: Any) -> str | None:
    """The ``guidance.kind`` of a method config section (``method.dmd``, ``method.isg``), None when it has none."""
    guidance = section.get("guidance") if isinstance(section, Mapping) else getattr(section, "guidance", None)
    if guidance is None:
        return None
    kind = guidance.get("kind") if isinstance(guidance, Mapping) else getattr(guidance, "kind", None)
    return None if kind is None else str(kind)

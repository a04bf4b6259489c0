"""Generator anchors τ₀ > τ₁ > … > τ_{K−1} of K evenly spaced steps (docs/method.md §4.1), the one place their
formulas live: the few-step samplers, inference, evaluation, the benchmark and the export's pipeline arguments
(a family's ``export_pipeline_kwargs``) all take them from here.
"""
from __future__ import annotations

from torch import Tensor

from senseflow.core.schedules import FlowSchedule, Schedule

__all__ = ["anchor_indices", "flow_anchor_grid", "make_anchors"]


def anchor_indices(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Grid indices i_k = (T − 1) − k·⌊T/K⌋, k = 0..K−1 (K = 4, T = 1000: 999, 749, 499, 249).

    For SDXL these are the anchors t_k themselves (docs/method.md §4.1).
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    stride = num_train_timesteps // num_steps
    return [num_train_timesteps - 1 - k * stride for k in range(num_steps)]


def flow_anchor_grid(num_steps: int) -> list[float]:
    """The unshifted flow grid u_k = 1 − k/K (K = 4: 1, .75, .5, .25)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    return [1.0 - k / num_steps for k in range(num_steps)]


def make_anchors(schedule: Schedule, num_steps: int) -> Tensor:
    """K evenly spaced generator anchors τ₀ > … > τ_{K−1} for ``schedule``.

    Flow: σ_k = shift(1 − k/K) with the schedule's static or dynamic shift (K = 4: SD3.5 1, .9, .75, .5; FLUX at
    1024² 1, .90453, .75951, .51284, which the reference truncates to 1, .904, .759, .512). DDPM: t_k =
    :func:`anchor_indices` (K = 4: 999, 749, 499, 249).
    """
    if isinstance(schedule, FlowSchedule):
        return schedule.anchors_from_grid(flow_anchor_grid(num_steps))
    return schedule.anchors(indices=anchor_indices(num_steps, schedule.num_train_timesteps))

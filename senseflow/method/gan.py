"""Adversarial losses of the VFM discriminator and their per-anchor time weights (docs/method.md §9.3, §10).

Hinge losses, each first averaged over a sample's logits (all heads, all positions), then multiplied by the
per-sample time weight w(τ_k) of the generator's input anchor, then averaged over the batch:

    D real:  mean_b[ w_b · mean_logits relu(1 − l) ]
    D fake:  mean_b[ w_b · mean_logits relu(1 + l) ]
    G:       mean_b[ w_b · (−mean_logits l) ]          (``gan_weight`` is applied by the caller)

The same w(τ_k) weighs the generator term and both discriminator terms.

Time weights (docs/method.md, decision 3):

* ``paper``: ω = (1 − σ)² for flow teachers and ᾱ_t for DDPM teachers (α_t² with α_t = √ᾱ_t);
* ``reference``: §10 as coded, per teacher family: DDPM (SDXL) √ᾱ_t (power 1); FLUX (1 − σ)²; SD3.5 reads the
  *descending* table at the *ascending* grid index i of the anchor (pass ``anchor_index``):
  w = σ_desc[i]² = ``tau_from_index(N − 1 − i)``² = s₃((N − i)/N)² (≈ 9.0e-6, 0.2513, 0.5636, 0.8109).
  :func:`reference_anchor_indices` gives those indices for the families that declare it
  (``TeacherFamily.gan_reference_misindexed``, whatever ``schedule.anchors`` is), ``None`` for the others.
"""
from __future__ import annotations

import torch
from torch import Tensor

from senseflow.core.family import TeacherFamily
from senseflow.core.schedules import DDPMSchedule, Schedule

__all__ = [
    "hinge_real_per_sample",
    "hinge_fake_per_sample",
    "generator_per_sample",
    "weighted_batch_mean",
    "discriminator_hinge_loss",
    "generator_hinge_loss",
    "gan_time_weight",
    "reference_anchor_indices",
]

_MODES = ("paper", "reference")


def _per_sample_mean(logits: Tensor) -> Tensor:
    if logits.ndim == 0:
        raise ValueError("GAN losses expect logits with a batch dimension, got a 0-dim tensor")
    return logits.float().reshape(logits.shape[0], -1).mean(dim=1)


def hinge_real_per_sample(logits: Tensor) -> Tensor:
    """[B]: mean over a sample's logits of relu(1 − l)."""
    return _per_sample_mean(torch.relu(1.0 - logits.float()))


def hinge_fake_per_sample(logits: Tensor) -> Tensor:
    """[B]: mean over a sample's logits of relu(1 + l)."""
    return _per_sample_mean(torch.relu(1.0 + logits.float()))


def generator_per_sample(logits: Tensor) -> Tensor:
    """[B]: −mean over a sample's logits of l."""
    return -_per_sample_mean(logits)


def weighted_batch_mean(per_sample: Tensor, weight: Tensor | float) -> Tensor:
    """mean_b(w_b · v_b); ``weight`` is a [B] tensor or a scalar."""
    w = torch.as_tensor(weight, dtype=per_sample.dtype, device=per_sample.device)
    if w.ndim not in (0, 1) or (w.ndim == 1 and w.shape[0] != per_sample.shape[0]):
        raise ValueError(f"GAN time weight of shape {tuple(w.shape)} does not match batch {per_sample.shape[0]}")
    return (per_sample * w).mean()


def discriminator_hinge_loss(logits: Tensor, weight: Tensor | float, real: bool) -> Tensor:
    """D's weighted hinge term on real (``real=True``) or fake logits."""
    per_sample = hinge_real_per_sample(logits) if real else hinge_fake_per_sample(logits)
    return weighted_batch_mean(per_sample, weight)


def generator_hinge_loss(logits: Tensor, weight: Tensor | float) -> Tensor:
    """G's weighted adversarial term mean_b[w_b·(−mean l)], without ``gan_weight``."""
    return weighted_batch_mean(generator_per_sample(logits), weight)


def gan_time_weight(
    schedule: Schedule, tau_k: Tensor, mode: str, anchor_index: int | Tensor | None = None
) -> Tensor:
    """w(τ_k) as a float [B] tensor for ``mode`` ``paper`` or ``reference`` (module docstring).

    ``anchor_index`` is the grid index i_k of the anchor (SD3.5: 999, 749, 499, 249); it only matters for a flow
    schedule in ``reference`` mode, and selects the mis-indexed table read of the SD3.5 trainers.
    """
    if mode not in _MODES:
        raise ValueError(f"gan.time_weight: {mode!r} is not one of {', '.join(_MODES)}")
    tau_k = torch.as_tensor(tau_k)
    if tau_k.ndim == 0:
        tau_k = tau_k.reshape(1)
    if isinstance(schedule, DDPMSchedule):
        alpha_bar = schedule.alpha_bar(tau_k, like=tau_k).reshape(-1)
        w = alpha_bar if mode == "paper" else alpha_bar.sqrt()
        return w.float().to(tau_k.device)
    sigma = tau_k.double()
    if mode == "reference" and anchor_index is not None:
        idx = torch.as_tensor(anchor_index, dtype=torch.long).reshape(-1).expand(sigma.shape[0])
        flipped = schedule.tau_from_index(schedule.num_train_timesteps - 1 - idx.cpu(), apply_shift=True)
        return (flipped.double() ** 2).float().to(tau_k.device)
    return ((1.0 - sigma) ** 2).float()


def reference_anchor_indices(family: TeacherFamily, schedule: Schedule, anchors: Tensor) -> list[int] | None:
    """The ``anchor_index`` of each anchor for :func:`gan_time_weight`: the grid index nearest to τ_k (SD3.5 with
    the preset anchors: 999, 749, 499, 249) when the family's own class declares ``gan_reference_misindexed`` (not
    inherited) and the schedule is a flow one, else ``None`` (DDPM, FLUX: the reference weight needs no index)."""
    if isinstance(schedule, DDPMSchedule) or not vars(type(family)).get("gan_reference_misindexed", False):
        return None
    from senseflow.method.isg import anchor_grid_indices

    return [int(i) for i in anchor_grid_indices(schedule, anchors)]

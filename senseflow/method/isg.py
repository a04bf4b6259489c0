"""ISG, intra-segment guidance (docs/method.md §8; decision 3).

One segment per iteration is supervised: the one that starts at the input anchor τ_k (k shared by the batch)
and ends at τ_{k+1} (the last segment ends at τ₄, see ``last_segment_end``). One mid-point τ_m inside the
segment is drawn per iteration from ``shared_gen`` and shared by the batch and by every rank.

With x = x_in, G's raw prediction p_θ = G(x, τ_k) (with grad) and ``step`` the schedule's deterministic move
(flow: Euler x + (σ′ − σ)·v; DDPM: DDIM x_{t′} = √ᾱ_{t′}·x̂₀ + √(1−ᾱ_{t′})·ε̂)::

    with no_grad:
        p_T   = T_guided(x, τ_k, c, s)                  teacher, guided
        x_m   = step(x, p_T, τ_k → τ_m)                 teacher move to the mid-point
        p_m   = G(x_m, τ_m, c)                          current generator, no grad
        x_tar = step(x_m, p_m, τ_m → τ_{k+1})           generator move from the mid-point
    x_dir = step(x, p_θ, τ_k → τ_{k+1})                 the generator's direct move, differentiable
    L_ISG = mean(√((x_dir − x_tar)² + c²) − c)         ``pseudo_huber`` (c = 1e-3), or mean((x_dir − x_tar)²) ``l2``

``sdxl_mode`` (config key ``method.isg.sdxl_mode``; validation allows ``reference`` for SDXL teachers only):
``"intended"`` (default) is the construction above for every schedule: for SDXL it is the paper's
"teacher τ_k → τ_m, generator τ_m → τ_{k+1}" with the generator's own ε at the mid-point (x̃₀ from ε_m).
``"reference"`` reproduces the released SDXL code (§8.2): x̃₀ = x0_from(x_m, p_T, τ_m) reuses the teacher's
prediction (so x̃₀ = x̂₀^T), the target is add_noise(x̃₀, ε̂_m, τ_{k+1}) and the direct move is
add_noise(x̂₀^G, ε̂_m, τ_{k+1}). Both share the noise term, so x_dir − x_tar = √ᾱ_{t_{k+1}}·(x̂₀^G − x̂₀^T): an x₀
regression onto the guided teacher at the same time, independent of τ_m.

Mid-points (``margin`` m, ``margin_space``):

* ``index``: the grid index space of the schedule's (shifted) table, like SD3.5:
  i_m ~ U{i_{k+1} + m … i_k − m} with i₄ = 0, τ_m = ``schedule.tau_from_index(i_m)``. Anchor indices i_k are the
  grid points nearest to τ_k (SD3.5: 999, 749, 499, 249). For DDPM the index is t itself.
* ``timestep``: integer units of N·σ (N = 1000), like FLUX: t_m ~ U{⌈Nσ_{k+1}⌉ + m … ⌊Nσ_k⌋ − m} with t₄ = 0,
  σ_m = t_m / N (FLUX k = 0 → [924, 980]). For DDPM the unit is t, so both spaces coincide.

``last_segment_end``: ``zero`` (default) ends the last segment at the clean point (σ = 0; DDPM ᾱ := 1);
``grid_start`` ends it at ``tau_from_index(0)`` like the reference (SD3.5 σ = 0.002994; SDXL t = 0).

``midpoint_model``: ``generator`` (default, the paper and the reference) takes the move τ_m → τ_{k+1} with the
current generator, p_m = G(x_m, τ_m); ``teacher`` takes it with the guided teacher, p_m = T_guided(x_m, τ_m, c, s),
so the target is a two-step teacher trajectory. The latter is **not** the paper's ISG: it is an ablation of the
mid-point model (docs/benchmarks.md, digits). Why it matters: for ``l2`` and flow the minimiser of L_ISG in
G's velocity is v_θ = a·v_T + (1 − a)·v_m with a = (σ_k − σ_m)/(σ_k − σ_{k+1}), and no loss trains G at σ_m itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from senseflow.core.condition import Condition
from senseflow.core.family import TeacherFamily
from senseflow.core.schedules import Schedule
from senseflow.method.dmd import scalar_logs
from senseflow.method.guidance import guided_prediction

__all__ = [
    "ISGOptions",
    "anchor_grid_indices",
    "segment_end",
    "midpoint_range",
    "draw_midpoint",
    "isg_trajectories",
    "isg_distance",
    "isg_loss",
]

_LOSSES = ("pseudo_huber", "l2")
_SPACES = ("index", "timestep")
_ENDS = ("zero", "grid_start")
_MODES = ("intended", "reference")
_MIDPOINT_MODELS = ("generator", "teacher")
# Tolerance, in integer units, under which N·σ counts as an integer (float32 anchors such as 0.904 give 903.99998).
_INTEGER_SNAP = 1e-3


@dataclass(frozen=True)
class ISGOptions:
    """ISG settings (config section ``isg``). ``margin``/``margin_space`` have no default: they are per teacher
    (SDXL 20/timestep, SD3.5 50/index, FLUX 20/timestep in the presets)."""

    margin: int
    margin_space: str
    loss: str = "pseudo_huber"
    huber_c: float = 1e-3
    last_segment_end: str = "zero"
    sdxl_mode: str = "intended"
    midpoint_model: str = "generator"

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("loss", self.loss, _LOSSES),
            ("margin_space", self.margin_space, _SPACES),
            ("last_segment_end", self.last_segment_end, _ENDS),
            ("sdxl_mode", self.sdxl_mode, _MODES),
            ("midpoint_model", self.midpoint_model, _MIDPOINT_MODELS),
        ):
            if value not in allowed:
                raise ValueError(f"method.isg.{name}: {value!r} is not one of {', '.join(allowed)}")
        if int(self.margin) != self.margin or self.margin < 0:
            raise ValueError(f"method.isg.margin: expected a non-negative integer, got {self.margin!r}")
        if not self.huber_c > 0:
            raise ValueError(f"method.isg.huber_c: expected > 0, got {self.huber_c!r}")

    @classmethod
    def from_config(cls, cfg: Any) -> "ISGOptions":
        """Read the options from the config section ``method.isg`` (a mapping or an attribute object such as
        :class:`senseflow.config.ISGConfig`); other keys are ignored. Every field is read from the key of its
        own name."""
        keys = {"margin": ("margin", int), "margin_space": ("margin_space", str), "loss": ("loss", str),
                "huber_c": ("huber_c", float), "last_segment_end": ("last_segment_end", str),
                "sdxl_mode": ("sdxl_mode", str), "midpoint_model": ("midpoint_model", str)}
        out = {}
        for name, (key, cast) in keys.items():
            value = cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)
            if value is not None:
                out[name] = cast(value)
        missing = [n for n in ("margin", "margin_space") if n not in out]
        if missing:
            raise ValueError(f"isg config: missing required key(s) {', '.join(missing)}")
        return cls(**out)


def _check_k(anchors: Tensor, k: int) -> None:
    if anchors.ndim != 1 or anchors.numel() == 0:
        raise ValueError(f"ISG: anchors must be a non-empty 1-D tensor of τ, got shape {tuple(anchors.shape)}")
    if not 0 <= int(k) < anchors.numel():
        raise ValueError(f"ISG: anchor index k={k} outside 0..{anchors.numel() - 1}")


def anchor_grid_indices(schedule: Schedule, anchors: Tensor) -> Tensor:
    """Grid index i of each anchor: the i whose ``tau_from_index(i)`` is nearest to τ (SD3.5 → 999, 749, 499, 249)."""
    table = schedule.tau_from_index(torch.arange(schedule.num_train_timesteps), apply_shift=True).double()
    dist = (table[None, :] - anchors.detach().cpu().double()[:, None]).abs()
    return dist.argmin(dim=1)


def _timestep_units(schedule: Schedule, tau: float) -> float:
    """τ in the integer units of ``timestep`` space: N·σ for flow, t for DDPM."""
    return float(tau) if schedule.prediction == "epsilon" else float(tau) * schedule.num_train_timesteps


def _tau_from_units(schedule: Schedule, units: Tensor) -> Tensor:
    if schedule.prediction == "epsilon":
        return units.long()
    return (units.double() / schedule.num_train_timesteps).float()


def _snap(u: float) -> float:
    r = round(u)
    return float(r) if abs(u - r) < _INTEGER_SNAP else u


def midpoint_range(schedule: Schedule, anchors: Tensor, k: int, margin: int, margin_space: str) -> tuple[int, int]:
    """Inclusive integer range {lo … hi} of the mid-point of segment k in ``margin_space`` units (§8)."""
    _check_k(anchors, k)
    if margin_space == "index":
        idx = anchor_grid_indices(schedule, anchors)
        start = int(idx[k])
        end = int(idx[k + 1]) if k + 1 < anchors.numel() else 0
        lo, hi = end + margin, start - margin
    elif margin_space == "timestep":
        t_start = _snap(_timestep_units(schedule, float(anchors[k])))
        t_end = _snap(_timestep_units(schedule, float(anchors[k + 1]))) if k + 1 < anchors.numel() else 0.0
        lo, hi = math.ceil(t_end) + margin, math.floor(t_start) - margin
    else:
        raise ValueError(f"method.isg.margin_space: {margin_space!r} is not one of {', '.join(_SPACES)}")
    if lo > hi:
        raise ValueError(
            f"ISG: segment {k} has no mid-point with margin {margin} in {margin_space} space (range {lo}..{hi})"
        )
    return lo, hi


def draw_midpoint(
    schedule: Schedule, anchors: Tensor, k: int, options: ISGOptions, shared_gen: torch.Generator
) -> Tensor:
    """One τ_m (0-dim: σ for flow, long t for DDPM) drawn uniformly from :func:`midpoint_range` with ``shared_gen``."""
    lo, hi = midpoint_range(schedule, anchors, k, options.margin, options.margin_space)
    u = torch.randint(lo, hi + 1, (), generator=shared_gen)
    if options.margin_space == "index":
        return schedule.tau_from_index(u.reshape(1), apply_shift=True).reshape(())
    return _tau_from_units(schedule, u)


def segment_end(schedule: Schedule, anchors: Tensor, k: int, last_segment_end: str, like: Tensor) -> Tensor:
    """τ_{k+1} as a [B] tensor; after the last anchor: the clean end (``zero``) or ``tau_from_index(0)``
    (``grid_start``)."""
    _check_k(anchors, k)
    b = like.shape[0]
    if k + 1 < anchors.numel():
        return anchors[k + 1].to(like.device).expand(b)
    if last_segment_end == "zero":
        return schedule.final_tau(like)
    if last_segment_end == "grid_start":
        return schedule.tau_from_index(torch.zeros(1, dtype=torch.long), apply_shift=True).to(like.device).expand(b)
    raise ValueError(f"method.isg.last_segment_end: {last_segment_end!r} is not one of {', '.join(_ENDS)}")


def isg_trajectories(
    family: TeacherFamily,
    schedule: Schedule,
    generator_net: nn.Module,
    teacher: nn.Module,
    x_in: Tensor,
    pred_theta: Tensor,
    tau_k: Tensor,
    tau_m: Tensor,
    tau_next: Tensor,
    cond: Condition,
    guidance_scale: float,
    sdxl_mode: str = "intended",
    midpoint_model: str = "generator",
    guidance_kind: str | None = None,
) -> tuple[Tensor, Tensor]:
    """(x_dir, x_tar) of the module docstring for given per-sample times τ_k, τ_m, τ_{k+1} (all [B]).

    x_dir carries the gradient of ``pred_theta``; x_tar is computed without grad. Both are fp32. The teacher is
    guided with ``guidance_scale`` in ``guidance_kind`` (config ``isg.guidance.kind``; None: the teacher folder's).
    """
    if sdxl_mode not in _MODES:
        raise ValueError(f"method.isg.sdxl_mode: {sdxl_mode!r} is not one of {', '.join(_MODES)}")
    if midpoint_model not in _MIDPOINT_MODELS:
        raise ValueError(f"method.isg.midpoint_model: {midpoint_model!r} is not one of {', '.join(_MIDPOINT_MODELS)}")
    x = x_in.detach().float()
    with torch.no_grad():
        pred_t = guided_prediction(family, teacher, x, tau_k, cond, guidance_scale, guidance_kind).float()
        x_m = schedule.step(x, pred_t, tau_k, tau_m).float()
        if midpoint_model == "generator":
            pred_m = family.predict(generator_net, x_m, tau_m, cond).float()
        else:
            pred_m = guided_prediction(family, teacher, x_m, tau_m, cond, guidance_scale, guidance_kind).float()
        if sdxl_mode == "intended":
            x_tar = schedule.step(x_m, pred_m, tau_m, tau_next)
        else:
            x0_tilde = schedule.x0_from(x_m, pred_t, tau_m)
            eps_m = schedule.eps_from(x_m, pred_m, tau_m)
            x_tar = schedule.add_noise(x0_tilde, eps_m, tau_next)
    if sdxl_mode == "intended":
        x_dir = schedule.step(x, pred_theta.float(), tau_k, tau_next)
    else:
        x_dir = schedule.add_noise(schedule.x0_from(x, pred_theta.float(), tau_k), eps_m, tau_next)
    return x_dir.float(), x_tar.float().detach()


def isg_distance(x_dir: Tensor, x_tar: Tensor, loss: str, huber_c: float) -> Tensor:
    """mean(√(d² + c²) − c) (``pseudo_huber``) or mean(d²) (``l2``) with d = x_dir − x_tar."""
    d = x_dir.float() - x_tar.float()
    if loss == "pseudo_huber":
        return (torch.sqrt(d * d + huber_c * huber_c) - huber_c).mean()
    if loss == "l2":
        return (d * d).mean()
    raise ValueError(f"method.isg.loss: {loss!r} is not one of {', '.join(_LOSSES)}")


def isg_loss(
    family: TeacherFamily,
    schedule: Schedule,
    generator_net: nn.Module,
    teacher: nn.Module,
    x_in: Tensor,
    pred_theta: Tensor,
    k: int,
    anchors: Tensor,
    cond: Condition,
    guidance_scale: float,
    options: ISGOptions | Any,
    shared_gen: torch.Generator | None,
    keep_images: bool = False,
    tau_mid: Tensor | None = None,
    guidance_kind: str | None = None,
) -> tuple[Tensor, dict]:
    """L_ISG for the segment starting at anchor ``k`` (shared by the batch); ``pred_theta`` = G(x_in, τ_k) with grad.

    ``options`` is an :class:`ISGOptions` or a config node with its fields. τ_m is ``tau_mid`` when given (drawn
    once per iteration by the caller, shared by its micro-batches), else drawn here from ``shared_gen``. The
    teacher is guided in ``guidance_kind`` (config ``isg.guidance.kind``; None: the teacher folder's own kind).
    """
    opts = options if isinstance(options, ISGOptions) else ISGOptions.from_config(options)
    _check_k(anchors, k)
    b = x_in.shape[0]
    if tau_mid is None:
        if shared_gen is None:
            raise ValueError("isg_loss: pass tau_mid or the shared generator to draw it from")
        tau_mid = draw_midpoint(schedule, anchors, k, opts, shared_gen)
    tau_m = tau_mid
    tau_k = anchors[k].to(x_in.device).expand(b)
    tau_m_b = tau_m.to(x_in.device).expand(b)
    tau_next = segment_end(schedule, anchors, k, opts.last_segment_end, x_in)
    x_dir, x_tar = isg_trajectories(
        family, schedule, generator_net, teacher, x_in, pred_theta, tau_k, tau_m_b, tau_next, cond,
        guidance_scale, sdxl_mode=opts.sdxl_mode, midpoint_model=opts.midpoint_model, guidance_kind=guidance_kind,
    )
    loss = isg_distance(x_dir, x_tar, opts.loss, opts.huber_c)
    diff = (x_dir.detach() - x_tar).abs().mean()
    logs: dict[str, Any] = scalar_logs(loss=loss, tau_mid=tau_m.double(), diff_abs_mean=diff)
    logs["guidance_scale"] = float(guidance_scale)
    if keep_images:
        logs.update({"image/x_dir": x_dir.detach(), "image/x_tar": x_tar})
    return loss, logs

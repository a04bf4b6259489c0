"""Where a distilled digits student loses to its teacher: two measurements on the evaluator's prompt/noise set.

Research tooling (not part of the ``senseflow`` package): the functions behind ``tools/diagnose_digits.py``,
imported from this folder by that script and by ``tests/test_digits_diagnose.py``.

**Hand-over FD-T.** On the student's K anchors τ₀ > … > τ_{K−1} (τ_K the clean end), the guided teacher takes the
first j Euler steps and the student the remaining K − j::

    x ← ε;  for k < K:  v = v_T^s(x, τ_k) if k < j else v_G(x, τ_k);  x ← x + (τ_{k+1} − τ_k)·v

j = 0 is the student's Euler sampler ("Ours (Euler)"), j = K the teacher's K-step Euler with CFG s. FD-T of each j
locates the anchor whose step costs the gap: if FD-T stays flat for j < K and drops only at j = K, the student's
last step alone (τ_{K−1} → 0) accounts for it.

**Velocity error along the guided teacher's ODE.** With x_σ the states of the teacher's n-step guided Euler
trajectory (CFG s, shifted grid) started from the evaluator's noise, and at each requested σ the grid point nearest
to it::

    e_G(σ)  = mean ‖v_G(x_σ, σ)   − v_T^s(x_σ, σ)‖²   (the student)
    e_1(σ)  = mean ‖v_T^1(x_σ, σ) − v_T^s(x_σ, σ)‖²   (the teacher without guidance = the student's initialisation)

e_G < e_1 means the student has baked part of the guidance in at σ; e_G > e_1 means it moved away from the guided
teacher there. This matters between the anchors too: ISG's target (docs/method.md §8.1) is
x + (σ_m − σ_k)·v_T^s + (σ_{k+1} − σ_m)·v_G(x_m, σ_m), whose L2 minimiser in v_θ is the mix
a·v_T^s + (1 − a)·v_G(σ_m) with a = (σ_k − σ_m)/(σ_k − σ_{k+1}); no loss trains G at σ_m itself.

**The supervised bound.** G (initialised from the teacher, like the distilled student) regressed directly onto the
guided teacher's velocity at the anchors, on states of the teacher's own guided Euler trajectory::

    k ~ U{0..K−1};  x ← guided-teacher Euler from ε over τ₀ … τ_k;  L = mean ‖v_G(x, τ_k) − v_T^s(x, τ_k)‖²

with AdamW, a cosine decay to 0 and gradient clipping at 1. Its 4-step Euler sampler converges to the teacher's
4-step Euler *from above* (at L = 0 the two are the same function), so its FD-T after n steps bounds from below
what baking the guidance in costs at a budget of n generator steps; beating the teacher's 4-step Euler needs a
target better than the guided teacher's own one-step velocity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from senseflow.benchmark import Evaluator

__all__ = ["VelocityError", "handover_sample", "handover_fdt", "velocity_errors", "guided_regression",
           "diagnosis_markdown"]


@dataclass(frozen=True)
class VelocityError:
    """e_G(σ) and e_1(σ) of the module docstring at the trajectory's grid point ``sigma``."""

    sigma: float
    student: float
    unguided_teacher: float


@torch.no_grad()
def handover_sample(ev: Evaluator, student: nn.Module, teacher_steps: int, cond, latents: Tensor) -> Tensor:
    """Euler on the student's anchors: the guided teacher for the first ``teacher_steps`` steps, then the student."""
    anchors = ev.anchors(ev.spec.student_steps)
    k_total = anchors.numel()
    if not 0 <= teacher_steps <= k_total:
        raise ValueError(f"teacher_steps must be in 0..{k_total}, got {teacher_steps}")
    fam, sch, x = ev.family, ev.schedule, latents
    b = x.shape[0]
    for k in range(k_total):
        tau = anchors[k].expand(b)
        tau_next = anchors[k + 1].expand(b) if k + 1 < k_total else sch.final_tau(x)
        if k < teacher_steps:
            v = fam.guided_predict(ev.teacher, x, tau, cond, ev.spec.teacher_guidance)
        else:
            v = fam.predict(student, x, tau, cond)
        x = sch.step(x, v, tau, tau_next.to(tau.dtype))
    return x


def handover_fdt(ev: Evaluator, student: nn.Module) -> list[tuple[int, float]]:
    """[(j, FD-T)] for j = 0..K teacher steps before the student takes over (module docstring)."""
    from senseflow.digits.metrics import fd_between

    reference = ev.build_reference()
    out = []
    for j in range(ev.spec.student_steps + 1):
        images, _ = ev.sample_set(lambda c, x, g, j=j: handover_sample(ev, student, j, c, x))
        out.append((j, fd_between(images, reference)))
    return out


@torch.no_grad()
def velocity_errors(ev: Evaluator, student: nn.Module, sigmas: Sequence[float], trajectory_steps: int = 56,
                    batch: int | None = None) -> list[VelocityError]:
    """e_G(σ) and e_1(σ) (module docstring) on the first ``batch`` prompts (default all) of the evaluator's set."""
    if trajectory_steps < 1:
        raise ValueError(f"trajectory_steps must be ≥ 1, got {trajectory_steps}")
    fam, sch, s = ev.family, ev.schedule, ev.spec.teacher_guidance
    n = len(ev.prompts) if batch is None else min(int(batch), len(ev.prompts))
    cond, x = ev.cond.index(slice(0, n)), ev.noise[:n].clone()
    grid = ev.anchors(trajectory_steps)
    wanted = {int(torch.argmin((grid - float(sig)).abs())) for sig in sigmas}
    out = []
    for k in range(grid.numel()):
        tau = grid[k].expand(n)
        v_guided = fam.guided_predict(ev.teacher, x, tau, cond, s)
        if k in wanted:
            e_g = float(((fam.predict(student, x, tau, cond) - v_guided) ** 2).mean())
            e_1 = float(((fam.predict(ev.teacher, x, tau, cond) - v_guided) ** 2).mean())
            out.append(VelocityError(float(grid[k]), e_g, e_1))
        tau_next = grid[k + 1].expand(n) if k + 1 < grid.numel() else sch.final_tau(x)
        x = sch.step(x, v_guided, tau, tau_next.to(tau.dtype))
    return out


def guided_regression(ev: Evaluator, steps: int, lr: float, batch_size: int, seed: int = 0,
                      eval_at: Sequence[int] = (), max_grad_norm: float = 1.0,
                      weight_decay: float = 0.0) -> tuple[nn.Module, list[tuple[int, float]]]:
    """The supervised bound of the module docstring: returns G after ``steps`` steps and [(step, FD-T of its Euler
    sampler)] at each step in ``eval_at``. Prompts use the evaluator's suite's template; noise comes from ``seed``."""
    from senseflow.digits.data import caption
    from senseflow.digits.metrics import fd_between

    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(
            f"guided_regression: steps, batch_size ≥ 1 and lr > 0 expected, got {steps}, {batch_size}, {lr}"
        )
    fam, sch, s = ev.family, ev.schedule, ev.spec.teacher_guidance
    anchors = ev.anchors(ev.spec.student_steps)
    student = fam.build_student(ev.teacher).train().requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=weight_decay)
    prompts = fam.encode_prompts([caption(d, ev.suite.template) for d in range(10)])
    gen = torch.Generator().manual_seed(int(seed))
    shape = (batch_size, *ev.noise.shape[1:])
    curve, scored = [], set(eval_at)
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / steps))
        cond = prompts.index(torch.randint(0, 10, (batch_size,), generator=gen))
        k = int(torch.randint(0, anchors.numel(), (), generator=gen))
        with torch.no_grad():
            x = torch.randn(shape, generator=gen)
            for j in range(k):
                tau = anchors[j].expand(batch_size)
                x = sch.step(x, fam.guided_predict(ev.teacher, x, tau, cond, s), tau, anchors[j + 1].expand(batch_size))
            tau = anchors[k].expand(batch_size)
            target = fam.guided_predict(ev.teacher, x, tau, cond, s)
        loss = ((fam.predict(student, x, tau, cond) - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm)
        opt.step()
        if step in scored:
            student.eval()
            images, _ = ev.student_images(student, "euler")
            curve.append((step, fd_between(images, ev.build_reference())))
            student.train()
    return student.eval().requires_grad_(False), curve


def diagnosis_markdown(handover: Sequence[tuple[int, float]], errors: Sequence[VelocityError]) -> str:
    """Both measurements as markdown tables."""
    k = max(j for j, _ in handover) if handover else 0
    lines = ["| guided-teacher Euler steps before the student takes over | FD-T |", "|---:|---:|"]
    for j, fdt in handover:
        label = f"{j} (student's Euler sampler)" if j == 0 else f"{j} (teacher {k}-step Euler)" if j == k else str(j)
        lines.append(f"| {label} | {fdt:.1f} |")
    lines += ["",
              "| σ (on the guided teacher's trajectory) | student ‖v_G − v_T^s‖² "
              "| unguided teacher ‖v_T^1 − v_T^s‖² |",
              "|---:|---:|---:|"]
    lines += [f"| {e.sigma:.3f} | {e.student:.4f} | {e.unguided_teacher:.4f} |" for e in errors]
    return "\n".join(lines) + "\n"

"""Few-step samplers of the generator and backward simulation, for any family and schedule (docs/method.md §4, §16.3).

Anchors τ₀ > τ₁ > … > τ_{K−1} (σ for flow models, integer t for SDXL) and τ_K := the clean end point
(σ = 0, or ᾱ = 1 for DDPM). Let P(x, τ) be the raw prediction of the network (v or ε) and x̂₀(x, τ) the clean
estimate the schedule derives from it.

* **Stochastic ("Ours", DMD-style)**: x ← ε; for k = 0..K−1: x̂₀ ← x̂₀(x, τ_k); x ← renoise(x̂₀, fresh ε, τ_{k+1})
  for k < K−1; output x̂₀.
* **Euler ("Ours (Euler)", deterministic)**: x ← ε; for k = 0..K−1: x ← step(x, P(x, τ_k), τ_k → τ_{k+1});
  output x (flow: x + (σ_{k+1} − σ_k)·v; DDPM: the DDIM move √ᾱ'·x̂₀ + √(1−ᾱ')·ε̂, i.e. Euler in σ-space,
  exactly what ``EulerDiscreteScheduler`` does at the same timesteps).
* **Backward simulation** (§4.2 a): the stochastic sampler stopped after k steps, under no_grad; k = 0 returns
  the pure noise.

Both samplers start from pure noise ε (for SDXL the UNet input at t = 999 is ε itself, as in the reference).
All noise comes from ``noise_gen`` in a fixed order (initial ε, then one fresh ε per re-noising), so the
stochastic sampler with K steps and backward simulation with k = K give the same result for the same generator
state. ``guidance_scale`` (optional) samples the *teacher* through ``family.guided_predict`` in its folder's guidance
kind (CFG for SDXL/SD3 and a FLUX without a guidance embedder, the distilled-guidance embedding for FLUX.1-dev); the
student takes none.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from senseflow.core import rng
from senseflow.core.condition import Condition
from senseflow.core.family import TeacherFamily
from senseflow.core.schedules import Schedule

__all__ = [
    "initial_noise",
    "sample_stochastic",
    "sample_euler",
    "backward_simulate",
    "Sampler",
    "SAMPLERS",
    "get_sampler",
]

#: a few-step sampler: ``(family, net, cond, anchors, noise_gen, shape, *, latents, guidance_scale, schedule)`` → the
#: clean latents (:func:`sample_stochastic`, :func:`sample_euler`)
Sampler = Callable[..., Tensor]


# ---- helpers -------------------------------------------------------------------------------------------------

def initial_noise(shape: Sequence[int], noise_gen: rng.NoiseSource, device: torch.device | str,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """ε ~ N(0, I) of ``shape`` drawn on the generator's device, then moved to ``device`` (so a CPU generator gives
    the same noise whatever the accelerator, as in diffusers' ``randn_tensor``)."""
    return rng.randn(tuple(shape), noise_gen, device=device, dtype=dtype)


def _schedule_for(family: TeacherFamily, shape: Sequence[int]) -> Schedule:
    """The family's schedule at the pixel size of latents of ``shape`` (FLUX's shift depends on it)."""
    f = int(getattr(family, "vae_scale_factor", 1))
    return family.schedule(int(shape[-2]) * f, int(shape[-1]) * f)


def _prepare(family: TeacherFamily, cond: Condition, anchors: Tensor | Sequence[float], noise_gen: rng.NoiseSource,
             shape: Sequence[int] | None, latents: Tensor | None,
             schedule: Schedule | None) -> tuple[Tensor, Tensor, Schedule]:
    device = cond.pooled.device
    if latents is None:
        if shape is None:
            raise ValueError("pass either the latent shape (B, C, h, w) or the initial noise latents")
        if noise_gen is None:
            raise ValueError("sampling from noise needs a noise_gen torch.Generator")
        if shape[0] != len(cond):
            raise ValueError(f"latent batch {shape[0]} does not match the condition batch {len(cond)}")
        latents = initial_noise(shape, noise_gen, device)
    taus = torch.as_tensor(anchors, device=latents.device)
    if taus.ndim != 1 or taus.numel() == 0:
        raise ValueError(f"anchors must be a non-empty 1-D sequence τ₀ > τ₁ > …, got shape {tuple(taus.shape)}")
    return latents, taus, schedule or _schedule_for(family, latents.shape)


def _predict(family: TeacherFamily, net: nn.Module, x: Tensor, tau: Tensor, cond: Condition,
             guidance_scale: float | Tensor | None) -> Tensor:
    if guidance_scale is None:
        return family.predict(net, x, tau, cond)
    return family.guided_predict(net, x, tau, cond, guidance_scale)


def _tau(anchors: Tensor, k: int, batch: int) -> Tensor:
    return anchors[k].expand(batch)


# ---- samplers ------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_stochastic(
    family: TeacherFamily,
    net: nn.Module,
    cond: Condition,
    anchors: Tensor | Sequence[float],
    noise_gen: rng.NoiseSource = None,
    shape: Sequence[int] | None = None,
    *,
    latents: Tensor | None = None,
    guidance_scale: float | Tensor | None = None,
    schedule: Schedule | None = None,
) -> Tensor:
    """The re-noising few-step sampler: x ← ε; x̂₀ ← x̂₀(x, τ_k); x ← renoise(x̂₀, fresh ε, τ_{k+1}); output x̂₀.

    ``shape`` = (B, C, h, w) of unpacked latents (noise from ``noise_gen``), or ``latents`` = the initial noise.
    ``schedule`` defaults to ``family.schedule`` at the latents' pixel size.
    """
    x, taus, schedule = _prepare(family, cond, anchors, noise_gen, shape, latents, schedule)
    b = x.shape[0]
    x0 = x
    for k in range(taus.numel()):
        tau = _tau(taus, k, b)
        x0 = schedule.x0_from(x, _predict(family, net, x, tau, cond, guidance_scale), tau)
        if k + 1 < taus.numel():
            eps = initial_noise(x.shape, noise_gen, x.device, x.dtype)
            x = schedule.renoise(x0, eps, _tau(taus, k + 1, b))
    return x0


@torch.no_grad()
def sample_euler(
    family: TeacherFamily,
    net: nn.Module,
    cond: Condition,
    anchors: Tensor | Sequence[float],
    noise_gen: rng.NoiseSource = None,
    shape: Sequence[int] | None = None,
    *,
    latents: Tensor | None = None,
    guidance_scale: float | Tensor | None = None,
    schedule: Schedule | None = None,
) -> Tensor:
    """The deterministic few-step ODE sampler: x ← ε; x ← step(x, P(x, τ_k), τ_k → τ_{k+1}) with τ_K the clean end.

    Same arguments as :func:`sample_stochastic`. Reproduces the stock pipelines (see tests/test_sampling.py):
    FLUX ``FluxPipeline(num_inference_steps=K)``; SD3.5 ``sigmas=flow_anchor_grid(K)``; SDXL ``timesteps=anchors``
    with ``EulerDiscreteScheduler``.
    """
    x, taus, schedule = _prepare(family, cond, anchors, noise_gen, shape, latents, schedule)
    b = x.shape[0]
    for k in range(taus.numel()):
        tau = _tau(taus, k, b)
        tau_next = _tau(taus, k + 1, b) if k + 1 < taus.numel() else schedule.final_tau(x)
        x = schedule.step(x, _predict(family, net, x, tau, cond, guidance_scale), tau, tau_next.to(tau.dtype))
    return x


@torch.no_grad()
def backward_simulate(
    family: TeacherFamily,
    net: nn.Module,
    cond: Condition,
    anchors: Tensor | Sequence[float],
    k: int,
    noise_gen: rng.NoiseSource,
    shape: Sequence[int],
    *,
    schedule: Schedule | None = None,
) -> Tensor:
    """Backward simulation (§4.2 a): the clean estimate after k generator steps from pure noise (no grad).

    x̂ ← ε; for j = 0..k−1: x_j = renoise(x̂, fresh ε, τ_j) (x₀ = ε itself, τ₀ being pure noise);
    x̂ ← x̂₀(G(x_j, τ_j)). Returns x̂, i.e. the pure noise ε when k = 0.
    """
    anchors_t = torch.as_tensor(anchors)
    if not 0 <= int(k) <= anchors_t.numel():
        raise ValueError(f"backward simulation step count k={k} must be in [0, {anchors_t.numel()}]")
    k = int(k)
    if k == 0:
        return initial_noise(shape, noise_gen, cond.pooled.device)
    return sample_stochastic(family, net, cond, anchors_t[:k], noise_gen, shape, schedule=schedule)


# ---- registry ------------------------------------------------------------------------------------------------

#: the few-step samplers of docs/method.md §16.3 by name (``--sampler``, ``generation.student.sampler``), the default
#: first: ``stochastic`` ("Ours") and ``euler`` ("Ours (Euler)"). Both take the same arguments; the Euler sampler
#: draws nothing, so a ``noise_gen`` given with ``latents`` is unused by it.
SAMPLERS: dict[str, Sampler] = {"stochastic": sample_stochastic, "euler": sample_euler}


def get_sampler(name: str) -> Sampler:
    """The sampler registered as ``name`` (:data:`SAMPLERS`)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} is unknown (expected one of: {', '.join(SAMPLERS)})")
    return SAMPLERS[name]

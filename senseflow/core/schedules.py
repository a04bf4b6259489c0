"""Noise schedules: every formula that differs between DDPM (SDXL) and flow-matching (SD3.5, FLUX) teachers.

Notation (docs/method.md §1.1). A per-sample "time" τ is a tensor of shape [B]:

* flow models: τ = σ ∈ [0, 1],  x_σ = (1 − σ)·x₀ + σ·ε,  the network predicts v ≈ ε − x₀,
  x̂₀ = x_σ − σ·v,  Euler move σ → σ′:  x_σ′ = x_σ + (σ′ − σ)·v;
* DDPM (ε-prediction): τ = t ∈ {0..N−1},  x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε,
  x̂₀ = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t (float64), and the deterministic (DDIM ≡ Euler in σ-space) move
  x_t′ = √ᾱ_t′·x̂₀ + √(1−ᾱ_t′)·ε̂ with ᾱ_{−1} := 1.

Both schedules share one integer "grid index" i ∈ {0..N−1} (ascending noise) used by the timestep samplers of
§5/§6, the anchors of §4.1 and ISG's mid-points (§8): flow maps i to σ = shift((i+1)/N), DDPM maps i to t = i.
The method code never branches on the teacher: it asks the schedule.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence, overload

import torch
from torch import Tensor

from senseflow.core import rng

__all__ = [
    "Schedule",
    "FlowSchedule",
    "DDPMSchedule",
    "TimestepSampler",
    "static_shift",
    "dynamic_shift",
    "flux_mu",
    "expand_like",
]


def expand_like(tau: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample [B] tensor to [B, 1, 1, ...] so it broadcasts against ``x`` (batch > 1 safe)."""
    tau = torch.as_tensor(tau, device=x.device)
    if tau.ndim == 0:
        tau = tau.expand(x.shape[0])
    return tau.reshape(tau.shape[0], *([1] * (x.ndim - 1)))


@overload
def static_shift(u: Tensor, shift: float) -> Tensor: ...
@overload
def static_shift(u: float, shift: float) -> float: ...
def static_shift(u: Tensor | float, shift: float) -> Tensor | float:
    """SD3 static shift s(u) = shift·u / (1 + (shift − 1)·u); s₃(u) = 3u/(1+2u)."""
    return shift * u / (1 + (shift - 1) * u)


@overload
def dynamic_shift(u: Tensor, mu: float) -> Tensor: ...
@overload
def dynamic_shift(u: float, mu: float) -> float: ...
def dynamic_shift(u: Tensor | float, mu: float) -> Tensor | float:
    """FLUX resolution-dependent shift σ = e^μ / (e^μ + (1/u − 1)) (the exponential time shift with exponent 1)."""
    if isinstance(u, Tensor):
        return math.exp(mu) / (math.exp(mu) + (1.0 / u - 1.0))
    return math.exp(mu) / (math.exp(mu) + (1.0 / u - 1.0)) if u > 0 else 0.0


def flux_mu(image_seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float) -> float:
    """μ linear in the packed image-token count: μ(base_seq_len) = base_shift, μ(max_seq_len) = max_shift.

    FLUX.1-dev at 1024² has (1024/16)² = 4096 tokens, so μ = 1.15 and e^μ ≈ 3.1582 (docs/method.md §4.1).
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


class Schedule(ABC):
    """Common interface of the two schedule kinds. ``tau`` is always a per-sample tensor of shape [B]."""

    #: "velocity" (flow) or "epsilon" (DDPM): what the denoiser predicts.
    prediction: str
    #: number of grid points N of the training discretisation (1000 for every supported teacher).
    num_train_timesteps: int

    @abstractmethod
    def add_noise(self, x0: Tensor, eps: Tensor, tau: Tensor) -> Tensor:
        """Forward-diffuse clean latents ``x0`` to time ``tau`` with noise ``eps``."""

    @abstractmethod
    def x0_from(self, x_tau: Tensor, pred: Tensor, tau: Tensor) -> Tensor:
        """Clean estimate x̂₀ from the network's raw prediction at ``x_tau``."""

    @abstractmethod
    def eps_from(self, x_tau: Tensor, pred: Tensor, tau: Tensor) -> Tensor:
        """Noise estimate ε̂ from the network's raw prediction."""

    @abstractmethod
    def pred_from(self, x_tau: Tensor, x0: Tensor, eps: Tensor, tau: Tensor) -> Tensor:
        """The raw prediction that corresponds to (x̂₀, ε̂): v = ε − x₀ (flow) or ε (DDPM)."""

    @abstractmethod
    def step(self, x_tau: Tensor, pred: Tensor, tau: Tensor, tau_next: Tensor) -> Tensor:
        """Deterministic ODE move from ``tau`` to ``tau_next`` (flow Euler; DDPM DDIM, i.e. Euler in σ-space)."""

    @abstractmethod
    def net_timestep(self, tau: Tensor) -> Tensor:
        """The value the denoiser takes as its ``timestep`` argument."""

    @abstractmethod
    def tau_from_index(self, index: Tensor, apply_shift: bool = True) -> Tensor:
        """Map grid indices i ∈ {0..N−1} (ascending noise) to τ (σ for flow, t for DDPM)."""

    @abstractmethod
    def final_tau(self, like: Tensor) -> Tensor:
        """τ of the clean end point (σ = 0, or t = −1 meaning ᾱ := 1) for a batch shaped like ``like``."""

    def renoise(self, x0: Tensor, eps: Tensor, tau: Tensor) -> Tensor:
        """Re-noise a clean estimate to the next anchor (stochastic sampler, backward simulation)."""
        return self.add_noise(x0, eps, tau)

    def anchors(self, indices: Sequence[int] | None = None, explicit: Sequence[float] | None = None) -> Tensor:
        """Generator anchors τ₀ > τ₁ > … (docs/method.md §4.1).

        ``indices`` are grid indices (SDXL t = 999, 749, 499, 249; SD3.5 σ = s₃((i+1)/1000) = 1, .9, .75, .5;
        FLUX σ = dynamic_shift((i+1)/1000) ≈ 1, .9045, .7595, .5128 at 1024²). ``explicit`` gives τ directly
        (σ for flow, e.g. the reference's FLUX [1.0, .904, .759, .512]; t for DDPM) and wins when both are set.
        """
        if explicit is not None:
            values = torch.tensor(list(explicit), dtype=torch.float64)
            return values.long() if self.prediction == "epsilon" else values.float()
        if indices is None:
            raise ValueError("anchors need either grid indices or an explicit list")
        return self.tau_from_index(torch.tensor(list(indices)), apply_shift=True)


class FlowSchedule(Schedule):
    """Rectified flow with an optional static (SD3: shift 3) or dynamic (FLUX: μ) shift of the σ grid.

    ``timestep_scale`` converts σ to the network's timestep argument: 1000 for SD3 (it takes 1000σ), 1 for FLUX
    (it takes σ and multiplies by 1000 itself).
    """

    prediction = "velocity"

    def __init__(
        self,
        timestep_scale: float,
        shift: float = 1.0,
        mu: float | None = None,
        num_train_timesteps: int = 1000,
    ) -> None:
        self.timestep_scale = float(timestep_scale)
        self.shift = float(shift)
        self.mu = mu
        self.num_train_timesteps = int(num_train_timesteps)

    def shifted(self, u: Tensor) -> Tensor:
        """Apply this schedule's shift to unshifted σ values u ∈ (0, 1]."""
        if self.mu is not None:
            return dynamic_shift(u, self.mu)
        return static_shift(u, self.shift)

    def add_noise(self, x0: Tensor, eps: Tensor, tau: Tensor) -> Tensor:
        s = expand_like(tau, x0).to(x0.dtype)
        return (1 - s) * x0 + s * eps

    def x0_from(self, x_tau: Tensor, pred: Tensor, tau: Tensor) -> Tensor:
        return x_tau - expand_like(tau, x_tau).to(x_tau.dtype) * pred

    def eps_from(self, x_tau: Tensor, pred: Tensor, tau: Tensor) -> Tensor:
        return x_tau + (1 - expand_like(tau, x_tau).to(x_tau.dtype)) * pred

    def pred_from(self, x_tau: Tensor, x0: Tensor, eps: Tensor, tau: Tensor) -> Tensor:
        return eps - x0

    def step(self, x_tau: Tensor, pred: Tensor, tau: Tensor, tau_next: Tensor) -> Tensor:
        ds = expand_like(tau_next, x_tau).to(x_tau.dtype) - expand_like(tau, x_tau).to(x_tau.dtype)
        return x_tau + ds * pred

    def net_timestep(self, tau: Tensor) -> Tensor:
        return tau * self.timestep_scale

    def tau_from_index(self, index: Tensor, apply_shift: bool = True) -> Tensor:
        u = (index.double() + 1) / self.num_train_timesteps
        sigma = self.shifted(u) if apply_shift else u
        return sigma.float()

    def final_tau(self, like: Tensor) -> Tensor:
        return torch.zeros(like.shape[0], device=like.device)

    def anchors_from_grid(self, grid: Sequence[float]) -> Tensor:
        """Anchors σ_k = shift(u_k) of an unshifted grid, e.g. SD3.5's [1, .75, .5, .25] → [1, .9, .75, .5]."""
        return self.shifted(torch.tensor(list(grid), dtype=torch.float64)).float()


class DDPMSchedule(Schedule):
    """Discrete DDPM with ε-prediction; ᾱ comes from the teacher's scheduler config (docs/method.md §1.1)."""

    prediction = "epsilon"

    def __init__(self, alphas_cumprod: Tensor) -> None:
        self.alphas_cumprod = alphas_cumprod.double()
        self.num_train_timesteps = int(alphas_cumprod.numel())

    @classmethod
    def from_scheduler_config(cls, config: dict) -> "DDPMSchedule":
        """Build ᾱ from a diffusers scheduler_config.json (``beta_schedule`` linear or scaled_linear)."""
        n = int(config.get("num_train_timesteps", 1000))
        b0, b1 = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
        kind = config.get("beta_schedule", "scaled_linear")
        if kind == "scaled_linear":
            betas = torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float64) ** 2
        elif kind == "linear":
            betas = torch.linspace(b0, b1, n, dtype=torch.float64)
        else:
            raise ValueError(
                f"scheduler config: beta_schedule {kind!r} is not supported (expected linear or scaled_linear)"
            )
        return cls(torch.cumprod(1.0 - betas, dim=0))

    def alpha_bar(self, t: Tensor, like: Tensor) -> Tensor:
        """ᾱ_t in float64 shaped to broadcast against ``like``; t = −1 means the clean end point (ᾱ = 1)."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).long()
        if t.ndim == 0:
            t = t.expand(like.shape[0])
        a = torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], torch.ones_like(self.alphas_cumprod[0]))
        return expand_like(a.to(like.device), like)

    def add_noise(self, x0: Tensor, eps: Tensor, tau: Tensor) -> Tensor:
        a = self.alpha_bar(tau, x0)
        return (a.sqrt() * x0.double() + (1 - a).sqrt() * eps.double()).to(x0.dtype)

    def x0_from(self, x_tau: Tensor, pred: Tensor, tau: Tensor) -> Tensor:
        a = self.alpha_bar(tau, x_tau)
        return ((x_tau.double() - (1 - a).sqrt() * pred.double()) / a.sqrt()).to(pred.dtype)

    def eps_from(self, x_tau: Tensor, pred: Tensor, tau: Tensor) -> Tensor:
        return pred

    def pred_from(self, x_tau: Tensor, x0: Tensor, eps: Tensor, tau: Tensor) -> Tensor:
        return eps

    def step(self, x_tau: Tensor, pred: Tensor, tau: Tensor, tau_next: Tensor) -> Tensor:
        x0 = self.x0_from(x_tau, pred, tau)
        a_next = self.alpha_bar(tau_next, x_tau)
        return (a_next.sqrt() * x0.double() + (1 - a_next).sqrt() * pred.double()).to(x_tau.dtype)

    def net_timestep(self, tau: Tensor) -> Tensor:
        return tau.long()

    def tau_from_index(self, index: Tensor, apply_shift: bool = True) -> Tensor:
        return index.long()

    def final_tau(self, like: Tensor) -> Tensor:
        return torch.full((like.shape[0],), -1, dtype=torch.long, device=like.device)


@dataclass(frozen=True)
class TimestepSampler:
    """Draws ascending grid indices i ∈ {0..N−1} for the DMD (§5) and fake-score (§6) losses.

    * ``uniform``: i ~ U{low..high} (SDXL / SD3.5 DMD: [20, 980]; SDXL fake: [0, 999]);
    * ``logit_normal``: u = sigmoid(N(mean, std)), j = ⌊N·u⌋ indexes the descending table, so i = N − 1 − j
      (FLUX DMD and fake, SD3.5 fake).
    ``apply_shift`` says whether the flow schedule's shift is applied when i becomes σ (SD3.5: yes; FLUX: no).
    """

    kind: str = "uniform"
    low: int = 0
    high: int = 999
    mean: float = 0.0
    std: float = 1.0
    apply_shift: bool = True

    def sample_index(self, batch: int, num_train_timesteps: int, generator: rng.NoiseSource = None) -> Tensor:
        if self.kind == "uniform":
            return rng.randint(self.low, self.high, (batch,), generator)
        if self.kind == "logit_normal":
            u = torch.sigmoid(self.mean + self.std * rng.randn((batch,), generator))
            j = (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
            return num_train_timesteps - 1 - j
        raise ValueError(f"timestep sampler kind {self.kind!r} is not one of: uniform, logit_normal")

    def sample(self, schedule: Schedule, batch: int, generator: rng.NoiseSource = None) -> Tensor:
        """τ for a batch: σ (flow) or t (DDPM)."""
        index = self.sample_index(batch, schedule.num_train_timesteps, generator)
        return schedule.tau_from_index(index, apply_shift=self.apply_shift)

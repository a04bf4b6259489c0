"""Toy teacher family and tiny networks for the method tests (no diffusers, no files).

``ToyFamily`` implements the prediction part of :class:`TeacherFamily` on (B, C, h, w) tensors: a net is called
as ``net(x, net_timestep(τ), pooled)``; the unconditional condition has ``pooled = 0`` and the guided prediction
is classifier-free guidance u + s·(c − u). Every call is recorded in ``family.calls`` so tests can check who
was guided.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from senseflow.core.condition import Condition
from senseflow.core.family import TeacherFamily
from senseflow.core.schedules import Schedule


class AffineField(nn.Module):
    """pred = a·x + b·t + pooled (broadcast over space): a velocity / ε field written by hand."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(a)))
        self.b = nn.Parameter(torch.tensor(float(b)))

    def forward(self, x: Tensor, t: Tensor, pooled: Tensor) -> Tensor:
        t = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        p = pooled.to(x.dtype).reshape(pooled.shape[0], -1, *([1] * (x.ndim - 2)))
        return self.a * x + self.b * t + p


class OracleX0(nn.Module):
    """A net whose clean estimate is always ``target``: returns the raw prediction that makes x0_from(x, pred, τ)
    equal ``target`` (flow: v = (x − target)/σ; DDPM: ε = (x − √ᾱ·target)/√(1 − ᾱ))."""

    def __init__(self, schedule: Schedule, target: Tensor) -> None:
        super().__init__()
        self.schedule = schedule
        self.register_buffer("target", target)
        self.scale = nn.Parameter(torch.ones(()))  # one trainable parameter so it can be "trained"

    def forward(self, x: Tensor, t: Tensor, pooled: Tensor) -> Tensor:
        s = self.schedule
        if s.prediction == "velocity":
            sigma = (t.double() / s.timestep_scale).reshape(-1, *([1] * (x.ndim - 1)))
            return ((x.double() - self.target.double()) / sigma).to(x.dtype) * self.scale
        a = s.alpha_bar(t, x)
        return ((x.double() - a.sqrt() * self.target.double()) / (1 - a).sqrt()).to(x.dtype) * self.scale


def toy_condition(batch: int, channels: int, value: float = 0.1) -> Condition:
    return Condition(prompt_embeds=torch.zeros(batch, 1, channels), pooled=torch.full((batch, channels), value))


class ToyFamily(TeacherFamily):
    name = "toy"
    denoiser_subfolder = "none"

    def __init__(self, schedule: Schedule) -> None:
        self._schedule = schedule
        self.calls: list[tuple[nn.Module, str, float | None]] = []

    def schedule(self, height: int = 0, width: int = 0) -> Schedule:
        return self._schedule

    def predict(self, net, x, tau, cond, guidance=None):
        self.calls.append((net, "predict", guidance))
        return net(x, self._schedule.net_timestep(tau), cond.pooled)

    def guided_predict(self, net, x, tau, cond, scale, kind=None):
        if kind not in (None, "cfg"):
            raise ValueError(f"toy: guidance kind {kind!r} is not cfg")
        self.calls.append((net, "guided", float(scale)))
        t = self._schedule.net_timestep(tau)
        u = net(x, t, self.unconditional(x.shape[0]).pooled.to(x.device))
        c = net(x, t, cond.pooled)
        return u + float(scale) * (c - u)

    def unconditional(self, batch: int) -> Condition:
        return Condition(prompt_embeds=torch.zeros(batch, 1, 1), pooled=torch.zeros(batch, 1))

    # ---- not needed by the method tests ----
    def load_denoiser(self, dtype=None):
        raise NotImplementedError

    def build_student(self, teacher):
        raise NotImplementedError

    def encode_prompts(self, prompts, original_sizes=None, crop_coords=None):
        raise NotImplementedError

    def latent_shape(self, height, width):
        raise NotImplementedError

    def encode_pixels(self, pixels, generator=None):
        raise NotImplementedError

    def decode_latents(self, latents):
        raise NotImplementedError

"""Optimisers and LR schedules of the three players (METHOD.md §3.4, §3.7)."""
from __future__ import annotations

import importlib.util
import math
from typing import Any, Iterable

import torch
from torch import nn


def require_optimizer_backend(name: str) -> None:
    """Fail before any model loads when ``optimizer.name`` needs a package that is not installed."""
    if name == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            "optimizer.name=adamw8bit needs bitsandbytes (pip install bitsandbytes, CUDA only); "
            "set optimizer.name=adamw to use torch.optim.AdamW"
        )


def build_optimizer(params: Iterable[nn.Parameter], lr: float, cfg: Any) -> torch.optim.Optimizer:
    """AdamW (torch) or 8-bit AdamW (bitsandbytes, when installed and ``optimizer.name: adamw8bit``)."""
    params = [p for p in params if p.requires_grad]
    kwargs = dict(lr=lr, betas=tuple(cfg.betas), eps=float(cfg.eps), weight_decay=float(cfg.weight_decay))
    if cfg.name == "adamw8bit":
        require_optimizer_backend(cfg.name)
        import bitsandbytes as bnb  # type: ignore

        return bnb.optim.AdamW8bit(params, **kwargs)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    raise ValueError(f"optimizer.name: {cfg.name!r} is not one of adamw, adamw8bit")


def warmup_lambda(lr: float, lr_start: float, warmup_steps: int, decay: str = "none", decay_steps: int = 0,
                  end_factor: float = 0.0):
    """Multiplier m(n) of the base LR at scheduler step n (one step per training iteration, §1.3).

    Warm-up: m rises linearly from lr_start/lr to 1 over ``warmup_steps``. Then ``decay``:
    ``none`` keeps m = 1 (with the presets' lr_start = lr = 1e-6 this is the reference's constant 1e-6, §3.7);
    ``cosine`` follows m = f + (1 − f)·½(1 + cos(π·min(n − W, D)/D)) from 1 down to f = ``end_factor`` over
    D = ``decay_steps`` iterations after the warm-up W, and stays at f afterwards.
    """
    start_ratio = lr_start / lr if lr > 0 else 1.0
    if decay not in ("none", "cosine"):
        raise ValueError(f"optimizer.decay: {decay!r} is not one of none, cosine")
    if decay == "cosine" and decay_steps <= 0:
        raise ValueError(f"optimizer.decay_steps must be > 0 with optimizer.decay=cosine, got {decay_steps}")

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return start_ratio + (1.0 - start_ratio) * step / warmup_steps
        if decay == "none":
            return 1.0
        progress = min(step - max(warmup_steps, 0), decay_steps) / decay_steps
        return end_factor + (1.0 - end_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(opt: torch.optim.Optimizer, lr: float, cfg: Any) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_lambda(lr, float(cfg.lr_start), int(cfg.warmup_steps), str(cfg.decay), int(cfg.decay_steps),
                           float(cfg.lr_end_factor)))


class EMA:
    """Exponential moving average of the generator: θ̄ ← d·θ̄ + (1 − d)·θ, by parameter name (fp32)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n, t in state.items():
            self.shadow[n].copy_(t)

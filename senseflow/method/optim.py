"""Optimisers and LR schedules of the three players (docs/method.md §3.4, §3.7)."""
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
    b1, b2 = (float(b) for b in cfg.betas)
    kwargs: dict[str, Any] = dict(lr=lr, betas=(b1, b2), eps=float(cfg.eps), weight_decay=float(cfg.weight_decay))
    if cfg.name == "adamw8bit":
        require_optimizer_backend(cfg.name)
        import bitsandbytes as bnb

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
    """Exponential moving average of the generator, by parameter name (fp32 shadow θ̄).

    After the n-th generator step (n = 1, 2, ...): θ̄ ← d_n·θ̄ + (1 − d_n)·θ with d_n = min(d, (1 + n)/(w + n)) when
    ``warmup`` w > 0 (so early averages are not dominated by the initial weights, here the teacher's), else d_n = d.
    ``num_updates`` n is part of the trainer's checkpointed state.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: float = 0.0) -> None:
        self.decay, self.warmup, self.num_updates = float(decay), float(warmup), 0
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        """d_n for the next update (n = ``num_updates`` + 1)."""
        n = self.num_updates + 1
        return min(self.decay, (1.0 + n) / (self.warmup + n)) if self.warmup > 0 else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1.0 - decay)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n, t in state.items():
            self.shadow[n].copy_(t)

    def full_weights(self, full_model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``full_model_state`` (the consolidated generator) with every averaged parameter replaced by θ̄.

        A collective under FSDP2: every rank gathers each sharded θ̄; ranks whose consolidated state is empty (all
        but rank 0 with a CPU-offloaded full state dict) get an empty dict back. Dtypes follow ``full_model_state``.
        """
        gathered = {n: (t.full_tensor() if hasattr(t, "full_tensor") else t) for n, t in self.shadow.items()}
        if not full_model_state:
            return {}
        missing = sorted(set(gathered) - set(full_model_state))
        if missing:
            raise KeyError(f"EMA parameters not in the generator's state dict: {missing[:5]}")
        out = dict(full_model_state)
        for n, t in gathered.items():
            out[n] = t.detach().to(device="cpu", dtype=out[n].dtype)
        return out

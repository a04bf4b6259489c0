"""LR multiplier m(n) of every player (senseflow.method.optim.warmup_lambda), stepped once per iteration.

Presets keep the reference's constant LR (docs/method.md §3.7, decay none); ``optimizer.decay=cosine`` is our option
for short runs such as the digits demo: m falls from 1 to ``lr_end_factor`` over ``decay_steps`` iterations after
the warm-up.
"""
from __future__ import annotations

import math

import pytest
import torch

from senseflow.method.optim import build_scheduler, warmup_lambda


def test_constant_after_warmup_by_default():
    m = warmup_lambda(1e-4, 1e-5, 10)
    assert m(0) == pytest.approx(0.1)
    assert m(5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert [m(n) for n in (10, 11, 10_000)] == [1.0, 1.0, 1.0]


def test_cosine_decay_from_end_of_warmup_to_end_factor():
    m = warmup_lambda(1e-4, 1e-4, 4, decay="cosine", decay_steps=100, end_factor=0.1)
    assert m(4) == pytest.approx(1.0)
    assert m(4 + 50) == pytest.approx(0.1 + 0.9 * 0.5)                       # half-way: cos(π/2) = 0
    assert m(4 + 25) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert m(104) == pytest.approx(0.1) and m(5_000) == pytest.approx(0.1)     # holds the final value
    values = [m(n) for n in range(4, 105)]
    assert all(a >= b for a, b in zip(values, values[1:]))                     # monotone


def test_cosine_needs_a_length_and_unknown_kinds_are_rejected():
    with pytest.raises(ValueError, match="decay_steps"):
        warmup_lambda(1e-4, 1e-4, 0, decay="cosine", decay_steps=0)
    with pytest.raises(ValueError, match="none, cosine"):
        warmup_lambda(1e-4, 1e-4, 0, decay="linear")


def test_scheduler_from_config_section_drives_the_optimizer_lr():
    from types import SimpleNamespace

    cfg = SimpleNamespace(lr_start=1e-4, warmup_steps=0, decay="cosine", decay_steps=10, lr_end_factor=0.0)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    sched = build_scheduler(opt, 1e-4, cfg)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[5] == pytest.approx(0.5e-4)
    assert lrs[10] == pytest.approx(0.0, abs=1e-12) and lrs[11] == pytest.approx(0.0, abs=1e-12)

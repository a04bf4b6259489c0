"""DMD (docs/method.md §5), the fake-score loss (§6) and guidance scales."""
from __future__ import annotations

import pytest
import torch

from method_toys import AffineField, OracleX0, ToyFamily, toy_condition
from senseflow.core.schedules import DDPMSchedule, FlowSchedule, TimestepSampler
from senseflow.method.dmd import (
    distribution_matching_loss,
    dmd_gradient,
    dmd_loss,
    fake_score_loss,
)
from senseflow.method.guidance import draw_guidance_scale


# ---- the gradient and the loss ---------------------------------------------------------------------------------
def test_dmd_gradient_by_hand():
    """Sample 0: |x̂₀ − x_r| has mean 0.5, so g = (x_f − x_r)/0.5; sample 1: mean 2 → g = (x_f − x_r)/2."""
    x0 = torch.tensor([[[[0.0, 1.0]]], [[[2.0, -2.0]]]])  # (2, 1, 1, 2)
    xr = torch.tensor([[[[0.5, 0.5]]], [[[0.0, 0.0]]]])
    xf = torch.tensor([[[[1.5, 0.0]]], [[[4.0, 1.0]]]])
    g = dmd_gradient(x0, xf, xr, eps=1e-8)
    assert g.flatten().tolist() == pytest.approx([2.0, -1.0, 2.0, 0.5])


def test_dmd_loss_gradient_is_g_over_n_and_value_is_half_mean_g_squared():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 5, 6, generator=gen, requires_grad=True)
    g = torch.randn(3, 4, 5, 6, generator=gen)
    loss = dmd_loss(x0, g)
    loss.backward()
    n = x0.numel()
    assert torch.allclose(x0.grad, g / n, atol=1e-9)
    assert float(loss.detach()) == pytest.approx(float(0.5 * (g**2).mean()), rel=1e-6)


def test_zero_normaliser_is_guarded_not_hidden():
    x0 = torch.ones(2, 3, 4, 4)
    g = dmd_gradient(x0, fake_x0=torch.zeros_like(x0), real_x0=x0.clone(), eps=1e-6)
    assert torch.isfinite(g).all()
    assert torch.allclose(g, torch.full_like(x0, -1e6))  # (0 − 1)/eps: finite, not silently zeroed
    with pytest.raises(ValueError, match="eps"):
        dmd_gradient(x0, x0, x0, eps=0.0)
    with pytest.raises(ValueError, match="shapes"):
        dmd_gradient(x0, x0[:1], x0, eps=1e-6)


# ---- the orchestrated loss on oracle networks ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["flow", "ddpm"])
def test_distribution_matching_loss_on_oracles(kind):
    """Teacher's clean estimate is 1, the fake's is 3, x̂₀ = 0 → normaliser 1, g = 2 everywhere, L = 2, ∂L/∂x̂₀ = 2/N."""
    if kind == "flow":
        schedule = FlowSchedule(timestep_scale=1000.0, shift=3.0)
        sampler = TimestepSampler(kind="uniform", low=20, high=980)
    else:
        schedule = DDPMSchedule.from_scheduler_config({})
        sampler = TimestepSampler(kind="uniform", low=20, high=980)
    shape = (2, 3, 4, 4)
    teacher = OracleX0(schedule, torch.ones(shape))
    fake = OracleX0(schedule, torch.full(shape, 3.0))
    family = ToyFamily(schedule)
    cond = toy_condition(2, 3, 0.0)
    x0_hat = torch.zeros(shape, requires_grad=True)
    loss, logs = distribution_matching_loss(family, schedule, teacher, fake, x0_hat, cond, sampler, 4.5,
                                            torch.Generator().manual_seed(0), eps=1e-8, keep_images=True)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(2.0, rel=1e-4)
    assert torch.allclose(x0_hat.grad, torch.full(shape, 2.0 / x0_hat.numel()), rtol=1e-4)
    assert torch.allclose(logs["image/real_x0"], torch.ones(shape), atol=1e-4)
    assert logs["guidance_scale"] == 4.5 and logs["loss"] == pytest.approx(2.0, rel=1e-4)
    # the fake is never guided; the teacher is called through guided_predict with the given scale
    assert [(kind_, g) for net, kind_, g in family.calls if net is fake] == [("predict", None)]
    assert [(kind_, g) for net, kind_, g in family.calls if net is teacher] == [("guided", 4.5)]
    assert teacher.scale.grad is None and fake.scale.grad is None


def test_distribution_matching_loss_is_zero_when_fake_equals_teacher():
    schedule = FlowSchedule(timestep_scale=1.0, shift=1.0)
    net = AffineField(0.7, 0.2)
    family = ToyFamily(schedule)
    cond = toy_condition(2, 1, 0.0)  # pooled 0: guidance changes nothing
    x0_hat = torch.randn(2, 1, 3, 3, requires_grad=True)
    loss, _ = distribution_matching_loss(family, schedule, net, net, x0_hat, cond,
                                         TimestepSampler(kind="logit_normal", apply_shift=False), 3.0,
                                         torch.Generator().manual_seed(1))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(x0_hat.grad) == 0


def test_noise_comes_from_noise_gen():
    schedule = FlowSchedule(timestep_scale=1.0, shift=1.0)
    family = ToyFamily(schedule)
    teacher, fake = AffineField(0.5, 0.1), AffineField(0.4, -0.1)
    cond = toy_condition(2, 1, 0.3)
    x0 = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(3))
    sampler = TimestepSampler(kind="logit_normal", apply_shift=False)

    def run(seed):
        loss, _ = distribution_matching_loss(family, schedule, teacher, fake, x0, cond, sampler, 2.0,
                                             torch.Generator().manual_seed(seed))
        return float(loss)

    assert run(7) == run(7)
    assert run(7) != run(8)


# ---- fake-score loss (§6) --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["flow", "ddpm"])
def test_fake_score_loss_is_zero_for_the_oracle_and_positive_otherwise(kind):
    """The target is v = ε − x₀ (flow) or ε (DDPM): a net that knows x₀ predicts it exactly."""
    if kind == "flow":
        schedule = FlowSchedule(timestep_scale=1.0, shift=1.0)
        sampler = TimestepSampler(kind="logit_normal", apply_shift=False)
    else:
        schedule = DDPMSchedule.from_scheduler_config({})
        sampler = TimestepSampler(kind="uniform", low=0, high=998)
    x0 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    family = ToyFamily(schedule)
    cond = toy_condition(3, 2, 0.0)
    oracle = OracleX0(schedule, x0)
    loss, logs = fake_score_loss(family, schedule, oracle, x0, cond, sampler, torch.Generator().manual_seed(2),
                                 keep_images=True)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-8)
    assert torch.allclose(logs["image/fake_x0"], x0, atol=1e-4)
    loss.backward()
    assert oracle.scale.grad is not None  # the fake score trains

    wrong = OracleX0(schedule, x0 + 0.5)
    loss_w, _ = fake_score_loss(family, schedule, wrong, x0, cond, sampler, torch.Generator().manual_seed(2))
    assert float(loss_w.detach()) > 1e-3


def test_fake_score_flow_target_by_hand():
    """Index 499 unshifted → σ = (499 + 1)/1000 = 0.5; x₀ = 1; a zero net; so L_F = mean((0 − (ε − 1))²)."""
    schedule = FlowSchedule(timestep_scale=1.0, shift=1.0)
    sampler = TimestepSampler(kind="uniform", low=499, high=499, apply_shift=False)
    family = ToyFamily(schedule)
    x0 = torch.ones(1, 1, 1, 2)
    zero_net = AffineField(0.0, 0.0)
    gen = torch.Generator().manual_seed(4)
    loss, _ = fake_score_loss(family, schedule, zero_net, x0, toy_condition(1, 1, 0.0), sampler, gen)
    # replay the draws: τ first (uniform index: one randint), then ε
    replay = torch.Generator().manual_seed(4)
    torch.randint(499, 500, (1,), generator=replay)
    eps = torch.randn(1, 1, 1, 2, generator=replay)
    assert float(loss.detach()) == pytest.approx(float(((eps - 1.0) ** 2).mean()), rel=1e-6)


# ---- guidance scale --------------------------------------------------------------------------------------------------
def test_guidance_scale_fixed_or_uniform_and_shared():
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert draw_guidance_scale(8.0, 8.0, g) == 8.0
    assert torch.equal(g.get_state(), state)  # a fixed scale draws nothing
    draws = [draw_guidance_scale(2.0, 8.0, g) for _ in range(200)]
    assert all(2.0 <= d <= 8.0 for d in draws) and max(draws) - min(draws) > 4.0
    a = draw_guidance_scale(1.0, 8.0, torch.Generator().manual_seed(11))
    b = draw_guidance_scale(1.0, 8.0, torch.Generator().manual_seed(11))
    assert a == b  # same shared stream on every rank → same scale
    with pytest.raises(ValueError, match="must not exceed"):
        draw_guidance_scale(4.0, 2.0, g)

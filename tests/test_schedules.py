"""Schedules against numbers computed by hand (docs/method.md §1.1, §4.1, §5, §6)."""
import math

import pytest
import torch

from senseflow.core.schedules import (
    DDPMSchedule,
    FlowSchedule,
    TimestepSampler,
    dynamic_shift,
    flux_mu,
    static_shift,
)

SDXL_SCHEDULER = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"
}
GRID = [999, 749, 499, 249]


def sd3() -> FlowSchedule:
    return FlowSchedule(timestep_scale=1000, shift=3.0)


def flux(tokens: int = 4096) -> FlowSchedule:
    return FlowSchedule(timestep_scale=1, mu=flux_mu(tokens, 256, 4096, 0.5, 1.15))


def test_static_shift_3_maps_quarter_grid_to_sd35_anchors():
    # s3(u) = 3u / (1 + 2u): s3(.75) = 2.25/2.5 = .9, s3(.5) = 1.5/2 = .75, s3(.25) = .75/1.5 = .5
    assert [static_shift(u, 3.0) for u in (1.0, 0.75, 0.5, 0.25)] == pytest.approx([1.0, 0.9, 0.75, 0.5])


def test_sd35_anchors_and_network_timesteps():
    s = sd3()
    anchors = s.anchors(GRID)
    assert anchors.tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5], abs=1e-6)
    assert s.net_timestep(anchors).tolist() == pytest.approx([1000, 900, 750, 500], abs=1e-3)
    # sigmas_asc[0] = s3(1/1000) = 0.003 / 1.002 = 0.002994 (the reference's "σ = 0" of the last ISG segment)
    assert s.tau_from_index(torch.tensor([0])).item() == pytest.approx(0.003 / 1.002, rel=1e-6)


def test_flux_dynamic_shift_at_1024_gives_reference_anchors():
    assert flux_mu(4096, 256, 4096, 0.5, 1.15) == pytest.approx(1.15)
    assert math.exp(1.15) == pytest.approx(3.1582, abs=1e-4)
    anchors = flux().anchors(GRID)
    # e^μ / (e^μ + 1/u − 1): u = .75 → 3.1582 / 3.4915 = .90453 ; u = .5 → 3.1582 / 4.1582 = .75951 ; u = .25 → .51284
    assert anchors.tolist() == pytest.approx([1.0, 0.90453, 0.75951, 0.51284], abs=1e-5)
    # the network takes σ itself
    assert flux().net_timestep(anchors).tolist() == pytest.approx(anchors.tolist())


def test_flux_explicit_reference_anchors_are_available():
    assert flux().anchors(explicit=[1.0, 0.904, 0.759, 0.512]).tolist() == pytest.approx([1.0, 0.904, 0.759, 0.512])


def test_flux_mu_is_linear_in_tokens():
    assert flux_mu(256, 256, 4096, 0.5, 1.15) == pytest.approx(0.5)
    assert flux_mu(2176, 256, 4096, 0.5, 1.15) == pytest.approx(0.825)
    assert dynamic_shift(0.5, 0.0) == pytest.approx(0.5)  # μ = 0 is the identity


def test_sdxl_anchors_and_alpha_bar():
    s = DDPMSchedule.from_scheduler_config(SDXL_SCHEDULER)
    anchors = s.anchors(GRID)
    assert anchors.tolist() == GRID and anchors.dtype == torch.long
    assert s.alphas_cumprod[anchors].sqrt().tolist() == pytest.approx([0.0683, 0.2380, 0.5269, 0.8218], abs=1e-4)
    assert s.net_timestep(anchors).tolist() == GRID


def test_flow_conversions_are_consistent():
    s = sd3()
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    sigma = torch.tensor([0.1, 0.5, 0.9])  # batch > 1: one σ per sample
    x = s.add_noise(x0, eps, sigma)
    v = eps - x0
    assert torch.allclose(x, (1 - sigma.view(3, 1, 1, 1)) * x0 + sigma.view(3, 1, 1, 1) * eps)
    assert torch.allclose(s.x0_from(x, v, sigma), x0, atol=1e-6)
    assert torch.allclose(s.eps_from(x, v, sigma), eps, atol=1e-6)
    assert torch.allclose(s.pred_from(x, x0, eps, sigma), v)
    # an exact Euler step along the straight line lands on the forward process at σ'
    sigma_next = torch.tensor([0.0, 0.25, 0.5])
    assert torch.allclose(s.step(x, v, sigma, sigma_next), s.add_noise(x0, eps, sigma_next), atol=1e-6)


def test_ddpm_conversions_and_deterministic_step():
    s = DDPMSchedule.from_scheduler_config(SDXL_SCHEDULER)
    x0, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t = torch.tensor([999, 249])
    x = s.add_noise(x0, eps, t)
    a = s.alphas_cumprod[t].view(2, 1, 1, 1)
    assert torch.allclose(x.double(), a.sqrt() * x0.double() + (1 - a).sqrt() * eps.double(), atol=1e-6)
    assert torch.allclose(s.x0_from(x, eps, t), x0, atol=1e-4)
    # DDIM move with the true ε lands on the forward process; t = -1 (ᾱ = 1) returns x̂₀
    assert torch.allclose(
        s.step(x, eps, t, torch.tensor([749, 0])), s.add_noise(x0, eps, torch.tensor([749, 0])), atol=1e-4
    )
    assert torch.allclose(s.step(x, eps, t, s.final_tau(x)), x0, atol=1e-4)


def test_linear_beta_schedule_and_unknown_kind():
    s = DDPMSchedule.from_scheduler_config({"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 2e-2})
    assert s.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4)
    with pytest.raises(ValueError, match="cosine"):
        DDPMSchedule.from_scheduler_config({"beta_schedule": "cosine"})


def test_uniform_sampler_range_and_sd35_shifted_sigma():
    g = torch.Generator().manual_seed(0)
    sampler = TimestepSampler(kind="uniform", low=20, high=980)
    idx = sampler.sample_index(10_000, 1000, g)
    assert idx.min().item() == 20 and idx.max().item() == 980
    sigma = TimestepSampler(kind="uniform", low=20, high=980, apply_shift=True).sample(sd3(), 10_000, g)
    # σ = s3((i+1)/1000) ∈ [s3(.021), s3(.981)] = [0.0605, 0.9936] (docs/method.md §5)
    assert sigma.min().item() == pytest.approx(static_shift(0.021, 3.0), abs=1e-6)
    assert sigma.max().item() == pytest.approx(static_shift(0.981, 3.0), abs=1e-6)


def test_logit_normal_sampler_matches_descending_table_convention():
    # u = sigmoid(z); j = floor(1000 u) indexes the descending table, σ = (1000 − j)/1000 (FLUX, unshifted)
    z = torch.randn(5, generator=torch.Generator().manual_seed(3))
    expected = (1000 - (torch.sigmoid(z) * 1000).long()) / 1000
    sampler = TimestepSampler(kind="logit_normal", mean=0.0, std=1.0, apply_shift=False)
    sigma = sampler.sample(flux(), 5, torch.Generator().manual_seed(3))
    assert torch.allclose(sigma, expected.float())
    # the same draw through SD3.5's shift-3 table: σ = s3((1000 − j)/1000)
    sigma3 = TimestepSampler(kind="logit_normal", apply_shift=True).sample(sd3(), 5, torch.Generator().manual_seed(3))
    assert torch.allclose(sigma3, static_shift(expected.double(), 3.0).float())


def test_unknown_sampler_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="uniform, logit_normal"):
        TimestepSampler(kind="cosine").sample_index(1, 1000)

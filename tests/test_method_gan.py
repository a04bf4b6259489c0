"""Hinge losses and the per-anchor GAN time weights of docs/method.md §9.3 and §10."""
from __future__ import annotations

import pytest
import torch

from senseflow.core.schedules import DDPMSchedule, FlowSchedule
from senseflow.method.gan import (
    discriminator_hinge_loss,
    gan_time_weight,
    generator_hinge_loss,
    hinge_fake_per_sample,
    hinge_real_per_sample,
)


# ---- §10 table ------------------------------------------------------------------------------------------------------
def test_sdxl_weights():
    s = DDPMSchedule.from_scheduler_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    t = torch.tensor([999, 749, 499, 249])
    ref = gan_time_weight(s, t, "reference")
    assert ref.tolist() == pytest.approx([0.0683, 0.2380, 0.5269, 0.8218], abs=5e-5)  # √ᾱ_t (power 1)
    paper = gan_time_weight(s, t, "paper")
    assert paper.tolist() == pytest.approx([v * v for v in ref.tolist()], rel=1e-6)  # ᾱ_t = α_t²


def test_sd35_weights():
    s = FlowSchedule(timestep_scale=1000.0, shift=3.0)
    indices = [999, 749, 499, 249]
    sigma = s.anchors(indices=indices)  # 1, .9, .75, .5
    ref = [float(gan_time_weight(s, sigma[k : k + 1], "reference", anchor_index=indices[k])) for k in range(4)]
    assert ref[0] == pytest.approx(9.0e-6, abs=1e-7)  # s₃(0.001)² = 0.002994²
    assert ref[1:] == pytest.approx([0.2513, 0.5636, 0.8109], abs=5e-5)
    paper = gan_time_weight(s, sigma, "paper", anchor_index=None)
    assert paper.tolist() == pytest.approx([0.0, 0.01, 0.0625, 0.25], abs=1e-6)


def test_flux_weights():
    s = FlowSchedule(timestep_scale=1.0, mu=1.15)
    sigma = s.anchors(explicit=[1.0, 0.904, 0.759, 0.512])
    expected = [0.0, 0.00922, 0.05808, 0.23814]
    for mode in ("reference", "paper"):
        assert gan_time_weight(s, sigma, mode).tolist() == pytest.approx(expected, abs=5e-6)


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="time_weight"):
        gan_time_weight(FlowSchedule(timestep_scale=1.0), torch.tensor([0.5]), "alpha")


# ---- hinge losses ----------------------------------------------------------------------------------------------------
def test_hinge_terms_per_sample_then_weighted_batch_mean():
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5], [-3.0, 1.0, 1.0, 1.0]])
    # relu(1 − l): [0, 1, 2, .5] → .875 ; [4, 0, 0, 0] → 1.0
    assert hinge_real_per_sample(logits).tolist() == pytest.approx([0.875, 1.0])
    # relu(1 + l): [3, 1, 0, 1.5] → 1.375 ; [0, 2, 2, 2] → 1.5
    assert hinge_fake_per_sample(logits).tolist() == pytest.approx([1.375, 1.5])
    w = torch.tensor([0.25, 1.0])
    assert float(discriminator_hinge_loss(logits, w, real=True)) == pytest.approx((0.25 * 0.875 + 1.0) / 2)
    assert float(discriminator_hinge_loss(logits, w, real=False)) == pytest.approx((0.25 * 1.375 + 1.5) / 2)
    # G: −mean l = [−0.375, −0.0] weighted → (0.25·(−0.375) + 0)/2
    assert float(generator_hinge_loss(logits, w)) == pytest.approx(0.25 * -0.375 / 2)


def test_generator_gradient_raises_fake_logits_and_zero_weight_switches_off():
    logits = torch.zeros(2, 5, requires_grad=True)
    generator_hinge_loss(logits, torch.tensor([0.0, 1.0])).backward()
    assert torch.all(logits.grad[0] == 0)  # w = 0 at k = 0 for flow models: no adversarial signal
    assert torch.all(logits.grad[1] < 0)  # descent raises D's logits on the generated sample


def test_weight_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="does not match batch"):
        generator_hinge_loss(torch.zeros(2, 3), torch.ones(3))


# ---- which reference column: the teacher family, not how the anchors are given (§10) ---------------------------------
def _distiller(family_name: str, schedule, anchors, time_weight: str):
    from method_toys import AffineField, ToyFamily
    from senseflow.config import MethodConfig
    from senseflow.method.distill import Distiller

    method = MethodConfig()
    method.gan.time_weight = time_weight
    # the family fact behind the reference GAN weight, as the shipped family of that name declares it (§10)
    own = {"name": family_name, "gan_reference_misindexed": family_name == "sd3"}
    family = type("Family", (ToyFamily,), own)(schedule)
    net = AffineField(0.1, 0.0)
    return Distiller(method, family, schedule, anchors, net, net, net)


def _weights(distiller, anchors):
    return [float(distiller.time_weight(anchors[k : k + 1], k)) for k in range(len(anchors))]


def test_reference_time_weight_follows_the_family_whatever_schedule_anchors_is():
    sd35 = FlowSchedule(timestep_scale=1000.0, shift=3.0)
    misindexed = [9.0e-6, 0.2513, 0.5636, 0.8109]
    for anchors in (sd35.anchors(indices=[999, 749, 499, 249]), sd35.anchors(explicit=[1.0, 0.9, 0.75, 0.5])):
        d = _distiller("sd3", sd35, anchors, "reference")
        assert d.gan_anchor_indices == [999, 749, 499, 249]  # anchors: null gives the preset's indices unchanged
        assert _weights(d, anchors) == pytest.approx(misindexed, abs=5e-5)
        paper = _weights(_distiller("sd3", sd35, anchors, "paper"), anchors)
        assert paper == pytest.approx([0.0, 0.01, 0.0625, 0.25], abs=1e-6)
    flux = FlowSchedule(timestep_scale=1.0, mu=1.15)
    expected = [0.0, 0.00922, 0.05808, 0.23814]
    for anchors in (flux.anchors(indices=[999, 749, 499, 249]), flux.anchors(explicit=[1.0, 0.904, 0.759, 0.512])):
        d = _distiller("flux", flux, anchors, "reference")
        assert d.gan_anchor_indices is None
        assert _weights(d, anchors) == pytest.approx([(1 - float(s)) ** 2 for s in anchors], abs=1e-7)
    assert _weights(d, anchors) == pytest.approx(expected, abs=5e-6)
    sdxl = DDPMSchedule.from_scheduler_config(
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    )
    t = sdxl.anchors(indices=[999, 749, 499, 249])
    d = _distiller("sdxl", sdxl, t, "reference")
    assert d.gan_anchor_indices is None
    assert _weights(d, t) == pytest.approx([0.0683, 0.2380, 0.5269, 0.8218], abs=5e-5)

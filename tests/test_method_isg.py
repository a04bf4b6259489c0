"""ISG (docs/method.md §8): mid-point ranges, the two-step target by hand, and SDXL's reference reduction."""
from __future__ import annotations

import pytest
import torch

from method_toys import AffineField, ToyFamily, toy_condition
from senseflow.core.schedules import DDPMSchedule, FlowSchedule
from senseflow.method.isg import (
    ISGOptions,
    draw_midpoint,
    isg_loss,
    isg_trajectories,
    midpoint_range,
    segment_end,
)


def sd35_schedule():
    return FlowSchedule(timestep_scale=1000.0, shift=3.0)


def flux_schedule():
    return FlowSchedule(timestep_scale=1.0, mu=1.15)


def sdxl_schedule():
    return DDPMSchedule.from_scheduler_config(
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    )


# ---- mid-point ranges (§8.1, §8.2) -------------------------------------------------------------------------------
def test_sd35_index_space_ranges():
    s = sd35_schedule()
    anchors = s.anchors(indices=[999, 749, 499, 249])
    ranges = [midpoint_range(s, anchors, k, 50, "index") for k in range(4)]
    assert ranges == [(799, 949), (549, 699), (299, 449), (50, 199)]
    # σ_m bounds quoted in §8.1: [0.923, 0.983] for k = 0 and [0.139, 0.429] for k = 3
    lo, hi = s.tau_from_index(torch.tensor([799, 949]))
    assert (round(float(lo), 3), round(float(hi), 3)) == (0.923, 0.983)
    lo, hi = s.tau_from_index(torch.tensor([50, 199]))
    assert (round(float(lo), 3), round(float(hi), 3)) == (0.139, 0.429)


def test_flux_timestep_space_ranges():
    s = flux_schedule()
    anchors = s.anchors(explicit=[1.0, 0.904, 0.759, 0.512])
    ranges = [midpoint_range(s, anchors, k, 20, "timestep") for k in range(4)]
    assert ranges == [(924, 980), (779, 884), (532, 739), (20, 492)]


def test_sdxl_ranges_in_t():
    s = sdxl_schedule()
    anchors = s.anchors(explicit=[999, 749, 499, 249])
    for space in ("index", "timestep"):
        ranges = [midpoint_range(s, anchors, k, 20, space) for k in range(4)]
        assert ranges == [(769, 979), (519, 729), (269, 479), (20, 229)]


def test_midpoint_draw_is_inside_and_reproducible():
    s = flux_schedule()
    anchors = s.anchors(explicit=[1.0, 0.904, 0.759, 0.512])
    opts = ISGOptions(margin=20, margin_space="timestep")
    draws = [float(draw_midpoint(s, anchors, 0, opts, torch.Generator().manual_seed(i))) for i in range(50)]
    assert all(0.924 - 1e-6 <= d <= 0.980 + 1e-6 for d in draws)
    assert len(set(draws)) > 5
    again = float(draw_midpoint(s, anchors, 0, opts, torch.Generator().manual_seed(3)))
    assert again == draws[3]


def test_empty_range_is_an_error():
    s = flux_schedule()
    anchors = s.anchors(explicit=[1.0, 0.904, 0.759, 0.512])
    with pytest.raises(ValueError, match="no mid-point"):
        midpoint_range(s, anchors, 0, 60, "timestep")


def test_last_segment_end():
    s = sd35_schedule()
    anchors = s.anchors(indices=[999, 749, 499, 249])
    like = torch.zeros(2, 1, 1, 1)
    assert torch.equal(segment_end(s, anchors, 3, "zero", like), torch.zeros(2))
    ref = segment_end(s, anchors, 3, "grid_start", like)
    assert torch.allclose(ref, torch.full((2,), 0.002994), atol=1e-6)
    assert torch.allclose(segment_end(s, anchors, 1, "zero", like), torch.full((2,), 0.75))


def test_options_validation_and_config_reading():
    with pytest.raises(ValueError, match="margin_space"):
        ISGOptions(margin=20, margin_space="sigma")
    with pytest.raises(ValueError, match="loss"):
        ISGOptions(margin=20, margin_space="index", loss="l1")
    opts = ISGOptions.from_config({"margin": 50, "margin_space": "index", "loss": "l2", "weight": 0.5, "enabled": True})
    assert opts == ISGOptions(margin=50, margin_space="index", loss="l2")
    with pytest.raises(ValueError, match="margin_space"):
        ISGOptions.from_config({"margin": 50})


def test_config_key_sdxl_mode_reaches_the_options_the_distiller_gets():
    """method.isg.sdxl_mode is the option ``mode``: read by from_config and by the Distiller (one path)."""
    from pathlib import Path

    from senseflow.config import load_config
    from senseflow.method.distill import Distiller

    preset = Path(__file__).resolve().parents[1] / "configs" / "sdxl" / "sdxl_senseflow.yaml"
    s = sdxl_schedule()
    anchors = s.anchors(indices=[999, 749, 499, 249])
    for mode in ("intended", "reference"):
        cfg = load_config(preset, [f"method.isg.sdxl_mode={mode}"])
        assert ISGOptions.from_config(cfg.method.isg).sdxl_mode == mode
        net = AffineField(0.1, 0.0)
        distiller = Distiller(cfg.method, ToyFamily(s), s, anchors, net, net, net)
        assert distiller.isg_options == ISGOptions(margin=20, margin_space="timestep", sdxl_mode=mode)
    opts = ISGOptions.from_config({"margin": 20, "margin_space": "index", "sdxl_mode": "reference"})
    assert opts.sdxl_mode == "reference"


# ---- the flow target, by hand ---------------------------------------------------------------------------------------
def test_flow_isg_target_equals_hand_computed_two_step_construction():
    """Teacher v_T = 2x + σ + s·p (CFG with p = 0.1, s = 3), generator v_G = 0.5x − σ + p, segment σ 0.75 → 0.5.

    The margin (125 units of 1000σ) leaves one admissible mid-point, σ_m = 0.625. By hand, for x = 1 and x = −2:
      v_T = 3.05 / −2.95;  x_m = x + (0.625 − 0.75)·v_T = 0.61875 / −1.63125
      v_m = 0.5·x_m − 0.625 + 0.1 = −0.215625 / −1.340625
      x_tar = x_m + (0.5 − 0.625)·v_m = 0.645703125 / −1.463671875
      v_θ = 0.5x − 0.75 + 0.1 = −0.15 / −1.65;  x_dir = x + (0.5 − 0.75)·v_θ = 1.0375 / −1.5875
    """
    s = FlowSchedule(timestep_scale=1.0, shift=1.0)
    anchors = torch.tensor([1.0, 0.75, 0.5, 0.25])
    family = ToyFamily(s)
    teacher, gen = AffineField(2.0, 1.0), AffineField(0.5, -1.0)
    cond = toy_condition(2, 1, 0.1)
    x = torch.tensor([1.0, -2.0]).reshape(2, 1, 1, 1)
    tau_k = torch.full((2,), 0.75)
    pred_theta = gen(x, tau_k, cond.pooled)
    opts = ISGOptions(margin=125, margin_space="timestep", loss="l2")
    assert midpoint_range(s, anchors, 1, 125, "timestep") == (625, 625)

    loss, logs = isg_loss(family, s, gen, teacher, x, pred_theta, 1, anchors, cond, 3.0, opts,
                          torch.Generator().manual_seed(0), keep_images=True)
    x_tar = logs["image/x_tar"].flatten().tolist()
    x_dir = logs["image/x_dir"].flatten().tolist()
    assert x_tar == pytest.approx([0.645703125, -1.463671875], abs=1e-6)
    assert x_dir == pytest.approx([1.0375, -1.5875], abs=1e-6)
    d = [1.0375 - 0.645703125, -1.5875 + 1.463671875]
    assert float(loss.detach()) == pytest.approx((d[0] ** 2 + d[1] ** 2) / 2, rel=1e-6)
    assert logs["tau_mid"] == pytest.approx(0.625)
    # the teacher was guided with s = 3; the generator's mid-point call was not guided
    kinds = [(net is teacher, kind, g) for net, kind, g in family.calls]
    assert (True, "guided", 3.0) in kinds and (False, "predict", None) in kinds


def test_flow_target_is_the_velocity_mix_and_the_teacher_midpoint_ablation_is_two_teacher_steps():
    """Same toy as above (segment 0.75 → 0.5, σ_m = 0.625, so a = (σ_k − σ_m)/(σ_k − σ_{k+1}) = 0.5).

    ``generator`` (the paper): x_tar = x + (σ_{k+1} − σ_k)·(a·v_T + (1 − a)·v_m), i.e. L_ISG (l2) is minimised by
    v_θ = 0.5·3.05 + 0.5·(−0.215625) = 1.4171875 for x = 1.
    ``teacher`` (ablation): the move from σ_m uses the guided teacher, v_T(x_m) = 2·x_m + σ_m + 3·0.1:
      x = 1:  v = 2.1625,  x_tar = 0.61875 − 0.125·2.1625 = 0.3484375
      x = −2: v = −2.3375, x_tar = −1.63125 + 0.125·2.3375 = −1.3390625
    """
    s = FlowSchedule(timestep_scale=1.0, shift=1.0)
    teacher, gen = AffineField(2.0, 1.0), AffineField(0.5, -1.0)
    cond = toy_condition(2, 1, 0.1)
    x = torch.tensor([1.0, -2.0]).reshape(2, 1, 1, 1)
    tau_k, tau_m, tau_n = torch.full((2,), 0.75), torch.full((2,), 0.625), torch.full((2,), 0.5)
    pred_theta = gen(x, tau_k, cond.pooled)

    _, x_tar = isg_trajectories(ToyFamily(s), s, gen, teacher, x, pred_theta, tau_k, tau_m, tau_n, cond, 3.0)
    v_mix = 0.5 * 3.05 + 0.5 * (0.5 * 0.61875 - 0.625 + 0.1)
    assert float(x_tar[0]) == pytest.approx(1.0 + (0.5 - 0.75) * v_mix, abs=1e-6)

    family = ToyFamily(s)
    _, x_tar = isg_trajectories(family, s, gen, teacher, x, pred_theta, tau_k, tau_m, tau_n, cond, 3.0,
                                midpoint_model="teacher")
    assert x_tar.flatten().tolist() == pytest.approx([0.3484375, -1.3390625], abs=1e-6)
    assert [(net is teacher, kind, g) for net, kind, g in family.calls] == [(True, "guided", 3.0)] * 2
    with pytest.raises(ValueError, match="midpoint_model"):
        ISGOptions(margin=20, margin_space="index", midpoint_model="fake")


def test_pseudo_huber_value_and_gradient_only_through_pred_theta():
    s = FlowSchedule(timestep_scale=1.0, shift=1.0)
    anchors = torch.tensor([1.0, 0.75, 0.5, 0.25])
    family = ToyFamily(s)
    teacher, gen = AffineField(2.0, 1.0), AffineField(0.5, -1.0)
    cond = toy_condition(2, 1, 0.1)
    x = torch.tensor([1.0, -2.0]).reshape(2, 1, 1, 1)
    pred_theta = gen(x, torch.full((2,), 0.75), cond.pooled)
    opts = ISGOptions(margin=125, margin_space="timestep", loss="pseudo_huber", huber_c=1e-3)
    loss, _ = isg_loss(family, s, gen, teacher, x, pred_theta, 1, anchors, cond, 3.0, opts, torch.Generator())
    d = torch.tensor([1.0375 - 0.645703125, -1.5875 + 1.463671875], dtype=torch.float64)
    expected = (torch.sqrt(d**2 + 1e-6) - 1e-3).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    # ∂L/∂a through x_dir = x + (σ_{k+1} − σ_k)(a·x + …): mean_b[d_b/√(d_b²+c²)·(−0.25)·x_b]
    expected_grad_a = float((d / torch.sqrt(d**2 + 1e-6) * (-0.25) * torch.tensor([1.0, -2.0]).double()).mean())
    assert float(gen.a.grad) == pytest.approx(expected_grad_a, rel=1e-4)
    assert teacher.a.grad is None


def test_flow_last_segment_reaches_zero_or_grid_start():
    s = sd35_schedule()
    anchors = s.anchors(indices=[999, 749, 499, 249])
    family = ToyFamily(s)
    teacher, gen = AffineField(0.3, 0.0), AffineField(0.2, 0.0)
    cond = toy_condition(1, 1, 0.0)
    x = torch.ones(1, 1, 2, 2)
    pred = gen(x, s.net_timestep(torch.full((1,), 0.5)), cond.pooled)
    out = {}
    for end in ("zero", "grid_start"):
        opts = ISGOptions(margin=50, margin_space="index", last_segment_end=end, loss="l2")
        _, logs = isg_loss(family, s, gen, teacher, x, pred, 3, anchors, cond, 1.0, opts,
                           torch.Generator().manual_seed(0), keep_images=True)
        out[end] = logs["image/x_dir"]
    # x_dir = x + (σ_end − 0.5)·v with v = 0.2: σ_end = 0 → 0.9, σ_end = 0.002994 → 0.9005988
    assert torch.allclose(out["zero"], torch.full_like(x, 0.9), atol=1e-6)
    assert torch.allclose(out["grid_start"], torch.full_like(x, 1 + (0.0029940 - 0.5) * 0.2), atol=1e-6)


# ---- SDXL (§8.2) --------------------------------------------------------------------------------------------------
def _sdxl_setup(batch=2):
    s = sdxl_schedule()
    anchors = s.anchors(explicit=[999, 749, 499, 249])
    family = ToyFamily(s)
    teacher, gen = AffineField(0.4, 0.0005), AffineField(-0.3, 0.001)
    cond = toy_condition(batch, 3, 0.2)
    x = torch.randn(batch, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    return s, anchors, family, teacher, gen, cond, x


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_sdxl_reference_reduces_to_x0_regression(k):
    s, anchors, family, teacher, gen, cond, x = _sdxl_setup()
    tau_k = anchors[k].expand(2)
    pred_theta = gen(x, tau_k, cond.pooled)
    opts = ISGOptions(margin=20, margin_space="timestep", sdxl_mode="reference", last_segment_end="grid_start")
    _, logs = isg_loss(family, s, gen, teacher, x, pred_theta, k, anchors, cond, 7.0, opts,
                       torch.Generator().manual_seed(5), keep_images=True)
    x0_g = s.x0_from(x, pred_theta.detach(), tau_k).double()
    with torch.no_grad():
        x0_t = s.x0_from(x, family.guided_predict(teacher, x, tau_k, cond, 7.0), tau_k).double()
    t_next = int(anchors[k + 1]) if k < 3 else 0
    expected = s.alphas_cumprod[t_next].sqrt() * (x0_g - x0_t)
    got = logs["image/x_dir"].double() - logs["image/x_tar"].double()
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_sdxl_reference_loss_does_not_depend_on_the_midpoint():
    s, anchors, family, teacher, gen, cond, x = _sdxl_setup()
    pred = gen(x, anchors[1].expand(2), cond.pooled)
    opts = ISGOptions(margin=20, margin_space="timestep", sdxl_mode="reference")
    losses, mids = [], []
    for seed in range(3):
        loss, logs = isg_loss(family, s, gen, teacher, x, pred, 1, anchors, cond, 7.0, opts,
                              torch.Generator().manual_seed(seed))
        losses.append(float(loss.detach()))
        mids.append(logs["tau_mid"])
    assert len(set(mids)) > 1
    assert losses == pytest.approx([losses[0]] * 3, rel=1e-4)


def test_sdxl_intended_is_two_ddim_moves_with_the_generators_own_eps():
    s, anchors, family, teacher, gen, cond, x = _sdxl_setup(batch=1)
    k, b = 1, 1
    tau_k, tau_m, tau_n = anchors[k].expand(b), torch.tensor([600]), anchors[k + 1].expand(b)
    pred_theta = gen(x, tau_k, cond.pooled)
    x_dir, x_tar = isg_trajectories(family, s, gen, teacher, x, pred_theta, tau_k, tau_m, tau_n, cond, 7.0,
                                    sdxl_mode="intended")

    ab = s.alphas_cumprod
    def ddim(x_t, eps, t, t_next):
        x0 = (x_t.double() - (1 - ab[t]).sqrt() * eps.double()) / ab[t].sqrt()
        return ab[t_next].sqrt() * x0 + (1 - ab[t_next]).sqrt() * eps.double()

    eps_t = family.guided_predict(teacher, x, tau_k, cond, 7.0)
    x_m = ddim(x, eps_t, 749, 600).float()
    eps_m = gen(x_m, tau_m, cond.pooled)
    assert torch.allclose(x_tar.double(), ddim(x_m, eps_m, 600, 499), atol=1e-5)
    assert torch.allclose(x_dir.double(), ddim(x, pred_theta.detach(), 749, 499), atol=1e-5)

"""Few-step samplers: docs/method.md §4.1 anchors, equality with the stock diffusers pipelines, determinism,
backward simulation.

The stock-pipeline calls that reproduce ``sample_euler`` with K = 4 (documented in the README):

* FLUX:  ``FluxPipeline(prompt, height, width, num_inference_steps=4, guidance_scale=g, generator=gen)``
  (teacher: our ``guidance_scale=g``; no-guidance student: guidance ignored on both sides);
* SD3.5: ``StableDiffusion3Pipeline(prompt, height, width, sigmas=[1.0, 0.75, 0.5, 0.25], guidance_scale=1.0,
  max_sequence_length=77, generator=gen)``;
* SDXL:  ``StableDiffusionXLPipeline(prompt, height, width, timesteps=[999, 749, 499, 249], guidance_scale=1.0,
  generator=gen)`` with the teacher's ``EulerDiscreteScheduler``.
"""
from __future__ import annotations

import pytest
import torch

from senseflow.core.anchors import anchor_indices, flow_anchor_grid, make_anchors
from senseflow.core.schedules import DDPMSchedule, FlowSchedule
from senseflow.method.sampling import (
    backward_simulate,
    sample_euler,
    sample_stochastic,
)
from senseflow.models.families import build_family
from senseflow.models.families.flux import unpack_latents

PROMPTS = ["a photo of a cat", "a red sports car driving through the desert"]
RES = 64
TOL = 1e-4


def _family(tiny_teacher, kind, **kw):
    name = {"sdxl": "sdxl", "sd35-medium": "sd3", "sd35-large": "sd3", "flux": "flux"}[kind]
    if name == "sdxl":
        kw.setdefault("resolution", RES)
    return build_family(name, path=tiny_teacher(kind), **kw)


# ---- anchors (§4.1) ------------------------------------------------------------------------------------------

def test_sdxl_anchors():
    sched = DDPMSchedule.from_scheduler_config(
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    )
    anchors = make_anchors(sched, 4)
    assert anchors.tolist() == [999, 749, 499, 249]
    assert [round(v, 4) for v in sched.alphas_cumprod[anchors].sqrt().tolist()] == [0.0683, 0.2380, 0.5269, 0.8218]


def test_sd35_anchors(tiny_teacher):
    anchors = _family(tiny_teacher, "sd35-medium").schedule(1024, 1024).anchors_from_grid(flow_anchor_grid(4))
    assert torch.allclose(anchors, torch.tensor([1.0, 0.9, 0.75, 0.5]), atol=1e-7)


def test_flux_anchors_at_1024(tiny_teacher):
    sched = _family(tiny_teacher, "flux").schedule(1024, 1024)  # μ = 1.15 at 4096 packed tokens
    anchors = make_anchors(sched, 4)
    assert torch.allclose(anchors, torch.tensor([1.0, 0.90453, 0.75951, 0.51284]), atol=1e-5)
    assert [int(a * 1000) / 1000 for a in anchors.tolist()] == [1.0, 0.904, 0.759, 0.512]  # the reference's values
    # the grid-index route of the configs gives the same anchors
    assert torch.allclose(sched.anchors(indices=[999, 749, 499, 249]), anchors)


@pytest.mark.parametrize("steps", [4, 5, 6, 7, 8])
def test_anchor_grids_for_4_to_8_steps(steps):
    idx = anchor_indices(steps)
    assert idx[0] == 999 and all(a - b == 1000 // steps for a, b in zip(idx, idx[1:]))
    grid = flow_anchor_grid(steps)
    assert grid[0] == 1.0 and grid[-1] == pytest.approx(1 / steps)
    flow = make_anchors(FlowSchedule(1000.0, shift=3.0), steps)
    assert flow[0] == 1.0 and bool((flow[1:] < flow[:-1]).all()) and len(flow) == steps


def test_bad_step_counts_are_rejected():
    with pytest.raises(ValueError, match="num_steps"):
        anchor_indices(0)
    with pytest.raises(ValueError, match="num_steps"):
        flow_anchor_grid(0)


# ---- Euler sampler == stock pipelines ------------------------------------------------------------------------

def _stock(pipe, output_type, **kw):
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        PROMPTS, height=RES, width=RES, generator=torch.Generator().manual_seed(0), output_type=output_type, **kw
    ).images


def _compare(fam, net, pipe, call, guidance_scale=None):
    """Our Euler sample (seed 0) against the pipeline's latents and decoded images."""
    cond = fam.encode_prompts(PROMPTS)
    shape = (len(PROMPTS), *fam.latent_shape(RES, RES))
    anchors = make_anchors(fam.schedule(RES, RES), 4)
    ours = sample_euler(fam, net, cond, anchors, torch.Generator().manual_seed(0), shape, guidance_scale=guidance_scale)
    stock = _stock(pipe, "latent", **call)
    if stock.ndim == 3:  # FLUX returns packed latents
        stock = unpack_latents(stock, *shape[-2:])
    assert (ours - stock).abs().max() < TOL * max(1.0, stock.abs().max())
    with torch.no_grad():
        image = (fam.decode_latents(ours) / 2 + 0.5).clamp(0, 1)
    assert (image - _stock(pipe, "pt", **call)).abs().max() < TOL


def test_sdxl_euler_equals_pipeline(tiny_teacher):
    from diffusers import StableDiffusionXLPipeline

    fam = _family(tiny_teacher, "sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_teacher("sdxl"), local_files_only=True)
    _compare(fam, fam.load_denoiser(), pipe, dict(timesteps=[999, 749, 499, 249], guidance_scale=1.0))


@pytest.mark.parametrize("kind", ["sd35-medium", "sd35-large"])
def test_sd35_euler_equals_pipeline(tiny_teacher, kind):
    from diffusers import StableDiffusion3Pipeline

    fam = _family(tiny_teacher, kind)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_teacher(kind), local_files_only=True)
    _compare(
        fam, fam.load_denoiser(), pipe, dict(sigmas=[1.0, 0.75, 0.5, 0.25], guidance_scale=1.0, max_sequence_length=77)
    )


def test_flux_teacher_euler_equals_pipeline_with_guidance(tiny_teacher):
    from diffusers import FluxPipeline

    fam = _family(tiny_teacher, "flux")
    pipe = FluxPipeline.from_pretrained(tiny_teacher("flux"), local_files_only=True)
    _compare(fam, fam.load_denoiser(), pipe, dict(num_inference_steps=4, guidance_scale=3.5), guidance_scale=3.5)


def test_flux_student_euler_equals_pipeline(tiny_teacher, tmp_path):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    fam = _family(tiny_teacher, "flux")
    student = fam.build_student(fam.load_denoiser()).eval()
    student.save_pretrained(tmp_path / "student")  # an exported no-guidance transformer (docs/method.md decision 4)
    reloaded = FluxTransformer2DModel.from_pretrained(tmp_path / "student", local_files_only=True)
    assert reloaded.config.guidance_embeds is False
    pipe = FluxPipeline.from_pretrained(tiny_teacher("flux"), transformer=reloaded, local_files_only=True)
    _compare(fam, student, pipe, dict(num_inference_steps=4, guidance_scale=3.5))  # guidance ignored on both sides


# ---- stochastic sampler and backward simulation --------------------------------------------------------------

@pytest.fixture(scope="module")
def sd3(tiny_teacher):
    fam = _family(tiny_teacher, "sd35-large")
    net = fam.load_denoiser()
    cond = fam.encode_prompts(PROMPTS)
    anchors = make_anchors(fam.schedule(RES, RES), 4)
    return fam, net, cond, anchors, (len(PROMPTS), *fam.latent_shape(RES, RES))


def test_stochastic_sampler_is_deterministic_per_seed(sd3):
    fam, net, cond, anchors, shape = sd3
    a = sample_stochastic(fam, net, cond, anchors, torch.Generator().manual_seed(7), shape)
    b = sample_stochastic(fam, net, cond, anchors, torch.Generator().manual_seed(7), shape)
    c = sample_stochastic(fam, net, cond, anchors, torch.Generator().manual_seed(8), shape)
    assert a.shape == shape and torch.equal(a, b) and not torch.allclose(a, c)
    assert not torch.allclose(a[0], a[1])  # batch samples get their own noise


def test_stochastic_sampler_equals_flow_euler_scheduler_with_stochastic_sampling(sd3, tiny_teacher):
    """x̂₀ then re-noise with fresh ε is diffusers' FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    fam, net, cond, anchors, shape = sd3
    ours = sample_stochastic(fam, net, cond, anchors, torch.Generator().manual_seed(3), shape)
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(
        tiny_teacher("sd35-large"), subfolder="scheduler", stochastic_sampling=True
    )
    sched.set_timesteps(sigmas=flow_anchor_grid(4))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen)
    for t in sched.timesteps:
        v = fam.predict(net, x, (t / 1000).expand(shape[0]), cond)
        x = sched.step(v, t, x, generator=gen).prev_sample
    assert (ours - x).abs().max() < TOL


def test_sdxl_stochastic_sampler_runs_in_ddpm_space(tiny_teacher):
    fam = _family(tiny_teacher, "sdxl")
    net, cond = fam.load_denoiser(), fam.encode_prompts(PROMPTS)
    anchors = make_anchors(fam.schedule(RES, RES), 4)
    shape = (2, *fam.latent_shape(RES, RES))
    out = sample_stochastic(fam, net, cond, anchors, torch.Generator().manual_seed(0), shape)
    again = backward_simulate(fam, net, cond, anchors, 4, torch.Generator().manual_seed(0), shape)
    assert out.shape == shape and torch.isfinite(out).all() and torch.equal(out, again)


def test_backward_simulation(sd3):
    fam, net, cond, anchors, shape = sd3
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(backward_simulate(fam, net, cond, anchors, 0, torch.Generator().manual_seed(5), shape), noise)
    # k steps of backward simulation are the stochastic sampler stopped after k steps
    full = sample_stochastic(fam, net, cond, anchors, torch.Generator().manual_seed(5), shape)
    assert torch.equal(backward_simulate(fam, net, cond, anchors, 4, torch.Generator().manual_seed(5), shape), full)
    one = backward_simulate(fam, net, cond, anchors, 1, torch.Generator().manual_seed(5), shape)
    sched = fam.schedule(RES, RES)
    expected = sched.x0_from(noise, fam.predict(net, noise, anchors[0].expand(2), cond), anchors[0].expand(2))
    assert torch.allclose(one, expected)
    with pytest.raises(ValueError, match="k=5"):
        backward_simulate(fam, net, cond, anchors, 5, torch.Generator(), shape)


def test_samplers_accept_initial_latents_and_more_steps(sd3):
    fam, net, cond, _, shape = sd3
    anchors = make_anchors(fam.schedule(RES, RES), 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    a = sample_euler(fam, net, cond, anchors, latents=noise)
    b = sample_euler(fam, net, cond, anchors, torch.Generator().manual_seed(0), shape)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="condition batch"):
        sample_euler(fam, net, cond, anchors, torch.Generator(), (3, *shape[1:]))
    with pytest.raises(ValueError, match="latent shape"):
        sample_euler(fam, net, cond, anchors, torch.Generator())


def test_teacher_sampling_with_cfg(sd3):
    fam, net, cond, anchors, shape = sd3
    guided = sample_euler(fam, net, cond, anchors, torch.Generator().manual_seed(0), shape, guidance_scale=4.0)
    plain = sample_euler(fam, net, cond, anchors, torch.Generator().manual_seed(0), shape)
    one = sample_euler(fam, net, cond, anchors, torch.Generator().manual_seed(0), shape, guidance_scale=1.0)
    assert not torch.allclose(guided, plain) and torch.allclose(one, plain, atol=1e-5)

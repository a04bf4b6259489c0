"""DMD2 baseline classifier on the fake UNet's bottleneck (docs/method.md §11), on a tiny diffusers SDXL UNet."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import UNet2DConditionModel

from method_toys import ToyFamily
from senseflow.core.condition import Condition
from senseflow.core.schedules import DDPMSchedule, TimestepSampler
from senseflow.models.dmd2_head import (
    DMD2Classifier,
    DMD2ClassifierHead,
    MidBlockCapture,
    bottleneck_shape,
    generator_cls_loss,
    guidance_cls_loss,
)

SDXL_UNET_CFG = dict(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                     attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
                     addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                     projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=8)


class TinySDXLFamily(ToyFamily):
    """Calls a diffusers UNet the SDXL way (ε-prediction, added text/time conditioning)."""

    def predict(self, net, x, tau, cond, guidance=None):
        self.calls.append((net, "predict", guidance))
        return net(x, self._schedule.net_timestep(tau), encoder_hidden_states=cond.prompt_embeds,
                   added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": cond.time_ids}).sample


def setup(batch=2, latent=16):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SDXL_UNET_CFG)
    schedule = DDPMSchedule.from_scheduler_config({})
    family = TinySDXLFamily(schedule)
    sampler = TimestepSampler(kind="uniform", low=0, high=999)
    clf = DMD2Classifier.for_unet(unet, (latent, latent), family, schedule, sampler, norm_groups=32)
    cond = Condition(prompt_embeds=torch.randn(batch, 4, 64), pooled=torch.randn(batch, 32),
                     time_ids=torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]).expand(batch, 6))
    return unet, clf, cond


def test_bottleneck_shape_matches_the_captured_mid_block_output():
    unet, clf, cond = setup()
    assert bottleneck_shape(unet.config, (16, 16)) == (64, 8, 8)
    assert bottleneck_shape(
        {"block_out_channels": [320, 640, 1280], "down_block_types": [1, 2, 3]}, (128, 128)
    ) == (1280, 32, 32)
    with MidBlockCapture(unet) as cap:
        clf.family.predict(unet, torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), cond)
    assert cap.output.shape == (2, 64, 8, 8)
    assert len(unet.mid_block._forward_hooks) == 0  # the hook is removed on exit


def test_head_layout_follows_the_spatial_size():
    head = DMD2ClassifierHead(channels=64, spatial_size=32, norm_groups=32)
    convs = [m for m in head.net if isinstance(m, torch.nn.Conv2d)]
    # 32 → 16 → 8 → 4 with 4×4 stride 2, then 4×4 stride 4 → 1, then 1×1 → 1 logit (§11.2)
    assert [(c.kernel_size, c.stride) for c in convs] == [((4, 4), (2, 2))] * 3 + [((4, 4), (4, 4)), ((1, 1), (1, 1))]
    assert head(torch.randn(3, 64, 32, 32)).shape == (3,)
    with pytest.raises(ValueError, match="bottleneck"):
        head(torch.randn(3, 64, 16, 16))


def test_generator_loss_reaches_x0_and_guidance_loss_trains_head_and_fake():
    unet, clf, cond = setup()
    x0_hat = torch.randn(2, 4, 16, 16, requires_grad=True)
    g_loss = clf.generator_loss(unet, x0_hat, cond, torch.Generator().manual_seed(0))
    assert g_loss.ndim == 0 and torch.isfinite(g_loss)
    g_loss.backward()
    assert x0_hat.grad is not None and x0_hat.grad.abs().sum() > 0
    unet.zero_grad(set_to_none=True)
    clf.zero_grad(set_to_none=True)

    real = torch.randn(2, 4, 16, 16)
    d_loss = clf.guidance_loss(unet, x0_hat, real, cond, torch.Generator().manual_seed(1))
    d_loss.backward()
    assert all(p.grad is not None for p in clf.parameters())
    assert unet.down_blocks[0].resnets[0].conv1.weight.grad is not None  # the fake UNet's encoder trains too
    assert unet.up_blocks[0].resnets[0].conv1.weight.grad is None  # nothing above the bottleneck is used
    assert {id(p) for p in clf.parameters()} == {id(p) for p in clf.head.parameters()}


def test_loss_formulas():
    lf, lr = torch.tensor([0.0, 2.0]), torch.tensor([1.0, -1.0])
    sp = torch.nn.functional.softplus
    assert float(generator_cls_loss(lf, 0.005)) == pytest.approx(0.005 * float(sp(-lf).mean()))
    assert float(guidance_cls_loss(lf, lr, 0.01)) == pytest.approx(0.01 * float(sp(lf).mean() + sp(-lr).mean()))

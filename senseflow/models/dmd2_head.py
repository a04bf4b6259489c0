"""DMD2 baseline: a GAN classifier on the fake UNet's bottleneck (docs/method.md §11.1-§11.2; SDXL only).

The classifier judges a latent x₀ after diffusion-GAN noising: t ~ sampler (U{0..999}), x_t = add_noise(x₀, ε, t),
the fake score F runs on (x_t, t, c) and the output of its ``mid_block`` (SDXL at 1024²: 1280 × 32 × 32) feeds

    [Conv 4×4 stride 2 pad 1 → GroupNorm → SiLU] × n   (spatial s → s/2 until s ≤ 4; n = 3 for s = 32)
    Conv s×s stride s → GroupNorm → SiLU                  (s → 1)
    Conv 1×1 → 1 logit

Losses (weights applied by the caller, config ``dmd2_cls.gen_weight`` 5e-3 / ``guidance_weight`` 1e-2):

    generator:  L = mean softplus(−l_fake)                         (on x̂₀ with grad)
    guidance:   L = mean softplus(l_fake) + mean softplus(−l_real)  (fake = detached x̂₀, real = real latents)
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from senseflow.core.condition import Condition
from senseflow.core.family import TeacherFamily
from senseflow.core.modules import unwrap
from senseflow.core.rng import NoiseSource, gaussian_like
from senseflow.core.schedules import Schedule, TimestepSampler

__all__ = [
    "MidBlockCapture",
    "bottleneck_shape",
    "DMD2ClassifierHead",
    "DMD2Classifier",
    "generator_cls_loss",
    "guidance_cls_loss",
]


class MidBlockCapture:
    """Context manager that records the output of ``unet.mid_block`` during the forwards inside the block."""

    def __init__(self, unet: nn.Module) -> None:
        mid = getattr(unwrap(unet), "mid_block", None)
        if mid is None:
            raise ValueError(f"DMD2 classifier: {type(unet).__name__} has no mid_block (expected a diffusers UNet)")
        self.module: nn.Module = mid
        self.output: Tensor | None = None
        self._handle: RemovableHandle | None = None

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.output = output[0] if isinstance(output, (tuple, list)) else output

    def __enter__(self) -> "MidBlockCapture":
        self.output = None
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def bottleneck_shape(unet_config: Any, latent_hw: Sequence[int]) -> tuple[int, int, int]:
    """(channels, h, w) of a diffusers ``UNet2DConditionModel`` mid-block output for latents of size ``latent_hw``:
    the last ``block_out_channels`` and one stride-2 downsampling (s → ⌈s/2⌉) per down block except the last."""
    get: Callable[[str], Any] = unet_config.get if isinstance(unet_config, dict) else lambda k: getattr(unet_config, k)
    channels = int(get("block_out_channels")[-1])
    h, w = int(latent_hw[0]), int(latent_hw[1])
    for _ in range(len(get("down_block_types")) - 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return channels, h, w


class DMD2ClassifierHead(nn.Module):
    """The conv tower from a (B, channels, s, s) bottleneck to one logit per sample (module docstring)."""

    def __init__(self, channels: int, spatial_size: int, norm_groups: int = 32) -> None:
        super().__init__()
        if spatial_size < 1:
            raise ValueError(f"DMD2 classifier: spatial size must be >= 1, got {spatial_size}")
        groups = math.gcd(int(norm_groups), int(channels))
        layers: list[nn.Module] = []
        s = int(spatial_size)
        while s > 4:
            layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.GroupNorm(groups, channels), nn.SiLU()]
            s = (s + 2 - 4) // 2 + 1
        layers += [nn.Conv2d(channels, channels, s, stride=s), nn.GroupNorm(groups, channels), nn.SiLU()]
        layers.append(nn.Conv2d(channels, 1, 1))
        self.net = nn.Sequential(*layers)
        self.channels, self.spatial_size = int(channels), int(spatial_size)

    def forward(self, feat: Tensor) -> Tensor:
        if feat.ndim != 4 or feat.shape[1] != self.channels or tuple(feat.shape[-2:]) != (self.spatial_size,) * 2:
            raise ValueError(
                f"DMD2 classifier: expected bottleneck (B, {self.channels}, {self.spatial_size}, {self.spatial_size}), "
                f"got {tuple(feat.shape)}"
            )
        dtype = next(self.net.parameters()).dtype  # the first conv's weight
        return self.net(feat.to(dtype)).reshape(feat.shape[0])


def generator_cls_loss(logits_fake: Tensor, weight: float = 1.0) -> Tensor:
    """weight · mean softplus(−l_fake) (non-saturating generator loss)."""
    return weight * F.softplus(-logits_fake.float()).mean()


def guidance_cls_loss(logits_fake: Tensor, logits_real: Tensor, weight: float = 1.0) -> Tensor:
    """weight · (mean softplus(l_fake) + mean softplus(−l_real)) (classifier loss of the guidance model)."""
    return weight * (F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean())


class DMD2Classifier(nn.Module):
    """The head plus the diffusion-GAN noising and the bottleneck capture; its parameters are the head's.

    ``family``, ``schedule`` and ``sampler`` (t ~ U{0..999} in the preset) are plain attributes, not submodules.
    """

    def __init__(
        self, head: DMD2ClassifierHead, family: TeacherFamily, schedule: Schedule, sampler: TimestepSampler
    ) -> None:
        super().__init__()
        self.head = head
        self.family, self.schedule, self.sampler = family, schedule, sampler

    @classmethod
    def for_unet(
        cls,
        unet: nn.Module,
        latent_hw: Sequence[int],
        family: TeacherFamily,
        schedule: Schedule,
        sampler: TimestepSampler,
        norm_groups: int = 32,
    ) -> "DMD2Classifier":
        """Size the head from the UNet config and the latent resolution (square bottleneck required)."""
        channels, h, w = bottleneck_shape(unwrap(unet).config, latent_hw)
        if h != w:
            raise ValueError(f"DMD2 classifier: bottleneck {h}×{w} is not square (latent size {tuple(latent_hw)})")
        return cls(DMD2ClassifierHead(channels, h, norm_groups), family, schedule, sampler)

    def logits(self, fake: nn.Module, x0: Tensor, cond: Condition, noise_gen: NoiseSource) -> Tensor:
        """[B] logits of latents ``x0`` noised at t ~ sampler (t and ε from ``noise_gen``)."""
        b = x0.shape[0]
        t = self.sampler.sample(self.schedule, b, noise_gen).to(x0.device)
        x_t = self.schedule.add_noise(x0, gaussian_like(x0, noise_gen), t)
        with MidBlockCapture(fake) as cap:
            self.family.predict(fake, x_t, t, cond)
        if cap.output is None:
            raise RuntimeError("DMD2 classifier: the UNet forward did not run its mid_block")
        return self.head(cap.output)

    def generator_loss(self, fake: nn.Module, x0_hat: Tensor, cond: Condition, noise_gen: NoiseSource) -> Tensor:
        """mean softplus(−l(x̂₀)); the gradient reaches x̂₀ through F (F's own grads are the trainer's to zero)."""
        return generator_cls_loss(self.logits(fake, x0_hat, cond, noise_gen))

    def guidance_loss(
        self,
        fake: nn.Module,
        x0_fake: Tensor,
        x0_real: Tensor,
        cond: Condition,
        noise_gen: NoiseSource,
        cond_real: Condition | None = None,
    ) -> Tensor:
        """mean softplus(l(sg(x̂₀))) + mean softplus(−l(x_real)); trains the head and F."""
        l_fake = self.logits(fake, x0_fake.detach(), cond, noise_gen)
        l_real = self.logits(fake, x0_real, cond if cond_real is None else cond_real, noise_gen)
        return guidance_cls_loss(l_fake, l_real)

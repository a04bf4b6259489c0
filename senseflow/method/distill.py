"""One SenseFlow / DMD2 iteration's losses, model-agnostic (docs/method.md §1.2-§1.3, §4-§11).

The :class:`Distiller` owns *what* is computed: the generator input (§4.2), the generator loss
L_G = L_DMD + L_adv + λ_ISG·L_ISG (§1.2), the fake-score loss L_F (§6), the discriminator's hinge loss (§9.3) and
the DMD2 baseline's classifier losses (§11). It never steps an optimiser: :mod:`senseflow.method.distillation`
declares the players and the trainer steps them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from senseflow.core import rng as draws
from senseflow.core.checks import need
from senseflow.core.condition import Condition
from senseflow.core.family import TeacherFamily
from senseflow.core.rng import RunRNG
from senseflow.core.schedules import Schedule, TimestepSampler
from senseflow.method import dmd, gan, isg
from senseflow.method.guidance import draw_guidance_scale, guidance_kind
from senseflow.method.isg import ISGOptions, draw_midpoint
from senseflow.method.sampling import backward_simulate

if TYPE_CHECKING:
    from senseflow.models.dmd2_head import DMD2Classifier


def sampler_from(cfg: Any) -> TimestepSampler:
    """A :class:`TimestepSampler` from a config node (kind, low, high, mean, std, apply_shift)."""
    return TimestepSampler(
        kind=str(cfg.kind), low=int(cfg.low), high=int(cfg.high),
        mean=float(cfg.mean), std=float(cfg.std), apply_shift=bool(cfg.apply_shift),
    )


@dataclass
class Decisions:
    """The draws of one iteration that every rank and every micro-batch share (docs/method.md, decision 2)."""

    backsim: bool
    k: int
    dmd_guidance: float
    isg_guidance: float
    isg_mid: Tensor | None  # τ_m of ISG's segment (§8), None when ISG is off

    def values(self) -> tuple:
        """Plain values every rank must agree on (checked by the trainer)."""
        mid = None if self.isg_mid is None else [float(v) for v in torch.as_tensor(self.isg_mid).reshape(-1)]
        return bool(self.backsim), int(self.k), float(self.dmd_guidance), float(self.isg_guidance), mid

    def logs(self) -> dict[str, float]:
        return {"decision/backsim": float(self.backsim), "decision/k": float(self.k)}


@dataclass
class MicroBatch:
    """Everything one micro-batch carries from the generator forward to the fake-score and discriminator steps."""

    cond: Condition
    text_embed: Tensor | None  # CLIP text embedding c for D (L2-normalised)
    real_pixels: Tensor | None  # r: real image in [-1, 1] for D (real sample and reference)
    real_latents: Tensor  # z_real
    noise: list[torch.Generator]  # one generator per sample (per-rank noise, docs/method.md decision 2)
    x_in: Tensor
    tau_k: Tensor
    pred: Tensor | None = None
    x0_hat: Tensor | None = None
    fake_pixels: Tensor | None = None  # decoded x̂₀ (detached) for D's fake branch
    ref_feats: Any = None
    decisions: Decisions | None = None  # the iteration's shared decisions (G's and D's losses read them)
    logs: dict[str, float] = field(default_factory=dict)


class Distiller:
    """SenseFlow (IDA + ISG + VFM GAN) or the DMD2 baseline, configured by ``cfg.method``."""

    def __init__(
        self,
        method_cfg: Any,
        family: TeacherFamily,
        schedule: Schedule,
        anchors: Tensor,
        teacher: nn.Module,
        generator: nn.Module,
        fake: nn.Module,
        discriminator: nn.Module | None = None,
        text_conditioner: nn.Module | None = None,
        dmd2_head: DMD2Classifier | None = None,
    ) -> None:
        self.cfg = method_cfg
        self.family, self.schedule, self.anchors = family, schedule, anchors
        self.teacher, self.generator, self.fake = teacher, generator, fake
        self.discriminator, self.text_conditioner, self.dmd2_head = discriminator, text_conditioner, dmd2_head
        self.dmd_sampler = sampler_from(method_cfg.dmd.timestep)
        self.fake_sampler = sampler_from(method_cfg.fake.timestep)
        self.use_gan = bool(method_cfg.gan.enabled) and discriminator is not None
        self.use_isg = bool(method_cfg.isg.enabled)
        self.use_cls = bool(method_cfg.dmd2_cls.enabled) and dmd2_head is not None
        self.isg_options = ISGOptions.from_config(method_cfg.isg)
        # how the teacher is guided in DMD's real score and in ISG (None: the teacher folder's own kind)
        self.dmd_guidance_kind = guidance_kind(method_cfg.dmd)
        self.isg_guidance_kind = guidance_kind(method_cfg.isg)
        # grid indices for the reference GAN weight of the families that read the σ table at them (§10: SD3.5)
        self.gan_anchor_indices = gan.reference_anchor_indices(family, schedule, anchors)

    # ---- shared draws ------------------------------------------------------------------------------------
    def draw_decisions(self, rng: RunRNG) -> Decisions:
        """Coin, anchor index k and guidance scales, drawn once per iteration from the shared stream."""
        c = self.cfg
        backsim = rng.coin(float(c.backward_simulation_prob))
        k = rng.randint(0, len(self.anchors) - 1)
        dmd_g = draw_guidance_scale(float(c.dmd.guidance.min), float(c.dmd.guidance.max), rng.shared)
        isg_g = draw_guidance_scale(float(c.isg.guidance.min), float(c.isg.guidance.max), rng.shared)
        mid = draw_midpoint(self.schedule, self.anchors, k, self.isg_options, rng.shared) if self.use_isg else None
        return Decisions(backsim=backsim, k=k, dmd_guidance=dmd_g, isg_guidance=isg_g, isg_mid=mid)

    # ---- generator input (§4.2) ----------------------------------------------------------------------------
    @torch.no_grad()
    def generator_input(
        self, real_latents: Tensor, cond: Condition, d: Decisions, noise: list[torch.Generator]
    ) -> tuple[Tensor, Tensor]:
        """x_in = renoise(clean, ε_in, τ_k) with clean = backward simulation (prob p) or the real latents."""
        if d.backsim:
            clean = backward_simulate(self.family, self.generator, cond, self.anchors, d.k, noise, real_latents.shape)
        else:
            clean = real_latents
        b = real_latents.shape[0]
        tau_k = self.anchors[d.k].expand(b).to(real_latents.device)
        eps = draws.randn(tuple(real_latents.shape), noise, real_latents.device, real_latents.dtype)
        if d.k == 0:
            # τ₀ is pure noise for every family (σ = 1; SDXL's t = 999 is replaced by ε exactly, §4.2)
            return eps, tau_k
        return self.schedule.renoise(clean.to(eps.dtype), eps, tau_k), tau_k

    # ---- generator loss (§1.2) -----------------------------------------------------------------------------
    def generator_loss(self, mb: MicroBatch, d: Decisions) -> tuple[Tensor, dict[str, float]]:
        """L_G = w_DMD·L_DMD + L_adv + λ_ISG·L_ISG (+ DMD2's classifier term); ``mb.pred`` carries grad."""
        c = self.cfg
        x0_hat, pred = need(mb.x0_hat, "the generator's estimate x0_hat"), need(mb.pred, "the generator's prediction")
        logs: dict[str, float] = {}
        loss_dmd, dmd_logs = dmd.distribution_matching_loss(
            self.family, self.schedule, self.teacher, self.fake, x0_hat, mb.cond,
            self.dmd_sampler, d.dmd_guidance, mb.noise, eps=float(c.dmd.normalizer_eps),
            guidance_kind=self.dmd_guidance_kind,
        )
        total = float(c.dmd.weight) * loss_dmd
        logs.update({f"dmd/{k}": v for k, v in dmd_logs.items()})
        logs["loss/dmd"] = float(loss_dmd.detach())
        if self.use_isg:
            loss_isg, isg_logs = isg.isg_loss(
                self.family, self.schedule, self.generator, self.teacher, mb.x_in, pred, d.k, self.anchors,
                mb.cond, d.isg_guidance, self.isg_options, None, tau_mid=d.isg_mid,
                guidance_kind=self.isg_guidance_kind,
            )
            total = total + float(c.isg.weight) * loss_isg
            logs["loss/isg"] = float(loss_isg.detach())
            logs.update({f"isg/{k}": v for k, v in isg_logs.items()})
        if self.use_gan:
            img = self.family.decode_latents(x0_hat.float())
            mb.fake_pixels = img.detach().float()  # D's fake sample this iteration: decoded once, reused
            logits = need(self.discriminator, "the discriminator")(img, mb.text_embed, mb.ref_feats, mb.noise)
            w = self.time_weight(mb.tau_k, d.k)
            loss_adv = float(c.gan.weight) * gan.generator_hinge_loss(logits, w)
            total = total + loss_adv
            logs["loss/adv"] = float(loss_adv.detach())
        if self.use_cls:
            loss_cls = need(self.dmd2_head, "the DMD2 head").generator_loss(self.fake, x0_hat, mb.cond, mb.noise)
            total = total + float(c.dmd2_cls.gen_weight) * loss_cls
            logs["loss/gen_cls"] = float(loss_cls.detach())
        logs["loss/generator"] = float(total.detach())
        return total, logs

    def time_weight(self, tau_k: Tensor, k: int) -> Tensor:
        """w(τ_k) of docs/method.md §10 for the configured mode (decision 3)."""
        return gan.gan_time_weight(self.schedule, tau_k, str(self.cfg.gan.time_weight), self.anchor_index(k))

    def anchor_index(self, k: int) -> int | None:
        """The grid index of anchor k for the teacher families whose reference weight reads the table at it."""
        return None if self.gan_anchor_indices is None else self.gan_anchor_indices[k]

    # ---- fake score (§6) -------------------------------------------------------------------------------------
    def fake_loss(self, mb: MicroBatch) -> tuple[Tensor, dict[str, float]]:
        """L_F on the detached generator sample (+ DMD2's guidance classifier term)."""
        x0_hat = need(mb.x0_hat, "the generator's estimate x0_hat").detach()
        loss, logs = dmd.fake_score_loss(
            self.family, self.schedule, self.fake, x0_hat, mb.cond, self.fake_sampler, mb.noise
        )
        out = {f"fake/{k}": v for k, v in logs.items()}
        out["loss/fake"] = float(loss.detach())
        if self.use_cls:
            head = need(self.dmd2_head, "the DMD2 head")
            cls_loss = head.guidance_loss(self.fake, x0_hat, mb.real_latents, mb.cond, mb.noise)
            loss = loss + float(self.cfg.dmd2_cls.guidance_weight) * cls_loss
            out["loss/guidance_cls"] = float(cls_loss.detach())
        return loss, out

    # ---- discriminator (§9.3) --------------------------------------------------------------------------------
    def discriminator_loss(self, mb: MicroBatch, k: int) -> tuple[Tensor, dict[str, float]]:
        """Hinge loss on real r and detached fake decode, both weighted by the generator's w(τ_k)."""
        w = self.time_weight(mb.tau_k, k)
        disc = need(self.discriminator, "the discriminator")
        real_logits = disc(mb.real_pixels, mb.text_embed, mb.ref_feats, mb.noise)
        fake = need(mb.fake_pixels, "the decoded fake sample").detach()
        fake_logits = disc(fake, mb.text_embed, mb.ref_feats, mb.noise)
        loss_real = gan.discriminator_hinge_loss(real_logits, w, real=True)
        loss_fake = gan.discriminator_hinge_loss(fake_logits, w, real=False)
        loss = loss_real + loss_fake
        return loss, {
            "loss/discriminator": float(loss.detach()),
            "loss/d_real": float(loss_real.detach()),
            "loss/d_fake": float(loss_fake.detach()),
        }

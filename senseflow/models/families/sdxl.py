"""SDXL family: UNet with ε-prediction on a DDPM schedule, two CLIP text encoders and size/crop micro-conditioning.

Text conditioning (docs/method.md §12):

* prompt_embeds = [h₋₂(CLIP-L) ; h₋₂(CLIP-G)] on the channel axis (penultimate hidden states, 77 tokens):
  (B, 77, 768 + 1280) for the real teacher;
* pooled = the projected ``text_embeds`` of text_encoder_2 (B, 1280);
* time_ids = [orig_h, orig_w, crop_top, crop_left, target_h, target_w] (B, 6);
* unconditional = zeros for prompt_embeds and pooled, with the conditional branch's time_ids.

The UNet takes the integer t ∈ {0..999} and ``added_cond_kwargs={"text_embeds", "time_ids"}``.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from senseflow.core.anchors import anchor_indices
from senseflow.core.condition import Condition
from senseflow.core.family import TextComponent, vae_factor
from senseflow.core.schedules import DDPMSchedule, Schedule
from senseflow.models.families.loading import DiffusersFamily
from senseflow.tiny import TINY_CLIP, TINY_VAE, TinyTeacher

__all__ = ["SDXLFamily"]

#: the tiny SDXL teacher (``senseflow tiny --kind sdxl``): CLIP-L hidden 16, CLIP-G hidden 32 with projection 24,
#: UNet cross-attention width 16 + 32, added-embedding input 6 time ids · 8 + 24; SDXL base's scheduler config and
#: VAE normalisation z·0.13025
_TINY = TinyTeacher(
    text={
        "clip_l": dict(TINY_CLIP, hidden_size=16, intermediate_size=32, num_attention_heads=2, projection_dim=16),
        "clip_g": dict(TINY_CLIP, hidden_size=32, intermediate_size=64, num_attention_heads=4, projection_dim=24),
    },
    vae=dict(TINY_VAE, latent_channels=4, scaling_factor=0.13025),
    denoiser=dict(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 24,  # 6 time ids · addition_time_embed_dim + CLIP-G projection
        cross_attention_dim=16 + 32,  # CLIP-L hidden + CLIP-G hidden
        norm_num_groups=8,
    ),
    scheduler=dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   prediction_type="epsilon", interpolation_type="linear", steps_offset=1, timestep_spacing="leading",
                   use_karras_sigmas=False),
)


def _size_pairs(value: Tensor | Sequence | None, batch: int, default: tuple[int, int], name: str) -> Tensor:
    """A (B, 2) float tensor from None (→ ``default``), one pair, or B pairs."""
    if value is None:
        return torch.tensor([default], dtype=torch.float32).expand(batch, 2)
    t = torch.as_tensor(value, dtype=torch.float32).cpu()
    if t.shape == (2,):
        return t.expand(batch, 2)
    if t.shape != (batch, 2):
        raise ValueError(
            f"sdxl: {name} must be None, one (h, w) pair or a ({batch}, 2) tensor; got shape {tuple(t.shape)}"
        )
    return t


class SDXLFamily(DiffusersFamily):
    """SDXL teacher from a local diffusers folder (unet, vae, text_encoder[_2], tokenizer[_2], scheduler).

    ``resolution`` is the generation size (target size of the micro-conditioning, and the default original
    size); an int means a square image.
    """

    name = "sdxl"
    denoiser_subfolder = "unet"
    denoiser_class_name = "UNet2DConditionModel"
    pipeline_class_name = "StableDiffusionXLPipeline"
    vae_uses_shift = False   # the SDXL pipeline decodes z = x / scaling_factor
    scheduler_class_name = "EulerDiscreteScheduler"
    text_components = (
        TextComponent("text_encoder", "tokenizer", "CLIPTextModel", "clip_l", "CLIP-L text", "clip_vit_l14_text"),
        TextComponent("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection", "clip_g", "CLIP-bigG text",
                      "clip_bigg14_text_with_projection"),
    )
    guidance_kind = "cfg"
    schedule_kind = "ddpm"
    unet_bottleneck = True   # the DMD2 classifier head sits on it
    inference_flags = ("sdxl_ckpt", "unet_config")
    public_vae = "sdxl_vae"
    checkpoint_units = ("ResnetBlock2D", "BasicTransformerBlock")  # what diffusers checkpoints inside the UNet
    #: BasicTransformerBlock: self- and cross-attention projections and the (GEGLU) feed-forward
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
    tiny_teachers = MappingProxyType({"sdxl": _TINY})
    export_readme_note = (
        "`timesteps` are the training anchors; `guidance_scale=0` switches CFG off. The scheduler is an "
        "`EulerDiscreteScheduler` with the teacher's betas, which on ε-predictions is the DDIM move of the "
        "SenseFlow Euler sampler."
    )

    def __init__(
        self,
        path: str | Path,
        device: torch.device | str = "cpu",
        denoiser_dtype: torch.dtype = torch.float32,
        vae_dtype: torch.dtype = torch.float32,
        text_dtype: torch.dtype = torch.float32,
        clip_max_length: int = 77,
        student_path: str | Path | None = None,
        text_device: torch.device | str | None = None,
        resolution: int | tuple[int, int] = 1024,
    ) -> None:
        super().__init__(
            path, device, denoiser_dtype, vae_dtype, text_dtype, clip_max_length, student_path, text_device
        )
        self.target_size = (resolution, resolution) if isinstance(resolution, int) else (resolution[0], resolution[1])
        if self.scheduler_config.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(
                f"sdxl: {self.path / 'scheduler' / 'scheduler_config.json'} has prediction_type "
                f"{self.scheduler_config.get('prediction_type')!r}; only 'epsilon' is supported"
            )

    @classmethod
    def denoiser_widths(cls, text: Mapping[str, Mapping[str, Any]], latent_channels: int, latent_size: int,
                        denoiser: Mapping[str, Any]) -> dict[str, Any]:
        """UNet cross-attention width = CLIP-L hidden + CLIP-G hidden; added-embedding input = 6 time ids ·
        ``addition_time_embed_dim`` + CLIP-G projection; ``text_time`` micro-conditioning."""
        return dict(
            sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
            addition_embed_type="text_time",
            cross_attention_dim=int(text["clip_l"]["hidden_size"]) + int(text["clip_g"]["hidden_size"]),
            projection_class_embeddings_input_dim=6 * int(denoiser["addition_time_embed_dim"])
            + int(text["clip_g"]["projection_dim"]),
        )

    @classmethod
    def latent_multiple(cls, denoiser_config: Mapping[str, Any]) -> int:
        """Each UNet level after the first halves the latent: 2^(levels − 1)."""
        return 2 ** (len(denoiser_config.get("block_out_channels", (0,))) - 1)

    @classmethod
    def pixel_multiple(cls, vae_config: Mapping[str, Any], denoiser_config: Mapping[str, Any]) -> int:
        """The VAE factor alone: inference leaves odd latent sizes to the UNet, which pads them itself (diffusers'
        ``forward_upsample_size``)."""
        return vae_factor(vae_config)

    @classmethod
    def size_kwargs(cls, height: int, width: int) -> dict[str, Any]:
        """The micro-conditioning target size is the generation size."""
        return {"resolution": (height, width)}

    # ---- export --------------------------------------------------------------------------------------------
    @classmethod
    def export_scheduler_config(cls, teacher_config: Mapping[str, Any]) -> dict[str, Any]:
        """An ``EulerDiscreteScheduler`` with the teacher's β; ``timestep_spacing="leading"`` so that the initial
        latent is ε itself, as in training. Euler in σ-space on ε-predictions is the DDIM move of our sampler."""
        keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
        cfg = {k: teacher_config[k] for k in keep if k in teacher_config}
        cfg.update(_class_name=cls.scheduler_class_name, prediction_type="epsilon", interpolation_type="linear",
                   timestep_spacing="leading", steps_offset=1, use_karras_sigmas=False, final_sigmas_type="zero")
        return cfg

    @classmethod
    def export_pipeline_kwargs(cls, steps: int) -> dict[str, Any]:
        """``timesteps`` = our anchors (999, 749, 499, 249 for 4 steps), CFG off."""
        return {"timesteps": anchor_indices(steps), "guidance_scale": 0.0}

    @classmethod
    def block_types(cls) -> tuple[type, ...]:
        from diffusers.models.unets.unet_2d_blocks import (
            CrossAttnDownBlock2D,
            CrossAttnUpBlock2D,
            DownBlock2D,
            UpBlock2D,
        )

        return (DownBlock2D, CrossAttnDownBlock2D, UpBlock2D, CrossAttnUpBlock2D)

    # ---- memory plan ---------------------------------------------------------------------------------------
    @classmethod
    def public_denoiser(cls, hint: str) -> str:
        return "sdxl_unet"

    @classmethod
    def memory_inputs(cls, config: Mapping[str, Any], batch: int, latent_side: int, clip_length: int,
                      t5_length: int, dtype: torch.dtype, device: str = "meta") -> dict[str, Any]:
        """UNet(sample, t, CLIP hidden states, added_cond_kwargs = pooled text embeds and 6 time ids)."""
        kw: dict[str, Any] = dict(device=device, dtype=dtype)
        x = torch.zeros(batch, config["in_channels"], latent_side, latent_side, requires_grad=True, **kw)
        n_time = 6 * int(config.get("addition_time_embed_dim") or 0)
        text_embeds = int(config.get("projection_class_embeddings_input_dim") or 0) - n_time
        return dict(sample=x, timestep=torch.ones(batch, device=device),
                    encoder_hidden_states=torch.zeros(batch, clip_length, config["cross_attention_dim"], **kw),
                    added_cond_kwargs={"text_embeds": torch.zeros(batch, text_embeds, **kw),
                                       "time_ids": torch.zeros(batch, 6, **kw)})

    # ---- schedule ------------------------------------------------------------------------------------------
    def schedule(self, height: int, width: int) -> Schedule:
        """DDPM ᾱ from the teacher's scheduler config (scaled-linear β 0.00085 → 0.012, 1000 steps)."""
        return DDPMSchedule.from_scheduler_config(self.scheduler_config)

    # ---- text ----------------------------------------------------------------------------------------------
    def time_ids(
        self, batch: int, original_sizes: Tensor | Sequence | None = None, crop_coords: Tensor | Sequence | None = None
    ) -> Tensor:
        """(B, 6) = [orig_h, orig_w, crop_top, crop_left, target_h, target_w]; defaults: original = target, crop 0."""
        orig = _size_pairs(original_sizes, batch, self.target_size, "original_sizes")
        crop = _size_pairs(crop_coords, batch, (0, 0), "crop_coords")
        target = torch.tensor([self.target_size], dtype=torch.float32).expand(batch, 2)
        return torch.cat([orig, crop, target], dim=1).to(self.device)

    def encode_text(self, prompts: Sequence[str], original_sizes: Tensor | Sequence | None = None,
                       crop_coords: Tensor | Sequence | None = None) -> Condition:
        """[h₋₂(CLIP-L) ; h₋₂(CLIP-G)], pooled = CLIP-G projection, time ids from sizes and crops (§12)."""
        prompts = list(prompts)
        t = self.text
        hidden = []
        out: Any = None  # the second encoder's output (CLIP-G: its projection is the pooled embedding)
        for tok, enc in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            ids = self._tokenize(t[tok], prompts, self.clip_max_length)
            out = t[enc](ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        return self.assemble_condition(torch.cat(hidden, dim=-1).to(self.device), out.text_embeds.to(self.device),
                                       original_sizes, crop_coords)

    def assemble_condition(self, prompt_embeds: Tensor, pooled: Tensor,
                           original_sizes: Tensor | Sequence | None = None,
                           crop_coords: Tensor | Sequence | None = None) -> Condition:
        """The encoders' outputs with the time ids of the batch's sizes and crops."""
        return Condition(prompt_embeds=prompt_embeds, pooled=pooled,
                         time_ids=self.time_ids(len(prompt_embeds), original_sizes, crop_coords))

    def _compute_unconditional(self) -> Condition:
        """Zeros for prompt_embeds and pooled (the SDXL reference's unconditional branch)."""
        c = self.encode_prompts([""])
        return replace(c, prompt_embeds=torch.zeros_like(c.prompt_embeds), pooled=torch.zeros_like(c.pooled))

    def training_condition(self, prompts: Sequence[str], drop: Tensor, original_sizes: Tensor | Sequence | None = None,
                           crop_coords: Tensor | Sequence | None = None) -> Condition:
        """Dropped captions get zero prompt embeddings and pooled vector (SDXL's unconditional input), the time
        ids of their image."""
        c = self.encode_text(prompts, original_sizes, crop_coords)
        keep = (~drop.to(torch.bool)).to(c.prompt_embeds.device, c.prompt_embeds.dtype)
        return replace(c, prompt_embeds=c.prompt_embeds * keep[:, None, None], pooled=c.pooled * keep[:, None])

    def _unconditional_like(self, cond: Condition) -> Condition:
        """Zeros with the conditional branch's own time ids."""
        return replace(self.unconditional(len(cond)), time_ids=cond.time_ids)

    # ---- denoiser ------------------------------------------------------------------------------------------
    def predict(
        self, net: nn.Module, x: Tensor, tau: Tensor, cond: Condition, guidance: Tensor | float | None = None
    ) -> Tensor:
        """ε̂ = UNet(x_t, t, prompt_embeds, added_cond_kwargs={text_embeds: pooled, time_ids}); ``guidance`` unused."""
        xin, c, _ = self._cast_inputs(net, x, cond)
        if c.time_ids is None:
            raise ValueError("an SDXL condition needs its time ids (docs/method.md §12)")
        t = torch.as_tensor(tau, device=x.device)
        t = (t.expand(x.shape[0]) if t.ndim == 0 else t).long()
        out = net(
            xin,
            t,
            encoder_hidden_states=c.prompt_embeds,
            added_cond_kwargs={"text_embeds": c.pooled, "time_ids": c.time_ids.to(x.device)},
            return_dict=False,
        )[0]
        return out.to(x.dtype)

"""SD3 / SD3.5 family (Medium and Large are presets of one family): MMDiT, rectified flow, static shift.

Text conditioning (docs/method.md §12):

* CLIP part: [h₋₂(CLIP-L) ; h₋₂(CLIP-G)] on channels (77 tokens; 768 + 1280 = 2048 for the real teacher),
  zero-padded on the channel axis to the T5 width (4096). A CLIP width larger than the T5 width is an error
  (the stock pipeline would silently crop it);
* T5 part: T5 last hidden state with ``t5_max_length`` tokens (77 in SenseFlow; the pipeline default is 256);
* prompt_embeds = [CLIP part ; T5 part] on the sequence axis: (B, 77 + 77, 4096);
* pooled = [proj(CLIP-L) ; proj(CLIP-G)] (B, 768 + 1280);
* unconditional = the same encoding of the empty prompt "".

The transformer takes the timestep 1000·σ; it predicts the velocity v ≈ ε − x₀.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from senseflow.core.anchors import flow_anchor_grid
from senseflow.core.condition import Condition
from senseflow.core.family import TextComponent
from senseflow.core.schedules import Schedule
from senseflow.models.families.loading import DiffusersFamily, flow_schedule_from_config
from senseflow.tiny import TINY_CLIP, TINY_T5, TINY_VAE, TinyTeacher

__all__ = ["SD3Family"]

#: tiny SD3.5 components: CLIP-L (hidden 16, projection 16), CLIP-G (hidden 32, projection 24), T5 (d_model 64 ≥
#: 16 + 32: padded, never cropped); VAE (z − 0.0609)·1.5305 with 16 latent channels; scheduler shift 3
_TINY_TEXT = {
    "clip_l": dict(TINY_CLIP, hidden_size=16, intermediate_size=32, num_attention_heads=2, projection_dim=16),
    "clip_g": dict(TINY_CLIP, hidden_size=32, intermediate_size=64, num_attention_heads=4, projection_dim=24),
    "t5": dict(TINY_T5, d_model=64, d_ff=64),
}
_TINY_VAE = dict(TINY_VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                 use_post_quant_conv=False)
_TINY_TRANSFORMER = dict(
    sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=64,  # = T5 d_model
    caption_projection_dim=32,  # = heads · head_dim
    pooled_projection_dim=16 + 24,  # CLIP-L projection + CLIP-G projection
    pos_embed_max_size=32, qk_norm="rms_norm",
)
_TINY_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)


class SD3Family(DiffusersFamily):
    """SD3.5 teacher from a local diffusers folder (transformer, vae, text_encoder[_2,_3], tokenizer[_2,_3],
    scheduler). ``t5_max_length`` is the T5 token count (77 as in SenseFlow's training)."""

    name = "sd3"
    denoiser_subfolder = "transformer"
    denoiser_class_name = "SD3Transformer2DModel"
    default_t5_max_length = 77
    pipeline_class_name = "StableDiffusion3Pipeline"
    scheduler_class_name = "FlowMatchEulerDiscreteScheduler"
    aliases = ("sd35", "sd3.5", "sd35-medium", "sd35-large")
    text_components = (
        TextComponent("text_encoder", "tokenizer", "CLIPTextModelWithProjection", "clip_l", "CLIP-L text",
                      "clip_vit_l14_text_with_projection"),
        TextComponent("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection", "clip_g", "CLIP-G text",
                      "clip_bigg14_text_with_projection"),
        TextComponent("text_encoder_3", "tokenizer_3", "T5EncoderModel", "t5", "T5-XXL encoder", "t5_v1_1_xxl_encoder"),
    )
    guidance_kind = "cfg"
    schedule_kind = "flow"
    gan_reference_misindexed = True  # the released SD3.5 trainer's reference GAN weight (§10)
    inference_flags = ("sd35_ckpt", "transformer_config")
    public_vae = "sd3_vae"
    #: SD3.5 Medium (MMDiT-X: dual attention in the first block) and Large (plain MMDiT); both with RMS qk-norm
    tiny_teachers = MappingProxyType({
        "sd35-medium": TinyTeacher(_TINY_TEXT, _TINY_VAE, dict(_TINY_TRANSFORMER, dual_attention_layers=(0,)),
                                   _TINY_SCHEDULER),
        "sd35-large": TinyTeacher(_TINY_TEXT, _TINY_VAE, dict(_TINY_TRANSFORMER, dual_attention_layers=()),
                                  _TINY_SCHEDULER),
    })
    #: the transformer's timestep argument is timestep_scale·σ
    timestep_scale = 1000.0
    #: JointTransformerBlock: the joint attention's image and context projections, both feed-forwards
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                           "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
    export_readme_note = (
        "`sigmas` are the *unshifted* grid; the scheduler's shift 3 turns them into the training anchors "
        "σ = 1, 0.9, 0.75, 0.5. `guidance_scale=1` switches CFG off; `max_sequence_length=77` is the T5 "
        "length used in training."
    )

    def _load_text(self) -> dict[str, Any]:
        text = super()._load_text()
        clip_width = text["text_encoder"].config.hidden_size + text["text_encoder_2"].config.hidden_size
        t5_width = text["text_encoder_3"].config.d_model
        if clip_width > t5_width:
            raise ValueError(
                f"sd3: CLIP-L + CLIP-G hidden width {clip_width} exceeds the T5 width {t5_width} in {self.path}; "
                "the CLIP embeddings would be cropped (they are zero-padded to the T5 width)"
            )
        return text

    @classmethod
    def denoiser_widths(cls, text: Mapping[str, Mapping[str, Any]], latent_channels: int, latent_size: int,
                        denoiser: Mapping[str, Any]) -> dict[str, Any]:
        """Joint attention width = T5 d_model (≥ CLIP-L + CLIP-G hidden, which are zero-padded to it); pooled width =
        CLIP-L + CLIP-G projections; caption projection = heads · head dim; positions cover the latent's patches."""
        clip = int(text["clip_l"]["hidden_size"]) + int(text["clip_g"]["hidden_size"])
        t5 = int(text["t5"]["d_model"])
        if clip > t5:
            raise ValueError(f"sd3: text_encoders clip_l.hidden_size + clip_g.hidden_size = {clip} exceeds "
                             f"t5.d_model = {t5} (the pipeline zero-pads CLIP to the T5 width and would crop it)")
        patch = int(denoiser.get("patch_size", 2))
        return dict(
            sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
            joint_attention_dim=t5,
            caption_projection_dim=int(denoiser["num_attention_heads"]) * int(denoiser["attention_head_dim"]),
            pooled_projection_dim=int(text["clip_l"]["projection_dim"]) + int(text["clip_g"]["projection_dim"]),
            pos_embed_max_size=latent_size // patch,
        )

    @classmethod
    def block_types(cls) -> tuple[type, ...]:
        from diffusers.models.attention import JointTransformerBlock

        return (JointTransformerBlock,)

    # ---- memory plan ---------------------------------------------------------------------------------------
    @classmethod
    def public_denoiser(cls, hint: str) -> str:
        """SD3.5 Medium or Large, by the word in the experiment name or teacher path."""
        for size in ("large", "medium"):
            if size in hint:
                return f"sd35_{size}_transformer"
        raise ValueError("teacher.family=sd3: cannot tell SD3.5 Medium from Large (no 'medium'/'large' in "
                         "experiment.name or teacher.path, no local transformer/config.json); pass --denoiser "
                         "sd35_medium_transformer or sd35_large_transformer")

    @classmethod
    def memory_inputs(cls, config: Mapping[str, Any], batch: int, latent_side: int, clip_length: int,
                      t5_length: int, dtype: torch.dtype, device: str = "meta") -> dict[str, Any]:
        """MMDiT(latents, [CLIP ; T5] tokens of the joint width, pooled, timestep)."""
        kw: dict[str, Any] = dict(device=device, dtype=dtype)
        x = torch.zeros(batch, config["in_channels"], latent_side, latent_side, requires_grad=True, **kw)
        context = torch.zeros(batch, clip_length + t5_length, config["joint_attention_dim"], **kw)
        return dict(hidden_states=x, encoder_hidden_states=context,
                    pooled_projections=torch.zeros(batch, config["pooled_projection_dim"], **kw),
                    timestep=torch.ones(batch, device=device))

    @classmethod
    def latent_multiple(cls, denoiser_config: Mapping[str, Any]) -> int:
        return int(denoiser_config.get("patch_size", 2))

    @classmethod
    def max_pixel_side(cls, vae_config: Mapping[str, Any], denoiser_config: Mapping[str, Any]) -> int | None:
        """``pos_embed_max_size`` patches of :meth:`pixel_multiple` pixels each (None when the config has none)."""
        if not denoiser_config.get("pos_embed_max_size"):
            return None
        return int(denoiser_config["pos_embed_max_size"]) * cls.pixel_multiple(vae_config, denoiser_config)

    # ---- export --------------------------------------------------------------------------------------------
    @classmethod
    def export_pipeline_kwargs(cls, steps: int) -> dict[str, Any]:
        """``sigmas`` = the unshifted grid of our anchors (the teacher scheduler's shift 3 gives 1, .9, .75, .5 for
        4 steps), CFG off, the training T5 length (the pipeline's default is 256)."""
        return {"sigmas": flow_anchor_grid(steps), "guidance_scale": 1.0,
                "max_sequence_length": cls.default_t5_max_length}

    # ---- schedule ------------------------------------------------------------------------------------------
    def schedule(self, height: int, width: int) -> Schedule:
        """FlowSchedule(timestep_scale=1000, shift = the config's shift, 3 for SD3.5)."""
        _, h, w = self.latent_shape(height, width)
        p = self._latent_multiple()
        return flow_schedule_from_config(self.scheduler_config, self.timestep_scale, (h // p) * (w // p))

    # ---- text ----------------------------------------------------------------------------------------------
    def encode_text(self, prompts: Sequence[str], original_sizes: Tensor | None = None,
                       crop_coords: Tensor | None = None) -> Condition:
        """[pad([h₋₂(CLIP-L) ; h₋₂(CLIP-G)]) ; T5] on the sequence axis, pooled = [proj L ; proj G] (§12).

        ``original_sizes`` and ``crop_coords`` are SDXL-only and ignored.
        """
        prompts = list(prompts)
        t = self.text
        hidden, pooled = [], []
        for tok, enc in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            out = t[enc](self._tokenize(t[tok], prompts, self.clip_max_length), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        t5 = t["text_encoder_3"](self._tokenize(t["tokenizer_3"], prompts, self.t5_max_length))[0]
        clip = torch.cat(hidden, dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Condition(
            prompt_embeds=torch.cat([clip, t5], dim=-2).to(self.device),
            pooled=torch.cat(pooled, dim=-1).to(self.device),
        )

    # ---- denoiser ------------------------------------------------------------------------------------------
    def predict(
        self, net: nn.Module, x: Tensor, tau: Tensor, cond: Condition, guidance: Tensor | float | None = None
    ) -> Tensor:
        """v̂ = MMDiT(x_σ, 1000·σ, prompt_embeds, pooled); ``guidance`` unused (SD3.5 has no guidance embedding)."""
        xin, c, _ = self._cast_inputs(net, x, cond)
        sigma = torch.as_tensor(tau, device=x.device, dtype=torch.float32)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        out = net(
            hidden_states=xin,
            timestep=sigma * self.timestep_scale,
            encoder_hidden_states=c.prompt_embeds,
            pooled_projections=c.pooled,
            return_dict=False,
        )[0]
        return out.to(x.dtype)

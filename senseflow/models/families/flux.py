"""FLUX family: MMDiT on 2×2-packed latents, rectified flow with a resolution-dependent (dynamic) shift, and two
guidance kinds: FLUX.1-dev's distilled-guidance embedding (``embedding``, one forward with g) and, for a
de-distilled teacher whose transformer has no guidance embedder, classifier-free guidance (``cfg``: u + s·(c − u)
on the velocity, with the conditional and the empty-prompt branch).

Text conditioning (docs/method.md §12): pooled = CLIP-L ``pooler_output`` (B, 768) from 77 tokens; prompt_embeds = T5
last hidden state (B, 512, 4096); text_ids = zeros (512, 3) shared by the batch (2-D, as current diffusers wants);
unconditional = the encoding of "" (the CFG branch of a teacher without a guidance embedder).

Packing: a latent (B, C, h, w) becomes (B, h/2·w/2, 4C) tokens, token (i, j) holding the 2×2 patch
[c, 2i+a, 2j+b] at channel 4c + 2a + b; img_ids (h/2·w/2, 3) = (0, i, j). The transformer takes σ (it multiplies
by 1000 itself) and, iff ``guidance_embeds``, a per-sample guidance scale g. :meth:`FluxFamily.predict` packs,
calls, and unpacks, so the method only ever sees unpacked latents.

docs/method.md, decision 4: the student G and fake score F are the teacher's transformer rebuilt with
``guidance_embeds=False``, carrying every teacher weight except ``time_text_embed.guidance_embedder.*``.
"""
from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from senseflow.core.condition import Condition
from senseflow.core.family import TextComponent
from senseflow.core.schedules import Schedule
from senseflow.models.families.loading import DiffusersFamily, flow_schedule_from_config, net_config
from senseflow.tiny import TINY_CLIP, TINY_T5, TINY_VAE, TinyTeacher

__all__ = ["FluxFamily", "pack_latents", "unpack_latents", "latent_image_ids", "GUIDANCE_PREFIX"]

#: state-dict prefix of the distilled-guidance MLP that the student does not have
GUIDANCE_PREFIX = "time_text_embed.guidance_embedder."


def pack_latents(x: Tensor) -> Tensor:
    """(B, C, h, w) → (B, h/2·w/2, 4C): token (i, j), channel 4c + 2a + b = x[c, 2i + a, 2j + b]."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"flux: latent sides must be even for 2x2 packing, got {h}x{w}")
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of :func:`pack_latents` for a latent of size ``h`` × ``w``."""
    b, n, d = tokens.shape
    if n != (h // 2) * (w // 2) or d % 4:
        raise ValueError(f"flux: cannot unpack {tuple(tokens.shape)} into a {h}x{w} latent")
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def latent_image_ids(
    h: int, w: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """(h/2·w/2, 3) position ids of the packed tokens: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3, dtype=dtype)
    ids[..., 1] = torch.arange(h // 2, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w // 2, dtype=dtype)[None, :]
    return ids.reshape(-1, 3).to(device)


#: the tiny FLUX.1-dev teacher (``senseflow tiny --kind flux``): CLIP-L hidden 24 = pooled width, T5 d_model 32 =
#: joint width, 2×2 packing of 16 latent channels, the guidance embedding; VAE (z − 0.1159)·0.3611; dynamic shift
_TINY = TinyTeacher(
    text={
        "clip_l": dict(TINY_CLIP, hidden_size=24, intermediate_size=48, num_attention_heads=2, projection_dim=24),
        "t5": dict(TINY_T5, d_model=32, d_ff=48),
    },
    vae=dict(TINY_VAE, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
             use_post_quant_conv=False),
    denoiser=dict(
        patch_size=1, in_channels=64, out_channels=None, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24,
        guidance_embeds=True,  # FLUX.1-dev is guidance-distilled
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    ),
    scheduler=dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                   base_image_seq_len=256, max_image_seq_len=4096),
)
#: the tiny de-distilled FLUX teacher (``senseflow tiny --kind flux-dedistilled``): the same without the guidance
#: embedder, guided by classifier-free guidance (``method.*.guidance.kind: cfg``)
_TINY_DEDISTILLED = dataclasses.replace(_TINY, denoiser=dict(_TINY.denoiser, guidance_embeds=False))


class FluxFamily(DiffusersFamily):
    """FLUX teacher from a local diffusers folder (transformer, vae, text_encoder = CLIP-L, text_encoder_2 = T5,
    tokenizer[_2], scheduler). ``t5_max_length`` is 512 for FLUX.1-dev."""

    name = "flux"
    denoiser_subfolder = "transformer"
    denoiser_class_name = "FluxTransformer2DModel"
    default_t5_max_length = 512
    pipeline_class_name = "FluxPipeline"
    scheduler_class_name = "FlowMatchEulerDiscreteScheduler"
    text_components = (
        TextComponent("text_encoder", "tokenizer", "CLIPTextModel", "clip_l", "CLIP-L text", "clip_vit_l14_text"),
        TextComponent("text_encoder_2", "tokenizer_2", "T5EncoderModel", "t5", "T5-XXL encoder",
                      "t5_v1_1_xxl_encoder"),
    )
    guidance_kind = "embedding"   # FLUX.1-dev's distilled guidance input, not CFG
    guidance_kinds = ("embedding", "cfg")  # cfg: a de-distilled teacher, without the guidance embedder
    schedule_kind = "flow"
    inference_flags = ("flux_ckpt", "dit_config")
    public_vae = "flux_vae"
    tiny_teachers = MappingProxyType({"flux": _TINY, "flux-dedistilled": _TINY_DEDISTILLED})
    #: the transformer's timestep argument is σ itself
    timestep_scale = 1.0
    #: docs/method.md decision 4: G and F have no distilled-guidance embedding
    student_overrides = MappingProxyType({"guidance_embeds": False})
    student_ignore_prefixes = (GUIDANCE_PREFIX,)
    #: FluxTransformerBlock's joint attention and feed-forwards, FluxSingleTransformerBlock's MLP and output
    #: projections (``proj_out`` also names the final projection)
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                           "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                           "proj_mlp", "proj_out")
    export_readme_note = (
        "The student has no guidance embedding (`guidance_embeds: false`), so `guidance_scale` has no effect; "
        "do not pass `negative_prompt` (that would switch on true CFG)."
    )

    @classmethod
    def denoiser_widths(cls, text: Mapping[str, Mapping[str, Any]], latent_channels: int, latent_size: int,
                        denoiser: Mapping[str, Any]) -> dict[str, Any]:
        """Input width = 4 · latent channels (2×2 packing); joint width = T5 d_model; pooled width = CLIP-L hidden
        (the pipeline uses its pooler output); the teacher has FLUX.1-dev's guidance embedding."""
        rope = [int(a) for a in denoiser.get("axes_dims_rope", ())]
        if rope and sum(rope) != int(denoiser["attention_head_dim"]):
            raise ValueError(f"flux: denoiser.axes_dims_rope {rope} must sum to attention_head_dim "
                             f"{denoiser['attention_head_dim']}")
        return dict(in_channels=4 * latent_channels, out_channels=None, joint_attention_dim=int(text["t5"]["d_model"]),
                    pooled_projection_dim=int(text["clip_l"]["hidden_size"]), guidance_embeds=True)

    @classmethod
    def teacher_guidance(cls, denoiser_config: Mapping[str, Any]) -> tuple[str, str]:
        """``embedding`` for a guidance-distilled transformer (``guidance_embeds: true``, FLUX.1-dev), ``cfg`` for
        one without a guidance embedder (a de-distilled FLUX)."""
        if denoiser_config.get("guidance_embeds", False):
            return "embedding", "has a guidance embedder (guidance_embeds: true): a guidance-distilled teacher"
        return "cfg", ("has no guidance embedder (guidance_embeds is not true): a de-distilled teacher takes "
                       "classifier-free guidance")

    @classmethod
    def block_types(cls) -> tuple[type, ...]:
        from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

        return (FluxTransformerBlock, FluxSingleTransformerBlock)

    # ---- memory plan ---------------------------------------------------------------------------------------
    @classmethod
    def public_denoiser(cls, hint: str) -> str:
        return "flux_dev_transformer"

    @classmethod
    def memory_inputs(cls, config: Mapping[str, Any], batch: int, latent_side: int, clip_length: int,
                      t5_length: int, dtype: torch.dtype, device: str = "meta") -> dict[str, Any]:
        """FLUX(packed latents (side/2)² tokens, T5 tokens, pooled CLIP-L, timestep, image and text ids)."""
        kw: dict[str, Any] = dict(device=device, dtype=dtype)
        n_img = (latent_side // 2) ** 2
        x = torch.zeros(batch, n_img, config["in_channels"], requires_grad=True, **kw)
        context = torch.zeros(batch, t5_length, config["joint_attention_dim"], **kw)
        return dict(hidden_states=x, encoder_hidden_states=context,
                    pooled_projections=torch.zeros(batch, config["pooled_projection_dim"], **kw),
                    timestep=torch.ones(batch, device=device), img_ids=torch.zeros(n_img, 3, device=device),
                    txt_ids=torch.zeros(t5_length, 3, device=device))

    @classmethod
    def latent_multiple(cls, denoiser_config: Mapping[str, Any]) -> int:
        return 2  # 2×2 packing

    # ---- schedule ------------------------------------------------------------------------------------------
    def schedule(self, height: int, width: int) -> Schedule:
        """FlowSchedule(timestep_scale=1, μ = flux_mu(h/2·w/2 packed tokens, config's base/max len and shift))."""
        _, h, w = self.latent_shape(height, width)
        return flow_schedule_from_config(self.scheduler_config, self.timestep_scale, (h // 2) * (w // 2))

    # ---- student (docs/method.md, decision 4) --------------------------------------------------------------
    def build_student(self, teacher: nn.Module) -> nn.Module:
        """The teacher's transformer rebuilt with ``guidance_embeds=False``, in fp32, trainable.

        Every teacher weight is copied except ``time_text_embed.guidance_embedder.*`` (strict otherwise), or the
        weights come from ``student_path`` (which must itself have ``guidance_embeds=False``).
        """
        if self.student_path is not None:
            net = self._student_from_path(teacher)
            if net.config.guidance_embeds:
                raise ValueError(f"flux: student at {str(self.student_path)!r} has guidance_embeds=True; "
                                 "student and fake score must have no guidance embedding (docs/method.md, decision 4)")
            return net.train().requires_grad_(True)
        from accelerate import init_empty_weights

        source = self._teacher_fp32(teacher)
        config = dict(net_config(teacher))
        config.update(self.student_overrides)
        with init_empty_weights():
            net = self.denoiser_class.from_config(config)
        weights = {k: v for k, v in source.state_dict().items() if not k.startswith(self.student_ignore_prefixes)}
        net.load_state_dict(weights, strict=True, assign=True)
        return net.to(torch.float32).train().requires_grad_(True)

    # ---- export --------------------------------------------------------------------------------------------
    @classmethod
    def export_scheduler_config(cls, teacher_config: Mapping[str, Any]) -> dict[str, Any]:
        """The teacher's ``FlowMatchEulerDiscreteScheduler`` unchanged; it must shift dynamically (FLUX's anchors)."""
        config = super().export_scheduler_config(teacher_config)
        if not config.get("use_dynamic_shifting", False):
            raise ValueError("the FLUX teacher's scheduler has no dynamic shifting; its anchors would not be FLUX's")
        return config

    @classmethod
    def export_pipeline_kwargs(cls, steps: int) -> dict[str, Any]:
        """``FluxPipeline(num_inference_steps=N)`` uses σ_k = shift_μ(1 − k/N) with μ from the image-token count:
        our anchors (:func:`senseflow.core.anchors.make_anchors`); the student takes no guidance."""
        return {"num_inference_steps": steps}

    # ---- text ----------------------------------------------------------------------------------------------
    def encode_text(self, prompts: Sequence[str], original_sizes: Tensor | None = None,
                       crop_coords: Tensor | None = None) -> Condition:
        """pooled = CLIP-L pooler_output, prompt_embeds = T5 last hidden state, text_ids = zeros (§12).

        ``original_sizes`` and ``crop_coords`` are SDXL-only and ignored.
        """
        prompts = list(prompts)
        t = self.text
        pooled = t["text_encoder"](
            self._tokenize(t["tokenizer"], prompts, self.clip_max_length), output_hidden_states=False
        ).pooler_output
        t5 = t["text_encoder_2"](
            self._tokenize(t["tokenizer_2"], prompts, self.t5_max_length), output_hidden_states=False
        )[0]
        return self.assemble_condition(t5.to(self.device), pooled.to(self.device))

    def assemble_condition(self, prompt_embeds: Tensor, pooled: Tensor, original_sizes: Tensor | None = None,
                           crop_coords: Tensor | None = None) -> Condition:
        """The encoders' outputs with text_ids = zeros (sequence, 3) in their dtype."""
        return Condition(prompt_embeds=prompt_embeds, pooled=pooled,
                         text_ids=torch.zeros(prompt_embeds.shape[1], 3, device=self.device, dtype=prompt_embeds.dtype))

    # ---- denoiser ------------------------------------------------------------------------------------------
    def has_guidance_embedding(self, net: nn.Module) -> bool:
        """Whether ``net`` takes a distilled-guidance input (FLUX.1-dev teacher: yes; student: no)."""
        return bool(getattr(net_config(net), "guidance_embeds", False))

    def predict(
        self, net: nn.Module, x: Tensor, tau: Tensor, cond: Condition, guidance: Tensor | float | None = None
    ) -> Tensor:
        """v̂ = unpack(FLUX(pack(x_σ), σ, g, pooled, prompt_embeds, text_ids, img_ids)).

        ``guidance`` (float or [B]) is passed iff the net has a guidance embedding; such a net requires it, a net
        without one ignores it (like ``FluxPipeline`` ignoring ``guidance_scale`` for a no-guidance transformer).
        """
        b, _, h, w = x.shape
        xin, c, dtype = self._cast_inputs(net, x, cond)
        sigma = torch.as_tensor(tau, device=x.device, dtype=torch.float32)
        sigma = sigma.expand(b) if sigma.ndim == 0 else sigma
        g = None
        if self.has_guidance_embedding(net):
            if guidance is None:
                raise ValueError(
                    "flux: this transformer has a guidance embedding (guidance_embeds=True); pass guidance=g"
                )
            g = torch.as_tensor(guidance, device=x.device, dtype=torch.float32)
            g = g.expand(b) if g.ndim == 0 else g
        text_ids = c.text_ids if c.text_ids is not None else torch.zeros(c.prompt_embeds.shape[1], 3, device=x.device)
        out = net(
            hidden_states=pack_latents(xin),
            timestep=sigma.to(dtype) * self.timestep_scale,
            guidance=g,
            pooled_projections=c.pooled,
            encoder_hidden_states=c.prompt_embeds,
            txt_ids=text_ids.to(x.device, dtype),
            img_ids=latent_image_ids(h, w, x.device, dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w).to(x.dtype)

    def guided_predict(self, net: nn.Module, x: Tensor, tau: Tensor, cond: Condition, scale: Tensor | float,
                       kind: str | None = None) -> Tensor:
        """``embedding`` (FLUX.1-dev): the distilled-guidance embedding set to ``scale``, one forward.
        ``cfg`` (a de-distilled teacher): v_u + s·(v_c − v_u) from the conditional and the empty-prompt branch
        (:meth:`cfg_predict`). ``kind`` None is this teacher folder's kind; each kind needs its transformer:
        ``embedding`` one with a guidance embedder, ``cfg`` one without."""
        kind = self._guidance_kind(kind)
        embedded = self.has_guidance_embedding(net)
        if kind == "cfg":
            if embedded:
                raise ValueError("flux: guidance kind 'cfg' needs a transformer without a guidance embedder; this "
                                 "one is guidance-distilled (guidance_embeds=True): use guidance kind 'embedding'")
            return self.cfg_predict(net, x, tau, cond, scale)
        if not embedded:
            raise ValueError("flux: guidance kind 'embedding' needs a guidance-distilled transformer "
                             "(guidance_embeds=True); a de-distilled teacher takes guidance kind 'cfg', and the "
                             "student has no guidance input (docs/method.md, decision 4)")
        return self.predict(net, x, tau, cond, guidance=scale)

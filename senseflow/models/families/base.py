"""The teacher-family seam: everything that differs between SDXL, SD3.5 and FLUX lives behind this interface.

A family loads the denoiser, VAE and text encoders of one local diffusers folder, turns captions into a
:class:`Condition`, calls a denoiser on ``(x, τ, condition)`` returning its raw prediction in the *unpacked*
latent layout (B, C, h, w), moves between pixels and latents with the VAE's scaling and shift factors, and
names its :class:`~senseflow.method.schedules.Schedule`. The method and the trainer never ask which teacher
they distil.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields, replace
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from senseflow.method.schedules import Schedule


@dataclass
class Condition:
    """Text conditioning of a batch (docs/method.md §12). Tensors are batch-first unless noted.

    * ``prompt_embeds``: SDXL (B, 77, 2048); SD3.5 (B, 154, 4096); FLUX (B, 512, 4096) at full width.
    * ``pooled``: SDXL text_encoder_2 projection (B, 1280); SD3.5 CLIP-L ⊕ CLIP-G projections (B, 2048);
      FLUX CLIP-L pooler output (B, 768).
    * ``time_ids``: SDXL only, (B, 6) = [orig_h, orig_w, crop_top, crop_left, target_h, target_w].
    * ``text_ids``: FLUX only, (seq, 3) zeros, shared by the batch (not batch-first).
    """

    prompt_embeds: Tensor
    pooled: Tensor
    time_ids: Tensor | None = None
    text_ids: Tensor | None = None

    _BATCHED = ("prompt_embeds", "pooled", "time_ids")

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Condition":
        """Move every tensor; ``dtype`` applies to floating tensors only (ids and time ids keep theirs)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                out[f.name] = None
            elif dtype is not None and f.name in ("prompt_embeds", "pooled"):
                out[f.name] = v.to(device=device, dtype=dtype)
            else:
                out[f.name] = v.to(device=device)
        return Condition(**out)

    def index(self, sel: Tensor | slice | Sequence[int]) -> "Condition":
        """Select samples of the batch."""
        return replace(self, **{n: getattr(self, n)[sel] for n in self._BATCHED if getattr(self, n) is not None})

    def expand(self, batch: int) -> "Condition":
        """Repeat a batch-1 condition ``batch`` times (used for the cached unconditional condition)."""
        if len(self) == batch:
            return self
        if len(self) != 1:
            raise ValueError(f"cannot expand a condition of batch {len(self)} to {batch}")
        return replace(
            self,
            **{
                n: getattr(self, n).expand(batch, *getattr(self, n).shape[1:])
                for n in self._BATCHED
                if getattr(self, n) is not None
            },
        )

    @staticmethod
    def cat(conds: Sequence["Condition"]) -> "Condition":
        """Concatenate along the batch axis (e.g. [uncond, cond] for one CFG forward)."""
        first = conds[0]
        out = {
            n: torch.cat([getattr(c, n) for c in conds]) for n in Condition._BATCHED if getattr(first, n) is not None
        }
        return replace(first, **out)


@dataclass(frozen=True)
class TextComponent:
    """One text encoder of a family's pipeline: its component and tokenizer names in the diffusers folder, its
    ``transformers`` class, the architecture section that sizes it in a teacher config and a tiny teacher
    (``clip_l``, ``clip_g``, ``t5``), and for the memory plan its row label and the shipped public config
    (:mod:`senseflow.memory.arch`) used when the teacher folder has none."""

    encoder: str
    tokenizer: str
    class_name: str
    section: str
    label: str = ""
    public_config: str | None = None

    @property
    def is_t5(self) -> bool:
        return self.class_name == "T5EncoderModel"


class TeacherFamily(ABC):
    """Adapter for one teacher architecture loaded from a local diffusers folder.

    Subclasses: ``sdxl`` (UNet, DDPM ε), ``sd3`` (MMDiT, flow, static shift; Medium and Large are presets),
    ``flux`` (MMDiT with 2×2 packing, flow, dynamic shift, distilled-guidance embedding).
    """

    #: registry name used by ``teacher.family`` in configs
    name: str
    #: other names :func:`~senseflow.models.families.get_family` accepts (SD3: ``sd35``, ``sd35-large`` …)
    aliases: tuple[str, ...] = ()
    #: how the teacher guides (:meth:`guided_predict`): ``cfg`` (classifier-free guidance u + s·(c − u)) or
    #: ``embedding`` (a distilled guidance input, FLUX.1-dev); ``method.*.guidance.kind`` must name it
    guidance_kind: str = "cfg"
    #: ``flow`` (σ ∈ (0, 1], velocity; anchors are sigmas) or ``ddpm`` (integer t, ε-prediction; anchors are
    #: timesteps, and ISG's ``reference`` reduction of the released SDXL code applies)
    schedule_kind: str = "flow"
    #: whether the denoiser is a UNet with a bottleneck the DMD2 classifier head can sit on (SDXL)
    unet_bottleneck: bool = False
    #: diffusers subfolder of the denoiser ("unet" or "transformer")
    denoiser_subfolder: str
    #: denoiser config entries a student (G, F) differs in from the teacher (FLUX: ``guidance_embeds=False``,
    #: docs/method.md decision 4); applied by :meth:`build_student`, inference and export
    student_overrides: Mapping[str, Any] = MappingProxyType({})
    #: teacher state-dict prefixes the student has no parameters for (FLUX: the guidance embedder, §3.6); keys under
    #: them are dropped when a checkpoint is loaded into the student
    student_ignore_prefixes: tuple[str, ...] = ()

    # ---- loading -------------------------------------------------------------------------------------------
    @abstractmethod
    def load_denoiser(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> nn.Module:
        """The teacher denoiser T from ``<path>/<denoiser_subfolder>``."""

    @abstractmethod
    def build_student(self, teacher: nn.Module) -> nn.Module:
        """A trainable copy of the teacher's weights for G or F.

        FLUX: ``guidance_embeds=False`` (docs/method.md, decision 4).
        """

    # ---- schedule ------------------------------------------------------------------------------------------
    @abstractmethod
    def schedule(self, height: int, width: int) -> Schedule:
        """The family's schedule at this resolution (FLUX's dynamic shift depends on the image-token count)."""

    # ---- text ----------------------------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(
        self,
        prompts: Sequence[str],
        original_sizes: Tensor | None = None,
        crop_coords: Tensor | None = None,
    ) -> Condition:
        """Encode captions exactly as docs/method.md §12 (SDXL also builds time ids from sizes and crops)."""

    @abstractmethod
    def unconditional(self, batch: int) -> Condition:
        """The unconditional condition of §12 (SDXL zeros; SD3.5/FLUX the encoding of ""), computed once."""

    # ---- denoiser calls ------------------------------------------------------------------------------------
    @abstractmethod
    def predict(
        self, net: nn.Module, x: Tensor, tau: Tensor, cond: Condition, guidance: Tensor | float | None = None
    ) -> Tensor:
        """Raw prediction (v or ε) of ``net`` at (x, τ) in the unpacked latent layout (B, C, h, w).

        ``guidance`` feeds a distilled-guidance embedding and is used iff the net has one (FLUX.1-dev teacher).
        """

    @abstractmethod
    def guided_predict(self, net: nn.Module, x: Tensor, tau: Tensor, cond: Condition, scale: Tensor | float) -> Tensor:
        """The teacher's guided prediction: CFG ``u + s·(c − u)`` (SDXL, SD3.5) or the guidance embedding (FLUX)."""

    # ---- latents -------------------------------------------------------------------------------------------
    @abstractmethod
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the unpacked latent for an image of ``height`` × ``width`` pixels."""

    @abstractmethod
    def encode_pixels(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Pixels in [−1, 1] → normalised latents (z − shift)·scale, sampling the VAE posterior."""

    @abstractmethod
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Normalised latents → pixels in [−1, 1] (differentiable; the GAN's gradient flows through it)."""

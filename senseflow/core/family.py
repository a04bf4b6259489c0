"""The teacher-family seam: everything that differs between SDXL, SD3.5 and FLUX lives behind this interface.

A family loads the denoiser, VAE and text encoders of one local diffusers folder, turns captions into a
:class:`Condition`, calls a denoiser on ``(x, τ, condition)`` returning its raw prediction in the *unpacked*
latent layout (B, C, h, w), moves between pixels and latents with the VAE's scaling and shift factors, and
names its :class:`~senseflow.core.schedules.Schedule`. The method and the trainer never ask which teacher
they distil.

This module is the protocol only: the facts every tool reads from a family (its pipeline, denoiser and scheduler
classes, text components, inference flags, memory-plan and tiny-teacher tables, export arguments) and the runtime
calls the method makes. The diffusers loading that implements the calls is
:class:`senseflow.models.families.loading.DiffusersFamily`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from senseflow.core.condition import Condition
from senseflow.core.schedules import Schedule


def vae_factor(vae_config: Mapping[str, Any]) -> int:
    """Pixel-to-latent downscaling 2^(levels − 1) of a VAE config (8, four levels, when it does not say)."""
    return 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)


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

    Subclasses (through :class:`~senseflow.models.families.loading.DiffusersFamily`): ``sdxl`` (UNet, DDPM ε),
    ``sd3`` (MMDiT, flow, static shift; Medium and Large are presets),
    ``flux`` (MMDiT with 2×2 packing, flow, dynamic shift, distilled-guidance embedding or, for a de-distilled
    teacher, CFG).
    """

    #: registry name used by ``teacher.family`` in configs
    name: str
    #: other names :func:`~senseflow.models.families.get_family` accepts (SD3: ``sd35``, ``sd35-large`` …)
    aliases: tuple[str, ...] = ()
    #: how the family's stock teacher guides (:meth:`guided_predict`): ``cfg`` (classifier-free guidance
    #: u + s·(c − u)) or ``embedding`` (a distilled guidance input, FLUX.1-dev). A family instance holds the kind
    #: of its own teacher folder (:meth:`teacher_guidance`: a FLUX teacher without a guidance embedder is ``cfg``)
    guidance_kind: str = "cfg"
    #: every guidance kind the family can run; ``method.*.guidance.kind`` must be one of them
    #: (:meth:`guidance_kind_expectation`) and the teacher folder's (:meth:`teacher_guidance`)
    guidance_kinds: tuple[str, ...] = ("cfg",)
    #: ``flow`` (σ ∈ (0, 1], velocity; anchors are sigmas) or ``ddpm`` (integer t, ε-prediction; anchors are
    #: timesteps, and ISG's ``reference`` reduction of the released SDXL code applies)
    schedule_kind: str = "flow"
    #: whether the denoiser is a UNet with a bottleneck the DMD2 classifier head can sit on (SDXL)
    unet_bottleneck: bool = False
    #: whether the family's released trainer reads the §10 ``reference`` GAN time weight of a flow teacher from the
    #: *descending* σ table at the anchor's *ascending* grid index (SD3.5 Medium and Large) instead of (1 − σ)²
    #: (:func:`senseflow.method.gan.reference_anchor_indices`). Not inherited: a quirk of one released code base,
    #: so a family derived from another declares it itself
    gan_reference_misindexed: bool = False
    #: diffusers subfolder of the denoiser ("unet" or "transformer")
    denoiser_subfolder: str
    #: denoiser config entries a student (G, F) differs in from the teacher (FLUX: ``guidance_embeds=False``,
    #: docs/method.md decision 4); applied by :meth:`build_student`, inference and export
    student_overrides: Mapping[str, Any] = MappingProxyType({})
    #: teacher state-dict prefixes the student has no parameters for (FLUX: the guidance embedder, §3.6); keys under
    #: them are dropped when a checkpoint is loaded into the student
    student_ignore_prefixes: tuple[str, ...] = ()
    #: peft ``target_modules`` of a LoRA player when ``model.lora.<player>.target_modules`` is null (docs/method.md
    #: §3.8): the denoiser's attention projections and feed-forward linears, named as in its diffusers classes
    lora_target_modules: tuple[str, ...] = ()

    #: the text encoders and tokenizers of the family's pipeline
    text_components: tuple[TextComponent, ...] = ()
    #: the stock diffusers pipeline and scheduler classes of the family
    pipeline_class_name: str
    scheduler_class_name: str
    #: whether the family's pipeline decodes with the VAE's ``shift_factor`` (z = x/scale + shift); SDXL's does not
    vae_uses_shift: bool = True
    #: name of the denoiser's diffusers class (resolved at construction, so importing a family stays cheap)
    denoiser_class_name: str
    #: T5 token length when the family has a T5 encoder (SD3.5: 77, FLUX.1-dev: 512; §12), else None
    default_t5_max_length: int | None = None
    #: what the README of an exported folder says about the pipeline call (``senseflow export``)
    export_readme_note: str = ""
    #: the inference script's flags for the teacher folder and the student config (the authors' README names)
    inference_flags: tuple[str, str] = ("teacher", "student_config")
    #: memory plan: the shipped public VAE config (:mod:`senseflow.memory.arch`) used when the folder has none
    public_vae: str | None = None
    #: memory plan: the denoiser blocks whose inputs autograd checkpointing keeps (default: :meth:`block_types`)
    checkpoint_units: tuple[str, ...] | None = None
    #: tiny teachers of the family (``senseflow tiny --kind KIND``): kind → component configs
    tiny_teachers: Mapping[str, Any] = MappingProxyType({})
    #: a text cache (``data.text_cache``, :class:`senseflow.data.cache.TextCache`) that :meth:`encode_prompts` reads
    #: per caption instead of running the text encoders (which are then never loaded); None: encode on the fly
    text_cache: Any = None

    def __init__(self, **kwargs: Any) -> None:
        """A family is built by :func:`senseflow.models.families.build_family` with keyword arguments only:
        ``path``, ``device``, the dtypes and text lengths of a teacher config (see
        :class:`~senseflow.models.families.loading.DiffusersFamily`, which takes them)."""
        if kwargs:
            raise TypeError(f"{type(self).__name__} takes no constructor arguments, got {', '.join(kwargs)}")

    # ---- folders -------------------------------------------------------------------------------------------
    @classmethod
    def component_subfolders(cls) -> tuple[str, ...]:
        """Text subfolders that must exist (besides scheduler, vae and the denoiser's)."""
        return tuple(name for c in cls.text_components for name in (c.encoder, c.tokenizer))

    @classmethod
    def required_subfolders(cls) -> tuple[str, ...]:
        """Every component subfolder a teacher folder of this family must hold: scheduler, vae, the denoiser's and
        the text encoders' and tokenizers'."""
        return ("scheduler", "vae", cls.denoiser_subfolder, *cls.component_subfolders())

    @classmethod
    def denoiser_widths(cls, text: Mapping[str, Mapping[str, Any]], latent_channels: int, latent_size: int,
                        denoiser: Mapping[str, Any]) -> dict[str, Any]:
        """The denoiser config entries that the other components fix (channel counts, text widths, sizes), for a
        teacher built from scratch; ``text`` maps each :class:`TextComponent` section to its config."""
        raise NotImplementedError

    @classmethod
    def block_types(cls) -> tuple[type, ...]:
        """Denoiser block classes, one FSDP unit each."""
        return ()

    @classmethod
    def latent_multiple(cls, denoiser_config: Mapping[str, Any]) -> int:
        """Latent sides must be multiples of this for a denoiser of ``denoiser_config`` (patch size, 2×2 packing,
        UNet downsampling)."""
        return 1

    @classmethod
    def pixel_multiple(cls, vae_config: Mapping[str, Any], denoiser_config: Mapping[str, Any]) -> int:
        """Image sides that inference accepts must be multiples of this: the VAE factor 2^(levels − 1) (8 when the
        config lacks ``block_out_channels``) times :meth:`latent_multiple`."""
        return vae_factor(vae_config) * cls.latent_multiple(denoiser_config)

    @classmethod
    def max_pixel_side(cls, vae_config: Mapping[str, Any], denoiser_config: Mapping[str, Any]) -> int | None:
        """The largest image side the denoiser's position embedding covers, or None when there is no limit."""
        return None

    # ---- guidance kinds (read from configs only: checked before any network loads) ---------------------------
    @classmethod
    def guidance_kind_expectation(cls, kind: str) -> str | None:
        """None when the family can guide with ``kind``; else what a ``method.*.guidance.kind`` of this family must
        be, phrased for a config error ("'cfg' for teacher.family=sdxl (…)")."""
        if kind in cls.guidance_kinds:
            return None
        if "embedding" not in cls.guidance_kinds:
            why = "only FLUX teachers have a guidance embedding"
        else:
            why = "its teachers take no classifier-free guidance"
        allowed = " or ".join(repr(k) for k in cls.guidance_kinds)
        return f"{allowed} for teacher.family={cls.name} ({why})"

    @classmethod
    def teacher_guidance(cls, denoiser_config: Mapping[str, Any]) -> tuple[str, str]:
        """(kind, reason): the guidance kind a teacher whose denoiser has ``denoiser_config`` runs, and a phrase
        saying why, for messages ("has a guidance embedder …"). By default the family's :attr:`guidance_kind`."""
        return cls.guidance_kind, f"is a {cls.name} teacher"

    # ---- memory plan (``senseflow memory``) -----------------------------------------------------------------
    @classmethod
    def public_denoiser(cls, hint: str) -> str:
        """The shipped public denoiser config planned when the teacher folder has none; ``hint`` is the experiment
        name and teacher path (lower case), for families with several sizes."""
        raise ValueError(f"teacher.family={cls.name}: no shipped denoiser config and no local "
                         f"{cls.denoiser_subfolder}/config.json; pass --denoiser CONFIG")

    @classmethod
    def memory_inputs(cls, config: Mapping[str, Any], batch: int, latent_side: int, clip_length: int,
                      t5_length: int, dtype: torch.dtype, device: str = "meta") -> dict[str, Any]:
        """Keyword arguments of one student forward (no guidance input) at the run's shapes: ``batch`` latents of
        side ``latent_side`` (the latent requires grad) and the config's text lengths."""
        raise NotImplementedError(f"{cls.name}: no memory-plan inputs")

    @classmethod
    def size_kwargs(cls, height: int, width: int) -> dict[str, Any]:
        """Constructor arguments that the generation size fixes (SDXL: the micro-conditioning target size)."""
        return {}

    # ---- export (``senseflow export``) ---------------------------------------------------------------------
    @classmethod
    def export_scheduler_config(cls, teacher_config: Mapping[str, Any]) -> dict[str, Any]:
        """The scheduler config written beside an exported student, with which the stock pipeline runs our Euler
        sampler on our anchors; by default the teacher's own, which must be a ``scheduler_class_name``."""
        name = teacher_config.get("_class_name")
        if name != cls.scheduler_class_name:
            raise ValueError(
                f"the teacher's scheduler is {name!r}; a {cls.name} export needs {cls.scheduler_class_name}"
            )
        return dict(teacher_config)

    @classmethod
    def export_pipeline_kwargs(cls, steps: int) -> dict[str, Any]:
        """Keyword arguments with which the stock pipeline reproduces our ``steps``-step Euler sampler on an exported
        folder (anchors from :mod:`senseflow.core.anchors`)."""
        raise ValueError(f"a {cls.name} student cannot be exported: the family defines no pipeline arguments")


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
    def guided_predict(self, net: nn.Module, x: Tensor, tau: Tensor, cond: Condition, scale: Tensor | float,
                       kind: str | None = None) -> Tensor:
        """The teacher's guided prediction with guidance ``kind`` (one of :attr:`guidance_kinds`; None: the
        instance's :attr:`guidance_kind`): CFG ``u + s·(c − u)`` (SDXL, SD3.5, FLUX without a guidance embedder)
        or the guidance embedding (FLUX.1-dev). A kind the family or ``net`` cannot run raises ``ValueError``."""

    # ---- latents -------------------------------------------------------------------------------------------
    @abstractmethod
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the unpacked latent for an image of ``height`` × ``width`` pixels."""

    @abstractmethod
    def encode_pixels(self, pixels: Tensor, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """Pixels in [−1, 1] → normalised latents (z − shift)·scale, sampling the VAE posterior."""

    @abstractmethod
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Normalised latents → pixels in [−1, 1] (differentiable; the GAN's gradient flows through it)."""

"""The training config's schema: a tree of dataclasses (OmegaConf structured configs).

The sections are ``experiment``, ``teacher``, ``model``, ``schedule``, ``method``, ``discriminator``, ``optimizer``,
``train``, ``data`` and ``dist``. Defaults are the SD3.5-Medium preset values or neutral ones. Comments cite
docs/method.md as "§N" and "decision N".

A string field that takes one of a fixed set of values is declared with :func:`choice`: the allowed values live in
the field's metadata (:data:`CHOICES`), which :func:`senseflow.config.validation.validate` reads, so each set is
written once, here. (``typing.Literal`` is not used: OmegaConf 2.4 checks a ``Literal`` field while merging each
layer, with its own message, so an invalid value would fail before the later layers and without the "did you
mean" hint.) Value ranges are in :mod:`senseflow.config.validation`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from omegaconf import MISSING

from senseflow.core.dtypes import DTYPE_NAMES

__all__ = [
    "CHOICES",
    "choice",
    "SenseFlowConfig",
    "ExperimentConfig",
    "TeacherConfig",
    "ScheduleConfig",
    "TimestepSamplerConfig",
    "GuidanceConfig",
    "DMDConfig",
    "FakeConfig",
    "IDAConfig",
    "ISGConfig",
    "GANConfig",
    "DMD2ClsConfig",
    "MethodConfig",
    "DiscriminatorConfig",
    "OptimizerConfig",
    "EMAConfig",
    "TrainConfig",
    "DataConfig",
    "DistConfig",
    "LoraAdapterConfig",
    "LoraPlayersConfig",
    "ModelConfig",
]

#: field-metadata key of the values a field allows (for a list field: the values its items allow)
CHOICES = "choices"


def choice(default: str, choices: tuple[str, ...] | Callable[[], tuple[str, ...]]) -> Any:
    """A string field that must be one of ``choices`` (the validator reads them from the field's metadata); a
    callable gives them when a config is validated (the teacher families, which can be registered at run time)."""
    return field(default=default, metadata={CHOICES: choices})


def _family_names() -> tuple[str, ...]:
    """The registered teacher families (:func:`senseflow.models.families.family_names`)."""
    from senseflow.models.families import family_names

    return family_names()


#: how a teacher family guides (``TeacherFamily.guidance_kind``): classifier-free guidance u + s·(c − u) (SDXL,
#: SD3.5) or the distilled guidance embedding (FLUX.1-dev). ``method.*.guidance.kind`` must name the family's
#: (checked by :func:`validate`, so a mismatch fails before any model loads).
_GUIDANCE_KINDS = ("cfg", "embedding")
_SAMPLER_KINDS = ("uniform", "logit_normal")
_AUGMENTS = ("color", "translation", "cutout")


@dataclass
class ExperimentConfig:
    name: str = "senseflow"
    seed: int = 71801  # §3.5
    output_dir: str | None = None  # run folder; None = given on the command line


@dataclass
class TeacherConfig:
    family: str = choice("sd3", _family_names)  # a registered teacher family
    path: str = MISSING  # local diffusers folder with model_index.json
    student_path: str | None = None  # explicit initial weights for G and F (FLUX: decision 4 makes it optional)
    dtype: str = choice("bfloat16", DTYPE_NAMES)  # frozen teacher T (§3.3)
    vae_dtype: str = choice("float32", DTYPE_NAMES)
    text_encoder_dtype: str = choice("float32", DTYPE_NAMES)
    clip_max_length: int = 77  # §12
    t5_max_length: int = 77  # §12: SD3.5 77, FLUX 512
    resolution: int = 1024  # generation resolution in pixels (§2)


@dataclass
class ScheduleConfig:
    """Generator anchors τ₀ > τ₁ > … (§4.1): grid indices, or an explicit τ list that wins when set."""

    anchor_indices: list[int] = field(default_factory=lambda: [999, 749, 499, 249])
    anchors: list[float] | None = None  # explicit σ (flow) or t (DDPM)

    def num_steps(self) -> int:
        """Number of generator steps K (4 for every preset)."""
        return len(self.anchors if self.anchors is not None else self.anchor_indices)


@dataclass
class TimestepSamplerConfig:
    """Fields of :class:`senseflow.core.schedules.TimestepSampler` (grid index i, then τ)."""

    kind: str = choice("uniform", _SAMPLER_KINDS)
    low: int = 20
    high: int = 980
    mean: float = 0.0
    std: float = 1.0
    apply_shift: bool = True


@dataclass
class GuidanceConfig:
    """Teacher guidance scale s ~ U(min, max) drawn once per call. ``kind`` states how the teacher family guides and
    must match it (the family's ``guidance_kind``): ``cfg`` = classifier-free guidance (SDXL, SD3.5),
    ``embedding`` = FLUX.1-dev's distilled guidance input."""

    kind: str = choice("cfg", _GUIDANCE_KINDS)  # must be the teacher family's guidance_kind
    min: float = 2.0
    max: float = 8.0


@dataclass
class DMDConfig:
    weight: float = 1.0  # §10
    timestep: TimestepSamplerConfig = field(default_factory=TimestepSamplerConfig)  # §5
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)  # §5
    normalizer_eps: float = 1e-8  # guards the per-sample normaliser mean|x̂₀ − x_r| (§17.12)


@dataclass
class FakeConfig:
    timestep: TimestepSamplerConfig = field(
        default_factory=lambda: TimestepSamplerConfig(kind="logit_normal", low=0, high=999)
    )  # §6


@dataclass
class IDAConfig:
    enabled: bool = True
    lam: float = 0.98  # φ ← λ·φ + (1 − λ)·θ (§7)


@dataclass
class ISGConfig:
    enabled: bool = True
    weight: float = 0.5  # λ_ISG (§8)
    loss: str = choice("pseudo_huber", ("pseudo_huber", "l2"))  # decision 3
    huber_c: float = 1e-3
    guidance: GuidanceConfig = field(default_factory=lambda: GuidanceConfig(kind="cfg", min=2.0, max=4.0))
    margin: int = 50  # mid-point margin from both segment ends
    # index: in grid indices; timestep: in units of the net timestep (1000σ or DDPM t)
    margin_space: str = choice("index", ("index", "timestep"))
    # grid_start: the reference SD3.5 code's σ₄ = first grid σ (§8.1)
    last_segment_end: str = choice("zero", ("zero", "grid_start"))
    # §8.2, decision 3; reference is SDXL only: other families need intended
    sdxl_mode: str = choice("intended", ("intended", "reference"))
    # generator: §8, the paper; teacher: ablation with a two-step teacher target
    midpoint_model: str = choice("generator", ("generator", "teacher"))


@dataclass
class GANConfig:
    enabled: bool = True
    weight: float = 0.1  # gan_weight (§10)
    time_weight: str = choice("reference", ("reference", "paper"))  # §10: reference = the released checkpoints


@dataclass
class DMD2ClsConfig:
    """DMD2's classifier on the fake UNet bottleneck (§11), SDXL only."""

    enabled: bool = False
    gen_weight: float = 5e-3
    guidance_weight: float = 1e-2
    timestep: TimestepSamplerConfig = field(default_factory=lambda: TimestepSamplerConfig(low=0, high=999))


@dataclass
class MethodConfig:
    name: str = choice("senseflow", ("senseflow", "dmd2"))
    gd: int = 5  # TTUR: GD fake-score (and D) updates per generator update (§1.3)
    backward_simulation_prob: float = 0.5  # §4.2
    dmd: DMDConfig = field(default_factory=DMDConfig)
    fake: FakeConfig = field(default_factory=FakeConfig)
    ida: IDAConfig = field(default_factory=IDAConfig)
    isg: ISGConfig = field(default_factory=ISGConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    dmd2_cls: DMD2ClsConfig = field(default_factory=DMD2ClsConfig)


@dataclass
class DiscriminatorConfig:
    """VFM discriminator (§9): frozen DINOv2 + CLIP text, trainable heads."""

    dino_path: str | None = None  # local transformers Dinov2Model folder (decision 5)
    clip_path: str | None = None  # local transformers CLIP folder (text model with projection)
    hooks: list[int] = field(default_factory=lambda: [2, 5, 8, 10, 14, 19, 23])
    hook_patch: bool = True  # also use the patch embedding before block 0 (8 maps in all)
    cmap_dim: int = 64
    downsample: int = 3  # stride-2 convolutions per head
    kernel_size: int = 3  # k of the residual basic blocks (the first basic block is 1×1)
    virtual_batch: int = 8  # BatchNormLocal group size
    diffaug: list[str] = field(default_factory=lambda: list(_AUGMENTS), metadata={CHOICES: _AUGMENTS})
    translation_ratio: float = 0.125
    cutout_ratio: float = 0.2
    resolution: int | None = None  # None = judge at the generation resolution
    gradient_checkpointing: bool = False  # checkpoint the DINOv2 layers while grad flows through them (G step)


@dataclass
class OptimizerConfig:
    name: str = choice("adamw", ("adamw", "adamw8bit"))
    lr_generator: float = 1e-6
    lr_fake: float = 1e-6
    lr_discriminator: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0  # max grad norm for all players; null = no clipping
    warmup_steps: int = 500  # linear warm-up from lr_start to the player's lr
    lr_start: float = 1e-6
    decay: str = choice("none", ("none", "cosine"))  # after the warm-up (ours, the reference is constant)
    decay_steps: int = 0  # cosine: iterations from the end of the warm-up to lr_end_factor·lr
    lr_end_factor: float = 0.0  # cosine: final LR as a fraction of the player's lr


@dataclass
class EMAConfig:
    enabled: bool = False
    decay: float = 0.999
    warmup: float = 0.0  # d_n = min(decay, (1 + n)/(warmup + n)) after the n-th G step; 0: the constant decay


@dataclass
class TrainConfig:
    iterations: int = 10_000_000
    batch_size: int = 1  # per process
    grad_accum: int = 1
    mixed_precision: str = choice("auto", ("auto", "bf16", "fp32"))  # auto: bf16 on CUDA, fp32 on CPU
    gradient_checkpointing: bool = True
    vae_gradient_checkpointing: bool = False  # checkpoint the VAE decoder blocks in L_adv's decode with grad
    ema: EMAConfig = field(default_factory=EMAConfig)
    log_interval: int = 15
    preview_interval: int = 500  # 0 = no previews
    preview_prompts: list[str] = field(default_factory=list)
    save_interval: int = 3000
    keep_last: int = 3  # checkpoints kept; 0 = keep all
    device: str = choice("auto", ("auto", "cpu", "cuda"))


@dataclass
class DataConfig:
    path: str = MISSING
    kind: str = choice("auto", ("auto", "json", "jsonl", "lmdb"))
    resolution: int = 1024
    crop: str = choice("center", ("center", "random"))
    num_workers: int = 4
    pin_memory: bool = True
    persistent_workers: bool = True
    max_bad_samples: int = 100
    text_cache: str | None = None  # `senseflow data text-cache` folder; null = run the text encoders every batch


@dataclass
class DistConfig:
    strategy: str = choice("auto", ("auto", "none", "ddp", "fsdp"))
    hsdp: bool = False
    cpu_offload: bool = False
    backend: str = choice("auto", ("auto", "nccl", "gloo"))


@dataclass
class LoraAdapterConfig:
    """One player as a LoRA adapter on the teacher's frozen weights (docs/method.md §3.8); rank 0 = full weights."""

    rank: int = 0  # r of ΔW = (alpha/r)·B·A per target layer; 0: the player is a full fp32 copy (the presets)
    alpha: float | None = None  # LoRA scale numerator; null: alpha = rank (scale 1)
    target_modules: list[str] | None = None  # module-name patterns (peft); null: the family's lora_target_modules
    dropout: float = 0.0  # peft's lora_dropout on the adapter's input (training only)


@dataclass
class LoraPlayersConfig:
    student: LoraAdapterConfig = field(default_factory=LoraAdapterConfig)  # the generator G
    fake: LoraAdapterConfig = field(default_factory=LoraAdapterConfig)  # the fake score F


@dataclass
class ModelConfig:
    """How the trained networks are parametrised (docs/method.md §3.8)."""

    lora: LoraPlayersConfig = field(default_factory=LoraPlayersConfig)


@dataclass
class SenseFlowConfig:
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dist: DistConfig = field(default_factory=DistConfig)

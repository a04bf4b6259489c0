"""The teacher-training config (``configs/teacher/<family>.yaml``): schema, loading and validation.

Architecture sections (``text_encoders.<section>``, ``vae``, ``denoiser``, ``scheduler``) are passed to the real
classes' constructors, so they are free-form mappings; :func:`validate` checks each key against the class it sizes
(``CLIPTextConfig``, ``T5Config``, ``AutoencoderKL``, the family's denoiser and scheduler) before anything is
built. The widths that one component fixes for another (cross-attention width, pooled width, input channels …) are
not keys: the family derives them (``denoiser_widths``). Training sections are typed.
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from senseflow.config import ConfigError, load_structured
from senseflow.models.families import family_names

__all__ = [
    "TokenizerSettings",
    "VAETraining",
    "TimestepSettings",
    "DenoiserTraining",
    "GuidanceDistillation",
    "SampleSettings",
    "TeacherTrainConfig",
    "default_config_path",
    "load_teacher_config",
    "validate",
]

@dataclass
class TokenizerSettings:
    """Tokenizers trained on the data set's captions (and "")."""

    clip_vocab_size: int = 400
    t5_vocab_size: int = 200
    clip_max_length: int = 77
    # the T5 length the teacher is trained and sampled with (generation.max_sequence_length)
    t5_max_length: int = 77


@dataclass
class VAETraining:
    """Stage 1: mean‖D(z) − x‖² + kl_weight·KL(q(z|x) ‖ N(0, I)), z = μ + σ_q·ε (AdamW, warm-up then cosine)."""

    steps: int = 600
    batch_size: int = 32
    lr: float = 2.0e-3
    warmup_steps: int = 30
    kl_weight: float = 1.0e-4


@dataclass
class TimestepSettings:
    """How the denoiser's training τ is drawn: ``uniform`` t ∈ {low..high} (DDPM) or ``logit_normal``
    u = sigmoid(N(mean, std)) mapped through the family's (static or dynamic) shift (flow)."""

    kind: str = "logit_normal"
    mean: float = 0.0
    std: float = 1.0
    low: int = 0
    high: int = 999


@dataclass
class DenoiserTraining:
    """Stage 2: the family's own objective (ε on DDPM, v = ε − x₀ on flow), text encoders trained jointly. The EMA
    decay after step n (0-based) is min(ema_decay, (1 + n)/(ema_warmup + n))."""

    steps: int = 2000
    batch_size: int = 32
    lr: float = 1.0e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: int = 10
    caption_dropout: float = 0.1
    train_text_encoders: bool = True
    timesteps: TimestepSettings = field(default_factory=TimestepSettings)


@dataclass
class GuidanceDistillation:
    """Stage 3 (FLUX): one call with the guidance embedding g reproduces CFG u + g·(c − u) of the stage-2 model,
    g ~ U(scale_min, scale_max); ``train``: ``all`` parameters or only the ``guidance_embedder``."""

    steps: int = 0
    batch_size: int = 32
    lr: float = 3.0e-4
    warmup_steps: int = 50
    grad_clip: float = 1.0
    ema_decay: float = 0.99
    ema_warmup: int = 10
    scale_min: float = 1.0
    scale_max: float = 6.0
    train: str = "all"
    eval_scales: list[float] = field(default_factory=lambda: [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    eval_samples: int = 64


@dataclass
class SampleSettings:
    """The grid written at the end with the family's stock pipeline (prompts: the data set's first distinct
    captions when empty)."""

    steps: int = 28
    guidance_scale: float = 4.0
    prompts: list[str] = field(default_factory=list)
    num_prompts: int = 8
    images_per_prompt: int = 4
    seed: int = 0


@dataclass
class TeacherTrainConfig:
    """Everything that defines a teacher; the same config and data give the same teacher."""

    family: str = "sd3"
    resolution: int = 32
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 50
    tokenizers: TokenizerSettings = field(default_factory=TokenizerSettings)
    text_encoders: dict[str, Any] = field(default_factory=dict)
    vae: dict[str, Any] = field(default_factory=dict)
    denoiser: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    vae_training: VAETraining = field(default_factory=VAETraining)
    denoiser_training: DenoiserTraining = field(default_factory=DenoiserTraining)
    guidance_distillation: GuidanceDistillation = field(default_factory=GuidanceDistillation)
    sample: SampleSettings = field(default_factory=SampleSettings)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_config_path(family: str) -> Path:
    """``configs/teacher/<family>.yaml`` of the source checkout."""
    return Path(__file__).resolve().parents[2] / "configs" / "teacher" / f"{family}.yaml"


def load_teacher_config(path: str | Path, overrides: Sequence[str] = ()) -> TeacherTrainConfig:
    """Load and validate a teacher config (``defaults`` chains and ``key=value`` overrides as for training)."""
    cfg, _ = load_structured(path, overrides, TeacherTrainConfig)
    validate(cfg, str(path))
    return cfg


def _unknown(label: str, keys: Sequence[str], accepted: Sequence[str], what: str) -> None:
    for key in keys:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{label}: '{key}' is not a setting of {what}{hint}")


def _init_keys(cls: type) -> list[str]:
    init = getattr(cls, "__init__")  # the class's constructor (mypy refuses cls.__init__ on a type variable)
    return [n for n in inspect.signature(init).parameters if n not in ("self", "args", "kwargs")]


def validate(cfg: TeacherTrainConfig, label: str) -> None:
    """Check every range and every architecture key against the class it sizes; raises :class:`ConfigError`."""
    import diffusers
    import transformers

    from senseflow.core.family import vae_factor
    from senseflow.models.families import get_family

    def need(ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{label}: {key} = {_value(cfg, key)!r}: expected {expected}")

    families = family_names()  # every registered one (SD3.5 Medium and Large are one family, ``sd3``)
    need(cfg.family in families, "family", "one of " + ", ".join(families))
    fam = get_family(cfg.family)
    need(cfg.resolution > 0, "resolution", "a positive number of pixels")
    need(cfg.checkpoint_every > 0, "checkpoint_every", "a positive number of steps")
    need(cfg.log_every > 0, "log_every", "a positive number of steps")
    for stage in ("vae_training", "denoiser_training", "guidance_distillation"):
        s = getattr(cfg, stage)
        need(s.steps >= 0, f"{stage}.steps", "a number of steps ≥ 0")
        need(s.batch_size > 0, f"{stage}.batch_size", "a positive batch size")
        need(s.lr > 0, f"{stage}.lr", "a positive learning rate")
        need(s.warmup_steps >= 0, f"{stage}.warmup_steps", "≥ 0")
    need(cfg.vae_training.steps > 0, "vae_training.steps", "at least one step")
    need(cfg.denoiser_training.steps > 0, "denoiser_training.steps", "at least one step")
    d = cfg.denoiser_training
    need(0.0 <= d.caption_dropout < 1.0, "denoiser_training.caption_dropout", "a probability in [0, 1)")
    need(0.0 <= d.ema_decay < 1.0, "denoiser_training.ema_decay", "a decay in [0, 1)")
    need(d.ema_warmup >= 1, "denoiser_training.ema_warmup", "≥ 1 (steps over which the EMA decay ramps up)")
    need(d.timesteps.kind in ("uniform", "logit_normal"), "denoiser_training.timesteps.kind", "uniform or logit_normal")
    g = cfg.guidance_distillation
    need(g.train in ("all", "guidance_embedder"), "guidance_distillation.train", "all or guidance_embedder")
    need(0.0 <= g.ema_decay < 1.0, "guidance_distillation.ema_decay", "a decay in [0, 1)")
    need(g.ema_warmup >= 1, "guidance_distillation.ema_warmup", "≥ 1 (steps over which the EMA decay ramps up)")
    need(0 < g.scale_min <= g.scale_max, "guidance_distillation.scale_max", "≥ scale_min > 0")
    need(g.steps == 0 or fam.guidance_kind == "embedding", "guidance_distillation.steps",
         "0: only FLUX teachers carry a guidance embedding")
    ts = d.timesteps
    need(0 <= ts.low <= ts.high <= int(cfg.scheduler.get("num_train_timesteps", 1000)) - 1,
         "denoiser_training.timesteps.high", "low ≤ high < scheduler.num_train_timesteps")
    need(ts.std > 0, "denoiser_training.timesteps.std", "a positive standard deviation")
    need(g.eval_samples > 0, "guidance_distillation.eval_samples", "a positive number of draws")
    need(cfg.vae_training.kl_weight >= 0, "vae_training.kl_weight", "≥ 0")
    need(cfg.seed >= 0, "seed", "≥ 0")
    tok = cfg.tokenizers
    need(tok.clip_vocab_size > 0 and tok.t5_vocab_size > 0, "tokenizers.clip_vocab_size", "positive vocabulary sizes")
    need(0 < tok.clip_max_length <= 77, "tokenizers.clip_max_length", "1..77 (the pipelines' CLIP length)")
    need(0 < tok.t5_max_length <= 512, "tokenizers.t5_max_length", "1..512 (the pipelines' T5 limit)")
    if fam.schedule_kind == "ddpm":
        need(cfg.scheduler.get("prediction_type", "epsilon") == "epsilon", "scheduler.prediction_type",
             f"epsilon (the {cfg.family.upper()} family trains and distils ε-prediction)")
    need(cfg.sample.steps > 0, "sample.steps", "a positive number of steps")
    need(cfg.sample.num_prompts > 0 and cfg.sample.images_per_prompt > 0, "sample.num_prompts", "positive counts")

    # architecture sections against the classes they size
    sections = {c.section: c for c in fam.text_components}
    _unknown(f"{label}: text_encoders", list(cfg.text_encoders), list(sections), f"a {cfg.family} teacher "
             f"(its text encoders: {', '.join(sections)})")
    for name, comp in sections.items():
        if name not in cfg.text_encoders:
            raise ConfigError(f"{label}: text_encoders.{name} is missing (the {comp.class_name} of {comp.encoder})")
        config_cls = transformers.T5Config if comp.is_t5 else transformers.CLIPTextConfig
        _unknown(f"{label}: text_encoders.{name}", list(cfg.text_encoders[name]), list(config_cls().to_dict()),
                 config_cls.__name__)
    _unknown(f"{label}: vae", list(cfg.vae), _init_keys(diffusers.AutoencoderKL), "AutoencoderKL")
    need("block_out_channels" in cfg.vae, "vae.block_out_channels", "the VAE's channel list (its length sets the "
         "downscaling 2^(n−1))")
    _unknown(f"{label}: denoiser", list(cfg.denoiser), _init_keys(getattr(diffusers, fam.denoiser_class_name)),
             fam.denoiser_class_name)
    _unknown(f"{label}: scheduler", list(cfg.scheduler), _init_keys(getattr(diffusers, fam.scheduler_class_name)),
             fam.scheduler_class_name)
    factor = vae_factor(cfg.vae)
    multiple = factor * fam.latent_multiple(cfg.denoiser)
    if cfg.resolution % multiple:
        raise ConfigError(f"{label}: resolution = {cfg.resolution}: expected a multiple of {multiple} (the VAE "
                          f"downscales {factor}× and the {fam.denoiser_class_name} needs latent sides divisible "
                          f"by {multiple // factor})")
    try:
        derived = fam.denoiser_widths(cfg.text_encoders, int(cfg.vae.get("latent_channels", 4)),
                                      cfg.resolution // factor, cfg.denoiser)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"{label}: {e}") from None
    # keys the builder sets itself: from the tokenizers, the resolution, the VAE measurement or the other components
    set_by_builder = {
        **{f"text_encoders.{n}.{k}": "the tokenizer" for n in cfg.text_encoders for k in _TOKENIZER_KEYS},
        **{f"vae.{k}": "the VAE's depth, the resolution or the latent measurement" for k in _VAE_BUILDER_KEYS},
        **{f"denoiser.{k}": "the other components' widths" for k in derived},
    }
    for section, values in (("text_encoders", cfg.text_encoders), ("vae", cfg.vae), ("denoiser", cfg.denoiser)):
        keys = [f"{section}.{n}.{k}" for n, v in values.items() for k in v] if section == "text_encoders" \
            else [f"{section}.{k}" for k in values]
        for key in keys:
            if key in set_by_builder:
                raise ConfigError(f"{label}: {key} is not a setting: it is derived from {set_by_builder[key]}")


#: text-encoder config entries the builder takes from the trained tokenizer
_TOKENIZER_KEYS = ("vocab_size", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
                   "decoder_start_token_id")
#: AutoencoderKL arguments the builder sets (block types from the depth, size, normalisation measured after training)
_VAE_BUILDER_KEYS = ("down_block_types", "up_block_types", "sample_size", "scaling_factor", "shift_factor")


def _value(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else getattr(cfg, part)
    return cfg

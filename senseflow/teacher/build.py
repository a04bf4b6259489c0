"""A fresh teacher of any family, as a diffusers pipeline: tokenizers trained on the captions, random weights.

Every component is the real class the family's stock pipeline loads: CLIP / T5 tokenizers
(:mod:`senseflow.models.tokenizers`), the family's text encoders (``CLIPTextModel``, ``CLIPTextModelWithProjection``,
``T5EncoderModel``), an ``AutoencoderKL``, the family's denoiser and scheduler. Sizes come from the config's
architecture sections; the widths one component fixes for another come from the family
(``denoiser_widths``). Each component is initialised on a forked RNG seeded from ``seed`` and its position, so the
same config gives byte-identical weights.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from senseflow.core.family import vae_factor
from senseflow.models.families import get_family
from senseflow.models.tokenizers import train_clip_tokenizer, train_t5_tokenizer
from senseflow.teacher.config import TeacherTrainConfig

__all__ = ["build_pipeline", "vae_scale_factor", "latent_size"]


def vae_scale_factor(cfg: TeacherTrainConfig) -> int:
    """Pixel-to-latent downscaling 2^(levels − 1) of the config's VAE."""
    return vae_factor(cfg.vae)


def latent_size(cfg: TeacherTrainConfig) -> int:
    return cfg.resolution // vae_scale_factor(cfg)


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build()


def _text_config(comp, settings: dict, tokenizer, max_length: int):
    import transformers

    if comp.is_t5:
        return transformers.T5Config(**{"dropout_rate": 0.0, "is_encoder_decoder": False, **settings},
                                     vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id,
                                     # accepted at run time; transformers' T5Config signature omits it
                                     decoder_start_token_id=tokenizer.pad_token_id)  # type: ignore[call-arg]
    return transformers.CLIPTextConfig(**settings, vocab_size=len(tokenizer), max_position_embeddings=max_length,
                                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id)


def build_pipeline(cfg: TeacherTrainConfig, captions: Sequence[str]) -> Any:
    """The family's stock pipeline holding the fresh components (tokenizers trained on ``captions`` and "")."""
    import diffusers
    import transformers

    family = get_family(cfg.family)
    corpus = sorted(set(captions)) + [""]
    tok = cfg.tokenizers
    clip_tokenizer = train_clip_tokenizer(corpus, tok.clip_vocab_size, tok.clip_max_length)
    t5_tokenizer = train_t5_tokenizer(corpus, tok.t5_vocab_size, tok.t5_max_length) \
        if any(c.is_t5 for c in family.text_components) else None
    components: dict[str, Any] = {}
    for i, comp in enumerate(family.text_components):
        tokenizer = t5_tokenizer if comp.is_t5 else clip_tokenizer
        max_length = tok.t5_max_length if comp.is_t5 else tok.clip_max_length
        config = _text_config(comp, dict(cfg.text_encoders[comp.section]), tokenizer, max_length)
        model_cls = getattr(transformers, comp.class_name)
        components[comp.tokenizer] = tokenizer
        components[comp.encoder] = _seeded(cfg.seed * 100 + i, lambda: model_cls(config))
    n_levels = len(cfg.vae["block_out_channels"])
    vae_settings = dict(down_block_types=("DownEncoderBlock2D",) * n_levels,
                        up_block_types=("UpDecoderBlock2D",) * n_levels, sample_size=cfg.resolution,
                        scaling_factor=1.0, shift_factor=0.0, **cfg.vae)
    components["vae"] = _seeded(cfg.seed * 100 + 10, lambda: diffusers.AutoencoderKL(**vae_settings))
    channels = int(components["vae"].config.latent_channels)
    widths = family.denoiser_widths(cfg.text_encoders, channels, latent_size(cfg), cfg.denoiser)
    denoiser_cls = getattr(diffusers, family.denoiser_class_name)
    components[family.denoiser_subfolder] = _seeded(cfg.seed * 100 + 11,
                                                    lambda: denoiser_cls(**{**cfg.denoiser, **widths}))
    components["scheduler"] = getattr(diffusers, family.scheduler_class_name)(**cfg.scheduler)
    return getattr(diffusers, family.pipeline_class_name)(**components)

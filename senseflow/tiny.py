"""Tiny teachers of every family, in the diffusers folder layout, for tests and the CPU demo.

``build_tiny_teacher(kind, out_dir, seed)`` writes a complete folder (``model_index.json``, ``scheduler/``,
``vae/``, text encoders, tokenizers, ``unet/`` or ``transformer/``) made of the real diffusers / transformers
classes with a few thousand random weights each. The stock pipelines load it offline
(``StableDiffusionXLPipeline`` / ``StableDiffusion3Pipeline`` / ``FluxPipeline``.from_pretrained(folder,
local_files_only=True)``), and so do the :mod:`senseflow.models.families`.

What is kept from the real checkpoints (the things the method depends on):

* schedulers: SDXL ``EulerDiscreteScheduler`` with scaled-linear β ∈ [0.00085, 0.012] over 1000 steps
  (SDXL base's own ``scheduler_config.json``); SD3.5 ``FlowMatchEulerDiscreteScheduler(shift=3)``; FLUX.1-dev
  ``FlowMatchEulerDiscreteScheduler`` with dynamic shifting (μ from 0.5 at 256 tokens to 1.15 at 4096 tokens);
* VAE latent normalisation: SDXL z·0.13025; SD3.5 (z − 0.0609)·1.5305; FLUX (z − 0.1159)·0.3611; 8× downscaling;
* text-encoder roles and widths *relations*: SDXL CLIP-L ⊕ CLIP-G hidden = UNet cross-attention width; SD3 CLIP-L
  hidden + CLIP-G hidden ≤ T5 width (otherwise the pipeline's pad silently crops);
  FLUX pooled width = CLIP-L hidden, joint width = T5 width; FLUX.1-dev's distilled-guidance embedding.

Widths deliberately differ between encoders (e.g. CLIP-L 16, CLIP-G 32) so that a concatenation in the wrong
order or of the wrong tensor fails a shape test. Tokenizers are trained on :data:`CORPUS` by
:mod:`senseflow.models.tokenizers` (a CLIP-style byte-level BPE and a T5-style Unigram). Every random draw
happens inside a forked torch RNG seeded from ``seed``, so the same seed gives byte-identical files (weights,
tokenizers and configs) and the caller's global RNG is left untouched.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
from pathlib import Path
from typing import Iterator, Sequence

import torch

from senseflow.models.tokenizers import train_clip_tokenizer, train_t5_tokenizer

__all__ = [
    "CORPUS",
    "TINY_KINDS",
    "build_tiny_teacher",
    "build_tiny_discriminator_backbones",
    "tiny_clip_tokenizer",
    "tiny_t5_tokenizer",
    "main_tiny",
]

#: kinds accepted by :func:`build_tiny_teacher` and the family each one loads with
TINY_KINDS: dict[str, str] = {"sdxl": "sdxl", "sd35-medium": "sd3", "sd35-large": "sd3", "flux": "flux"}

#: the small built-in corpus the tiny tokenizers are trained on
CORPUS: tuple[str, ...] = (
    "a photo of a cat sitting on a red sofa",
    "a watercolor painting of a lighthouse at dawn",
    "an astronaut riding a horse on the moon, high detail",
    "a bowl of ramen with an egg and green onions",
    "portrait of an old fisherman, dramatic lighting, 85mm",
    "a futuristic city skyline at night with neon signs",
    "a small wooden cabin in a snowy forest",
    "a corgi wearing sunglasses on the beach",
    "an oil painting of sunflowers in a blue vase",
    "a red sports car driving through the desert",
    "macro shot of a dew drop on a green leaf",
    "a medieval castle on a hill under a stormy sky",
    "the word 'senseflow' written in the sand",
    "a cup of coffee and a croissant on a marble table",
    "low poly 3d render of a fox",
    "a robot reading a book in a library",
    "aerial view of a river winding through mountains",
    "a child flying a kite in a field of tulips",
    "studio photo of a pair of white sneakers",
    "a dragon made of clouds over the ocean",
    "an empty street in paris after the rain",
    "a plate of sushi, top view, soft light",
    "a hot air balloon over a valley at sunset",
    "pixel art of a knight fighting a slime",
    "a glass of orange juice with ice cubes",
    "an owl perched on a branch at midnight",
    "a bicycle leaning against a yellow wall",
    "a cozy living room with a fireplace and plants",
    "two dogs playing with a ball in the park",
    "a sailboat on calm water, 4k, photorealistic",
    "a teddy bear on a skateboard in times square",
    "a bunch of bananas, an apple and 3 oranges",
)

# ---- component configs (tiny, but with the real classes' relations; see the module docstring) --------------

_CLIP_COMMON = dict(num_hidden_layers=2, max_position_embeddings=77, hidden_act="gelu")
_VAE_COMMON = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 32),  # 4 levels: 8x downscaling like the real VAEs
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=128,
)
#: SDXL VAE: 4 latent channels, z·0.13025, with quant convs
VAE_SDXL = dict(_VAE_COMMON, latent_channels=4, scaling_factor=0.13025)
#: SD3.5 VAE: 16 latent channels, (z − 0.0609)·1.5305, no quant convs
VAE_SD3 = dict(_VAE_COMMON, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
               use_quant_conv=False, use_post_quant_conv=False)
#: FLUX VAE: 16 latent channels, (z − 0.1159)·0.3611, no quant convs
VAE_FLUX = dict(VAE_SD3, scaling_factor=0.3611, shift_factor=0.1159)

#: SDXL: text_encoder = CLIP-L (hidden 16), text_encoder_2 = CLIP-G with projection (hidden 32, projection 24)
SDXL_CLIP_L = dict(_CLIP_COMMON, hidden_size=16, intermediate_size=32, num_attention_heads=2, projection_dim=16)
SDXL_CLIP_G = dict(_CLIP_COMMON, hidden_size=32, intermediate_size=64, num_attention_heads=4, projection_dim=24)
SDXL_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    transformer_layers_per_block=(1, 2),
    projection_class_embeddings_input_dim=6 * 8 + 24,  # 6 time ids · addition_time_embed_dim + CLIP-G projection
    cross_attention_dim=16 + 32,  # CLIP-L hidden + CLIP-G hidden
    norm_num_groups=8,
)
#: SDXL base's scheduler_config.json (EulerDiscreteScheduler)
SCHEDULER_SDXL = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    interpolation_type="linear",
    steps_offset=1,
    timestep_spacing="leading",
    use_karras_sigmas=False,
)

#: SD3.5: CLIP-L (hidden 16, proj 16), CLIP-G (hidden 32, proj 24), T5 (d_model 64 ≥ 16 + 32: padded, never cropped)
SD3_CLIP_L = dict(_CLIP_COMMON, hidden_size=16, intermediate_size=32, num_attention_heads=2, projection_dim=16)
SD3_CLIP_G = dict(_CLIP_COMMON, hidden_size=32, intermediate_size=64, num_attention_heads=4, projection_dim=24)
SD3_T5 = dict(d_model=64, d_ff=64, d_kv=8, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
              relative_attention_max_distance=16, feed_forward_proj="gated-gelu")
_SD3_TRANSFORMER = dict(
    sample_size=16,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=64,  # = T5 d_model
    caption_projection_dim=32,  # = heads · head_dim
    pooled_projection_dim=16 + 24,  # CLIP-L projection + CLIP-G projection
    pos_embed_max_size=32,
    qk_norm="rms_norm",
)
#: SD3.5 Medium (MMDiT-X: dual attention in the first block) and Large (plain MMDiT); both with RMS qk-norm
SD35_MEDIUM_TRANSFORMER = dict(_SD3_TRANSFORMER, dual_attention_layers=(0,))
SD35_LARGE_TRANSFORMER = dict(_SD3_TRANSFORMER, dual_attention_layers=())
SCHEDULER_SD3 = dict(num_train_timesteps=1000, shift=3.0)

#: FLUX: CLIP-L (hidden 24 = pooled width), T5 (d_model 32 = joint width)
FLUX_CLIP_L = dict(_CLIP_COMMON, hidden_size=24, intermediate_size=48, num_attention_heads=2, projection_dim=24)
FLUX_T5 = dict(SD3_T5, d_model=32, d_ff=48)
FLUX_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,  # 2×2 packing of 16 latent channels
    out_channels=None,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=24,
    guidance_embeds=True,  # FLUX.1-dev is guidance-distilled
    axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
)
SCHEDULER_FLUX = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                      max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)

#: discriminator backbones (docs/method.md, decision 5): DINOv2 with patch 8 at 64 px (64 tokens) and a CLIP text tower
DINO_BACKBONE = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=2, image_size=64,
                     patch_size=8, num_channels=3, layerscale_value=1.0, use_swiglu_ffn=False)
CLIP_TEXT_BACKBONE = dict(_CLIP_COMMON, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          projection_dim=32)

_CLIP_VOCAB_SIZE = 700
_T5_VOCAB_SIZE = 200
_T5_MAX_LENGTH = 512


def tiny_clip_tokenizer():
    """The CLIP-style tokenizer of the tiny teachers, trained on :data:`CORPUS`."""
    return train_clip_tokenizer(CORPUS, _CLIP_VOCAB_SIZE, 77)


def tiny_t5_tokenizer():
    """The T5-style tokenizer of the tiny teachers, trained on :data:`CORPUS`."""
    return train_t5_tokenizer(CORPUS, _T5_VOCAB_SIZE, _T5_MAX_LENGTH)


# ---- builders ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run weight initialisation on a forked CPU RNG seeded with ``seed`` (the caller's RNG is restored after)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _clip_ids(tokenizer) -> dict:
    return dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


def _t5_ids(tokenizer) -> dict:
    return dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id, is_encoder_decoder=False)


def _prepare_out_dir(out_dir: str | Path, overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _build_sdxl(seed: int):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = tiny_clip_tokenizer()
    with _seeded(seed):
        text_encoder = CLIPTextModel(CLIPTextConfig(**SDXL_CLIP_L, **_clip_ids(tok)))
    with _seeded(seed + 1):
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_CLIP_G, **_clip_ids(tok)))
    with _seeded(seed + 2):
        vae = AutoencoderKL(**VAE_SDXL)
    with _seeded(seed + 3):
        unet = UNet2DConditionModel(**SDXL_UNET)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tok, tokenizer_2=tok,
        unet=unet, scheduler=EulerDiscreteScheduler(**SCHEDULER_SDXL),
    )


def _build_sd3(seed: int, transformer_cfg: dict):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_tok, t5_tok = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    with _seeded(seed):
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**SD3_CLIP_L, **_clip_ids(clip_tok)))
    with _seeded(seed + 1):
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SD3_CLIP_G, **_clip_ids(clip_tok)))
    with _seeded(seed + 2):
        text_encoder_3 = T5EncoderModel(T5Config(**SD3_T5, **_t5_ids(t5_tok)))
    with _seeded(seed + 3):
        vae = AutoencoderKL(**VAE_SD3)
    with _seeded(seed + 4):
        transformer = SD3Transformer2DModel(**transformer_cfg)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_SD3), vae=vae,
        text_encoder=text_encoder, tokenizer=clip_tok, text_encoder_2=text_encoder_2, tokenizer_2=clip_tok,
        text_encoder_3=text_encoder_3, tokenizer_3=t5_tok,
    )


def _build_flux(seed: int):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tok, t5_tok = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    with _seeded(seed):
        text_encoder = CLIPTextModel(CLIPTextConfig(**FLUX_CLIP_L, **_clip_ids(clip_tok)))
    with _seeded(seed + 1):
        text_encoder_2 = T5EncoderModel(T5Config(**FLUX_T5, **_t5_ids(t5_tok)))
    with _seeded(seed + 2):
        vae = AutoencoderKL(**VAE_FLUX)
    with _seeded(seed + 3):
        transformer = FluxTransformer2DModel(**FLUX_TRANSFORMER)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_FLUX), vae=vae, text_encoder=text_encoder,
        tokenizer=clip_tok, text_encoder_2=text_encoder_2, tokenizer_2=t5_tok, transformer=transformer,
    )


def build_tiny_teacher(kind: str, out_dir: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a tiny teacher of ``kind`` ∈ :data:`TINY_KINDS` as a diffusers folder at ``out_dir``; return its path.

    ``sd35-medium`` has dual attention in block 0 and RMS qk-norm (MMDiT-X); ``sd35-large`` has RMS qk-norm only;
    ``flux`` has FLUX.1-dev's distilled-guidance embedding (``guidance_embeds=True``). Same ``seed`` → byte-identical
    files. Takes about a second (plus imports).
    """
    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny teacher kind {kind!r}; expected one of {sorted(TINY_KINDS)}")
    out = _prepare_out_dir(out_dir, overwrite)
    if kind == "sdxl":
        pipe = _build_sdxl(seed)
    elif kind == "sd35-medium":
        pipe = _build_sd3(seed, SD35_MEDIUM_TRANSFORMER)
    elif kind == "sd35-large":
        pipe = _build_sd3(seed, SD35_LARGE_TRANSFORMER)
    else:
        pipe = _build_flux(seed)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def build_tiny_discriminator_backbones(out_dir: str | Path, seed: int = 0, overwrite: bool = False) -> dict[str, Path]:
    """Tiny backbones of the VFM discriminator (docs/method.md, decision 5): ``from_pretrained`` folders in ``out_dir``.

    * ``dino``: a ``transformers.Dinov2Model`` (patch 8, image 64 → 64 tokens, hidden 32, 4 layers);
    * ``clip``: a ``CLIPTextModelWithProjection`` (hidden 32, projection 32) and its ``CLIPTokenizer`` in one
      folder, like a hub CLIP repository.

    Returns ``{"dino": path, "clip": path}``.
    """
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, Dinov2Config, Dinov2Model

    out = _prepare_out_dir(out_dir, overwrite)
    tok = tiny_clip_tokenizer()
    with _seeded(seed):
        dino = Dinov2Model(Dinov2Config(**DINO_BACKBONE))
    with _seeded(seed + 1):
        clip = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_TEXT_BACKBONE, **_clip_ids(tok)))
    paths = {"dino": out / "dinov2", "clip": out / "clip_text"}
    dino.save_pretrained(paths["dino"], safe_serialization=True)
    clip.save_pretrained(paths["clip"], safe_serialization=True)
    tok.save_pretrained(paths["clip"])
    return paths


# ---- tiny image-caption set ----------------------------------------------------------------------------------

_SHAPE_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
_SHAPES = ("circle", "square")


def build_tiny_dataset(out_dir: str | Path, num_images: int = 16, size: tuple[int, int] = (80, 72), seed: int = 0,
                       overwrite: bool = False) -> Path:
    """A JSON image-caption set (docs/method.md §13.1 layout, relative paths) of coloured shapes for CPU runs.

    Images are ``size`` = (width, height) RGB PNGs, deliberately not square so the loader's resize-and-crop runs;
    captions say the colour and the shape ("a red circle on a white background"). Returns the JSON's path.
    """
    from PIL import Image, ImageDraw

    out = _prepare_out_dir(out_dir, overwrite)
    (out / "images").mkdir()
    gen = torch.Generator().manual_seed(seed)
    keys, paths, prompts = [], [], []
    colours = list(_SHAPE_COLOURS)
    w, h = size
    for i in range(num_images):
        colour, shape = colours[i % len(colours)], _SHAPES[(i // len(colours)) % len(_SHAPES)]
        r = int(torch.randint(h // 6, h // 3, (), generator=gen))
        cx = int(torch.randint(r, w - r, (), generator=gen))
        cy = int(torch.randint(r, h - r, (), generator=gen))
        img = Image.new("RGB", size, (255, 255, 255))
        draw = ImageDraw.Draw(img)
        box = (cx - r, cy - r, cx + r, cy + r)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=_SHAPE_COLOURS[colour])
        key = f"{i:08d}"
        img.save(out / "images" / f"{key}.png")
        keys.append(key)
        paths.append(f"images/{key}.png")
        prompts.append(f"a {colour} {shape} on a white background")
    path = out / "dataset.json"
    path.write_text(json.dumps({"keys": keys, "image_paths": paths, "prompts": prompts}, indent=1))
    return path


def build_tiny_assets(out_dir: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Everything the tiny configs (configs/tiny/*.yaml) read, under ``out_dir``: one folder per tiny teacher
    (sdxl, sd35-medium, sd35-large, flux), ``backbones/`` (DINOv2 and CLIP text), ``data/dataset.json`` and
    ``data/sdxl_latents.lmdb`` (the same images as SDXL VAE latents at 64 px)."""
    out = _prepare_out_dir(out_dir, overwrite)
    for kind in TINY_KINDS:
        build_tiny_teacher(kind, out / kind, seed=seed)
    build_tiny_discriminator_backbones(out / "backbones", seed=seed)
    images = build_tiny_dataset(out / "data", seed=seed)
    from senseflow.data.build_lmdb import build_latent_lmdb

    # SDXL trains from DMD2-layout latents (docs/method.md §13.2), encoded with the tiny SDXL teacher's VAE
    build_latent_lmdb(images, out / "sdxl", out / "data" / "sdxl_latents.lmdb", resolution=64, batch_size=8,
                      seed=seed, progress=False)
    return out


# ---- CLI -----------------------------------------------------------------------------------------------------

def main_tiny(argv: Sequence[str] | None = None) -> int:
    """``senseflow tiny --kind {sdxl,sd35-medium,sd35-large,flux,backbones} --out DIR [--seed 0] [--overwrite]``."""
    parser = argparse.ArgumentParser(prog="senseflow tiny",
                                     description="Write a tiny random teacher (diffusers layout) "
                                                 "or the tiny VFM-discriminator backbones, for tests and CPU demos.")
    parser.add_argument("--kind", required=True, choices=[*TINY_KINDS, "backbones", "dataset", "all"],
                        help="a teacher, the discriminator backbones, the tiny image-caption set, or all of them")
    parser.add_argument("--out", required=True, help="output folder (created; must be empty unless --overwrite)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    args = parser.parse_args(argv)
    try:
        if args.kind == "all":
            print(build_tiny_assets(args.out, seed=args.seed, overwrite=args.overwrite))
        elif args.kind == "dataset":
            print(build_tiny_dataset(args.out, seed=args.seed, overwrite=args.overwrite))
        elif args.kind == "backbones":
            paths = build_tiny_discriminator_backbones(args.out, seed=args.seed, overwrite=args.overwrite)
            for name, p in paths.items():
                print(f"{name}: {p}")
        else:
            print(build_tiny_teacher(args.kind, args.out, seed=args.seed, overwrite=args.overwrite))
    except FileExistsError as e:
        parser.error(str(e))  # one line, exit code 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main_tiny())

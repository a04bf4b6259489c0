"""Tiny teachers of every family, in the diffusers folder layout, for tests and the CPU demo.

``build_tiny_teacher(kind, out_dir, seed)`` writes a complete folder (``model_index.json``, ``scheduler/``,
``vae/``, text encoders, tokenizers, ``unet/`` or ``transformer/``) made of the real diffusers / transformers
classes with a few thousand random weights each. The stock pipelines load it offline
(``StableDiffusionXLPipeline`` / ``StableDiffusion3Pipeline`` / ``FluxPipeline``.from_pretrained(folder,
local_files_only=True)``), and so do the :mod:`senseflow.models.families`.

Each family declares its tiny teachers (``tiny_teachers``: kind → :class:`TinyTeacher`, the configs of its
components) in its own module; this module holds what they share (:data:`TINY_CLIP`, :data:`TINY_VAE`, the
tokenizers) and the one builder. What the tiny configs keep from the real checkpoints (the things the method
depends on):

* schedulers: SDXL ``EulerDiscreteScheduler`` with scaled-linear β ∈ [0.00085, 0.012] over 1000 steps
  (SDXL base's own ``scheduler_config.json``); SD3.5 ``FlowMatchEulerDiscreteScheduler(shift=3)``; FLUX.1-dev
  ``FlowMatchEulerDiscreteScheduler`` with dynamic shifting (μ from 0.5 at 256 tokens to 1.15 at 4096 tokens);
* VAE latent normalisation: SDXL z·0.13025; SD3.5 (z − 0.0609)·1.5305; FLUX (z − 0.1159)·0.3611; 8× downscaling;
* text-encoder roles and widths *relations*: SDXL CLIP-L ⊕ CLIP-G hidden = UNet cross-attention width; SD3 CLIP-L
  hidden + CLIP-G hidden ≤ T5 width (otherwise the pipeline's pad silently crops);
  FLUX pooled width = CLIP-L hidden, joint width = T5 width; FLUX.1-dev's distilled-guidance embedding (and a
  de-distilled FLUX without it).

Widths deliberately differ between encoders (e.g. CLIP-L 16, CLIP-G 32) so that a concatenation in the wrong
order or of the wrong tensor fails a shape test. Tokenizers are trained on :data:`CORPUS` by
:mod:`senseflow.models.tokenizers` (a CLIP-style byte-level BPE and a T5-style Unigram). Every random draw
happens inside a forked torch RNG seeded from ``seed`` (text encoder i: ``seed + i`` in the family's
``text_components`` order, then the VAE, then the denoiser), so the same seed gives byte-identical files (weights,
tokenizers and configs) and the caller's global RNG is left untouched.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from senseflow.models.tokenizers import train_clip_tokenizer, train_t5_tokenizer

__all__ = [
    "CORPUS",
    "TINY_CLIP",
    "TINY_VAE",
    "TINY_T5",
    "TinyTeacher",
    "tiny_kinds",
    "build_tiny_teacher",
    "build_tiny_discriminator_backbones",
    "tiny_clip_tokenizer",
    "tiny_t5_tokenizer",
    "main_tiny",
]


@dataclass(frozen=True)
class TinyTeacher:
    """The component configs of one tiny teacher: ``text`` maps each of the family's ``TextComponent`` sections
    (``clip_l``, ``clip_g``, ``t5``) to a ``CLIPTextConfig`` / ``T5Config`` (token ids come from the tokenizers);
    ``vae``, ``denoiser`` and ``scheduler`` are the arguments of the family's classes."""

    text: Mapping[str, Mapping[str, Any]]
    vae: Mapping[str, Any]
    denoiser: Mapping[str, Any]
    scheduler: Mapping[str, Any]


def tiny_kinds() -> dict[str, str]:
    """Kinds accepted by :func:`build_tiny_teacher` → family name: the ``tiny_teachers`` each registered family
    declares itself (a subclass does not inherit its base's)."""
    from senseflow.models.families import family_names, get_family

    kinds: dict[str, str] = {}
    for name in family_names():
        for kind in vars(get_family(name)).get("tiny_teachers", {}):
            kinds.setdefault(kind, name)
    return kinds


def __getattr__(name: str) -> Any:
    if name == "TINY_KINDS":  # kinds → family, read from the registry when asked (families register at run time)
        return tiny_kinds()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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

# ---- what the families' tiny configs share -------------------------------------------------------------------

#: every tiny CLIP text encoder: 2 layers, 77 positions
TINY_CLIP: dict[str, Any] = dict(num_hidden_layers=2, max_position_embeddings=77, hidden_act="gelu")
#: every tiny VAE: 4 levels (8× downscaling like the real VAEs); families add latent channels and normalisation
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=128,
)
#: every tiny T5 encoder: 2 layers of 4 heads of 8; families set the widths d_model and d_ff
TINY_T5 = dict(d_kv=8, num_layers=2, num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
               feed_forward_proj="gated-gelu")

#: discriminator backbones (docs/method.md, decision 5): DINOv2 with patch 8 at 64 px (64 tokens) and a CLIP text tower
DINO_BACKBONE: dict[str, Any] = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=2,
                                     image_size=64, patch_size=8, num_channels=3, layerscale_value=1.0,
                                     use_swiglu_ffn=False)
CLIP_TEXT_BACKBONE: dict[str, Any] = dict(TINY_CLIP, hidden_size=32, intermediate_size=64, num_attention_heads=4,
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


def _build_pipeline(family: Any, spec: TinyTeacher, seed: int) -> Any:
    """The family's stock pipeline holding the tiny components of ``spec`` (text encoder i seeded ``seed + i``,
    then the VAE, then the denoiser)."""
    import diffusers
    import transformers

    clip_tok = tiny_clip_tokenizer()
    t5_tok = tiny_t5_tokenizer() if any(c.is_t5 for c in family.text_components) else None
    components: dict[str, Any] = {}
    for i, comp in enumerate(family.text_components):
        tok = t5_tok if comp.is_t5 else clip_tok
        config = (transformers.T5Config(**spec.text[comp.section], **_t5_ids(tok)) if comp.is_t5
                  else transformers.CLIPTextConfig(**spec.text[comp.section], **_clip_ids(tok)))
        with _seeded(seed + i):
            components[comp.encoder] = getattr(transformers, comp.class_name)(config)
        components[comp.tokenizer] = tok
    n = len(family.text_components)
    with _seeded(seed + n):
        components["vae"] = diffusers.AutoencoderKL(**spec.vae)
    with _seeded(seed + n + 1):
        components[family.denoiser_subfolder] = getattr(diffusers, family.denoiser_class_name)(**spec.denoiser)
    components["scheduler"] = getattr(diffusers, family.scheduler_class_name)(**spec.scheduler)
    return getattr(diffusers, family.pipeline_class_name)(**components)


def build_tiny_teacher(kind: str, out_dir: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a tiny teacher of ``kind`` (one of :func:`tiny_kinds`) as a diffusers folder at ``out_dir``; return
    its path.

    ``sd35-medium`` has dual attention in block 0 and RMS qk-norm (MMDiT-X); ``sd35-large`` has RMS qk-norm only;
    ``flux`` has FLUX.1-dev's distilled-guidance embedding (``guidance_embeds=True``); ``flux-dedistilled`` is the
    same transformer without it (a de-distilled FLUX, guided by classifier-free guidance). Same ``seed`` →
    byte-identical files. Takes about a second (plus imports).
    """
    from senseflow.models.families import get_family

    kinds = tiny_kinds()
    if kind not in kinds:
        raise ValueError(f"unknown tiny teacher kind {kind!r}; expected one of {sorted(kinds)}")
    out = _prepare_out_dir(out_dir, overwrite)
    family = get_family(kinds[kind])
    pipe = _build_pipeline(family, family.tiny_teachers[kind], seed)
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
    (sdxl, sd35-medium, sd35-large, flux, flux-dedistilled), ``backbones/`` (DINOv2 and CLIP text),
    ``data/dataset.json`` and ``data/sdxl_latents.lmdb`` (the same images as SDXL VAE latents at 64 px)."""
    out = _prepare_out_dir(out_dir, overwrite)
    for kind in tiny_kinds():
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
    """``senseflow tiny --kind {sdxl,sd35-medium,sd35-large,flux,flux-dedistilled,backbones,dataset,all} --out DIR
    [--seed 0] [--overwrite]``."""
    parser = argparse.ArgumentParser(prog="senseflow tiny",
                                     description="Write a tiny random teacher (diffusers layout) "
                                                 "or the tiny VFM-discriminator backbones, for tests and CPU demos.")
    parser.add_argument("--kind", required=True, choices=[*tiny_kinds(), "backbones", "dataset", "all"],
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

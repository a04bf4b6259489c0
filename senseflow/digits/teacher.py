"""The shipped digits teacher: where it is, how to load and sample it, and how well it samples.

The teacher is a small SD3-family ``StableDiffusion3Pipeline`` folder (``senseflow/assets/digits_teacher``,
2.3 MB): VAE, MMDiT and text encoders with the architecture and training settings of ``configs/teacher/sd3.yaml``,
trained on the digits' training split (80%, :func:`senseflow.digits.data.load_digits_data`); its training record
is ``senseflow_digits_teacher.json``. Digits teachers of every family come from ``senseflow teacher train``
(``tools/train_digits_teacher.py``) and load and sample through the same functions (:func:`load_teacher` picks
the stock pipeline the folder's ``model_index.json`` names). Generation uses ``max_sequence_length`` = 77, the T5
length it was trained with.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "TEACHER_RECORD",
    "default_teacher_path",
    "load_teacher",
    "generate_digits",
    "evaluate_teacher",
    "teacher_record",
]

#: File written next to the shipped teacher's components with its training config and measurements.
TEACHER_RECORD = "senseflow_digits_teacher.json"


def default_teacher_path() -> Path:
    """The teacher folder shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "assets" / "digits_teacher"


def load_teacher(folder: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """The stock pipeline of the folder's family, ``from_pretrained(folder, local_files_only=True)`` (default: the
    shipped teacher)."""
    import diffusers

    from senseflow.models.families import family_of_folder, get_family

    folder = Path(folder) if folder is not None else default_teacher_path()
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{folder / 'model_index.json'} not found: expected a diffusers teacher folder "
            f"(train one with: senseflow teacher train --family sd3 --data SET --out {folder})"
        )
    pipeline_class = getattr(diffusers, get_family(family_of_folder(folder)).pipeline_class_name)
    pipe = pipeline_class.from_pretrained(folder, local_files_only=True, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def teacher_record(folder: str | Path | None = None) -> dict:
    """The training record shipped beside a teacher (config, VAE factors, timings)."""
    folder = Path(folder) if folder is not None else default_teacher_path()
    path = folder / TEACHER_RECORD
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected the teacher's training record")
    return json.loads(path.read_text())


@torch.no_grad()
def generate_digits(
    pipe,
    digits: Sequence[int],
    template: str,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int,
    max_sequence_length: int = 77,
    sigmas: Sequence[float] | None = None,
    batch_size: int = 100,
    resolution: int | None = None,
) -> Tensor:
    """Sample one image per entry of ``digits`` with the pipeline's Euler sampler and CFG.

    Prompts are ``template`` filled with each digit; latents come from ``torch.Generator().manual_seed(seed)``
    (one draw per batch of ``batch_size``). ``sigmas`` (pre-shift) overrides the pipeline's default grid.
    ``resolution`` defaults to the denoiser's ``sample_size`` times the VAE factor (SD3 folders; pass it for others);
    ``max_sequence_length`` is passed to pipelines that take it (SD3, FLUX).
    Returns (N, 3, H, W) pixels in [−1, 1].
    """
    import inspect

    from senseflow.digits.data import caption

    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    height = resolution or denoiser.config.sample_size * pipe.vae_scale_factor
    extra = {}
    if "max_sequence_length" in inspect.signature(pipe.__call__).parameters:
        extra["max_sequence_length"] = max_sequence_length
    gen = torch.Generator().manual_seed(int(seed))
    prompts = [caption(int(d), template) for d in digits]
    out = []
    for i in range(0, len(prompts), batch_size):
        kwargs = dict(sigmas=list(sigmas)) if sigmas is not None else dict(num_inference_steps=num_inference_steps)
        images = pipe(
            prompt=prompts[i : i + batch_size],
            guidance_scale=guidance_scale,
            height=height,
            width=height,
            generator=gen,
            output_type="pt",
            **extra,
            **kwargs,
        ).images
        out.append(images * 2.0 - 1.0)
    return torch.cat(out)


def evaluate_teacher(
    pipe,
    classifier=None,
    template: str = "a handwritten digit {word}",
    per_digit: int = 10,
    seed: int = 0,
    guidance_scale: float = 4.0,
    steps: Sequence[int] = (28, 4),
    max_sequence_length: int = 77,
    resolution: int | None = None,
) -> dict:
    """Prompt accuracy and FD to the real digits of Euler samples with CFG, ``per_digit`` samples of each digit,
    for every step count in ``steps`` (same seed, hence the same initial noise, for each)."""
    from senseflow.digits.metrics import fd_to_real, prompt_accuracy

    digits = [d for d in range(10) for _ in range(per_digit)]
    out: dict[str, dict[str, object]] = {}
    for n in steps:
        images = generate_digits(pipe, digits, template, n, guidance_scale, seed, max_sequence_length,
                                 resolution=resolution)
        out[f"euler_{n}"] = {
            "prompt_accuracy": prompt_accuracy(images, digits, classifier),
            "fd_real": fd_to_real(images, classifier),
        }
    out["settings"] = {"template": template, "per_digit": per_digit, "seed": seed, "guidance_scale": guidance_scale}
    return out

"""A tiny real SD3-family teacher trained on the digits: VAE, MMDiT and text encoders.

Training (all draws from explicit ``torch.Generator`` objects seeded from ``config.seed``):

1. **VAE** ``AutoencoderKL`` (16 latent channels like SD3, no quant convs), pixels x ∈ [−1,1]³ˣ³²ˣ³² → latents
   z ∈ ℝ¹⁶ˣ⁸ˣ⁸. Loss = mean‖D(z) − x‖² + β·mean KL(q(z|x) ‖ N(0, I)), z = μ + σ_q·ε.
   Then ``shift_factor`` = mean(z) and ``scaling_factor`` = 1/std(z) over posterior samples of the training
   images, so that the diffusion latents x₀ = (z − shift)·scale have zero mean and unit variance (as SD3's).
2. **Text**: tokenizers trained on every caption (and ""), tiny encoders initialised randomly (:mod:`.text`);
   prompts are encoded exactly as the SD3 pipeline does.
3. **Transformer** ``SD3Transformer2DModel`` and the text encoders, trained jointly by flow matching (§1.1):
   x_σ = (1 − σ)·x₀ + σ·ε,  target v* = ε − x₀,  loss = mean‖v_θ(x_σ, 1000σ, c) − v*‖²,
   σ = shift_s(u) on the scheduler's grid with u logit-normal (:class:`TimestepSampler`), and the caption replaced
   by "" with probability ``caption_dropout`` (for classifier-free guidance). The shipped weights are an EMA.

The result is a ``StableDiffusion3Pipeline`` with a ``FlowMatchEulerDiscreteScheduler(shift=scheduler_shift)``;
generation must use ``max_sequence_length = text.t5_max_length`` (77), the T5 length it was trained with.

Choices, measured on seed 0 (100 samples, 10 per digit, CFG 4, 28 Euler steps; prompt accuracy by the project's
classifier): frozen random text encoders, patch 2, shift 1 → 19 %; jointly trained encoders, patch 1, shift 1
→ 93 % (63 % without CFG); the same with shift 3 (SD3.5's value) → 100 % (94 % without CFG). Shift 3 puts more
of the logit-normal training σ at high noise, where the digit's identity is decided; it also makes the SD3.5
presets' anchors σ = s₃(1, .75, .5, .25) = 1, .9, .75, .5 the teacher's own 4-step grid.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from senseflow.digits.data import DigitsDataConfig, all_captions, load_digits_data
from senseflow.digits.text import (
    TextStack,
    TextStackConfig,
    TokenIds,
    build_text_stack,
    encode_token_ids,
    tokenize_prompts,
)
from senseflow.method.schedules import FlowSchedule, TimestepSampler

__all__ = [
    "VAEConfig",
    "TransformerConfig",
    "FlowTrainConfig",
    "DigitsTeacherConfig",
    "TEACHER_RECORD",
    "default_teacher_path",
    "build_vae",
    "train_vae",
    "latent_statistics",
    "build_transformer",
    "CaptionIds",
    "train_flow_transformer",
    "train_teacher",
    "save_teacher",
    "load_teacher",
    "generate_digits",
    "evaluate_teacher",
    "teacher_record",
]

#: File written next to the diffusers components with the training config and measurements.
TEACHER_RECORD = "senseflow_digits_teacher.json"
#: SD3 transformers take 1000·σ as their timestep argument (docs/method.md §1.1).
SD3_TIMESTEP_SCALE = 1000.0


def default_teacher_path() -> Path:
    """The teacher folder shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "assets" / "digits_teacher"


@dataclass(frozen=True)
class VAEConfig:
    """Tiny ``AutoencoderKL``: downsampling factor 2^(len(block_out_channels) − 1), and its training."""

    block_out_channels: tuple[int, ...] = (8, 16, 16)
    layers_per_block: int = 1
    latent_channels: int = 16
    norm_num_groups: int = 4
    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 30
    kl_weight: float = 1e-4


@dataclass(frozen=True)
class TransformerConfig:
    """Tiny ``SD3Transformer2DModel`` (SD3.5-style rms qk-norm; ``dual_attention_layers`` = () is SD3.5 Large's
    MMDiT, (0,) would be Medium's MMDiT-X)."""

    patch_size: int = 1
    num_layers: int = 3
    attention_head_dim: int = 32
    num_attention_heads: int = 2
    qk_norm: str | None = "rms_norm"
    dual_attention_layers: tuple[int, ...] = ()


@dataclass(frozen=True)
class FlowTrainConfig:
    """Flow-matching training of the transformer, and of the text encoders when ``train_text_encoders`` (AdamW,
    linear warm-up then cosine decay, EMA of the weights)."""

    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    train_text_encoders: bool = True
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclass(frozen=True)
class DigitsTeacherConfig:
    """Everything that defines the shipped teacher; ``seed`` seeds every random draw of the training."""

    data: DigitsDataConfig = field(default_factory=DigitsDataConfig)
    text: TextStackConfig = field(default_factory=TextStackConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    flow: FlowTrainConfig = field(default_factory=FlowTrainConfig)
    scheduler_shift: float = 3.0
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _generator(seed: int, stream: int) -> torch.Generator:
    """An independent generator per training stage: seed·1000 + stream."""
    return torch.Generator().manual_seed(int(seed) * 1000 + int(stream))


def _init_seeded(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a module whose parameter initialisation (which uses the global RNG) is fixed by ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build()


# ---------------------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------------------
def build_vae(config: VAEConfig, resolution: int, seed: int):
    """A fresh ``AutoencoderKL`` of ``config`` (scaling/shift factors are set after training)."""
    from diffusers import AutoencoderKL

    n = len(config.block_out_channels)
    return _init_seeded(
        seed,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(config.block_out_channels),
            layers_per_block=config.layers_per_block,
            latent_channels=config.latent_channels,
            norm_num_groups=config.norm_num_groups,
            sample_size=resolution,
            scaling_factor=1.0,
            shift_factor=0.0,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
    )


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:  # warmup ≥ 1 here
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_vae(vae, images: Tensor, config: VAEConfig, generator: torch.Generator, log: Callable[[str], None] = print) -> list[float]:
    """Minimise mean‖D(μ + σ_q·ε) − x‖² + β·mean KL(N(μ, σ_q²) ‖ N(0, I)) with AdamW; returns the losses."""
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config.steps, config.warmup_steps))
    losses = []
    for step in range(config.steps):
        idx = torch.randint(images.shape[0], (config.batch_size,), generator=generator)
        x = images[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        rec = (recon - x).pow(2).mean()
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        loss = rec + config.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 200 == 0 or step == config.steps - 1:
            log(f"vae step {step:5d}  recon {float(rec.detach()):.5f}  kl {float(kl.detach()):.3f}")
    vae.eval()
    return losses


@torch.no_grad()
def _posterior(vae, images: Tensor, batch: int = 256) -> tuple[Tensor, Tensor]:
    """Posterior means and standard deviations of q(z|x) for every image."""
    means, stds = [], []
    for i in range(0, images.shape[0], batch):
        post = vae.encode(images[i : i + batch]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def latent_statistics(mean: Tensor, std: Tensor, generator: torch.Generator) -> tuple[float, float]:
    """(shift_factor, scaling_factor) = (mean(z), 1/std(z)) over one posterior sample z = μ + σ_q·ε per image."""
    z = (mean + std * torch.randn(mean.shape, generator=generator)).double()
    return float(z.mean()), float(1.0 / z.std())


# ---------------------------------------------------------------------------------------------------------------
# Transformer
# ---------------------------------------------------------------------------------------------------------------
def build_transformer(config: TransformerConfig, latent_size: int, latent_channels: int, text: TextStackConfig, seed: int):
    """A fresh ``SD3Transformer2DModel`` sized to the latents and to the text stack's widths."""
    from diffusers import SD3Transformer2DModel

    if latent_size % config.patch_size:
        raise ValueError(f"latent size {latent_size} is not divisible by patch_size {config.patch_size}")
    inner = config.num_attention_heads * config.attention_head_dim
    return _init_seeded(
        seed,
        lambda: SD3Transformer2DModel(
            sample_size=latent_size,
            patch_size=config.patch_size,
            in_channels=latent_channels,
            out_channels=latent_channels,
            num_layers=config.num_layers,
            attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads,
            joint_attention_dim=text.t5_d_model,
            caption_projection_dim=inner,
            pooled_projection_dim=2 * text.clip_projection_dim,
            pos_embed_max_size=latent_size // config.patch_size,
            dual_attention_layers=tuple(config.dual_attention_layers),
            qk_norm=config.qk_norm,
        ),
    )


class CaptionIds:
    """Token ids of every caption: ``ids[d, j]`` = digit d in phrasing j, plus the ids of "" (for dropout)."""

    def __init__(self, text: TextStack, templates: Sequence[str], t5_max_length: int) -> None:
        captions = all_captions(templates)
        self.n_templates = len(templates)
        flat = tokenize_prompts(text, [c for row in captions for c in row], t5_max_length)
        self.table = TokenIds(*(t.reshape(10, self.n_templates, -1) for t in (flat.clip_l, flat.clip_g, flat.t5)))
        self.empty = tokenize_prompts(text, [""], t5_max_length)

    def batch(self, digits: Tensor, phrasing: Tensor, drop: Tensor) -> TokenIds:
        """Ids of digit ``digits[i]`` in phrasing ``phrasing[i]``, or of "" where ``drop[i]``."""
        picked = self.table.index((digits, phrasing))
        empty = (self.empty.clip_l, self.empty.clip_g, self.empty.t5)
        chosen = (picked.clip_l, picked.clip_g, picked.t5)
        return TokenIds(*(torch.where(drop[:, None], e, t) for e, t in zip(empty, chosen)))


def train_flow_transformer(
    transformer,
    text: TextStack,
    captions: CaptionIds,
    latent_mean: Tensor,
    latent_std: Tensor,
    labels: Tensor,
    config: FlowTrainConfig,
    schedule: FlowSchedule,
    generator: torch.Generator,
    log: Callable[[str], None] = print,
) -> tuple[torch.nn.Module, TextStack, list[float]]:
    """Flow matching on normalised latents x₀ = μ + σ_q·ε_q (μ, σ_q already shifted and scaled).

    Each sample draws a phrasing of its digit's caption and, with probability ``caption_dropout``, the empty
    caption instead; the prompt is encoded by the text stack (trained jointly when ``train_text_encoders``).
    σ comes from the logit-normal :class:`TimestepSampler` on the shifted grid of ``schedule``.
    Returns the EMA transformer, the EMA text stack and the losses.
    """
    sampler = TimestepSampler(kind="logit_normal", mean=config.logit_mean, std=config.logit_std, apply_shift=True)
    encoders = torch.nn.ModuleList([text.text_encoder, text.text_encoder_2, text.text_encoder_3])
    encoders.requires_grad_(config.train_text_encoders).train(config.train_text_encoders)
    nets = torch.nn.ModuleList([transformer, encoders])
    ema = copy.deepcopy(nets).requires_grad_(False).eval()
    transformer.train()
    params = [p for p in nets.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config.steps, config.warmup_steps))
    pairs = [(e, p) for e, p in zip(ema.parameters(), nets.parameters()) if p.requires_grad]
    losses = []
    b = config.batch_size
    for step in range(config.steps):
        idx = torch.randint(latent_mean.shape[0], (b,), generator=generator)
        x0 = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=generator)
        phrasing = torch.randint(captions.n_templates, (b,), generator=generator)
        drop = torch.rand(b, generator=generator) < config.caption_dropout
        with torch.set_grad_enabled(config.train_text_encoders):
            emb, pooled = encode_token_ids(text, captions.batch(labels[idx], phrasing, drop))
        sigma = sampler.sample(schedule, b, generator)
        eps = torch.randn(x0.shape, generator=generator)
        x_sigma = schedule.add_noise(x0, eps, sigma)
        target = schedule.pred_from(x_sigma, x0, eps, sigma)
        pred = transformer(
            hidden_states=x_sigma,
            encoder_hidden_states=emb,
            pooled_projections=pooled,
            timestep=schedule.net_timestep(sigma),
            return_dict=False,
        )[0]
        loss = (pred - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        sched.step()
        decay = min(config.ema_decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            for e, p in pairs:
                e.lerp_(p.detach(), 1.0 - decay)
        losses.append(float(loss.detach()))
        if step % 250 == 0 or step == config.steps - 1:
            recent = sum(losses[-50:]) / len(losses[-50:])
            log(f"flow step {step:5d}  loss {recent:.4f}  lr {sched.get_last_lr()[0]:.2e}")
    ema_transformer, ema_encoders = ema[0], ema[1]
    ema_text = TextStack(text.tokenizer, text.tokenizer_2, text.tokenizer_3, *ema_encoders)
    return ema_transformer, ema_text, losses


# ---------------------------------------------------------------------------------------------------------------
# Whole teacher
# ---------------------------------------------------------------------------------------------------------------
def train_teacher(config: DigitsTeacherConfig, log: Callable[[str], None] = print):
    """Train the VAE, then the text encoders and transformer, on the training split; returns (pipeline, record)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    t_start = time.perf_counter()
    seed = config.seed
    data = load_digits_data(config.data)
    images, labels = data.subset("train")
    resolution = config.data.resolution

    vae = build_vae(config.vae, resolution, seed)
    t0 = time.perf_counter()
    vae_losses = train_vae(vae, images, config.vae, _generator(seed, 1), log)
    t_vae = time.perf_counter() - t0
    vae.requires_grad_(False)
    mean, std = _posterior(vae, images)
    shift_factor, scaling_factor = latent_statistics(mean, std, _generator(seed, 2))
    vae.register_to_config(shift_factor=shift_factor, scaling_factor=scaling_factor)
    log(f"vae done in {t_vae:.0f}s; shift_factor {shift_factor:.4f} scaling_factor {scaling_factor:.4f}")

    corpus = [c for row in all_captions(config.data.templates) for c in row] + [""]
    text = build_text_stack(corpus, config.text, seed)
    captions = CaptionIds(text, config.data.templates, config.text.t5_max_length)
    latent_size = resolution // 2 ** (len(config.vae.block_out_channels) - 1)
    transformer = build_transformer(config.transformer, latent_size, config.vae.latent_channels, config.text, seed)
    schedule = FlowSchedule(timestep_scale=SD3_TIMESTEP_SCALE, shift=config.scheduler_shift)
    t0 = time.perf_counter()
    ema, ema_text, flow_losses = train_flow_transformer(
        transformer,
        text,
        captions,
        (mean - shift_factor) * scaling_factor,
        std * scaling_factor,
        labels,
        config.flow,
        schedule,
        _generator(seed, 3),
        log,
    )
    t_flow = time.perf_counter() - t0
    log(f"transformer done in {t_flow:.0f}s")

    pipe = StableDiffusion3Pipeline(
        transformer=ema,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=config.scheduler_shift),
        vae=vae,
        **ema_text.components(),
    )
    encoders = (ema_text.text_encoder, ema_text.text_encoder_2, ema_text.text_encoder_3)
    record = {
        "config": config.to_dict(),
        "vae_scale": {"shift_factor": shift_factor, "scaling_factor": scaling_factor},
        "params": {
            "vae": sum(p.numel() for p in vae.parameters()),
            "transformer": sum(p.numel() for p in ema.parameters()),
            "text_encoders": sum(p.numel() for e in encoders for p in e.parameters()),
        },
        "final_loss": {
            "vae": sum(vae_losses[-50:]) / len(vae_losses[-50:]),
            "flow": sum(flow_losses[-200:]) / len(flow_losses[-200:]),
        },
        "wall_time_s": {"vae": t_vae, "transformer": t_flow, "total": time.perf_counter() - t_start},
        "torch_threads": torch.get_num_threads(),
        "generation": {"max_sequence_length": config.text.t5_max_length, "height": resolution, "width": resolution},
    }
    return pipe, record


def save_teacher(pipe, folder: str | Path, record: dict) -> Path:
    """``save_pretrained`` the pipeline (safetensors) and write the training record beside it."""
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / TEACHER_RECORD).write_text(json.dumps(record, indent=1))
    return folder


def load_teacher(folder: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """``StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True)`` (default: the shipped teacher)."""
    from diffusers import StableDiffusion3Pipeline

    folder = Path(folder) if folder is not None else default_teacher_path()
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{folder / 'model_index.json'} not found: expected a diffusers SD3 folder "
            f"(train one with: python tools/train_digits_teacher.py --out {folder})"
        )
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True, dtype=dtype)
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
) -> Tensor:
    """Sample one image per entry of ``digits`` with the pipeline's Euler sampler and CFG.

    Prompts are ``template`` filled with each digit; latents come from ``torch.Generator().manual_seed(seed)``
    (one draw per batch of ``batch_size``). ``sigmas`` (pre-shift) overrides the pipeline's default grid.
    Returns (N, 3, H, W) pixels in [−1, 1].
    """
    from senseflow.digits.data import caption

    height = pipe.transformer.config.sample_size * pipe.vae_scale_factor
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
            max_sequence_length=max_sequence_length,
            generator=gen,
            output_type="pt",
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
) -> dict:
    """Prompt accuracy and FD to the real digits of Euler samples with CFG, ``per_digit`` samples of each digit,
    for every step count in ``steps`` (same seed, hence the same initial noise, for each)."""
    from senseflow.digits.metrics import fd_to_real, prompt_accuracy

    digits = [d for d in range(10) for _ in range(per_digit)]
    out = {}
    for n in steps:
        images = generate_digits(pipe, digits, template, n, guidance_scale, seed, max_sequence_length)
        out[f"euler_{n}"] = {
            "prompt_accuracy": prompt_accuracy(images, digits, classifier),
            "fd_real": fd_to_real(images, classifier),
        }
    out["settings"] = {"template": template, "per_digit": per_digit, "seed": seed, "guidance_scale": guidance_scale}
    return out

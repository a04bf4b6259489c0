"""Train a small teacher of any family from an image-caption set, resumably, into a stock diffusers folder.

Stages (each a resumable loop; every random draw comes from one CPU ``torch.Generator`` per stage, seeded from
``seed``, whose state is checkpointed with the weights, so an interrupted run continues bit-exactly):

1. **VAE** ``AutoencoderKL``: minimise mean‖D(μ + σ_q·ε) − x‖² + β·KL(N(μ, σ_q²) ‖ N(0, I)). Then
   ``shift_factor`` = mean(z) and ``scaling_factor`` = 1/std(z) over one posterior sample per image, so that the
   diffusion latents x₀ = (z − shift)·scale have zero mean and unit variance; for a family whose pipeline decodes
   without a shift (SDXL) no shift and ``scaling_factor`` = 1/√E[z²] (unit second moment).
2. **Denoiser and text encoders**, jointly, with the family's own objective and schedule (docs/method.md §1.1):
   x_τ = add_noise(x₀, ε, τ), target = ε (SDXL, DDPM ε-prediction, τ = t uniform on {low..high}) or v = ε − x₀
   (SD3 with its static shift, FLUX with its dynamic shift, σ logit-normal through the shift); loss =
   mean‖pred − target‖². A caption is replaced by the family's unconditional input with probability
   ``caption_dropout`` (SDXL: zero embeddings; SD3 / FLUX: ""), which is what CFG needs. The weights kept are an EMA.
3. **Guidance distillation** (FLUX, as FLUX.1-dev): the transformer gains the guidance embedding, zero-initialised
   so that it starts as the stage-2 conditional prediction, and learns T(x_σ, σ, c, g) ≈ u + g·(c − u) of the
   frozen stage-2 model, g ~ U(scale_min, scale_max). Reported: the relative error ‖T_g − CFG_g‖ / ‖CFG_g‖ per scale
   before and after.

The output folder is the family's stock diffusers folder (``from_pretrained(out, local_files_only=True)``) plus
``teacher_config.yaml`` (the resolved settings), ``teacher_card.json`` (data fingerprint, settings, training curves,
timings, guidance errors: written last, it marks a finished teacher), ``samples.png`` and ``training_state/``.
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from senseflow.config import ConfigError
from senseflow.core.io import atomic_write
from senseflow.teacher.config import TeacherTrainConfig
from senseflow.teacher.data import CaptionedImages, check_image_set, load_image_set

__all__ = ["CARD", "CONFIG_FILE", "STATE_DIR", "prepare_output", "train_teacher"]

CARD = "teacher_card.json"
CONFIG_FILE = "teacher_config.yaml"
STATE_DIR = "training_state"
SAMPLES = "samples.png"


# ---- output folder -----------------------------------------------------------------------------------------------

def _settings(cfg: TeacherTrainConfig, data: Path) -> dict[str, Any]:
    return {"data": str(data.resolve()), **cfg.to_dict()}


def prepare_output(out: Path, cfg: TeacherTrainConfig, data: Path) -> bool:
    """Check ``out`` before anything is written; returns True when it holds this run already (resume).

    Refused, with one line: ``out`` is a file; it holds files that are not a run of this command; it holds a run
    started with other settings or another data set.
    """
    from omegaconf import OmegaConf

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, expected a folder for the teacher")
    if not out.exists() or not any(out.iterdir()):
        return False
    saved = out / CONFIG_FILE
    if not saved.is_file():
        found = ", ".join(sorted(p.name for p in out.iterdir())[:4])
        raise ConfigError(f"--out {out}: holds files that are not a teacher run of this command ({found}); "
                          f"choose an empty or new folder")
    before = OmegaConf.to_container(OmegaConf.load(saved))
    now = _settings(cfg, data)
    if before != now:
        diff = _first_difference(before, now)
        raise ConfigError(f"--out {out}: was started with other settings ({diff}); re-run with the same settings "
                          f"to continue it, or choose a new folder")
    return True


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
    return f"{prefix[:-1]}: {a!r} then, {b!r} now"


# ---- one resumable stage ---------------------------------------------------------------------------------------

def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


class Stage:
    """A loop of ``steps`` AdamW steps over ``modules`` (an ``nn.ModuleDict``) with an optional EMA, checkpointed
    every ``every`` steps to ``<state>/<name>.pt`` (weights, EMA, optimiser, LR schedule, generator, losses)."""

    def __init__(self, name: str, state_dir: Path, modules: nn.ModuleDict, steps: int, lr: float, warmup: int,
                 seed: int, every: int, weight_decay: float = 0.0, grad_clip: float | None = None,
                 ema_decay: float | None = None, ema_warmup: int = 1) -> None:
        self.name, self.path, self.modules, self.steps, self.every = (
            name, state_dir / f"{name}.pt", modules, steps, every
        )
        self.params = [p for p in modules.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: _lr_factor(s, steps, warmup))
        self.grad_clip, self.ema_decay, self.ema_warmup = grad_clip, ema_decay, ema_warmup
        self.ema = copy.deepcopy(modules).requires_grad_(False).eval() if ema_decay is not None else None
        self.generator = torch.Generator().manual_seed(int(seed))
        self.step, self.seconds = 0, 0.0
        self.losses: list[float] = []
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        state = torch.load(self.path, map_location="cpu", weights_only=True)  # written by this run (see _save)
        self.modules.load_state_dict(state["modules"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self.step, self.losses, self.seconds = int(state["step"]), list(state["losses"]), float(state["seconds"])

    def _save(self) -> None:
        state = {"modules": self.modules.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "generator": self.generator.get_state(),
                 "step": self.step, "losses": self.losses, "seconds": self.seconds}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        atomic_write(self.path, lambda p: torch.save(state, p))

    def run(self, loss_fn: Callable[[torch.Generator], Tensor], progress: bool = True) -> None:
        """``loss_fn(generator)`` returns one step's loss; runs the remaining steps."""
        from tqdm import tqdm

        bar = tqdm(total=self.steps, initial=self.step, desc=self.name, disable=not progress, dynamic_ncols=True)
        start = time.perf_counter() - self.seconds
        while self.step < self.steps:
            loss = loss_fn(self.generator)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None and self.ema_decay is not None:  # both or neither
                decay = min(self.ema_decay, (1.0 + self.step) / (self.ema_warmup + self.step))
                with torch.no_grad():
                    for e, p in zip(self.ema.parameters(), self.modules.parameters()):
                        if p.requires_grad:
                            e.lerp_(p.detach(), 1.0 - decay)
            self.losses.append(float(loss.detach()))
            self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{sum(self.losses[-50:]) / len(self.losses[-50:]):.4f}")
            if self.step % self.every == 0 or self.step == self.steps:
                self.seconds = time.perf_counter() - start
                self._save()
        bar.close()

    @property
    def result(self) -> nn.ModuleDict:
        """The EMA weights when kept, else the trained ones."""
        return self.ema if self.ema is not None else self.modules

    def curve(self, every: int) -> list[float]:
        """Mean loss of each block of ``every`` steps."""
        return [
            sum(self.losses[i:i + every]) / len(self.losses[i:i + every]) for i in range(0, len(self.losses), every)
        ]


# ---- stages ----------------------------------------------------------------------------------------------------

def _family(cfg: TeacherTrainConfig, out: Path, device: torch.device):
    from senseflow.models.families import build_family

    return build_family({"family": cfg.family, "path": str(out), "clip_max_length": cfg.tokenizers.clip_max_length,
                         "t5_max_length": cfg.tokenizers.t5_max_length, "resolution": cfg.resolution}, device)


def _train_vae(cfg: TeacherTrainConfig, out: Path, data: CaptionedImages, device: torch.device, progress: bool) -> dict:
    from diffusers import AutoencoderKL

    from senseflow.models.families import get_family

    t = cfg.vae_training
    vae = AutoencoderKL.from_pretrained(out / "vae", local_files_only=True).to(device).train()
    stage = Stage("vae", out / STATE_DIR, nn.ModuleDict({"vae": vae}), t.steps, t.lr, t.warmup_steps,
                  cfg.seed * 1000 + 1, cfg.checkpoint_every)
    pixels = data.pixels

    def loss(gen: torch.Generator) -> Tensor:
        x = pixels[torch.randint(len(data), (t.batch_size,), generator=gen)].to(device)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device)
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        return (vae.decode(z).sample - x).pow(2).mean() + t.kl_weight * kl

    stage.run(loss, progress)
    vae.eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 2)
    with torch.no_grad():
        zs = []
        for i in range(0, len(data), 256):
            post = vae.encode(pixels[i:i + 256].to(device)).latent_dist
            zs.append((post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device)).double().cpu())
        z = torch.cat(zs)
    if get_family(cfg.family).vae_uses_shift:
        shift, scale = float(z.mean()), float(1.0 / z.std())
    else:  # the pipeline ignores a shift: no shift, and unit second moment E[x₀²] = 1
        shift, scale = None, float(1.0 / z.pow(2).mean().sqrt())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    return {"curve": stage.curve(cfg.log_every), "seconds": stage.seconds,
            "vae_scale": {"shift_factor": shift, "scaling_factor": scale}}


def _normalised_posterior(family, pixels: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """(μ − shift)·scale and σ_q·scale of every image: x₀ = μ' + σ' ε is a normalised posterior sample."""
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, pixels.shape[0], 256):
            post = family.vae.encode(pixels[i:i + 256].to(device)).latent_dist
            means.append((post.mean - family.shift_factor) * family.scaling_factor)
            stds.append(post.std * family.scaling_factor)
    return torch.cat(means), torch.cat(stds)


def _timestep_sampler(cfg: TeacherTrainConfig):
    from senseflow.core.schedules import TimestepSampler

    ts = cfg.denoiser_training.timesteps
    return TimestepSampler(kind=ts.kind, low=ts.low, high=ts.high, mean=ts.mean, std=ts.std, apply_shift=True)


def _text_modules(family) -> nn.ModuleDict:
    return nn.ModuleDict({c.encoder: family.text[c.encoder] for c in family.text_components})


def _train_denoiser(cfg: TeacherTrainConfig, out: Path, data: CaptionedImages, device: torch.device,
                    progress: bool) -> dict:
    t = cfg.denoiser_training
    family = _family(cfg, out, device)
    mean, std = _normalised_posterior(family, data.pixels, device)
    net = family.build_student(family.load_denoiser(torch.float32))   # FLUX: without the guidance embedding
    text = _text_modules(family).requires_grad_(t.train_text_encoders).train(t.train_text_encoders)
    stage = Stage("denoiser", out / STATE_DIR, nn.ModuleDict({"denoiser": net, "text": text}), t.steps, t.lr,
                  t.warmup_steps, cfg.seed * 1000 + 3, cfg.checkpoint_every, t.weight_decay, t.grad_clip, t.ema_decay,
                  t.ema_warmup)
    schedule = family.schedule(cfg.resolution, cfg.resolution)
    sampler = _timestep_sampler(cfg)
    b = t.batch_size

    def loss(gen: torch.Generator) -> Tensor:
        idx = torch.randint(len(data), (b,), generator=gen)
        x0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen).to(device)
        drop = torch.rand(b, generator=gen) < t.caption_dropout
        with torch.set_grad_enabled(t.train_text_encoders):
            cond = family.training_condition([data.captions[i] for i in idx.tolist()], drop,
                                             data.original_sizes[idx], data.crop_coords[idx])
        tau = sampler.sample(schedule, b, gen).to(device)
        eps = torch.randn(x0.shape, generator=gen).to(device)
        x_tau = schedule.add_noise(x0, eps, tau)
        return (family.predict(net, x_tau, tau, cond) - schedule.pred_from(x_tau, x0, eps, tau)).pow(2).mean()

    stage.run(loss, progress)
    ema = stage.result
    encoders: Any = ema["text"]  # the transformers text encoders by folder name
    for name, encoder in encoders.items():
        encoder.save_pretrained(out / name, safe_serialization=True)
    _write_denoiser(family, ema["denoiser"], out, cfg.seed * 1000 + 6)
    return {"curve": stage.curve(cfg.log_every), "seconds": stage.seconds}


def _write_denoiser(family, net: Any, out: Path, seed: int) -> None:
    """Save ``net`` as the folder's denoiser; a FLUX folder keeps its guidance embedding (zero-initialised output,
    so the guided call starts equal to ``net``'s prediction)."""
    folder = out / family.denoiser_subfolder
    config = json.loads((folder / "config.json").read_text())
    if not config.get("guidance_embeds", False):
        net.save_pretrained(folder, safe_serialization=True)
        return
    with torch.random.fork_rng(devices=[]):   # the embedder's first layer is drawn from the run's seed
        torch.manual_seed(seed)
        guided = family.denoiser_class.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    missing, unexpected = guided.load_state_dict(net.state_dict(), strict=False)
    if unexpected or any(not k.startswith(family.student_ignore_prefixes) for k in missing):
        raise RuntimeError(f"cannot carry the denoiser into the guided transformer: {missing} {unexpected}")
    last = guided.time_text_embed.guidance_embedder.linear_2
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    guided.save_pretrained(folder, safe_serialization=True)


def _distil_guidance(cfg: TeacherTrainConfig, out: Path, data: CaptionedImages, device: torch.device,
                     progress: bool) -> dict:
    t = cfg.guidance_distillation
    family = _family(cfg, out, device)
    mean, std = _normalised_posterior(family, data.pixels, device)
    guided = family.load_denoiser(torch.float32).train()
    teacher = family.build_student(guided).eval().requires_grad_(False)   # the stage-2 model, without the embedding
    trainable = guided if t.train == "all" else guided.time_text_embed.guidance_embedder
    trainable.requires_grad_(True)
    schedule = family.schedule(cfg.resolution, cfg.resolution)
    sampler = _timestep_sampler(cfg)

    def batch(gen: torch.Generator, b: int):
        idx = torch.randint(len(data), (b,), generator=gen)
        x0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen).to(device)
        cond = family.encode_prompts([data.captions[i] for i in idx.tolist()])
        tau = sampler.sample(schedule, b, gen).to(device)
        x_tau = schedule.add_noise(x0, torch.randn(x0.shape, generator=gen).to(device), tau)
        return x_tau, tau, cond

    def errors(net: nn.Module) -> list[float]:
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + 5)
        x_tau, tau, cond = batch(gen, t.eval_samples)
        out_ = []
        with torch.no_grad():
            for g in t.eval_scales:
                target = family.cfg_predict(teacher, x_tau, tau, cond, g)
                err = family.predict(net, x_tau, tau, cond, guidance=g) - target
                out_.append(float(err.pow(2).sum().sqrt() / target.pow(2).sum().sqrt()))
        return out_

    before = errors(guided)
    stage = Stage("guidance", out / STATE_DIR, nn.ModuleDict({"transformer": guided}), t.steps, t.lr,
                  t.warmup_steps, cfg.seed * 1000 + 4, cfg.checkpoint_every, 0.0, t.grad_clip, t.ema_decay,
                  t.ema_warmup)

    def loss(gen: torch.Generator) -> Tensor:
        x_tau, tau, cond = batch(gen, t.batch_size)
        g = t.scale_min + (t.scale_max - t.scale_min) * torch.rand(t.batch_size, generator=gen).to(device)
        with torch.no_grad():
            target = family.cfg_predict(teacher, x_tau, tau, cond, g)
        return (family.predict(guided, x_tau, tau, cond, guidance=g) - target).pow(2).mean()

    stage.run(loss, progress)
    result: Any = stage.result["transformer"]  # a diffusers transformer
    after = errors(result)
    result.save_pretrained(out / family.denoiser_subfolder, safe_serialization=True)
    return {"curve": stage.curve(cfg.log_every), "seconds": stage.seconds,
            "relative_error": {"scales": list(t.eval_scales), "before": before, "after": after,
                               "samples": t.eval_samples, "train": t.train}}


# ---- samples and card ------------------------------------------------------------------------------------------

def sample_grid(cfg: TeacherTrainConfig, out: Path, captions: list[str], device: torch.device):
    """``sample.images_per_prompt`` images of each sample prompt from the family's stock pipeline (rows = prompts)."""
    import inspect

    import diffusers

    from senseflow.imageio import to_pil
    from senseflow.models.families import get_family

    s = cfg.sample
    prompts = list(s.prompts) or list(dict.fromkeys(captions))[: s.num_prompts]
    pipe = getattr(diffusers, get_family(cfg.family).pipeline_class_name).from_pretrained(out, local_files_only=True)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    kwargs: dict[str, Any] = {}
    if "max_sequence_length" in inspect.signature(pipe.__call__).parameters:
        kwargs["max_sequence_length"] = cfg.tokenizers.t5_max_length
    gen = torch.Generator().manual_seed(s.seed)
    images = pipe(prompt=[p for p in prompts for _ in range(s.images_per_prompt)], num_inference_steps=s.steps,
                  guidance_scale=s.guidance_scale, height=cfg.resolution, width=cfg.resolution, generator=gen,
                  output_type="pt", **kwargs).images
    r, n = cfg.resolution, s.images_per_prompt
    grid = images.reshape(len(prompts), n, 3, r, r).permute(2, 0, 3, 1, 4).reshape(3, len(prompts) * r, n * r)
    return to_pil(grid[None] * 2.0 - 1.0)[0], prompts


def train_teacher(cfg: TeacherTrainConfig, data_path: str | Path, out: str | Path, device: str = "cpu",
                  progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """Train (or continue training) the teacher of ``cfg`` on ``data_path`` into ``out``; returns ``out``."""
    from omegaconf import OmegaConf

    from senseflow.teacher.build import build_pipeline

    out, data_path = Path(out), Path(data_path)
    check_image_set(data_path, cfg.resolution)
    resuming = prepare_output(out, cfg, data_path)
    if resuming and (out / CARD).is_file():
        log(f"{out}: the teacher is already trained ({CARD}); nothing to do")
        return out
    dev = torch.device(device)
    t0 = time.perf_counter()
    data = load_image_set(data_path, cfg.resolution)
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    if not resuming:
        atomic_write(out / CONFIG_FILE, lambda p: p.write_text(OmegaConf.to_yaml(_settings(cfg, data_path))))
    progress_file = out / STATE_DIR / "progress.json"
    done: dict[str, Any] = json.loads(progress_file.read_text()) if progress_file.is_file() else {}
    started_on = done.get("init", {}).get("data", {}).get("fingerprint")
    if started_on is not None and started_on != data.fingerprint:
        raise ConfigError(f"--data {data_path}: its images or captions changed since {out} was started "
                          f"(sha256 {started_on[:12]}… then, {data.fingerprint[:12]}… now); use a new --out")
    if "init" not in done:
        build_pipeline(cfg, data.captions).save_pretrained(out, safe_serialization=True)
        done["init"] = {"data": {"fingerprint": data.fingerprint, "records": len(data)}}
        atomic_write(progress_file, lambda p: p.write_text(json.dumps(done)))
    stages = [("vae", _train_vae), ("denoiser", _train_denoiser)]
    if cfg.guidance_distillation.steps > 0:
        stages.append(("guidance", _distil_guidance))
    for name, run in stages:
        if name not in done:
            log(f"stage {name}")
            done[name] = run(cfg, out, data, dev, progress)
            atomic_write(progress_file, lambda p: p.write_text(json.dumps(done)))
    grid, prompts = sample_grid(cfg, out, data.captions, dev)
    grid.save(out / SAMPLES)
    family = _family(cfg, out, dev)
    card = {
        "family": cfg.family,
        "pipeline": family.pipeline_class_name,
        "data": {"path": str(data_path.resolve()), **done["init"]["data"]},
        "settings": cfg.to_dict(),
        "vae_scale": done["vae"]["vae_scale"],
        "curves": {name: {"every": cfg.log_every, "loss": done[name]["curve"]} for name, _ in stages},
        "wall_time_s": {
            **{name: done[name]["seconds"] for name, _ in stages}, "last_invocation": time.perf_counter() - t0
        },
        "torch_threads": torch.get_num_threads(),
        "params": {name: sum(p.numel() for p in module.parameters())
                   for name, module in (("vae", family.vae), ("denoiser", family.load_denoiser()),
                                        *((c.encoder, family.text[c.encoder]) for c in family.text_components))},
        "generation": {"height": cfg.resolution, "width": cfg.resolution,
                       "max_sequence_length": cfg.tokenizers.t5_max_length,
                       "clip_max_length": cfg.tokenizers.clip_max_length,
                       "num_inference_steps": cfg.sample.steps, "guidance_scale": cfg.sample.guidance_scale},
        "samples": {"file": SAMPLES, "prompts": prompts, "seed": cfg.sample.seed},
    }
    if "guidance" in done:
        card["guidance_distillation"] = done["guidance"]["relative_error"]
    atomic_write(out / CARD, lambda p: p.write_text(json.dumps(card, indent=1)))
    log(f"teacher written to {out}")
    return out

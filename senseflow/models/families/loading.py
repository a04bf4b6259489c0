"""What the three diffusers-folder families share: folder checks, lazy component loading, the VAE, CFG.

A teacher folder is a diffusers pipeline folder (``model_index.json`` plus one subfolder per component). Every
component is loaded with ``from_pretrained(path, subfolder=..., local_files_only=True)``; nothing is ever fetched
from a hub. All subfolders are checked *before* any weight is read, so a wrong path fails in milliseconds with a
message naming the folder and the missing piece.

Latent normalisation (docs/method.md §2): z_norm = (z − shift)·scale with the VAE config's ``scaling_factor`` and
``shift_factor`` (shift may be absent: SDXL z·0.13025; SD3.5 (z − 0.0609)·1.5305; FLUX (z − 0.1159)·0.3611).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from senseflow.core.condition import Condition
from senseflow.core.family import TeacherFamily, vae_factor
from senseflow.core.modules import unwrap
from senseflow.core.schedules import FlowSchedule, expand_like, flux_mu

__all__ = [
    "check_folder",
    "read_json",
    "net_config",
    "net_dtype",
    "flow_schedule_from_config",
    "DiffusersFamily",
]

#: the file that marks a loadable component subfolder
_MARKERS = {
    "scheduler": ("scheduler_config.json",),
    "tokenizer": ("tokenizer_config.json", "tokenizer.json", "vocab.json", "spiece.model"),
}


def _marker_files(subfolder: str) -> tuple[str, ...]:
    kind = "tokenizer" if subfolder.startswith("tokenizer") else subfolder
    return _MARKERS.get(kind, ("config.json",))


def check_folder(path: str | Path, subfolders: Sequence[str], what: str = "teacher") -> Path:
    """Check that ``path`` is a folder holding every component subfolder, each with its marker file.

    Raises ``FileNotFoundError`` naming the folder and the first missing subfolder or file. Reads no weights.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{what} folder {str(root)!r} does not exist (expected a local diffusers folder)")
    for sub in subfolders:
        folder = root / sub
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{what} folder {str(root)!r} has no {sub!r} subfolder (needed: {', '.join(subfolders)})"
            )
        markers = _marker_files(sub)
        if not any((folder / m).is_file() for m in markers):
            raise FileNotFoundError(f"{what} folder {str(root)!r}: subfolder {sub!r} has none of {', '.join(markers)}")
    return root


def read_json(path: Path) -> dict:
    """Read a JSON config, with an error that names the file."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {str(path)!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"config file {str(path)!r} is not valid JSON: {e}") from None


def net_config(net: Any) -> Any:
    """The diffusers ``config`` of a (possibly wrapped) denoiser."""
    return unwrap(net).config


def net_dtype(net: nn.Module) -> torch.dtype:
    """The dtype of the first floating parameter (the dtype inputs are cast to before a forward)."""
    for p in net.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def flow_schedule_from_config(config: Mapping, timestep_scale: float, image_seq_len: int) -> FlowSchedule:
    """A :class:`FlowSchedule` from a ``FlowMatchEulerDiscreteScheduler`` config.

    Static shift (SD3.5: ``shift`` = 3 → σ = s₃(u)) or, with ``use_dynamic_shifting``, FLUX's
    μ = flux_mu(image_seq_len, base_image_seq_len, max_image_seq_len, base_shift, max_shift) and
    σ = e^μ / (e^μ + 1/u − 1).
    """
    n = int(config.get("num_train_timesteps", 1000))
    if config.get("use_dynamic_shifting", False):
        shift_type = config.get("time_shift_type", "exponential")
        if shift_type != "exponential":
            raise ValueError(
                f"scheduler config: time_shift_type {shift_type!r} is not supported (expected 'exponential')"
            )
        for key in ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift"):
            if key not in config:
                raise ValueError(f"scheduler config with use_dynamic_shifting lacks {key!r}")
        mu = flux_mu(image_seq_len, int(config["base_image_seq_len"]), int(config["max_image_seq_len"]),
                     float(config["base_shift"]), float(config["max_shift"]))
        return FlowSchedule(timestep_scale=timestep_scale, mu=mu, num_train_timesteps=n)
    return FlowSchedule(timestep_scale=timestep_scale, shift=float(config.get("shift", 1.0)), num_train_timesteps=n)


class DiffusersFamily(TeacherFamily):
    """Shared machinery of the SDXL / SD3 / FLUX families (a local diffusers folder at ``path``): the runtime calls
    of :class:`~senseflow.core.family.TeacherFamily`, whose class-level facts a family fills in.

    Components are loaded lazily on first use (the VAE and text encoders stay frozen, in eval mode, on
    ``text_device``/``device``); the unconditional condition is computed once and cached.

    Args:
        path: the teacher's diffusers folder.
        device: where the denoiser, the VAE and (by default) the text encoders live.
        denoiser_dtype / vae_dtype / text_dtype: parameter dtypes of the teacher denoiser, VAE and text encoders.
        clip_max_length: CLIP token length (77, §12).
        student_path: optional initial weights of G and F: a denoiser folder (``config.json`` + weights) or a
            pipeline folder with the denoiser subfolder.
        text_device: where the text encoders run (default: ``device``).
        t5_max_length: T5 token length (families with a T5 encoder; default ``default_t5_max_length``).
    """

    def __init__(
        self,
        path: str | Path,
        device: torch.device | str = "cpu",
        denoiser_dtype: torch.dtype = torch.float32,
        vae_dtype: torch.dtype = torch.float32,
        text_dtype: torch.dtype = torch.float32,
        clip_max_length: int = 77,
        student_path: str | Path | None = None,
        text_device: torch.device | str | None = None,
        t5_max_length: int | None = None,
    ) -> None:
        import diffusers

        self.denoiser_class = getattr(diffusers, self.denoiser_class_name)
        self.path = check_folder(path, self.required_subfolders())
        self.student_path = self._check_student(student_path) if student_path is not None else None
        self.device = torch.device(device)
        self.text_device = torch.device(text_device) if text_device is not None else self.device
        self.denoiser_dtype = denoiser_dtype
        self.vae_dtype = vae_dtype
        self.text_dtype = text_dtype
        if clip_max_length < 1:
            raise ValueError(f"clip_max_length must be positive, got {clip_max_length}")
        self.clip_max_length = int(clip_max_length)
        if self.default_t5_max_length is not None:
            t5 = self.default_t5_max_length if t5_max_length is None else t5_max_length
            if t5 < 1:
                raise ValueError(f"t5_max_length must be positive, got {t5}")
            self.t5_max_length = int(t5)
        self.scheduler_config = read_json(self.path / "scheduler" / "scheduler_config.json")
        self.vae_config = read_json(self.path / "vae" / "config.json")
        self.denoiser_config = read_json(self.path / self.denoiser_subfolder / "config.json")
        #: the guidance kind of this teacher folder (FLUX: ``cfg`` when its transformer has no guidance embedder)
        self.guidance_kind = self.teacher_guidance(self.denoiser_config)[0]
        self._vae: nn.Module | None = None
        self._text: dict[str, Any] | None = None
        self._uncond: Condition | None = None

    def _check_student(self, student_path: str | Path) -> Path:
        root = Path(student_path).expanduser()
        if (root / self.denoiser_subfolder / "config.json").is_file():
            return root / self.denoiser_subfolder
        if (root / "config.json").is_file():
            return root
        raise FileNotFoundError(
            f"student folder {str(root)!r} has neither config.json nor a {self.denoiser_subfolder!r} subfolder with one"
        )

    def _load(
        self, cls: Any, subfolder: str, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> Any:
        kwargs: dict[str, Any] = {"local_files_only": True}
        if dtype is not None:
            kwargs["torch_dtype"] = dtype
        obj = cls.from_pretrained(str(self.path), subfolder=subfolder, **kwargs)
        if isinstance(obj, nn.Module):
            obj = obj.to(device if device is not None else self.device).eval().requires_grad_(False)
        return obj

    # ---- components ----------------------------------------------------------------------------------------
    @property
    def vae(self) -> Any:
        """The frozen ``AutoencoderKL`` (loaded on first use; typed Any: diffusers types ``encode`` / ``decode`` as
        unions of output classes and tuples)."""
        if self._vae is None:
            from diffusers import AutoencoderKL

            self._vae = self._load(AutoencoderKL, "vae", self.vae_dtype)
        return self._vae

    @property
    def text(self) -> dict[str, Any]:
        """Tokenizers and frozen text encoders by subfolder name (loaded on first use)."""
        if self._text is None:
            self._text = self._load_text()
        return self._text

    def _load_text(self) -> dict[str, Any]:
        """Every tokenizer (``AutoTokenizer``) and text encoder (its :class:`TextComponent` class) of the folder."""
        import transformers

        text: dict[str, Any] = {}
        for c in self.text_components:
            text[c.tokenizer] = self._load(transformers.AutoTokenizer, c.tokenizer)
            text[c.encoder] = self._load(
                getattr(transformers, c.class_name), c.encoder, self.text_dtype, self.text_device
            )
        return text

    def load_denoiser(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> nn.Module:
        """The frozen teacher T from ``<path>/<denoiser_subfolder>`` in ``dtype`` (default ``denoiser_dtype``) on
        ``device`` (default the family's; the CPU when rank 0 reads weights that FSDP2 then shards)."""
        target = torch.device(device) if device is not None else None
        return self._load(self.denoiser_class, self.denoiser_subfolder, dtype or self.denoiser_dtype, target)

    def _teacher_fp32(self, teacher: nn.Module) -> nn.Module:
        """An fp32 copy of the teacher: a deep copy if it is held in fp32, else its folder's weights read in fp32
        (so no bf16 rounding enters the fp32 master weights)."""
        plain = unwrap(teacher)
        if all(p.dtype == torch.float32 for p in plain.parameters() if p.is_floating_point()):
            return copy.deepcopy(plain)
        device = next(plain.parameters()).device
        return self._load(self.denoiser_class, self.denoiser_subfolder, torch.float32, device)

    def build_student(self, teacher: nn.Module) -> nn.Module:
        """A trainable fp32 copy of the teacher (G or F; docs/method.md decision 2: fp32 master weights).

        From ``student_path`` when given, else the teacher's own weights (see :meth:`_teacher_fp32`).
        """
        net = self._student_from_path(teacher) if self.student_path is not None else self._teacher_fp32(teacher)
        return net.to(torch.float32).train().requires_grad_(True)

    def _student_from_path(self, teacher: nn.Module) -> Any:
        """The fp32 denoiser of ``student_path`` on the teacher's device."""
        net = self.denoiser_class.from_pretrained(str(self.student_path), torch_dtype=torch.float32,
                                                  local_files_only=True)
        return net.to(next(unwrap(teacher).parameters()).device)

    # ---- latents -------------------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        """Pixel-to-latent downscaling 2^(levels − 1) of the VAE."""
        return vae_factor(self.vae_config)

    @property
    def latent_channels(self) -> int:
        return int(self.vae_config["latent_channels"])

    @property
    def scaling_factor(self) -> float:
        return float(self.vae_config.get("scaling_factor", 1.0))

    @property
    def shift_factor(self) -> float:
        shift = self.vae_config.get("shift_factor")
        return 0.0 if shift is None else float(shift)

    def _latent_multiple(self) -> int:
        return self.latent_multiple(self.denoiser_config)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) = (latent channels, height/f, width/f), f the VAE scale factor."""
        f = self.vae_scale_factor * self._latent_multiple()
        if height <= 0 or width <= 0 or height % f or width % f:
            raise ValueError(f"{self.name}: image size {height}x{width} must be positive multiples of {f}")
        return self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor

    def encode_pixels(self, pixels: Tensor, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """z ~ q(z | x) for pixels x ∈ [−1, 1], normalised to (z − shift)·scale."""
        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.device, self.vae_dtype)).latent_dist
            z = dist.sample(generator=generator)
        return ((z.float() - self.shift_factor) * self.scaling_factor).to(pixels.dtype)

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Pixels D(z_norm/scale + shift) in [−1, 1] (differentiable w.r.t. ``latents``)."""
        z = latents / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(self.vae_dtype)).sample.to(latents.dtype)

    # ---- conditions ----------------------------------------------------------------------------------------
    def encode_text(self, prompts: Sequence[str], original_sizes: Tensor | None = None,
                    crop_coords: Tensor | None = None) -> Condition:
        """The family's prompt encoding (docs/method.md §12), differentiable w.r.t. the text encoders (a teacher
        being trained updates them through it)."""
        raise NotImplementedError

    def encode_prompts(self, prompts: Sequence[str], original_sizes: Tensor | None = None,
                       crop_coords: Tensor | None = None) -> Condition:
        """:meth:`encode_text` without gradients (what distillation, inference and evaluation use); with a
        :attr:`text_cache` the encoder outputs are the cached rows of the captions (no text encoder runs)."""
        if self.text_cache is not None:
            prompts = list(prompts)
            return self.assemble_condition(self.text_cache.stack(prompts, "prompt_embeds").to(self.device),
                                           self.text_cache.stack(prompts, "pooled").to(self.device),
                                           original_sizes, crop_coords)
        with torch.no_grad():
            return self.encode_text(prompts, original_sizes, crop_coords)

    def assemble_condition(self, prompt_embeds: Tensor, pooled: Tensor, original_sizes: Tensor | None = None,
                           crop_coords: Tensor | None = None) -> Condition:
        """The :class:`Condition` of the text encoders' outputs plus what no encoder computes (SDXL's time ids,
        FLUX's text ids): the one place :meth:`encode_text` and a text cache both build it."""
        return Condition(prompt_embeds=prompt_embeds, pooled=pooled)

    def training_condition(self, prompts: Sequence[str], drop: Tensor, original_sizes: Tensor | None = None,
                           crop_coords: Tensor | None = None) -> Condition:
        """The condition a CFG teacher is trained with: captions where ``drop[i]`` is set are replaced by the
        family's unconditional input (here the empty prompt "", as the stock pipelines' negative prompt)."""
        kept = [p if not bool(d) else "" for p, d in zip(prompts, drop.tolist())]
        return self.encode_text(kept, original_sizes, crop_coords)

    def _tokenize(self, tokenizer: Any, prompts: Sequence[str], max_length: int) -> Tensor:
        return tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.text_device)

    def _compute_unconditional(self) -> Condition:
        """The batch-1 unconditional condition (default: the encoding of the empty prompt "")."""
        return self.encode_prompts([""])

    def unconditional(self, batch: int) -> Condition:
        """The cached unconditional condition, expanded to ``batch``."""
        if self._uncond is None:
            self._uncond = self._compute_unconditional()
        return self._uncond.expand(batch)

    def _unconditional_like(self, cond: Condition) -> Condition:
        """The unconditional branch paired with ``cond`` in CFG."""
        return self.unconditional(len(cond))

    # ---- guidance ------------------------------------------------------------------------------------------
    def _guidance_kind(self, kind: str | None) -> str:
        """``kind`` (None: this teacher's :attr:`guidance_kind`), refused unless one of :attr:`guidance_kinds`."""
        kind = self.guidance_kind if kind is None else kind
        if kind not in self.guidance_kinds:
            raise ValueError(f"{self.name}: guidance kind {kind!r} is not one of the family's "
                             f"({', '.join(self.guidance_kinds)})")
        return kind

    def guided_predict(self, net: nn.Module, x: Tensor, tau: Tensor, cond: Condition, scale: Tensor | float,
                       kind: str | None = None) -> Tensor:
        """The teacher's guided prediction: classifier-free guidance (:meth:`cfg_predict`), the one kind a
        family guides with unless it declares more (:attr:`guidance_kinds`)."""
        kind = self._guidance_kind(kind)
        if kind != "cfg":
            raise ValueError(f"{self.name}: guidance kind {kind!r} needs the family's own guided_predict")
        return self.cfg_predict(net, x, tau, cond, scale)

    def cfg_predict(self, net: nn.Module, x: Tensor, tau: Tensor, cond: Condition, scale: Tensor | float) -> Tensor:
        """Classifier-free guidance u + s·(c − u), with u and c from one batched forward of [uncond; cond].

        ``scale`` is a float or a per-sample [B] tensor.
        """
        b = x.shape[0]
        tau = torch.as_tensor(tau, device=x.device)
        tau = tau.expand(b) if tau.ndim == 0 else tau
        both = Condition.cat([self._unconditional_like(cond).to(x.device), cond.to(x.device)])
        pred = self.predict(net, torch.cat([x, x]), torch.cat([tau, tau]), both)
        u, c = pred.chunk(2)
        s = expand_like(torch.as_tensor(scale, dtype=u.dtype, device=u.device), u)
        return u + s * (c - u)

    def _cast_inputs(self, net: nn.Module, x: Tensor, cond: Condition) -> tuple[Tensor, Condition, torch.dtype]:
        dtype = net_dtype(net)
        return x.to(dtype), cond.to(x.device, dtype), dtype

"""The networks of a run, built on meta from the config (which ones a family uses, the discriminator's heads), and
the trace of one iteration's forwards with grad at the config's resolution and per-GPU batch."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch import nn

from senseflow.core.dtypes import DTYPES
from senseflow.core.family import vae_factor
from senseflow.memory.activations import ActivationProfile, _Traces, trace_activations
from senseflow.memory.arch import _no_power_iterations, build_meta, load_arch_config
from senseflow.memory.budget import MemoryPlanError, _Net

if TYPE_CHECKING:
    from senseflow.method.adapters import SharedBase
    from senseflow.models.discriminator import VFMDiscriminator

# the discriminator's backbones when its configs are not local folders
_DISC_BACKBONE, _DISC_TEXT = "dinov2_large", "clip_vit_l14_text_with_projection"


def _family(cfg: Any) -> Any:
    """The teacher family class: its networks, units and dummy inputs (senseflow.models.families)."""
    from senseflow.models.families import get_family

    return get_family(cfg.teacher.family)


def _resolve_denoiser(cfg: Any, denoiser: str | None,
                      denoiser_set: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """The teacher's architecture: ``denoiser`` (a shipped name or a path), else the teacher folder's own
    ``config.json`` when it exists, else the family's shipped public config; then ``denoiser_set`` replaces entries
    of that config (e.g. ``guidance_embeds: false``: a de-distilled FLUX.1-dev). A key the config does not hold is
    refused."""
    fam = _family(cfg)
    if denoiser:
        name, config = str(denoiser), load_arch_config(denoiser)
    else:
        local = Path(cfg.teacher.path) / fam.denoiser_subfolder / "config.json"
        if local.is_file():
            name, config = str(local), load_arch_config(local)
        else:
            try:
                name = fam.public_denoiser(f"{cfg.experiment.name} {cfg.teacher.path}".lower())
            except ValueError as exc:
                raise MemoryPlanError(str(exc)) from None
            config = load_arch_config(name)
    if denoiser_set:
        unknown = sorted(k for k in denoiser_set if k not in config)
        if unknown:
            raise MemoryPlanError(f"--denoiser-set {unknown[0]}: not a key of the architecture config {name} "
                                  f"(expected one of: {', '.join(sorted(k for k in config if not k.startswith('_')))})")
        config = dict(config, **denoiser_set)
        name += " (" + ", ".join(f"{k}={v}" for k, v in denoiser_set.items()) + ")"
    return name, config


def _local_or_shipped(cfg: Any, subfolder: str, shipped: str) -> dict[str, Any]:
    local = Path(cfg.teacher.path) / subfolder / "config.json"
    return load_arch_config(local if local.is_file() else shipped)


def _denoiser_inputs(cfg: Any, config: dict[str, Any], batch: int, lat: int, dtype: torch.dtype,
                     device: str = "meta") -> Callable[[nn.Module], Any]:
    """A closure running the student's forward (no guidance input) on the family's inputs of the run's shapes:
    latents of side ``lat``, the config's text lengths."""
    inputs = _family(cfg).memory_inputs(config, batch, lat, int(cfg.teacher.clip_max_length),
                                        int(cfg.teacher.t5_max_length), dtype, device)
    return lambda net: net(**inputs, return_dict=False)[0]


def _discriminator(cfg: Any, dino: nn.Module, c_dim: int) -> tuple[VFMDiscriminator | None, str]:
    """The real VFMDiscriminator built on meta around the meta DINOv2 (None if its constructor does not fit)."""
    d = cfg.discriminator
    try:
        from senseflow.models.discriminator import VFMDiscriminator

        # the trainer's constructor path, traced without checkpointing (the plan applies it to the traced units)
        with torch.device("meta"), _no_power_iterations():
            return VFMDiscriminator.from_config(dino, c_dim, d, gradient_checkpointing=False), ""
    except Exception as exc:  # fall back to the analytic head count of docs/method.md §9.1
        return None, f"discriminator heads counted analytically (VFMDiscriminator could not be built: {exc})"


def analytic_head_params(channels: int, c_dim: int, cmap_dim: int, downsample: int, kernel: int = 3) -> int:
    """Trainable parameters of one D head (docs/method.md §9.1): main and refmapper stacks (1×1 block, ``downsample``
    stride-2 3×3 convs, ``downsample``−1 residual k×k blocks, BatchNormLocal affines), cls and refmapper 1×1
    projections to cmap_dim, and the equalised linear c_dim → cmap_dim."""
    conv = lambda k, cin, cout: k * k * cin * cout + cout  # noqa: E731
    block = lambda k: conv(k, channels, channels) + 2 * channels  # noqa: E731
    stack = block(1) + downsample * conv(3, channels, channels) + max(downsample - 1, 0) * block(kernel)
    return 2 * stack + 2 * conv(1, channels, cmap_dim) + c_dim * cmap_dim + cmap_dim


def _lora_base(cfg: Any, den_cfg: dict[str, Any]) -> SharedBase | None:
    """With ``model.lora.<player>.rank > 0``: the teacher's network on meta carrying the LoRA players' peft adapters
    (the trainer's own :meth:`SharedBase.add_adapters`: the family's target modules matched on the real layers,
    adapters in fp32, the base frozen), else None. A teacher the adapters cannot live on is refused with the
    trainer's line."""
    from types import SimpleNamespace

    from senseflow.method.adapters import SharedBase, adapter_specs, check_lora_fits_teacher

    fam = _family(cfg)
    try:
        specs = adapter_specs(cfg.model.lora, tuple(fam.lora_target_modules))
        check_lora_fits_teacher(SimpleNamespace(name=fam.name, student_overrides=fam.student_overrides,
                                                denoiser_config=den_cfg), specs)
    except ValueError as exc:
        raise MemoryPlanError(str(exc)) from None
    if not specs:
        return None
    base = build_meta(den_cfg)
    with torch.device("meta"):
        try:
            SharedBase.add_adapters(base, specs)
            return SharedBase(base, specs)
        except ValueError as exc:  # peft / AdapterWeights: no layer matches the target modules
            raise MemoryPlanError(f"model.lora: {exc}") from None


def _adapter_unit_params(shared: SharedBase, key: str, unit_types: Sequence[str]) -> int:
    """Parameters of adapter ``key`` inside the largest FSDP unit of the shared base (the gradient a unit's backward
    writes)."""
    names = set(unit_types)
    mine = {id(p) for p in shared.weights[key].parameters()}
    counts = [sum(p.numel() for p in m.parameters() if id(p) in mine)
              for m in shared.base.modules() if type(m).__name__ in names]
    return max(counts, default=0)


def _players(cfg: Any, arch: str, den_cfg: dict[str, Any], student_cfg: dict[str, Any], shared: SharedBase | None,
             fsdp: bool, teacher_sharded: bool, units: tuple[str, ...]) -> list[_Net]:
    """G, F, T (and G's EMA): full fp32 copies, or LoRA adapters on one frozen shared base (docs/memory_plan.md)."""
    labels = {"generator": ("student", "generator G", "G"), "fake": ("fake", "fake score F", "F")}
    nets = []
    for key, (lora_key, label, short) in labels.items():
        if shared is not None and lora_key in shared.specs:
            spec = shared.specs[lora_key]
            nets.append(_Net(key, f"{short}: LoRA adapter r={spec.rank}", f"{arch} LoRA r={spec.rank}",
                             shared.weights[lora_key], True, "float32", fsdp and teacher_sharded, units,
                             unit_source=shared.base, unit_grad=_adapter_unit_params(shared, lora_key, units)))
        else:
            nets.append(_Net(key, label, arch, build_meta(student_cfg), True, "float32", fsdp, units))
    label = "teacher T" if shared is None else "T = shared base"
    nets.append(_Net("teacher", label, arch, build_meta(den_cfg), False, cfg.teacher.dtype, fsdp and teacher_sharded,
                     units))
    if bool(cfg.train.ema.enabled):  # fp32 shadow of G's trained parameters (senseflow.method.optim.EMA)
        g = nets[0]
        nets.append(_Net("ema", "EMA of G (fp32)", g.arch, g.module, False, "float32", g.sharded))
    return nets


def _build_networks(cfg: Any, denoiser: str | None, fsdp: bool, teacher_sharded: bool,
                    disc_backbone_dtype: str, denoiser_set: Mapping[str, Any] | None = None
                    ) -> tuple[str, dict[str, Any], list[_Net], VFMDiscriminator | None, list[str], SharedBase | None]:
    """(teacher arch name, its config, the run's networks on meta, the meta VFMDiscriminator or None, notes, the
    shared LoRA base or None)."""
    fam = _family(cfg)
    arch, den_cfg = _resolve_denoiser(cfg, denoiser, denoiser_set)
    shared = _lora_base(cfg, den_cfg)
    student_cfg = dict(den_cfg, **fam.student_overrides) if fam.student_overrides else den_cfg  # FLUX: decision 4
    units, notes = tuple(t.__name__ for t in fam.block_types()), []  # one FSDP unit each
    nets = _players(cfg, arch, den_cfg, student_cfg, shared, fsdp, teacher_sharded, units)
    if shared is not None:
        notes.append("LoRA: " + ", ".join(f"{k} adapter rank {s.rank}, alpha {s.alpha:g}, "
                                          f"{sum(p.numel() for p in shared.weights[k].parameters()):,} parameters"
                                          for k, s in shared.specs.items())
                     + "; T, G and F share one frozen base (counted once, teacher.dtype)")
    nets += [
        _Net("vae", "VAE", fam.public_vae, build_meta(_local_or_shipped(cfg, "vae", fam.public_vae)), False,
             cfg.teacher.vae_dtype, False),
    ]
    text_cache = cfg.data.text_cache is not None  # with a text cache no text encoder is loaded
    for c in () if text_cache else fam.text_components:
        nets.append(_Net(f"text:{c.encoder}", c.label, c.public_config,
                         build_meta(_local_or_shipped(cfg, c.encoder, c.public_config)), False,
                         cfg.teacher.text_encoder_dtype, False))
    disc = None
    if cfg.method.gan.enabled:
        d = cfg.discriminator
        local = lambda path: path and Path(path, "config.json").is_file()  # noqa: E731
        dino = build_meta(load_arch_config(d.dino_path if local(d.dino_path) else _DISC_BACKBONE))
        clip_cfg = load_arch_config(d.clip_path if local(d.clip_path) else _DISC_TEXT)
        if clip_cfg.get("model_type") == "clip":  # a full CLIP folder: its text tower with projection
            clip_cfg = dict(clip_cfg["text_config"], architectures=["CLIPTextModelWithProjection"],
                            projection_dim=clip_cfg.get("projection_dim", 768))
        nets.append(_Net("disc_backbone", "D backbone DINOv2", _DISC_BACKBONE, dino, False, disc_backbone_dtype, False))
        if not text_cache:
            nets.append(_Net("disc_text", "D text CLIP-L/14", _DISC_TEXT, build_meta(clip_cfg), False,
                             disc_backbone_dtype, False))
        c_dim = int(clip_cfg.get("projection_dim", 768))
        disc, why = _discriminator(cfg, dino, c_dim)
        if disc is not None:
            heads: nn.Module = disc.heads
            label = f"D heads ×{len(disc.heads)}"
        else:  # one flat meta tensor of the analytic size (docs/method.md §9.1)
            notes.append(why)
            n_heads = len(d.hooks) + int(d.hook_patch)
            per_head = analytic_head_params(dino.config.hidden_size, c_dim, d.cmap_dim, d.downsample, d.kernel_size)
            size = n_heads * per_head
            heads = nn.ParameterList([nn.Parameter(torch.empty(size, device="meta"))])
            label = f"D heads ×{n_heads} (analytic)"
        nets.append(_Net("disc_heads", label, "VFMDiscriminator heads", heads, True, "float32", False))
    if cfg.method.dmd2_cls.enabled and fam.unet_bottleneck:
        from senseflow.models.dmd2_head import DMD2ClassifierHead, bottleneck_shape

        lat = int(cfg.teacher.resolution) // 8
        ch, h, _ = bottleneck_shape(nets[1].module.config, (lat, lat))
        with torch.device("meta"):
            head = DMD2ClassifierHead(ch, h)
        nets.append(_Net("dmd2_head", "DMD2 classifier head", "DMD2ClassifierHead", head, True, "float32", False))
        notes.append("DMD2 classifier: its fake-UNet forward with grad is counted as one more denoiser activation "
                     "in the G and F steps (upper bound)")
    return arch, student_cfg, nets, disc, notes, shared


def _trace_run(cfg: Any, student_cfg: dict[str, Any], nets: list[_Net], disc: VFMDiscriminator | None,
               disc_backbone_dtype: str, shared: SharedBase | None = None, batch: int | None = None) -> _Traces:
    """Trace the forwards with grad of one iteration at the config's resolution and per-GPU batch (``batch``, else
    ``train.batch_size``). A LoRA generator
    is traced as the trainer runs it: the frozen shared base with the student adapter active (the base's layers
    keep no inputs for a weight gradient; each adapted layer keeps its input and the rank-r product for B's)."""
    fam, res = _family(cfg), int(cfg.teacher.resolution)
    batch = int(cfg.train.batch_size) if batch is None else batch
    compute = None if cfg.train.mixed_precision == "fp32" else torch.bfloat16
    by: dict[str, Any] = {n.key: n.module for n in nets}  # diffusers / transformers models (dynamic configs)
    vae = by["vae"].to(DTYPES[cfg.teacher.vae_dtype])
    lat = res // vae_factor(vae.config)  # latent side (VAE downsampling 8)
    lora_g = shared is not None and "student" in shared.specs
    gen = shared.base if shared is not None and lora_g else by["generator"]
    gen.to(compute or torch.float32)  # FSDP2 MixedPrecisionPolicy: blocks compute in bf16
    units = fam.checkpoint_units or tuple(t.__name__ for t in fam.block_types())
    run = _denoiser_inputs(cfg, student_cfg, batch, lat, compute or torch.float32)
    with shared.active("student") if shared is not None and lora_g else contextlib.nullcontext():
        den = trace_activations(gen, run, units, compute)
    gen.float()
    channels = int(vae.config.latent_channels)
    z = torch.zeros(batch, channels, lat, lat, device="meta", dtype=DTYPES[cfg.teacher.vae_dtype],
                    requires_grad=True)
    batch_tensors = 2 * batch * 3 * res * res * 4 + 3 * batch * channels * lat * lat * 4  # pixels; latents, x_in
    empty = ActivationProfile()
    if disc is None:  # no GAN: the decode with grad and the discriminator do not run
        return _Traces(den, empty, empty, empty, empty, batch_tensors, compute)
    decode = lambda m: m.decode(z).sample  # noqa: E731
    vae_prof = trace_activations(vae, decode, ("ResnetBlock2D", "Attention"), compute)
    vae_ckpt = trace_activations(vae, decode, ("UNetMidBlock2D", "UpDecoderBlock2D"), compute)
    disc.to(DTYPES[disc_backbone_dtype])
    disc.heads.float()
    dino_cfg: Any = disc.dino.config  # a transformers Dinov2Config
    judged = res if cfg.discriminator.resolution is None else int(cfg.discriminator.resolution)
    side = judged // int(dino_cfg.patch_size)
    refs = [torch.zeros(batch, int(dino_cfg.hidden_size), side, side, device="meta") for _ in range(len(disc.heads))]
    c = torch.zeros(batch, disc.c_dim, device="meta")
    x = torch.zeros(batch, 3, res, res, device="meta", requires_grad=True)
    x_detached = torch.zeros(batch, 3, res, res, device="meta")
    with _no_power_iterations():
        disc.heads.requires_grad_(False)  # G step: gradient to the pixels only
        disc_g = trace_activations(disc, lambda m: m(x, c, refs, None), ("Dinov2Layer",), compute)
        disc.heads.requires_grad_(True)  # D step: gradient to the heads only, pixels detached
        disc_d = trace_activations(disc, lambda m: m(x_detached, c, refs, None), ("DiscriminatorHead",), compute)
    batch_tensors += sum(r.numel() for r in refs) * 4
    return _Traces(den, vae_prof, vae_ckpt, disc_g, disc_d, batch_tensors, compute)

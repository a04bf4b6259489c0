"""The VFM discriminator D_ψ: a frozen DINOv2 backbone, trainable heads, text and reference conditioning
(docs/method.md §9, decision 5).

Forward D(x, c, r):

1. x ∈ [−1, 1] is augmented with DiffAugment (the reference r is not), both are mapped to [0, 1], optionally
   resized to the backbone's resolution, and normalised with the backbone's image mean/std (ImageNet by default).
2. The frozen ``Dinov2Model`` (eval mode forced) gives the embedding output (``hidden_states[0]``) and the outputs
   of the hooked blocks (``hidden_states[i + 1]``). For each of these token maps the cls token is added to every
   patch token ("readout add") and the patch tokens are reshaped to f ∈ ℝ^{B × hidden × h × w}.
3. One head per feature map (§9.1 item 5)::

       main      = Block₁ → [SNConv₃ stride 2 → Res(Block_k)] × (downsample − 1) → SNConv₃ stride 2
       refmapper = (same stack) → SNConv₁ (hidden → cmap_dim)
       cls       = SNConv₁ (hidden → cmap_dim)
       cmapper   = equalised-LR linear c_dim → cmap_dim
       logits    = Σ_channels cls(main(f(x))) ⊙ (cmapper(c) + refmapper(f(r))) / √cmap_dim

   with Block_k = SNConv_k (circular padding) → BatchNormLocal → LeakyReLU(0.2), Res(f)(x) = (f(x) + x)/√2 and
   k = ``kernel_size`` (config ``discriminator.kernel_size``; §9.1: 3).
4. Each head's map is flattened and all heads are concatenated: (B, Σ h_out·w_out).

The reference features f(r) are computed once per iteration with :meth:`VFMDiscriminator.reference_features`
and reused by every D call of that iteration. Only ``heads`` train (:meth:`trainable_parameters`).

The text condition c is the L2-normalised CLIP text embedding of the caption (:class:`TextConditioner`, or
:class:`CachedTextConditioner` reading it from ``data.text_cache`` without loading the CLIP text model).

With ``gradient_checkpointing`` (config ``discriminator.gradient_checkpointing``) each DINOv2 layer keeps only its
input for backward while grad is enabled and recomputes its activations in backward (``torch.utils.checkpoint``,
non-reentrant). transformers' own ``gradient_checkpointing_enable()`` is not used: its layers checkpoint only in
training mode, and the backbone here always runs in eval mode.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm
from torch.utils.checkpoint import checkpoint

from senseflow.models.diffaug import POLICIES, diff_augment

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BatchNormLocal",
    "EqualLinear",
    "DiscriminatorHead",
    "VFMDiscriminator",
    "TextConditioner",
    "CachedTextConditioner",
    "DiscriminatorBackbones",
    "load_discriminator_backbones",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---- head building blocks ------------------------------------------------------------------------------------
class BatchNormLocal(nn.Module):
    """Batch norm over "virtual batches": the batch is split into ⌈B / virtual_batch⌉ nearly equal contiguous
    groups (each ≤ ``virtual_batch`` samples); each channel is normalised over (group samples × H × W) with the
    biased variance and ``eps``, then a learnable affine (init 1 / 0). No running statistics are kept."""

    def __init__(self, num_features: int, virtual_batch: int = 8, eps: float = 1e-5) -> None:
        super().__init__()
        if virtual_batch < 1:
            raise ValueError(f"BatchNormLocal: virtual_batch must be >= 1, got {virtual_batch}")
        self.virtual_batch, self.eps = int(virtual_batch), float(eps)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        groups = math.ceil(x.shape[0] / self.virtual_batch)
        out = []
        for chunk in torch.tensor_split(x, groups, dim=0):
            c = chunk.float()
            mean = c.mean(dim=(0, 2, 3), keepdim=True)
            var = c.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
            out.append(((c - mean) * torch.rsqrt(var + self.eps)).to(x.dtype))
        y = torch.cat(out, dim=0)
        return y * self.weight.to(y.dtype)[None, :, None, None] + self.bias.to(y.dtype)[None, :, None, None]


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate: W ~ N(0, 1) at init, used as W/√in_features; bias init 0."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.scale = 1.0 / math.sqrt(in_features)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


def sn_conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Module:
    """Spectrally normalised conv (1 power iteration, eps 1e-12, dim 0) with circular padding kernel//2."""
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, padding_mode="circular", bias=True)
    return spectral_norm(conv, n_power_iterations=1, eps=1e-12, dim=0)


class _Block(nn.Sequential):
    def __init__(self, channels: int, kernel: int, virtual_batch: int) -> None:
        super().__init__(
            sn_conv(channels, channels, kernel), BatchNormLocal(channels, virtual_batch), nn.LeakyReLU(0.2)
        )


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return (self.fn(x) + x) / math.sqrt(2.0)


def _conv_stack(channels: int, downsample: int, virtual_batch: int, kernel_size: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = [_Block(channels, 1, virtual_batch)]
    for d in range(downsample):
        layers.append(sn_conv(channels, channels, 3, stride=2))
        if d < downsample - 1:
            layers.append(_Residual(_Block(channels, kernel_size, virtual_batch)))
    return nn.Sequential(*layers)


class DiscriminatorHead(nn.Module):
    """One head on one feature map: projection-conditioned logits (text + reference), see the module docstring."""

    def __init__(
        self, channels: int, c_dim: int, cmap_dim: int, downsample: int, virtual_batch: int, kernel_size: int = 3
    ) -> None:
        super().__init__()
        if downsample < 0:
            raise ValueError(f"discriminator downsample must be >= 0, got {downsample}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"discriminator kernel_size must be an odd integer >= 1, got {kernel_size}")
        self.cmap_dim = int(cmap_dim)
        self.main = _conv_stack(channels, downsample, virtual_batch, kernel_size)
        self.cls = sn_conv(channels, cmap_dim, 1)
        self.refmapper = nn.Sequential(
            _conv_stack(channels, downsample, virtual_batch, kernel_size), sn_conv(channels, cmap_dim, 1)
        )
        self.cmapper = EqualLinear(c_dim, cmap_dim)

    def forward(self, feat: Tensor, c: Tensor, ref_feat: Tensor) -> Tensor:
        h = self.cls(self.main(feat))
        cmap = self.cmapper(c)[:, :, None, None] + self.refmapper(ref_feat)
        if cmap.shape[-2:] != h.shape[-2:]:
            raise ValueError(
                f"discriminator head: reference map {tuple(cmap.shape[-2:])} and image map {tuple(h.shape[-2:])} "
                "differ in size; give x and the reference r the same resolution"
            )
        out = (h * cmap).sum(dim=1, keepdim=True) / math.sqrt(self.cmap_dim)
        return out.flatten(1)


# ---- the discriminator ----------------------------------------------------------------------------------------
class VFMDiscriminator(nn.Module):
    """D_ψ(x, c, r) of §9 on a frozen transformers ``Dinov2Model``.

    Args (config section ``discriminator``; defaults are §9's values where they are model-independent):
        dino: a loaded ``Dinov2Model``; frozen here and kept in eval mode.
        c_dim: width of the text condition c (768 for CLIP ViT-L/14).
        hooks: 0-based block indices whose outputs are used (ViT-L/14: 2, 5, 8, 10, 14, 19, 23), in addition to
            the embedding output; one head per map.
        cmap_dim, downsample, virtual_batch: head sizes (64, 3, 8).
        kernel_size: k of the heads' residual basic blocks (3; the first block is 1×1, the stride-2 convs 3×3).
        augment_policy, translation_ratio, cutout_ratio: DiffAugment on x (color/translation/cutout, 1/8, 1/5).
        resize_to: backbone input size (int or (h, w)); ``None`` feeds the image at its own resolution.
        image_mean, image_std: backbone normalisation of [0, 1] images (ImageNet).
        use_embedding: also judge the patch-embedding output before block 0 (config ``hook_patch``; §9.1: yes).
        gradient_checkpointing: checkpoint every DINOv2 layer while grad is enabled (module docstring).
    """

    image_mean: Tensor  # buffers (registered in __init__)
    image_std: Tensor

    def __init__(
        self,
        dino: nn.Module,
        c_dim: int,
        hooks: Sequence[int],
        cmap_dim: int = 64,
        downsample: int = 3,
        virtual_batch: int = 8,
        augment_policy: Sequence[str] = POLICIES,
        translation_ratio: float = 0.125,
        cutout_ratio: float = 0.2,
        resize_to: int | Sequence[int] | None = None,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        use_embedding: bool = True,
        kernel_size: int = 3,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        cfg: Any = dino.config  # a transformers config (nn.Module attributes are typed Tensor | Module)
        self.use_embedding = bool(use_embedding)
        self.c_dim = int(c_dim)  # width of the text condition c
        self.hooks = [int(h) for h in hooks]
        bad = [h for h in self.hooks if not 0 <= h < cfg.num_hidden_layers]
        if bad:
            raise ValueError(f"discriminator.hooks {bad} outside the backbone's blocks 0..{cfg.num_hidden_layers - 1}")
        for name in augment_policy:
            if name not in POLICIES:
                raise ValueError(f"discriminator.augment_policy: {name!r} is not one of {', '.join(POLICIES)}")
        self.dino = dino
        self.dino.requires_grad_(False)
        self.dino.eval()
        self.patch_size = int(cfg.patch_size)
        self.augment_policy = tuple(augment_policy)
        self.translation_ratio, self.cutout_ratio = float(translation_ratio), float(cutout_ratio)
        if resize_to is not None and isinstance(resize_to, int):
            resize_to = (resize_to, resize_to)
        self.resize_to = None if resize_to is None else tuple(int(s) for s in resize_to)
        self.register_buffer("image_mean", torch.tensor(list(image_mean)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(list(image_std)).view(1, -1, 1, 1), persistent=False)
        self.heads = nn.ModuleList(
            DiscriminatorHead(cfg.hidden_size, c_dim, cmap_dim, downsample, virtual_batch, kernel_size)
            for _ in range(int(self.use_embedding) + len(self.hooks))
        )
        self.gradient_checkpointing = bool(gradient_checkpointing)
        if self.gradient_checkpointing:
            layers = getattr(getattr(dino, "encoder", None), "layer", None)
            if layers is None:
                raise ValueError("discriminator.gradient_checkpointing: the backbone has no encoder.layer list "
                                 "(expected a transformers Dinov2Model)")
            for layer in layers:
                setattr(layer, "forward", _checkpointed(layer.forward))  # noqa: B010 (an instance attribute)

    @classmethod
    def from_config(
        cls,
        dino: nn.Module,
        c_dim: int,
        d: Any,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        gradient_checkpointing: bool | None = None,
    ) -> "VFMDiscriminator":
        """D from the config section ``discriminator`` (``d``): the one constructor path of the trainer and of the
        memory plan (``senseflow memory``), so both build the same heads. The backbones are given loaded.
        ``gradient_checkpointing`` overrides ``d.gradient_checkpointing`` (the memory plan traces D without it)."""
        ckpt = bool(d.gradient_checkpointing) if gradient_checkpointing is None else gradient_checkpointing
        return cls(
            dino, int(c_dim), list(d.hooks), cmap_dim=int(d.cmap_dim), downsample=int(d.downsample),
            virtual_batch=int(d.virtual_batch), augment_policy=list(d.diffaug),
            translation_ratio=float(d.translation_ratio), cutout_ratio=float(d.cutout_ratio),
            resize_to=d.resolution, image_mean=image_mean, image_std=image_std,
            use_embedding=bool(d.hook_patch), kernel_size=int(d.kernel_size),
            gradient_checkpointing=ckpt,
        )

    def train(self, mode: bool = True) -> "VFMDiscriminator":
        super().train(mode)
        self.dino.eval()  # the backbone is frozen and always in eval mode
        return self

    def trainable_parameters(self):
        """The parameters the discriminator's optimiser holds: the heads only."""
        return self.heads.parameters()

    @property
    def num_feature_maps(self) -> int:
        return len(self.heads)

    # ---- backbone -------------------------------------------------------------------------------------------
    def _preprocess(self, x: Tensor) -> Tensor:
        x = (x.float() + 1.0) / 2.0
        if self.resize_to is not None and tuple(x.shape[-2:]) != self.resize_to:
            x = F.interpolate(x, size=self.resize_to, mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.image_mean) / self.image_std
        dtype = next(self.dino.parameters()).dtype
        return x.to(dtype)

    def _features(self, pixel_values: Tensor) -> list[Tensor]:
        b, _, height, width = pixel_values.shape
        h, w = height // self.patch_size, width // self.patch_size
        hidden = self.dino(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        maps = []
        chosen = ([hidden[0]] if self.use_embedding else []) + [hidden[i + 1] for i in self.hooks]
        for tokens in chosen:
            patches = tokens[:, -h * w :] + tokens[:, :1]  # readout "add": cls token added to every patch token
            maps.append(patches.transpose(1, 2).reshape(b, tokens.shape[-1], h, w))
        return maps

    def features(self, x: Tensor) -> list[Tensor]:
        """Backbone feature maps of images x ∈ [−1, 1] (no augmentation), differentiable w.r.t. x."""
        return self._features(self._preprocess(x))

    @torch.no_grad()
    def reference_features(self, r: Tensor) -> list[Tensor]:
        """Feature maps f(r) of the reference real images (no grad, no augmentation), computed once per iteration."""
        return [f.detach() for f in self.features(r)]

    # ---- logits ---------------------------------------------------------------------------------------------
    def forward(
        self, x: Tensor, c: Tensor, ref_feats: Sequence[Tensor], aug_gen: torch.Generator | None = None
    ) -> Tensor:
        """Logits (B, total) for images ``x`` ∈ [−1, 1], text condition ``c`` (B, c_dim) and reference features.

        ``aug_gen`` draws the DiffAugment parameters; ``None`` disables augmentation (evaluation).
        """
        if len(ref_feats) != len(self.heads):
            raise ValueError(f"discriminator: got {len(ref_feats)} reference maps, expected {len(self.heads)}")
        if aug_gen is not None and self.augment_policy:
            x = diff_augment(x, aug_gen, self.augment_policy, self.translation_ratio, self.cutout_ratio)
        feats = self.features(x)
        head_dtype = next(self.heads.parameters()).dtype
        c = c.to(head_dtype)
        logits = [
            head(f.to(head_dtype), c, r.to(head_dtype)) for head, f, r in zip(self.heads, feats, ref_feats)
        ]
        return torch.cat(logits, dim=1)


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` run under non-reentrant ``torch.utils.checkpoint`` while grad is enabled (plain otherwise)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run


# ---- text condition ---------------------------------------------------------------------------------------------
class TextConditioner(nn.Module):
    """c = text_embeds / ‖text_embeds‖ of a frozen transformers ``CLIPTextModelWithProjection`` (§9.2)."""

    def __init__(self, text_model: nn.Module, tokenizer: Any | None = None, max_length: int = 77) -> None:
        super().__init__()
        self.text_model = text_model
        self.text_model.requires_grad_(False)
        self.text_model.eval()
        self.tokenizer = tokenizer
        self.max_length = int(max_length)

    def train(self, mode: bool = True) -> "TextConditioner":
        super().train(mode)
        self.text_model.eval()
        return self

    @property
    def embed_dim(self) -> int:
        config: Any = self.text_model.config
        return int(config.projection_dim)

    @torch.no_grad()
    def encode_ids(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """L2-normalised projected embeddings (B, projection_dim) in fp32 from token ids."""
        device = next(self.text_model.parameters()).device
        out = self.text_model(
            input_ids=input_ids.to(device),
            attention_mask=None if attention_mask is None else attention_mask.to(device),
        )
        return F.normalize(out.text_embeds.float(), dim=-1)

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> Tensor:
        """Tokenise to ``max_length`` (pad and truncate) and encode."""
        if self.tokenizer is None:
            raise ValueError("TextConditioner was built without a tokenizer; use encode_ids or pass one")
        tok = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        return self.encode_ids(tok["input_ids"], tok.get("attention_mask"))


class CachedTextConditioner(nn.Module):
    """The text condition c read from a text cache (``data.text_cache``): ``lookup(prompts)`` gives the stored
    L2-normalised CLIP features (B, embed_dim), computed by a :class:`TextConditioner` when the cache was built. No
    CLIP text model is loaded."""

    _anchor: Tensor  # an empty buffer: the device the features are moved to

    def __init__(self, lookup: Callable[[list[str]], Tensor], embed_dim: int) -> None:
        super().__init__()
        self.lookup = lookup
        self._embed_dim = int(embed_dim)
        self.register_buffer("_anchor", torch.empty(0), persistent=False)  # follows .to(device)

    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> Tensor:
        return self.lookup(list(prompts)).to(self._anchor.device, torch.float32)


# ---- loading -----------------------------------------------------------------------------------------------------
@dataclass
class DiscriminatorBackbones:
    """The frozen pieces D needs, loaded from local folders."""

    dino: nn.Module | None  #: None when loaded with ``dino=False``
    text_model: nn.Module | None  #: None when loaded with ``text=False`` (a text cache gives the features)
    tokenizer: Any
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]


def _require_folder(path: str | os.PathLike, what: str) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: folder {path!r} does not exist (expected a local transformers model folder)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{what}: {path!r} has no config.json (expected a local transformers model folder)")
    return path


def _image_normalisation(path: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """image_mean / image_std of ``preprocessor_config.json`` when present, else ImageNet's."""
    cfg_file = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(cfg_file):
        with open(cfg_file, encoding="utf-8") as fh:
            cfg = json.load(fh)
        if "image_mean" in cfg and "image_std" in cfg:
            return tuple(float(v) for v in cfg["image_mean"]), tuple(float(v) for v in cfg["image_std"])
    return IMAGENET_MEAN, IMAGENET_STD


def load_discriminator_backbones(
    dino_path: str | os.PathLike,
    clip_path: str | os.PathLike,
    device: torch.device | str,
    dtype: torch.dtype,
    tokenizer_path: str | os.PathLike | None = None,
    dino: bool = True,
    text: bool = True,
) -> DiscriminatorBackbones:
    """Load a ``Dinov2Model`` and a ``CLIPTextModelWithProjection`` (+ tokenizer) from local folders only.

    ``clip_path`` may be a full CLIP model folder (e.g. clip-vit-large-patch14) or a text-only one; the tokenizer
    is read from ``tokenizer_path`` (default ``clip_path``). Only safetensors weights are accepted. ``text=False``
    loads no CLIP text model nor tokenizer (training with a text cache); ``dino=False`` no DINOv2 (building one).
    """
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, Dinov2Model

    dino_path = _require_folder(dino_path, "discriminator.dino_path") if dino else os.fspath(dino_path)
    kwargs: dict[str, Any] = dict(local_files_only=True, use_safetensors=True, dtype=dtype)
    # moved as nn.Modules: transformers types PreTrainedModel.to through a decorator that rejects a device
    backbone: nn.Module | None = None
    if dino:
        loaded: nn.Module = Dinov2Model.from_pretrained(dino_path, **kwargs)
        backbone = loaded.to(device)
    text_model: nn.Module | None = None
    tokenizer: Any = None
    if text:
        clip_path = _require_folder(clip_path, "discriminator.clip_path")
        tok_path = os.fspath(tokenizer_path) if tokenizer_path is not None else clip_path
        if not os.path.isdir(tok_path):
            raise FileNotFoundError(f"discriminator.clip_tokenizer_path: folder {tok_path!r} does not exist")
        clip: nn.Module = CLIPTextModelWithProjection.from_pretrained(clip_path, **kwargs)
        text_model = clip.to(device)
        tokenizer = AutoTokenizer.from_pretrained(tok_path, local_files_only=True)
    mean, std = _image_normalisation(dino_path) if dino else (IMAGENET_MEAN, IMAGENET_STD)
    return DiscriminatorBackbones(dino=backbone, text_model=text_model, tokenizer=tokenizer, image_mean=mean,
                                  image_std=std)

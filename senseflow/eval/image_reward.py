"""ImageReward (Xu et al., 2023) as a BLIP image encoder + cross-attending BERT text encoder + linear head, read
from a local folder; and a converter from the released ``ImageReward.pt``.

The ``image-reward`` package cannot be installed here (its timm / fairscale pins pull torchvision) and downloads
its weights from a hub, so the scorer is rebuilt from transformers' BLIP classes:

    v = BlipVision(x)                                    patch tokens of the ViT (post-norm), (B, N+1, d_v)
    h = BlipText(c, cross-attending to v)[:, 0]          the [CLS] state of the prompt c, (B, d_t)
    r = W_5 W_4 W_3 W_2 W_1 h + b                        the MLP head (linear layers; dropout only in training)
    ImageReward(x, c) = (r − μ_r) / σ_r                  μ_r, σ_r: the release's normalisation constants

Prompts are tokenised by the folder's BERT tokenizer, padded / truncated to ``max_length`` (35 in the release);
images by its ``CLIPImageProcessor`` (224 px bicubic short side, centre crop, CLIP mean/std).

Folder layout (written by :func:`save_image_reward` and by ``senseflow eval convert-imagereward``):
``config.json`` (``format``, ``vision_config``, ``text_config``, ``head_dims``, ``reward_mean``, ``reward_std``,
``max_length``), ``model.safetensors`` (``vision.*``, ``text.*``, ``head.*``), the tokenizer files and
``preprocessor_config.json``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from PIL import Image
from torch import Tensor, nn

__all__ = ["ImageRewardModel", "save_image_reward", "load_image_reward", "ImageRewardScorer",
           "convert_imagereward_state", "convert_imagereward_checkpoint", "RELEASE_MEAN", "RELEASE_STD"]

FORMAT = "senseflow-imagereward"
#: normalisation constants of the released ImageReward-v1.0 head
RELEASE_MEAN = 0.16717362830052426
RELEASE_STD = 1.0333394966054072
RELEASE_MAX_LENGTH = 35
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


class ImageRewardModel(nn.Module):
    """BLIP vision tower, BLIP text tower with cross-attention, linear head; see the module docstring."""

    def __init__(self, vision_config: Mapping[str, Any], text_config: Mapping[str, Any], head_dims: Sequence[int],
                 reward_mean: float = RELEASE_MEAN, reward_std: float = RELEASE_STD,
                 max_length: int = RELEASE_MAX_LENGTH) -> None:
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        tcfg = dict(text_config)
        tcfg["is_decoder"] = True  # builds the cross-attention layers; forward runs bidirectional (is_decoder=False)
        self.vision = BlipVisionModel(BlipVisionConfig(**dict(vision_config)))
        self.text = BlipTextModel(BlipTextConfig(**tcfg), add_pooling_layer=False)
        dims = [int(d) for d in head_dims]
        if len(dims) < 2 or dims[0] != self.text.config.hidden_size or dims[-1] != 1:
            raise ValueError(f"head_dims {dims} must go from the text width {self.text.config.hidden_size} to 1")
        self.head = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])])
        self.head_dims = dims
        self.reward_mean, self.reward_std, self.max_length = float(reward_mean), float(reward_std), int(max_length)

    def config_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "vision_config": self.vision.config.to_dict(),
                "text_config": self.text.config.to_dict(), "head_dims": self.head_dims,
                "reward_mean": self.reward_mean, "reward_std": self.reward_std, "max_length": self.max_length}

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B,) normalised rewards."""
        v = self.vision(pixel_values=pixel_values).last_hidden_state
        v_mask = torch.ones(v.shape[:-1], dtype=torch.long, device=v.device)
        h = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=v,
                      encoder_attention_mask=v_mask, is_decoder=False).last_hidden_state[:, 0]
        r = self.head(h.float()).squeeze(-1)
        return (r - self.reward_mean) / self.reward_std


def save_image_reward(model: ImageRewardModel, folder: Path | str, tokenizer: Any, image_processor: Any) -> Path:
    """Write the folder layout of the module docstring."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config_dict(), indent=1), encoding="utf-8")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    tokenizer.save_pretrained(str(folder))
    image_processor.save_pretrained(str(folder))
    return folder


def load_image_reward(folder: Path | str) -> ImageRewardModel:
    """Read an ImageReward folder (strict key check); FileNotFoundError / ValueError name the file."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"ImageReward model folder not found: {folder}")
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"ImageReward model folder {folder} has no {name} "
                                    "(convert ImageReward.pt with: senseflow eval convert-imagereward)")
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{folder / 'config.json'}: format is {cfg.get('format')!r}, expected {FORMAT!r}")
    model = ImageRewardModel(cfg["vision_config"], cfg["text_config"], cfg["head_dims"], cfg["reward_mean"],
                             cfg["reward_std"], cfg["max_length"])
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return model.eval().requires_grad_(False)


class ImageRewardScorer:
    """score(images, prompts) → (B,) ImageReward values; model, tokenizer and processor from one local folder."""

    def __init__(self, folder: Path | str, device: torch.device | str = "cpu") -> None:
        from transformers import AutoTokenizer, CLIPImageProcessor

        from senseflow.quiet import quiet_libraries

        quiet_libraries()
        self.device = torch.device(device)
        self.model = load_image_reward(folder).to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.processor = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.model.max_length,
                             return_tensors="pt")
        return self.model(pixels, tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)).cpu()


# ---- conversion of the released checkpoint -----------------------------------------------------------------

_VISION_RULES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.(weight|bias)$", r"embeddings.patch_embedding.\1"),
    (r"^blocks\.(\d+)\.norm1\.(weight|bias)$", r"encoder.layers.\1.layer_norm1.\2"),
    (r"^blocks\.(\d+)\.norm2\.(weight|bias)$", r"encoder.layers.\1.layer_norm2.\2"),
    (r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", r"encoder.layers.\1.self_attn.qkv.\2"),
    (r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$", r"encoder.layers.\1.self_attn.projection.\2"),
    (r"^blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", r"encoder.layers.\1.mlp.\2.\3"),
    (r"^norm\.(weight|bias)$", r"post_layernorm.\1"),
]


def _count(prefix: str, keys: Sequence[str]) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def convert_imagereward_state(state: Mapping[str, Tensor], head_dim: int = 64, vision_eps: float = 1e-6,
                              text_eps: float = 1e-12) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Released ImageReward state dict (``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``) →
    (our state dict, our config). Widths, depths, patch and image size come from the tensor shapes; the number of
    heads is width / ``head_dim`` (BLIP's ViT-L and BERT-base both use 64)."""
    ve, te = "blip.visual_encoder.", "blip.text_encoder."
    need = [ve + "pos_embed", ve + "patch_embed.proj.weight", te + "embeddings.word_embeddings.weight",
            "mlp.layers.0.weight"]
    for k in need:
        if k not in state:
            raise ValueError(f"not an ImageReward checkpoint: key {k!r} is missing")
    out: dict[str, Tensor] = {}
    vkeys = [k[len(ve):] for k in state if k.startswith(ve)]
    for k in vkeys:
        for pat, rep in _VISION_RULES:
            if re.match(pat, k):
                out["vision." + re.sub(pat, rep, k)] = state[ve + k]
                break
        else:
            raise ValueError(f"unexpected vision key in the ImageReward checkpoint: {ve + k}")
    for k in state:
        if k.startswith(te) and not k.endswith("position_ids"):
            out["text." + k[len(te):]] = state[k]
    linear = sorted({int(m.group(1)) for k in state if (m := re.match(r"^mlp\.layers\.(\d+)\.weight$", k))})
    for j, i in enumerate(linear):
        out[f"head.{j}.weight"] = state[f"mlp.layers.{i}.weight"]
        out[f"head.{j}.bias"] = state[f"mlp.layers.{i}.bias"]
    head_dims = [int(state[f"mlp.layers.{linear[0]}.weight"].shape[1])] + \
                [int(state[f"mlp.layers.{i}.weight"].shape[0]) for i in linear]

    pos, patch = state[ve + "pos_embed"], state[ve + "patch_embed.proj.weight"]
    width, side = int(pos.shape[-1]), round((pos.shape[1] - 1) ** 0.5)
    t_width = int(state[te + "embeddings.word_embeddings.weight"].shape[1])
    for name, w in (("vision", width), ("text", t_width)):
        if w % head_dim:
            raise ValueError(f"the {name} width {w} is not a multiple of head_dim {head_dim}")
    vision = dict(hidden_size=width, num_hidden_layers=_count("blocks.", vkeys),
                  num_attention_heads=width // head_dim,
                  intermediate_size=int(state[ve + "blocks.0.mlp.fc1.weight"].shape[0]),
                  patch_size=int(patch.shape[-1]), image_size=side * int(patch.shape[-1]),
                  layer_norm_eps=vision_eps, hidden_act="gelu")
    tkeys = [k[len(te):] for k in state if k.startswith(te)]
    words = state[te + "embeddings.word_embeddings.weight"]
    text = dict(vocab_size=int(words.shape[0]), hidden_size=t_width,
                num_hidden_layers=_count("encoder.layer.", tkeys), num_attention_heads=t_width // head_dim,
                intermediate_size=int(state[te + "encoder.layer.0.intermediate.dense.weight"].shape[0]),
                max_position_embeddings=int(state[te + "embeddings.position_embeddings.weight"].shape[0]),
                encoder_hidden_size=int(state[te + "encoder.layer.0.crossattention.self.key.weight"].shape[1]),
                layer_norm_eps=text_eps, hidden_act="gelu", pad_token_id=0)
    return out, {"vision_config": vision, "text_config": text, "head_dims": head_dims}


def convert_imagereward_checkpoint(checkpoint: Path | str, tokenizer_folder: Path | str, out: Path | str,
                                   image_size: int | None = None, head_dim: int = 64) -> Path:
    """``ImageReward.pt`` + a local ``bert-base-uncased`` tokenizer folder → our ImageReward folder.

    The tokenizer gets BLIP's two extra tokens (``[DEC]`` as bos, ``[ENC]``), as the release's tokenizer had.
    """
    from transformers import AutoTokenizer, CLIPImageProcessor

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"ImageReward checkpoint not found: {checkpoint}")
    state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    ours, cfg = convert_imagereward_state(state, head_dim=head_dim)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_folder), local_files_only=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tok) > cfg["text_config"]["vocab_size"]:
        raise ValueError(f"tokenizer in {tokenizer_folder} has {len(tok)} tokens but the checkpoint's text "
                         f"embedding has {cfg['text_config']['vocab_size']} rows (expected bert-base-uncased)")
    cfg["text_config"].update(bos_token_id=tok.bos_token_id, sep_token_id=tok.sep_token_id,
                              pad_token_id=tok.pad_token_id)
    model = ImageRewardModel(cfg["vision_config"], cfg["text_config"], cfg["head_dims"])
    model.load_state_dict(ours, strict=True)
    side = int(image_size or cfg["vision_config"]["image_size"])
    proc = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                              resample=3, image_mean=_CLIP_MEAN, image_std=_CLIP_STD, do_convert_rgb=True)
    return save_image_reward(model, out, tok, proc)

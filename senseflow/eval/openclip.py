"""Convert an OpenCLIP checkpoint (e.g. HPSv2's ``HPS_v2.1_compressed.pt``) into a ``transformers.CLIPModel``
folder, so that HPSv2 scores through :class:`senseflow.eval.clip_score.CLIPScorer` without open_clip.

OpenCLIP stores a CLIP with fused attention projections; the mapping to transformers' names is

    visual.conv1 → vision_model.embeddings.patch_embedding      visual.class_embedding → …class_embedding
    visual.positional_embedding → …position_embedding.weight    visual.ln_pre → vision_model.pre_layrnorm
    visual.ln_post → vision_model.post_layernorm                visual.proj (d×e) → visual_projection.weight = projᵀ
    token_embedding → text_model.embeddings.token_embedding      positional_embedding → …position_embedding.weight
    ln_final → text_model.final_layer_norm                       text_projection (d×e) → text_projection.weight = ᵀ
    resblocks.i.{ln_1, ln_2, mlp.c_fc, mlp.c_proj, attn.out_proj} → layers.i.{layer_norm1, layer_norm2, mlp.fc1,
    mlp.fc2, self_attn.out_proj};  attn.in_proj_{weight,bias} = [W_q; W_k; W_v] → q_proj, k_proj, v_proj

The architecture (widths, heads, activation, token ids) comes from the ``config.json`` of a *base* CLIPModel folder
of the same architecture (for HPSv2: the transformers copy of OpenCLIP ViT-H/14 laion2B, which HPSv2 fine-tunes);
its tokenizer and image processor are copied next to the converted weights. Loading is strict.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

__all__ = ["convert_openclip_state", "convert_openclip_checkpoint"]

_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
          "attn.out_proj": "self_attn.out_proj"}
_TOP = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_IGNORED = ("attn_mask",)


def convert_openclip_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """OpenCLIP state dict → transformers ``CLIPModel`` state dict (see the module docstring)."""
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in _TOP:
            out[_TOP[key]] = value
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif m := re.match(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", key):
            tower = "vision_model" if m.group(1) else "text_model"
            prefix = f"{tower}.encoder.layers.{m.group(2)}."
            part, kind = m.group(3), m.group(4)
            if part in _BLOCK:
                out[prefix + f"{_BLOCK[part]}.{kind}"] = value
            else:
                raise ValueError(f"OpenCLIP key {key!r} has no transformers counterpart")
        elif m := re.match(r"^(visual\.)?transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key):
            tower = "vision_model" if m.group(1) else "text_model"
            prefix = f"{tower}.encoder.layers.{m.group(2)}.self_attn."
            if value.shape[0] % 3:
                raise ValueError(f"{key}: first dimension {value.shape[0]} is not 3·width")
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[prefix + f"{name}.{m.group(3)}"] = chunk.contiguous()
        elif key in _IGNORED:
            continue
        else:
            raise ValueError(f"OpenCLIP key {key!r} has no transformers counterpart (not a plain CLIP ViT?)")
    return out


def convert_openclip_checkpoint(checkpoint: Path | str, base: Path | str, out: Path | str) -> Path:
    """OpenCLIP checkpoint (a state dict, or ``{"state_dict": ...}`` as HPSv2 ships) + base CLIPModel folder →
    a CLIPModel folder at ``out`` with the base's tokenizer and image processor."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    checkpoint, base, out = Path(checkpoint), Path(base), Path(out)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"OpenCLIP checkpoint not found: {checkpoint}")
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"base CLIP folder {base} has no config.json")
    state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    model = CLIPModel(CLIPConfig.from_pretrained(str(base), local_files_only=True))
    converted = convert_openclip_state(state)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{checkpoint} does not match the architecture of {base}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(base), local_files_only=True).save_pretrained(str(out))
    CLIPImageProcessor.from_pretrained(str(base), local_files_only=True).save_pretrained(str(out))
    return out

"""CLIP-embedding scores of image–prompt pairs: CLIP score, HPSv2 and PickScore (docs/method.md §19 columns).

All three are a ``transformers.CLIPModel`` read from a local folder. With unit embeddings
î = P_v(f_v(x)) / ‖·‖ and t̂ = P_t(f_t(c)) / ‖·‖ (image tower f_v with projection P_v, text tower f_t with P_t):

* **CLIP score** = î·t̂, the cosine (the paper's 0.32-ish values), for a general CLIP model;
* **HPSv2** = î·t̂ with the HPSv2 fine-tune of OpenCLIP ViT-H/14 (converted to this format with
  ``senseflow eval convert-openclip``; the HPSv2 scorer takes the same diagonal of normalised features);
* **PickScore** = exp(s)·î·t̂ with the model's learned logit scale s (PickScore_v1, ≈ 22–23 in the table).

Images are preprocessed by the folder's ``CLIPImageProcessor`` (resize of the short side, centre crop,
normalisation, all from ``preprocessor_config.json``); prompts by its tokenizer, truncated to the text tower's
``max_position_embeddings``. A separate ``processor`` folder may supply both (PickScore_v1 ships none).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

__all__ = ["CLIPScorer", "check_model_folder"]


def check_model_folder(folder: Path | str, what: str, needs: Sequence[str] = ("config.json",)) -> Path:
    """Raise FileNotFoundError unless ``folder`` is a folder holding ``needs``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} model folder not found: {folder}")
    for name in needs:
        if not (folder / name).exists():
            raise FileNotFoundError(f"{what} model folder {folder} has no {name}")
    return folder


class CLIPScorer:
    """score(images, prompts) = scale · î·t̂ per pair, scale = exp(logit_scale) when ``use_logit_scale``."""

    def __init__(self, folder: Path | str, use_logit_scale: bool = False, processor_folder: Path | str | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, what: str = "CLIP") -> None:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        from senseflow.quiet import quiet_libraries

        quiet_libraries()
        folder = check_model_folder(folder, what)
        proc = check_model_folder(processor_folder, f"{what} processor", ()) if processor_folder else folder
        if not (proc / "preprocessor_config.json").is_file():
            raise FileNotFoundError(f"{what}: no preprocessor_config.json in {proc} (set the metric's 'processor' "
                                    "to a folder holding the CLIP image processor and tokenizer)")
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
        module: torch.nn.Module = self.model  # moved as an nn.Module: transformers types PreTrainedModel.to through
        module.to(self.device).eval().requires_grad_(False)  # a decorator that rejects a device
        self.tokenizer = AutoTokenizer.from_pretrained(str(proc), local_files_only=True)
        self.processor = CLIPImageProcessor.from_pretrained(str(proc), local_files_only=True)
        self.use_logit_scale = use_logit_scale
        text_config: Any = self.model.config.text_config  # a CLIPTextConfig once loaded (typed dict | None too)
        self.max_length = int(text_config.max_position_embeddings)

    @torch.no_grad()
    def image_embeds(self, images: Sequence[Image.Image]) -> Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, dtype=self.model.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> Tensor:
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        out = self.model.text_model(input_ids=tok["input_ids"].to(self.device),
                                    attention_mask=tok["attention_mask"].to(self.device))
        return F.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> Tensor:
        """(B,) float32 scores of image i with prompt i."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        cos = (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)
        if self.use_logit_scale:
            cos = cos * self.model.logit_scale.float().exp()
        return cos.cpu()

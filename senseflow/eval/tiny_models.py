"""Tiny random metric models of the real classes, in the real folder layouts, for tests and the CPU demo.

Every metric backend of :mod:`senseflow.eval.metrics` loads these exactly as it loads the real models:

* ``inception.safetensors``: :class:`~senseflow.eval.inception.FIDInceptionV3` with ``channel_divisor`` 16
  (128-d features instead of 2048);
* ``clip/``: a ``transformers.CLIPModel`` (32-px ViT, 2 layers) with a CLIP BPE tokenizer trained on
  :data:`senseflow.tiny.CORPUS` and a ``CLIPImageProcessor`` (used for CLIP score, HPSv2 and PickScore);
* ``imagereward/``: :class:`~senseflow.eval.image_reward.ImageRewardModel` with a word-piece BERT tokenizer.

The weights are random (a fixed seed), so the numbers mean nothing; the plumbing is the real one.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = ["build_tiny_inception", "build_tiny_clip", "build_tiny_image_reward", "build_tiny_metric_models",
           "TINY_CLIP", "TINY_BLIP_VISION", "TINY_BLIP_TEXT"]

TINY_CLIP: dict[str, Any] = dict(
    text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=77, hidden_act="gelu"),
    vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=8, hidden_act="gelu"),
    projection_dim=16,
)
TINY_BLIP_VISION: dict[str, Any] = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=32, patch_size=8, layer_norm_eps=1e-6,
                                         hidden_act="gelu")
TINY_BLIP_TEXT: dict[str, Any] = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=40, encoder_hidden_size=32, layer_norm_eps=1e-12, hidden_act="gelu",
                      pad_token_id=0)
TINY_HEAD = (32, 16, 8, 1)
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _processor(side: int):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}, resample=3,
                              image_mean=_CLIP_MEAN, image_std=_CLIP_STD)


def build_tiny_inception(path: Path | str, seed: int = 0, channel_divisor: int = 16) -> Path:
    """A random FID Inception of the real class (widths ÷ ``channel_divisor``) with non-trivial BN statistics."""
    from senseflow.eval.inception import FIDInceptionV3, save_fid_inception

    with _seeded(seed):
        model = FIDInceptionV3(channel_divisor=channel_divisor)
        # calibrate the batch-norm statistics on random images (cumulative average), so that every layer sees
        # unit-scale inputs and the features vary with the image instead of collapsing to a constant
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        model.train()
        with torch.no_grad():
            for _ in range(2):
                low = torch.rand(8, 3, 8, 8)
                model.features(torch.nn.functional.interpolate(low, size=(64, 64), mode="bilinear") * 0.5
                               + 0.5 * torch.rand(8, 3, 64, 64))
        for bn in bns:
            bn.momentum = 0.1
        model.eval()
    return save_fid_inception(model, path)


def build_tiny_clip(folder: Path | str, seed: int = 0) -> Path:
    """A tiny ``CLIPModel`` folder (config, weights, tokenizer, image processor)."""
    from transformers import CLIPConfig, CLIPModel

    from senseflow.models.tokenizers import train_clip_tokenizer
    from senseflow.quiet import quiet_libraries
    from senseflow.tiny import CORPUS

    quiet_libraries()
    tok = train_clip_tokenizer(CORPUS, vocab_size=400, max_length=77)
    cfg = CLIPConfig(**{**TINY_CLIP, "text_config": {**TINY_CLIP["text_config"], "vocab_size": len(tok),
                                                      "bos_token_id": tok.bos_token_id,
                                                      "eos_token_id": tok.eos_token_id,
                                                      "pad_token_id": tok.pad_token_id}})
    with _seeded(seed):
        model = CLIPModel(cfg).eval()
    folder = Path(folder)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    _processor(TINY_CLIP["vision_config"]["image_size"]).save_pretrained(str(folder))
    return folder


def _tiny_bert_tokenizer(folder: Path):
    from transformers import BertTokenizer

    from senseflow.tiny import CORPUS

    words = sorted({w for text in CORPUS for w in text.lower().replace(",", " ").replace("'", " ").split()})
    chars = sorted({c for w in words for c in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars), *words]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    tok = BertTokenizer(str(folder / "vocab.txt"))
    (folder / "vocab.txt").unlink()
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def build_tiny_image_reward(folder: Path | str, seed: int = 0) -> Path:
    """A tiny ImageReward folder in the layout of :mod:`senseflow.eval.image_reward`."""
    from senseflow.eval.image_reward import ImageRewardModel, save_image_reward

    folder = Path(folder)
    tok = _tiny_bert_tokenizer(folder)
    with _seeded(seed):
        text = {
            **TINY_BLIP_TEXT, "vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "sep_token_id": tok.sep_token_id
        }
        model = ImageRewardModel(TINY_BLIP_VISION, text, TINY_HEAD).eval()
    return save_image_reward(model, folder, tok, _processor(TINY_BLIP_VISION["image_size"]))


def build_tiny_metric_models(out_dir: Path | str, seed: int = 0) -> dict[str, Path]:
    """``{"inception": file, "clip": folder, "imagereward": folder}`` under ``out_dir``."""
    out = Path(out_dir)
    return {"inception": build_tiny_inception(out / "inception.safetensors", seed),
            "clip": build_tiny_clip(out / "clip", seed),
            "imagereward": build_tiny_image_reward(out / "imagereward", seed)}

"""Tiny SD3-style text stack for the digits teacher: locally trained tokenizers, tiny text encoders, and the
prompt encoding of docs/method.md §12 (SD3.5).

* CLIP-L and CLIP-G: ``CLIPTextModelWithProjection`` (no dropout) with a byte-level BPE tokenizer trained by ``tokenizers`` on
  the caption corpus and wrapped as ``transformers.CLIPTokenizer`` (77 tokens, bos/eos/pad like CLIP).
* T5: ``T5EncoderModel`` with a Unigram tokenizer trained by ``tokenizers`` and wrapped as ``T5Tokenizer``.

The encoders start random (seeded); the digits teacher trains them jointly with its transformer.

Prompt encoding (what ``StableDiffusion3Pipeline.encode_prompt`` computes, written from the math):
  h_L, h_G = penultimate hidden states of CLIP-L, CLIP-G on 77 tokens   (B, 77, d_L), (B, 77, d_G)
  p_L, p_G = projected pooled outputs (``text_embeds``)                 (B, p_L), (B, p_G)
  h_T      = last hidden state of T5 on ``t5_max_length`` tokens         (B, L_T, d_T)
  prompt_embeds = [ pad_channels(h_L ⊕ h_G, d_T) ; h_T ]  (sequence axis)  (B, 77 + L_T, d_T)
  pooled        = p_L ⊕ p_G                                               (B, p_L + p_G)
"""
from __future__ import annotations

import json
import math
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "TextStackConfig",
    "TextStack",
    "train_clip_tokenizer",
    "train_t5_tokenizer",
    "build_text_stack",
    "TokenIds",
    "tokenize_prompts",
    "encode_token_ids",
    "encode_prompts",
]


@dataclass(frozen=True)
class TextStackConfig:
    """Sizes of the tiny text encoders and tokenizers (documented defaults of the schema).

    ``clip_l_hidden + clip_g_hidden`` must not exceed ``t5_d_model`` (the SD3 pipeline zero-pads the CLIP
    channels to the T5 width and would silently crop otherwise).
    """

    clip_vocab_size: int = 400
    t5_vocab_size: int = 200
    clip_max_length: int = 77
    t5_max_length: int = 77
    clip_l_hidden: int = 16
    clip_g_hidden: int = 16
    clip_projection_dim: int = 16
    clip_layers: int = 2
    clip_heads: int = 2
    clip_intermediate: int = 32
    t5_d_model: int = 32
    t5_d_ff: int = 64
    t5_d_kv: int = 8
    t5_layers: int = 2
    t5_heads: int = 4

    def __post_init__(self) -> None:
        if self.clip_l_hidden + self.clip_g_hidden > self.t5_d_model:
            raise ValueError(
                f"TextStackConfig: clip_l_hidden + clip_g_hidden = {self.clip_l_hidden + self.clip_g_hidden} exceeds "
                f"t5_d_model = {self.t5_d_model}; the SD3 pipeline would crop the CLIP embeddings"
            )


@dataclass
class TextStack:
    """The six text components of an SD3 pipeline (names as in ``StableDiffusion3Pipeline``)."""

    tokenizer: object
    tokenizer_2: object
    tokenizer_3: object
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    text_encoder_3: torch.nn.Module

    def components(self) -> dict:
        return dict(
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            tokenizer_3=self.tokenizer_3,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            text_encoder_3=self.text_encoder_3,
        )


def _canonical_bpe(vocab: dict[str, int], merges: list, specials: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Order a trained BPE independently of the trainer's tie-breaking (which varies from run to run).

    The trainer yields the same vocabulary and merge *sets* each run but not the same order. Merges are ranked by
    (length of the merged token, left, right): a merge's parts are shorter than its result, so every part can be
    formed before it is needed. Ids: ``specials``, then the initial alphabet sorted, then merge results by rank.
    """
    pairs = sorted({tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges}, key=lambda ab: (len(ab[0]) + len(ab[1]), ab))
    merged = list(dict.fromkeys(a + b for a, b in pairs))
    alphabet = sorted(set(vocab) - set(specials) - set(merged))
    order = list(specials) + alphabet + merged
    if len(order) != len(vocab) or set(order) != set(vocab):
        raise ValueError("BPE canonicalisation lost or duplicated tokens; the trained vocabulary is inconsistent")
    return {t: i for i, t in enumerate(order)}, pairs


def train_clip_tokenizer(corpus: Sequence[str], vocab_size: int, max_length: int):
    """Byte-level BPE with CLIP's normaliser, pre-tokeniser and ``</w>`` word suffix, trained on ``corpus`` by
    ``tokenizers``, put in a canonical order (:func:`_canonical_bpe`) and wrapped as ``transformers.CLIPTokenizer``
    (ids: ``<|startoftext|>`` = 0, ``<|endoftext|>`` = 1 = eos = pad)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token=eos))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[bos, eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab, merges = _canonical_bpe(model["vocab"], model["merges"], (bos, eos))
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
        return CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file), model_max_length=max_length)


def _piece_log_frequencies(corpus: Sequence[str], pieces: Sequence[str]) -> list[tuple[str, float]]:
    """Score each piece by log(c(p) / Σ c), c(p) = occurrences of p in the corpus's ▁-prefixed words (min 1);
    sorted by (−score, piece)."""
    words = ["▁" + w for text in corpus for w in unicodedata.normalize("NFKC", text).split()]
    counts = {p: max(1, sum(w.count(p) for w in words)) for p in pieces}
    total = sum(counts.values())
    return sorted(((p, math.log(c / total)) for p, c in counts.items()), key=lambda ps: (-ps[1], ps[0]))


def train_t5_tokenizer(corpus: Sequence[str], vocab_size: int, max_length: int):
    """Unigram tokenizer (NFKC, whitespace + metaspace pre-tokenisation) wrapped as ``transformers.T5Tokenizer``
    (ids: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2; ``</s>`` is appended).

    ``tokenizers``' Unigram trainer picks the pieces (the same set every run); their scores, which it breaks
    ties in differently from run to run, are replaced by deterministic log-frequencies
    (:func:`_piece_log_frequencies`) so that the tokenizer, and every id, is reproducible.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    specials = ["<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(list(corpus), trainer=trainer)
    pieces = [p for p, _ in json.loads(tok.to_str())["model"]["vocab"] if p not in specials]
    vocab = [(s, 0.0) for s in specials] + _piece_log_frequencies(corpus, pieces)
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def build_text_stack(corpus: Sequence[str], config: TextStackConfig, seed: int) -> TextStack:
    """Train the tokenizers on ``corpus`` and build random text encoders from ``seed`` (no dropout; returned
    frozen and in eval mode; the teacher's training may unfreeze them)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_tok = train_clip_tokenizer(corpus, config.clip_vocab_size, config.clip_max_length)
    t5_tok = train_t5_tokenizer(corpus, config.t5_vocab_size, config.t5_max_length)

    def clip(hidden: int) -> CLIPTextModelWithProjection:
        cfg = CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=hidden,
            intermediate_size=config.clip_intermediate,
            projection_dim=config.clip_projection_dim,
            num_hidden_layers=config.clip_layers,
            num_attention_heads=config.clip_heads,
            max_position_embeddings=config.clip_max_length,
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
            hidden_act="gelu",
        )
        return CLIPTextModelWithProjection(cfg)

    t5_cfg = T5Config(
        vocab_size=len(t5_tok),
        d_model=config.t5_d_model,
        d_ff=config.t5_d_ff,
        d_kv=config.t5_d_kv,
        num_layers=config.t5_layers,
        num_heads=config.t5_heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        dropout_rate=0.0,
        decoder_start_token_id=t5_tok.pad_token_id,
        pad_token_id=t5_tok.pad_token_id,
        eos_token_id=t5_tok.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        encoders = [clip(config.clip_l_hidden), clip(config.clip_g_hidden), T5EncoderModel(t5_cfg)]
    for enc in encoders:
        enc.requires_grad_(False).eval()
    return TextStack(clip_tok, clip_tok, t5_tok, *encoders)


@dataclass
class TokenIds:
    """Token ids of a batch of prompts for the three tokenizers: (B, 77), (B, 77), (B, L_T)."""

    clip_l: Tensor
    clip_g: Tensor
    t5: Tensor

    def index(self, sel) -> "TokenIds":
        return TokenIds(self.clip_l[sel], self.clip_g[sel], self.t5[sel])


def tokenize_prompts(stack: TextStack, prompts: Sequence[str], t5_max_length: int) -> TokenIds:
    """Pad/truncate to each CLIP tokenizer's ``model_max_length`` and to ``t5_max_length`` for T5 (with ``</s>``)."""
    prompts = list(prompts)
    clip = [
        tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        for tok in (stack.tokenizer, stack.tokenizer_2)
    ]
    t5 = stack.tokenizer_3(
        prompts, padding="max_length", max_length=t5_max_length, truncation=True, add_special_tokens=True, return_tensors="pt"
    ).input_ids
    return TokenIds(clip[0], clip[1], t5)


def encode_token_ids(stack: TextStack, ids: TokenIds) -> tuple[Tensor, Tensor]:
    """(prompt_embeds, pooled) from token ids (module docstring); differentiable w.r.t. the encoders."""
    hidden, pooled = [], []
    for tok_ids, enc in ((ids.clip_l, stack.text_encoder), (ids.clip_g, stack.text_encoder_2)):
        out = enc(tok_ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out.text_embeds)
    t5 = stack.text_encoder_3(ids.t5)[0]
    clip = torch.cat(hidden, dim=-1)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)


@torch.no_grad()
def encode_prompts(stack: TextStack, prompts: Sequence[str], t5_max_length: int) -> tuple[Tensor, Tensor]:
    """(prompt_embeds, pooled) of ``prompts`` exactly as the SD3 pipeline builds them (module docstring)."""
    return encode_token_ids(stack, tokenize_prompts(stack, prompts, t5_max_length))

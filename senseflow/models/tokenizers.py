"""Tokenizers trained on a caption set, with the shapes of the real ones (for teachers the project builds itself).

* CLIP: byte-level BPE with CLIP's normaliser, pre-tokeniser and ``</w>`` end-of-word suffix, wrapped as
  ``transformers.CLIPTokenizer``: ``<|startoftext|>`` = 0 (bos), ``<|endoftext|>`` = 1 (eos = pad = unk), padded to
  ``max_length`` (77 for every real CLIP text tower).
* T5: SentencePiece-style Unigram (NFKC, ``▁`` word prefix), wrapped as ``transformers.T5Tokenizer``: ``<pad>`` = 0,
  ``</s>`` = 1 (appended to every sequence), ``<unk>`` = 2, no ``<extra_id_*>``.

Both are reproducible: the same corpus and sizes give the same files in every process (the trainers' tie-breaking,
which varies between runs, is replaced by a canonical order).
"""
from __future__ import annotations

import json
import math
import tempfile
import unicodedata
from pathlib import Path
from typing import Sequence

__all__ = ["train_clip_tokenizer", "train_t5_tokenizer"]


def _canonical_bpe(
    vocab: dict[str, int], merges: list, specials: Sequence[str]
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Order a trained BPE independently of the trainer's tie-breaking (which varies from run to run).

    The trainer yields the same vocabulary and merge *sets* each run but not the same order. Merges are ranked by
    (length of the merged token, left, right): a merge's parts are shorter than its result, so every part can be
    formed before it is needed. Ids: ``specials``, then the initial alphabet sorted, then merge results by rank.
    """
    def pair(merge: str | Sequence[str]) -> tuple[str, str]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        return left, right

    pairs = sorted(
        {pair(m) for m in merges},
        key=lambda ab: (len(ab[0]) + len(ab[1]), ab),
    )
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
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
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
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    pieces = [p for p, _ in json.loads(tok.to_str())["model"]["vocab"] if p not in specials]
    vocab = [(s, 0.0) for s in specials] + _piece_log_frequencies(corpus, pieces)
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)

"""Latent / text-embedding caches: safetensors keyed by record key, rebuilt when the fingerprint goes stale."""
from __future__ import annotations

import logging
import os

import pytest
import torch

from senseflow.data import EmbeddingCache, ImageCaptionDataset, LatentCache
from test_data_support import write_json_set


def test_put_flush_get_round_trip_across_instances(tmp_path):
    src = write_json_set(tmp_path, n=2)
    c = LatentCache(tmp_path / "lat", src, resolution=16, encoder="vae-a")
    a, b = torch.randn(4, 8, 8), torch.randn(4, 8, 8)
    c.put("00000000", a)
    assert torch.equal(c.get("00000000"), a)  # readable before flush
    c.flush()
    c.put("00000001", b)
    c.flush()
    again = LatentCache(tmp_path / "lat", src, resolution=16, encoder="vae-a")
    assert not again.stale and len(again) == 2
    assert torch.equal(again.get("00000000"), a) and torch.equal(again.get("00000001"), b)
    assert again.get("nope") is None


def test_embedding_cache_holds_several_named_tensors(tmp_path):
    src = write_json_set(tmp_path, n=1)
    c = EmbeddingCache(tmp_path / "emb", src, encoder="clip+t5", max_length=77)
    c.put("00000000", {"prompt_embeds": torch.ones(77, 8), "pooled": torch.zeros(8)})
    c.flush()
    got = EmbeddingCache(tmp_path / "emb", src, encoder="clip+t5", max_length=77).get("00000000")
    assert set(got) == {"prompt_embeds", "pooled"} and torch.equal(got["prompt_embeds"], torch.ones(77, 8))


@pytest.mark.parametrize(
    "change",
    ["source modified", "resolution", "encoder"],
)
def test_stale_cache_reads_empty_and_is_rebuilt(tmp_path, change):
    src = write_json_set(tmp_path, n=1)
    c = LatentCache(tmp_path / "lat", src, 16, "vae-a")
    c.put("00000000", torch.ones(2))
    c.flush()
    res, enc = 16, "vae-a"
    if change == "source modified":
        st = os.stat(src)
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    elif change == "resolution":
        res = 32
    else:
        enc = "vae-b"
    stale = LatentCache(tmp_path / "lat", src, res, enc)
    assert stale.stale and stale.get("00000000") is None and len(stale) == 0
    stale.put("00000000", torch.zeros(2))
    stale.flush()
    assert len(list((tmp_path / "lat").glob("shard_*.safetensors"))) == 1
    fresh = LatentCache(tmp_path / "lat", src, res, enc)
    assert not fresh.stale and torch.equal(fresh.get("00000000"), torch.zeros(2))


def test_dataset_uses_a_complete_cache_and_ignores_a_partial_one(tmp_path, caplog):
    src = write_json_set(tmp_path, n=2, size=(16, 16))
    lat, emb = LatentCache(tmp_path / "lat", src, 16, "v"), EmbeddingCache(tmp_path / "emb", src, "t")
    for i in range(2):
        lat.put(f"{i:08d}", torch.full((4, 8, 8), float(i)))
        emb.put(f"{i:08d}", {"pooled": torch.full((3,), float(i))})
    lat.flush()
    emb.flush()
    s = ImageCaptionDataset(src, 16, latent_cache=LatentCache(tmp_path / "lat", src, 16, "v"),
                            embedding_cache=EmbeddingCache(tmp_path / "emb", src, "t"))[1]
    assert torch.equal(s["latents"], torch.ones(4, 8, 8)) and torch.equal(s["text.pooled"], torch.ones(3))
    assert s["pixels"].shape == (3, 16, 16)  # pixels are still needed as the discriminator's real samples

    part = LatentCache(tmp_path / "part", src, 16, "v")
    part.put("00000000", torch.zeros(4, 8, 8))
    part.flush()
    with caplog.at_level(logging.WARNING):
        s = ImageCaptionDataset(src, 16, latent_cache=part)[0]
    assert "latents" not in s and "covers 1 of 2 records" in caplog.text


def test_latent_cache_of_centre_crops_is_refused_for_random_crops(tmp_path):
    src = write_json_set(tmp_path, n=1)
    with pytest.raises(ValueError, match="holds 'center' crops"):
        ImageCaptionDataset(src, 16, crop="random", latent_cache=LatentCache(tmp_path / "c", src, 16, "v"))

"""Latent LMDB (docs/method.md §13.2): build with a tiny VAE, read back exactly, resume after an interruption,
refuse to overwrite."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from senseflow.data import DataError, ImageCaptionDataset, LatentLMDBDataset, read_lmdb_header
from senseflow.data.build_lmdb import build_latent_lmdb, encode_latents, load_vae
from senseflow.data.lmdb_latents import open_lmdb_readonly
from senseflow.data.seeding import generator_for
from test_data_support import fp16_latents, save_tiny_vae_pipeline, tiny_vae, write_json_set, write_raw_lmdb

RES = 16  # tiny VAE downscales 2×: latents 4 × 8 × 8


def _all_bytes(path) -> dict[bytes, bytes]:
    with open_lmdb_readonly(path).begin() as txn:
        return {bytes(k): bytes(v) for k, v in txn.cursor()}


def test_round_trip_exact_fp16_latents_and_captions(tmp_path):
    """Stored latent i = fp16((μ_i − 0)·0.13025) for the posterior mean; the reader returns exactly it in fp32."""
    images = write_json_set(tmp_path / "data", n=5, size=(24, 20))
    vae_dir = save_tiny_vae_pipeline(tmp_path / "teacher")
    res = build_latent_lmdb(images, vae_dir, tmp_path / "lmdb", RES, batch_size=2, device="cpu",
                            sample_posterior=False, progress=False)
    assert res.finished and res.written == 5 and res.consumed == 5

    src = ImageCaptionDataset(images, RES)
    vae = load_vae(vae_dir)
    pixels = torch.stack([src[i]["pixels"] for i in range(5)])
    # the same batches as the build (batched convolutions round differently per batch size)
    expected = torch.cat([encode_latents(vae, pixels[j : j + 2]) for j in range(0, 5, 2)]).numpy().astype("<f2")

    header = read_lmdb_header(tmp_path / "lmdb")
    assert header.count == 5 and header.latent_shape == (4, 8, 8) and header.resolution == RES
    raw = _all_bytes(tmp_path / "lmdb")
    assert raw[b"latents_shape"] == b"5 4 8 8" and raw[b"prompts_shape"] == b"5"
    ds = LatentLMDBDataset(tmp_path / "lmdb")
    for i in range(5):
        assert raw[f"latents_{i}_data".encode()] == expected[i].tobytes()
        s = ds[i]
        assert s["latents"].dtype == torch.float32
        assert torch.equal(s["latents"], torch.from_numpy(expected[i].astype(np.float32)))
        assert s["caption"] == f"caption number {i}" and s["key"] == f"{i:08d}"
        assert s["original_size"].tolist() == [20, 24] and s["crop_coords"].tolist() == [0, 1]


def test_posterior_sample_uses_per_record_noise(tmp_path):
    """z_i = μ_i + σ_i·ε_i with ε_i from mix_seed(seed, i): the noise does not depend on the batch size (the
    latents agree up to the rounding of batched convolutions)."""
    images = write_json_set(tmp_path / "data", n=3, size=(16, 16))
    vae = tiny_vae()
    build_latent_lmdb(images, vae, tmp_path / "a", RES, 3, "cpu", seed=7, progress=False)
    build_latent_lmdb(images, vae, tmp_path / "b", RES, 1, "cpu", seed=7, progress=False)
    build_latent_lmdb(images, vae, tmp_path / "c", RES, 1, "cpu", seed=8, progress=False)
    a, b, c = (LatentLMDBDataset(tmp_path / d) for d in "abc")
    for i in range(3):
        assert torch.allclose(a[i]["latents"], b[i]["latents"], atol=2e-3)
        assert not torch.allclose(b[i]["latents"], c[i]["latents"], atol=2e-3)
    x = ImageCaptionDataset(images, RES)[2]["pixels"][None]
    manual = encode_latents(vae, x, [generator_for(7, 2)]).numpy().astype("<f2")
    assert _all_bytes(tmp_path / "b")[b"latents_2_data"] == manual[0].tobytes()


def test_resume_after_interruption_equals_uninterrupted_build(tmp_path):
    images = write_json_set(tmp_path / "data", n=7, size=(20, 20))
    vae = tiny_vae()
    full = build_latent_lmdb(images, vae, tmp_path / "full", RES, 2, "cpu", progress=False)

    part = build_latent_lmdb(images, vae, tmp_path / "part", RES, 2, "cpu", max_batches=2, progress=False)
    assert not part.finished and part.consumed == 4 and part.written == 4
    with pytest.raises(DataError, match="run the same command again to resume"):
        LatentLMDBDataset(tmp_path / "part")
    rest = build_latent_lmdb(images, vae, tmp_path / "part", RES, 2, "cpu", progress=False)
    assert rest.finished and rest.written == 7 and full.written == 7
    a, b = _all_bytes(tmp_path / "full"), _all_bytes(tmp_path / "part")
    assert a.keys() == b.keys() and b"build_progress" not in b
    assert all(a[k] == b[k] for k in a if k != b"build_info")


def test_resume_with_other_inputs_is_refused(tmp_path):
    images = write_json_set(tmp_path / "data", n=4, size=(20, 20))
    vae = tiny_vae()
    build_latent_lmdb(images, vae, tmp_path / "out", RES, 2, "cpu", max_batches=1, progress=False)
    with pytest.raises(ValueError, match="different inputs.*seed"):
        build_latent_lmdb(images, vae, tmp_path / "out", RES, 2, "cpu", seed=1, progress=False)


def test_finished_set_is_never_overwritten(tmp_path):
    images = write_json_set(tmp_path / "data", n=2, size=(16, 16))
    vae = tiny_vae()
    build_latent_lmdb(images, vae, tmp_path / "out", RES, 2, "cpu", progress=False)
    before = _all_bytes(tmp_path / "out")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        build_latent_lmdb(images, vae, tmp_path / "out", RES, 2, "cpu", progress=False)
    assert _all_bytes(tmp_path / "out") == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        build_latent_lmdb(images, vae, tmp_path / "other", RES, 2, "cpu", progress=False)


def test_bad_image_stops_the_build_unless_skipped(tmp_path):
    images = write_json_set(tmp_path / "data", n=4, size=(16, 16))
    (tmp_path / "data" / "images" / "img_0002.png").unlink()
    vae = tiny_vae()
    with pytest.raises(DataError, match=r"record 2 \(key '00000002'\).*does not exist.*--skip-bad"):
        build_latent_lmdb(images, vae, tmp_path / "a", RES, 2, "cpu", progress=False)
    res = build_latent_lmdb(images, vae, tmp_path / "b", RES, 2, "cpu", skip_bad=True, progress=False)
    assert res.finished and res.written == 3 and res.skipped == 1
    assert [LatentLMDBDataset(tmp_path / "b")[i]["key"] for i in range(3)] == ["00000000", "00000001", "00000003"]


def test_dmd2_layout_without_sizes_gets_defaults(tmp_path):
    lat = fp16_latents(3)
    path = write_raw_lmdb(tmp_path / "dmd2", [a.tobytes() for a in lat], [b"a", b"b", "ç".encode()])
    ds = LatentLMDBDataset(path)  # no 'resolution' key: R = 8 · vae_scale_factor 8 = 64
    s = ds[2]
    assert s["original_size"].tolist() == [64, 64] and s["crop_coords"].tolist() == [0, 0] and s["caption"] == "ç"
    assert LatentLMDBDataset(path, resolution=1024)[0]["original_size"].tolist() == [1024, 1024]
    assert torch.equal(s["latents"], torch.from_numpy(lat[2].astype(np.float32)))


def test_environment_is_opened_lazily_per_process_and_never_pickled(tmp_path):
    lat = fp16_latents(4)
    path = write_raw_lmdb(tmp_path / "l", [a.tobytes() for a in lat], [b"p"] * 4)
    ds = LatentLMDBDataset(path)
    assert ds._env is None
    ds[0]
    assert ds._env is not None and pickle.loads(pickle.dumps(ds))._env is None
    batches = list(DataLoader(ds, batch_size=2, num_workers=2))
    assert torch.equal(
        torch.cat([b["latents"] for b in batches]), torch.stack([torch.from_numpy(a.astype(np.float32)) for a in lat])
    )

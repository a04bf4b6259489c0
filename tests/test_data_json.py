"""JSON (docs/method.md §13.1) and JSON Lines image-caption sets: what a sample holds, path resolution, equivalence
of the formats."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import default_collate

from senseflow.data import DataError, ImageCaptionDataset, open_dataset
from senseflow.data.records import JsonlRecords, JsonRecords, open_records
from test_data_support import noise_image, write_json_set, write_jsonl_set


def test_json_sample_holds_pixels_caption_size_and_crop(tmp_path):
    path = write_json_set(tmp_path, n=3, size=(40, 32))
    ds = ImageCaptionDataset(path, resolution=16)
    assert len(ds) == 3
    s = ds[1]
    assert s["pixels"].shape == (3, 16, 16) and s["pixels"].dtype == torch.float32
    assert -1.0 <= s["pixels"].min() and s["pixels"].max() <= 1.0
    assert s["caption"] == "caption number 1" and s["key"] == "00000001" and s["index"] == 1
    # 40×32 (w×h) at 16: s = 0.5 → 20×16, centre crop left = 2
    assert s["original_size"].tolist() == [32, 40] and s["crop_coords"].tolist() == [0, 2]


def test_relative_paths_resolve_against_the_json_folder_not_the_cwd(tmp_path, monkeypatch):
    path = write_json_set(tmp_path / "deep" / "set", n=2)
    monkeypatch.chdir(tmp_path)
    rec = open_records(path).record(0)
    assert rec.image_path == str(tmp_path / "deep" / "set" / "images" / "img_0000.png")


def test_absolute_paths_are_kept(tmp_path):
    noise_image(20, 20).save(tmp_path / "a.png")
    p = tmp_path / "abs.json"
    p.write_text(json.dumps({"keys": [7], "image_paths": [str(tmp_path / "a.png")], "prompts": ["x"]}))
    rec = JsonRecords(p).record(0)
    assert rec.key == "7" and rec.image_path == str(tmp_path / "a.png")


def test_jsonl_equals_json(tmp_path):
    a = ImageCaptionDataset(write_json_set(tmp_path / "a", n=4), 16)
    b = ImageCaptionDataset(write_jsonl_set(tmp_path / "b", n=4), 16)
    assert isinstance(b.records, JsonlRecords) and len(a) == len(b) == 4
    for i in range(4):
        sa, sb = a[i], b[i]
        assert torch.equal(sa["pixels"], sb["pixels"]) and sa["caption"] == sb["caption"] and sa["key"] == sb["key"]


def test_jsonl_skips_blank_lines_and_reports_line_numbers(tmp_path):
    p = write_jsonl_set(tmp_path, n=2)
    lines = p.read_text().splitlines()
    p.write_text("\n" + lines[0] + "\n\n" + lines[1] + "\n")
    recs = JsonlRecords(p)
    assert len(recs) == 2 and recs.line_of(1) == 4 and recs.record(1).key == "00000001"


def test_repeat_and_random_crop_depend_on_epoch_and_index_only(tmp_path):
    path = write_json_set(tmp_path, n=2, size=(64, 16))
    ds = ImageCaptionDataset(path, 16, crop="random", seed=3, repeat=2)
    assert len(ds) == 4 and ds[3]["key"] == "00000001"
    assert torch.equal(ds.load(1, epoch=0)["pixels"], ds.load(1, epoch=0)["pixels"])
    crops = {tuple(ds.load(1, epoch=e)["crop_coords"].tolist()) for e in range(8)}
    assert len(crops) > 1


def test_default_collate_gives_b_by_2_sizes(tmp_path):
    ds = open_dataset(write_json_set(tmp_path, n=3), 16)
    batch = default_collate([ds[0], ds[1], ds[2]])
    assert batch["pixels"].shape == (3, 3, 16, 16)
    assert batch["original_size"].shape == (3, 2) and batch["crop_coords"].shape == (3, 2)
    assert batch["caption"] == ["caption number 0", "caption number 1", "caption number 2"]


def test_explicit_kind_overrides_the_suffix(tmp_path):
    path = write_jsonl_set(tmp_path, n=2, name="records.txt")
    assert isinstance(open_dataset(path, 16, kind="jsonl").records, JsonlRecords)
    with pytest.raises(DataError, match=r"records.txt, line 2: invalid JSON \(Extra data"):
        open_dataset(path, 16)  # auto → §13.1 JSON by suffix: the first line is not a whole JSON document
    with pytest.raises(DataError, match="no data.mdb|cannot open as LMDB"):
        open_dataset(path, 16, kind="lmdb")

"""`senseflow data build-lmdb` and `senseflow data check` (exit codes 0 / 2), and the start-up `quick_check`."""
from __future__ import annotations

import pytest

from senseflow.data import quick_check
from senseflow.data.cli import main_data
from test_data_support import fp16_latents, save_tiny_vae_pipeline, write_json_set, write_jsonl_set, write_raw_lmdb


def test_build_then_check_then_refuse_to_overwrite(tmp_path, capsys):
    images = write_jsonl_set(tmp_path / "data", n=5, size=(20, 20))
    vae = save_tiny_vae_pipeline(tmp_path / "teacher")
    out = tmp_path / "lmdb"
    args = ["build-lmdb", "--images", str(images), "--vae", str(vae), "--out", str(out), "--resolution", "16",
            "--batch-size", "2", "--device", "cpu", "--num-workers", "0", "--no-progress"]
    assert main_data(args + ["--max-batches", "1"]) == 0
    assert "partial" in capsys.readouterr().out
    assert main_data(args) == 0
    assert "finished; 5/5 records read, 5 latents written" in capsys.readouterr().out

    assert main_data(["check", str(out), "--resolution", "16", "--vae-scale-factor", "2"]) == 0
    assert "usable: 0 bad record(s)" in capsys.readouterr().out
    assert main_data(["check", str(out), "--resolution", "32"]) == 2
    assert "training resolution is 32" in capsys.readouterr().out

    assert main_data(args) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


def test_build_with_a_vae_folder_itself(tmp_path):
    images = write_json_set(tmp_path / "data", n=2, size=(16, 16))
    vae = save_tiny_vae_pipeline(tmp_path / "teacher") / "vae"
    assert main_data(["build-lmdb", "--images", str(images), "--vae", str(vae), "--out", str(tmp_path / "o"),
                      "--resolution", "16", "--batch-size", "4", "--device", "cpu", "--num-workers", "0",
                      "--no-progress"]) == 0


def test_build_with_a_folder_without_vae_fails_cleanly(tmp_path, capsys):
    images = write_json_set(tmp_path / "data", n=1)
    (tmp_path / "empty").mkdir()
    assert main_data(["build-lmdb", "--images", str(images), "--vae", str(tmp_path / "empty"), "--out",
                      str(tmp_path / "o"), "--resolution", "16", "--batch-size", "1", "--no-progress"]) == 2
    assert "no VAE found" in capsys.readouterr().err


def test_check_json_sets(tmp_path, capsys):
    good = write_json_set(tmp_path / "g", n=3, size=(20, 20))
    assert main_data(["check", str(good), "--resolution", "16"]) == 0
    out = capsys.readouterr().out
    assert "3 records, 3 checked" in out and "usable" in out
    assert main_data(["check", str(good), "--resolution", "32"]) == 0  # small images only warn
    assert "small_image" in capsys.readouterr().out
    (tmp_path / "g" / "images" / "img_0001.png").unlink()
    assert main_data(["check", str(good)]) == 2
    out = capsys.readouterr().out
    assert "UNUSABLE" in out and "record 1 (key '00000001')" in out and "img_0001.png does not exist" in out
    assert main_data(["check", str(tmp_path / "nothing.json")]) == 2
    assert main_data(["check"]) == 2  # argparse: missing argument


def test_quick_check(tmp_path):
    good = write_json_set(tmp_path / "g", n=5, size=(20, 20))
    assert quick_check(good, 16) == 5
    (tmp_path / "g" / "images" / "img_0004.png").unlink()  # the last record is always among the samples
    with pytest.raises(ValueError, match=r"set.json, record 4 \(key '00000004'\).*does not exist"):
        quick_check(good, 16)
    lmdb_path = write_raw_lmdb(tmp_path / "l", [a.tobytes() for a in fp16_latents(3)], [b"a", b"b", b"c"])
    assert quick_check(lmdb_path, 64) == 3
    with pytest.raises(ValueError, match="latents are 4×8×8.*training resolution is 1024"):
        quick_check(lmdb_path, 1024)
    with pytest.raises(FileNotFoundError):
        quick_check(tmp_path / "missing.json", 16)

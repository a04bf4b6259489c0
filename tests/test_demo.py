"""The demo end to end in a fast mode: data + backbones → launcher + SD3.5 trainer → grids + metrics table.

Runs `senseflow demo` (``main_demo``) for 11 iterations (two generator steps at the config's GD = 5) with 2 images
per digit and checks that the sample grids and both metrics files appear with the rows of the teacher's 28-, 4- and
2-step Euler samplers and the student's two (re-noising and Euler).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from senseflow.digits.demo import main_demo
from senseflow.digits.teacher import default_teacher_path


def _teacher() -> Path:
    path = Path(os.environ.get("SENSEFLOW_DIGITS_TEACHER", default_teacher_path()))
    if not (path / "model_index.json").is_file():
        pytest.skip(f"digits teacher not found at {path} (set SENSEFLOW_DIGITS_TEACHER)")
    return path


def test_demo_fast_mode_writes_grids_and_metrics(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    rc = main_demo(["--out", str(out), "--iterations", "11", "--samples-per-digit", "2", "--grid-columns", "2",
                    "--threads", "1", "--teacher", str(_teacher())])
    assert rc == 0
    for name in ("grids.png", "student_grid.png", "teacher_grid.png", "metrics.md", "metrics.json"):
        assert (out / name).is_file(), name
    data = json.loads((out / "metrics.json").read_text())
    names = [r["name"] for r in data["results"]]
    assert names == ["teacher 28-step Euler + CFG", "teacher 4-step Euler + CFG", "teacher 2-step Euler + CFG",
                     "SenseFlow student 4-step", "SenseFlow student 4-step (Euler)"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in data["results"])
    assert [r["nfe"] for r in data["results"]] == [56, 8, 4, 4, 4]
    assert (out / "run" / "metrics.jsonl").is_file()  # the trainer really ran
    assert "| SenseFlow student 4-step |" in (out / "metrics.md").read_text()


def test_demo_rejects_missing_teacher(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        main_demo(["--out", str(tmp_path / "x"), "--teacher", str(tmp_path / "nope")])


def test_iterations_stretch_the_cosine_decay_of_the_digits_config(tmp_path: Path) -> None:
    """``--iterations N`` also sets optimizer.decay_steps = N: otherwise a longer run would spend every iteration
    after the config's 1200 at the decayed LR (lr_end_factor 0 → no learning at all)."""
    from senseflow.config import load_config
    from senseflow.digits.demo import DEFAULT_CONFIG, repo_root, train_command

    assets = {"data": tmp_path / "d.json", "dino": tmp_path / "dino", "clip": tmp_path / "clip"}
    config = repo_root() / DEFAULT_CONFIG
    cmd = train_command(config, tmp_path / "run", tmp_path / "teacher", assets, 2400)
    overrides = cmd[6:]  # after: sh LAUNCHER nodes gpus config save_dir
    cfg = load_config(config, overrides)
    assert (cfg.train.iterations, cfg.optimizer.decay, cfg.optimizer.decay_steps) == (2400, "cosine", 2400)
    # an explicit override given after it wins; without --iterations the config's own length stays
    assert load_config(config, train_command(config, tmp_path / "r", tmp_path / "t", assets, 2400,
                                             ["optimizer.decay_steps=600"])[6:]).optimizer.decay_steps == 600
    assert load_config(config, train_command(config, tmp_path / "r", tmp_path / "t", assets,
                                             None)[6:]).optimizer.decay_steps == 1200

"""``senseflow eval`` end to end (senseflow/eval/cli.py, report.py, config.py) on a tiny FLUX teacher and tiny
metric models: generation that resumes, metrics, ``metrics.json`` and a Table-1-style ``table.md`` with the paper's
published rows beside ours; ready image folders; bad input exits with code 2 and one line naming the problem.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from senseflow.eval.cli import main_eval
from senseflow.eval.config import load_eval_config
from senseflow.eval.report import COLUMNS, PAPER_TABLE1

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a cat sitting on a red sofa", "a red sports car driving through the desert",
           "a small wooden cabin in a snowy forest", "an owl perched on a branch at midnight"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from senseflow.eval.tiny_models import build_tiny_metric_models

    return build_tiny_metric_models(tmp_path_factory.mktemp("eval_cli_models"))


def write_config(tmp_path, teacher, models, **extra) -> Path:
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    cfg = {
        "name": "tiny", "output_dir": str(tmp_path / "run"),
        "prompts": {"source": "text", "path": str(tmp_path / "prompts.txt")},
        "generation": {"teacher": str(teacher), "height": 64, "width": 64, "batch_size": 2, "device": "cpu",
                       "dtype": "fp32",
                       "student": {"spec": "flux", "checkpoint": str(teacher), "sampler": "euler"},
                       "reference": {"steps": 3, "pipeline_kwargs": {"max_sequence_length": 32}}},
        "metrics": {"device": "cpu", "fid_t": {"weights": str(models["inception"])},
                    "patch_fid_t": {"patch_size": 32},
                    "clip": {"model": str(models["clip"])}, "hpsv2": {"model": str(tmp_path / "missing_hps")},
                    "pickscore": {"model": str(models["clip"])}, "imagereward": {"model": str(models["imagereward"])}},
        "table": {"block": "flux", "row": "tiny student"},
    }
    for key, value in extra.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_eval_resumes_then_scores_and_writes_json_and_table(tiny_teacher, tiny_models, tmp_path, capsys):
    config = write_config(tmp_path, tiny_teacher("flux"), tiny_models)
    run = tmp_path / "run"
    assert main_eval(["--config", str(config), "--limit", "3", "--no-progress"]) == 0
    assert len(list((run / "samples").glob("*.png"))) == 3 and len(list((run / "reference").glob("*.png"))) == 3
    assert not (run / "metrics.json").exists()  # metrics wait for every image
    assert "rerun the same command to continue" in capsys.readouterr().err
    first = {p.name: p.stat().st_mtime_ns for p in (run / "samples").glob("*.png")}

    assert main_eval(["--config", str(config), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "student samples: 1 written, 3 already there" in err
    assert {n: (run / "samples" / n).stat().st_mtime_ns for n in first} == first

    report = json.loads((run / "metrics.json").read_text())
    assert report["n_samples"] == report["n_reference"] == 4 and report["prompts"]["count"] == 4
    m = report["metrics"]
    for name in ("fid_t", "patch_fid_t", "clip", "pickscore", "imagereward"):
        assert m[name]["status"] == "ok" and isinstance(m[name]["value"], float), name
    assert m["hpsv2"]["status"] == "skipped" and "missing_hps" in m["hpsv2"]["message"]
    assert m["hpsv2"]["value"] is None

    table = (run / "table.md").read_text()
    lines = table.splitlines()
    assert lines[2] == "| method | FID-T | Patch FID-T | CLIP | HPSv2 | Pick | ImageReward |"
    assert "| Ours-FLUX (paper) | 15.64 | 19.60 | 0.3167 | 0.2997 | 23.13 | 1.0921 |" in lines
    ours = next(line for line in lines if line.startswith("| **tiny student**"))
    cells = [c.strip() for c in ours.strip("|").split("|")][1:]
    assert cells[0] == f"{m['fid_t']['value']:.2f}" and cells[2] == f"{m['clip']['value']:.4f}"
    assert cells[3] == "–"  # HPSv2 skipped, never estimated
    assert any("HPSv2: skipped" in line and "missing_hps" in line for line in lines)
    assert (run / "prompts.txt").read_text().splitlines() == PROMPTS


def test_ready_folders_are_scored_without_generation(tiny_teacher, tiny_models, tmp_path):
    first = tmp_path / "first"
    first.mkdir()
    config = write_config(first, tiny_teacher("flux"), tiny_models)
    assert main_eval(["--config", str(config), "--no-progress", "--generate-only"]) == 0
    run = first / "run"
    second = tmp_path / "second"
    second.mkdir()
    config2 = write_config(second, tiny_teacher("flux"), tiny_models, **{
        "generation.teacher": None, "generation.student.checkpoint": None,
        "images.samples": str(run / "samples"), "images.reference": str(run / "reference"),
        "metrics.clip.enabled": False, "metrics.imagereward.enabled": False})
    assert main_eval(["--config", str(config2), "--no-progress"]) == 0
    m = json.loads((second / "run" / "metrics.json").read_text())["metrics"]
    assert m["fid_t"]["status"] == "ok" and m["clip"]["status"] == "skipped" and m["pickscore"]["status"] == "ok"
    assert not (second / "run" / "samples").exists()


def test_bad_input_exits_2_with_one_line_naming_it(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a cat\n")
    base = [f"prompts.path={tmp_path / 'p.txt'}", f"output_dir={tmp_path / 'out'}", "--no-progress"]
    assert main_eval([*base, "metrics.clip.modle=x"]) == 2
    assert "metrics.clip.modle" in capsys.readouterr().err
    assert main_eval([*base, "metrics.patch_fid_t.layout=random"]) == 2
    assert "metrics.patch_fid_t.layout" in capsys.readouterr().err
    assert main_eval(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    assert main_eval([*base]) == 2  # nothing to score
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[-1].startswith("senseflow eval: error: samples folder not found")


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs" / "eval").glob("*.yaml")))
def test_shipped_eval_configs_are_valid(name):
    cfg = load_eval_config(REPO / "configs" / "eval" / name)
    assert cfg.table.block in (None, *PAPER_TABLE1)
    if cfg.prompts.source == "coco":  # the published protocol: COCO-5K, 4 steps
        assert cfg.prompts.num == 5000 and cfg.generation.student.steps == 4 and cfg.generation.height == 1024


def test_paper_rows_are_those_of_method_md():
    method = REPO / "docs" / "method.md"
    text = method.read_text(encoding="utf-8")
    section = text[text.index("### 19.1"):text.index("### 19.2")]
    published = {}
    for line in section.splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and re.match(r"^[\d.–]+$", cells[1]) and cells[1] != "":
            published[cells[0]] = [None if c == "–" else float(c) for c in cells[1:]]
    ours = {row[0]: list(row[1:]) for _, rows in PAPER_TABLE1.values() for row in rows}
    assert len(published) == 19 and ours == published
    assert [h for _, h, _ in COLUMNS] == ["FID-T", "Patch FID-T", "CLIP", "HPSv2", "Pick", "ImageReward"]

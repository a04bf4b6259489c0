"""The embedded benchmarks (``tools/benchmark.py --suite {digits,shapes}``, :mod:`senseflow.benchmark`).

* The suites: which prompts each one evaluates, that its accuracy metric passes real images of those prompts, that
  its FD separates real images from noise, and the grid layouts.
* The settings: both suite yamls load, every method's row, seed and run folder, typos refused.
* The CI run of the shapes benchmark: a tiny SDXL shapes teacher (``senseflow teacher train --family sdxl``, a few
  steps on 16 scenes) distilled by DMD2 and SenseFlow through their launchers for 6 iterations (generator updates at
  GD 5), then the table,
  the FD-T plot and the grids must appear with every row.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from senseflow.benchmark import ShapesSuite, build_suite, load_settings
from senseflow.config import load_config
from senseflow.launch import repo_root
from senseflow.shapes import HELDOUT_STREAM, ShapesConfig, generate_scenes


def _tool():
    """tools/benchmark.py as a module (it lives outside the package)."""
    spec = importlib.util.spec_from_file_location("benchmark_tool", repo_root() / "tools" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- suites -----------------------------------------------------------------------------------------------------
def test_digits_suite_prompts_every_digit_equally_often_and_lays_out_one_row_per_digit():
    suite = load_settings("digits").make_suite(per_digit=3, grid_columns=2)
    assert len(suite.prompts) == 30
    assert suite.prompts[:3] == ["a handwritten digit zero", "a handwritten digit one", "a handwritten digit two"]
    assert suite.prompts[17] == "a handwritten digit seven"            # prompt j names digit j mod 10
    rows = suite.grid_rows()
    assert rows[7] == [7, 17] and len(rows) == 10                        # row d: the first images of digit d
    assert suite.grid(torch.zeros(30, 3, 32, 32)).size == (2 * 64, 10 * 64)
    assert suite.compare_indices() == list(range(10))                   # side by side: one image of each digit
    assert suite.accuracy_name == "prompt accuracy"


@pytest.fixture(scope="module")
def shapes_suite() -> ShapesSuite:
    return load_settings("shapes").make_suite(num_prompts=40, real_count=200, grid_prompts=12, compare_rows=3)


def test_shapes_suite_prompts_are_the_held_out_captions(shapes_suite):
    assert shapes_suite.prompts == generate_scenes(40, ShapesConfig(), stream=HELDOUT_STREAM).captions
    assert shapes_suite.accuracy_name == "compositional accuracy"


def test_shapes_suite_accuracy_passes_the_real_scenes_and_fails_noise(shapes_suite):
    real = shapes_suite.heldout.images
    report = shapes_suite.accuracy_report(real)
    assert report["accuracy"] >= 0.9 and report["object_accuracy"] >= report["accuracy"]
    # the reader's ceiling on these prompts: high on the real held-out scenes, low when each scene is scored against
    # another scene's caption (images rolled by one against their prompts)
    assert shapes_suite.heldout_accuracy() >= 0.95
    assert shapes_suite.accuracy_report(real.roll(1, 0))["accuracy"] < 0.2
    noise = torch.rand_like(real) * 2 - 1
    assert shapes_suite.accuracy_report(noise)["accuracy"] < 0.1
    # FD to real scenes: small for real held-out scenes, large for noise; FD between a set and itself is 0
    fd_real, fd_noise = shapes_suite.fd_to_real(real), shapes_suite.fd_to_real(noise)
    assert fd_real < 0.2 * fd_noise
    assert abs(shapes_suite.fd_between(real, real)) < 1e-6


def test_shapes_suite_grids(shapes_suite):
    images = shapes_suite.heldout.images
    assert shapes_suite.grid_rows() == [list(range(8)), list(range(8, 12))]   # the first 12 prompts, 8 per row
    assert shapes_suite.grid(images).size == (8 * 64, 2 * 64)
    side = shapes_suite.comparison({"teacher 28-step": images, "DMD2": images, "SenseFlow w/o VFM": images})
    width, height = side.size
    assert width >= 3 * 96 and width % 3 == 0                            # one column per method
    assert height > 3 * 96                                               # three prompts under a header of names


def test_unknown_or_missing_suite_settings_are_refused():
    with pytest.raises(ValueError, match="per_digt"):
        build_suite("digits", {"per_digt": 3})
    with pytest.raises(ValueError, match="not one of"):
        build_suite("faces", {})
    settings = dict(load_settings("digits").suite)
    del settings["per_digit"]                                      # every setting comes from the yaml: no defaults
    with pytest.raises(ValueError, match=r"missing setting\(s\) per_digit"):
        build_suite("digits", settings)


# ---- settings ---------------------------------------------------------------------------------------------------
def test_both_suite_yamls_load_with_their_methods_and_seeds():
    digits = load_settings("digits")
    assert digits.suite_kind == "digits" and digits.teacher == repo_root() / "senseflow/assets/digits_teacher"
    assert digits.teacher_steps == [28, 4, 2] and digits.eval_spec().teacher_baselines == (4, 2)
    assert digits.methods["SenseFlow GAN weight paper"].overrides == ["method.gan.time_weight=paper"]
    assert digits.methods["SenseFlow (IDA+ISG+GAN)"].overrides == []     # the preset's GAN weight: reference
    assert load_config(repo_root() / "configs/SD35/digits_senseflow.yaml").method.gan.time_weight == "reference"
    shapes = load_settings("shapes", ["train.iterations=8", "train.seeds=[0,1]"])
    assert shapes.iterations == 8 and shapes.teacher == repo_root() / "senseflow/assets/shapes_teacher"
    assert {m.trainer for m in shapes.methods.values()} == {"sdxl_dmd2", "sdxl_senseflow"}
    runs = shapes.runs()
    names = [r.name for r in runs]
    assert names[:7] == ["DMD2", "SenseFlow", "SenseFlow + IDA", "SenseFlow w/o ISG",
                         "SenseFlow w/o VFM discriminator", "SenseFlow ISG sdxl_mode reference",
                         "SenseFlow GAN weight paper"]
    assert names[7:] == ["DMD2 (seed 1)", "SenseFlow (seed 1)"]          # headline methods again at the 2nd seed
    assert [(r.slug, r.seed) for r in runs[7:]] == [("dmd2_seed1", 1), ("senseflow_seed1", 1)]
    assert [r.slug for r in load_settings("shapes", ["train.seeds=[1]"]).runs(["DMD2"])] == ["dmd2_seed1"]
    assert [r.name for r in shapes.runs(["SenseFlow"])] == ["SenseFlow", "SenseFlow (seed 1)"]
    with pytest.raises(ValueError, match="unknown method"):
        shapes.runs(["SenseFlow w/o everything"])
    with pytest.raises(ValueError, match="itrations"):
        load_settings("shapes", ["train.itrations=8"])


@pytest.mark.parametrize("override, says", [
    ("eval.batch_size=0", "eval.batch_size must be ≥ 1"),
    ("methods.DMD2.config=configs/sdxl/no_such.yaml", "methods['DMD2'].config"),
])
def test_the_tool_refuses_a_bad_setting_with_one_line_before_writing_anything(tmp_path, capsys, override, says):
    out = tmp_path / "bench"
    assert _tool().main(["--suite", "shapes", "--out", str(out), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert str(repo_root() / "configs" / "benchmarks" / "shapes.yaml") in err and says in err
    assert not out.exists()


def test_a_run_is_reused_only_when_finished_with_the_intended_settings(tmp_path):
    from senseflow.benchmark.runner import finished_run
    from senseflow.config import load_config, resolved_yaml
    from senseflow.launch import train_command

    config = repo_root() / "configs" / "sdxl" / "shapes_senseflow.yaml"
    assets = {k: tmp_path / k for k in ("data", "dino", "clip")}
    run = tmp_path / "run"
    cmd = train_command(config, run, tmp_path / "teacher", assets, 8, ["experiment.seed=1", "method.gan.enabled=false"],
                        "sdxl_senseflow")
    assert not finished_run(run, cmd)                                    # nothing there
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(resolved_yaml(load_config(config, cmd[6:])))
    (run / "checkpoints" / "latest").write_text("iter_000004")
    assert not finished_run(run, cmd)                                    # killed half-way
    (run / "checkpoints" / "latest").write_text("iter_000008")
    assert finished_run(run, cmd)
    other_seed = train_command(config, run, tmp_path / "teacher", assets, 8, ["experiment.seed=0"], "sdxl_senseflow")
    assert not finished_run(run, other_seed)
    assert not finished_run(run, [*cmd[:-1], "method.gan.enabled=true"])  # another override value
    assert not finished_run(run, train_command(config, run, tmp_path / "teacher", assets, 16, cmd[-2:],
                                               "sdxl_senseflow"))


# ---- the CI run -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_shapes_teacher(tmp_path_factory) -> Path:
    """A tiny SDXL-family teacher trained for a few steps on 16 shapes scenes (the real one takes hours)."""
    from senseflow.cli import main
    from senseflow.shapes import export_json_dataset

    root = tmp_path_factory.mktemp("shapes_teacher")
    data = export_json_dataset(root / "data", ShapesConfig(num_scenes=16))
    out = root / "teacher"
    assert main(["teacher", "train", "--family", "sdxl", "--data", str(data), "--out", str(out), "--no-progress",
                 "vae_training.steps=2", "vae_training.batch_size=4", "denoiser_training.steps=2",
                 "denoiser_training.batch_size=4", "sample.steps=2", "sample.num_prompts=2",
                 "sample.images_per_prompt=2"]) == 0
    return out


def test_shapes_benchmark_runs_the_shapes_configs_and_writes_table_plot_and_grids(tiny_shapes_teacher, tmp_path):
    out = tmp_path / "bench"
    rc = _tool().main(["--suite", "shapes", "--out", str(out), "--teacher", str(tiny_shapes_teacher),
                       "--iterations", "6", "--save-every", "3", "--methods", "DMD2", "SenseFlow", "--seeds", "0",
                       "--parallel", "2", "suite.num_prompts=8", "suite.real_count=64", "suite.train_scenes=16",
                       "suite.grid_prompts=8", "suite.grid_columns=4", "suite.compare_rows=4", "eval.batch_size=8",
                       "eval.teacher_steps=[8,2]"])
    assert rc == 0
    rows = ["teacher 8-step Euler + CFG", "teacher 2-step Euler + CFG", "DMD2", "SenseFlow", "DMD2 (Euler)",
            "SenseFlow (Euler)"]
    table = (out / "results.md").read_text()
    assert ("| method | compositional accuracy | objects | relations | wrong colour | missing | FD (real) | "
            "FD-T (teacher 8) | NFE/image | ms/image |") in table
    for name in rows:
        assert f"| {name} |" in table, name
    assert "Reader compositional accuracy on the 8 real held-out scenes" in table
    data = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in data["results"]] == rows
    assert [r["nfe"] for r in data["results"]] == [16, 4, 4, 4, 4, 4]     # CFG: 2 NFE per teacher step
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["seconds_per_image"] > 0 for r in data["results"])
    meta = data["meta"]
    assert meta["command"].startswith("python tools/benchmark.py --suite shapes")
    curve = meta["curves"]["SenseFlow"]                                   # FD-T of every saved checkpoint
    assert [it for it, _ in curve] == [3, 6] and curve[-1][1] == data["results"][3]["fd_teacher"]
    assert 0.0 <= meta["metric_heldout_accuracy"] <= 1.0 and meta["total_seconds"] > 0
    assert meta["runs"]["DMD2"]["command"][1].endswith("exp_sdxl/train_sdxl_dmd2.sh")   # each method's own trainer
    assert meta["runs"]["SenseFlow"]["command"][1].endswith("exp_sdxl/train_sdxl_senseflow.sh")
    assert (out / "work" / "senseflow" / "metrics.jsonl").is_file()      # the trainers really ran
    from senseflow.benchmark.runner import finished_run

    assert finished_run(out / "work" / "senseflow", meta["runs"]["SenseFlow"]["command"])   # a 2nd call reuses it
    from safetensors.torch import load_file

    teacher_unet = load_file(str(tiny_shapes_teacher / "unet" / "diffusion_pytorch_model.safetensors"))
    for run in ("dmd2", "senseflow"):                                     # and their generators were updated
        student = load_file(str(out / "work" / run / "checkpoints" / "iter_000006" / "student.safetensors"))
        assert any(not torch.equal(v, teacher_unet[k]) for k, v in student.items() if k in teacher_unet), run
    assert (out / "fdt_curve.png").stat().st_size > 0
    for grid in ("dmd2", "senseflow", "teacher_8step", "teacher_2step", "side_by_side"):
        assert (out / "grids" / f"{grid}.png").is_file(), grid


def test_the_table_compares_each_student_with_the_teachers_sampler_at_equal_and_at_twice_the_cost():
    from senseflow.benchmark.report import MethodResult, results_markdown

    rows = [MethodResult("teacher 28-step Euler + CFG", 1.0, 10.0, 3.0, 56, 0.1, {"teacher_steps": 28}),
            MethodResult("teacher 4-step Euler + CFG", 0.9, 20.0, 15.0, 8, 0.01, {"teacher_steps": 4}),
            MethodResult("teacher 2-step Euler + CFG", 0.5, 40.0, 40.0, 4, 0.01, {"teacher_steps": 2}),
            MethodResult("SenseFlow", 0.95, 15.0, 12.0, 4, 0.01, {"seed": 0}),
            MethodResult("DMD2", 0.9, 30.0, 30.0, 4, 0.01, {"seed": 0})]
    table = results_markdown(rows, "compositional accuracy")
    assert ("- SenseFlow: FD-T 12.0, better than teacher 2-step Euler + CFG (same cost: 40.0); better than "
            "teacher 4-step Euler + CFG (twice the cost: 15.0)") in table
    assert ("- DMD2: FD-T 30.0, better than teacher 2-step Euler + CFG (same cost: 40.0); not better than "
            "teacher 4-step Euler + CFG (twice the cost: 15.0)") in table
    # rows on the same sides share a line: their count and FD-T range (names only for a few)
    rows.append(MethodResult("SenseFlow (seed 1)", 0.9, 16.0, 10.0, 4, 0.01, {"seed": 1}))
    table = results_markdown(rows, "compositional accuracy")
    assert ("- 2 student rows (SenseFlow, SenseFlow (seed 1)): FD-T 10.0–12.0, better than teacher 2-step Euler + "
            "CFG (same cost: 40.0); better than teacher 4-step Euler + CFG (twice the cost: 15.0)") in table
    assert "- SenseFlow: FD-T" not in table


def test_methods_trained_with_several_seeds_get_their_spread_and_a_per_seed_table():
    from senseflow.benchmark.report import MethodResult, results_markdown

    def student(method: str, seed: int, acc: float, fdt: float) -> MethodResult:
        name = method if seed == 0 else f"{method} (seed {seed})"
        return MethodResult(name, acc, 20.0, fdt, 4, 0.01, {"method": method, "seed": seed,
                                                            "object_accuracy": 0.75, "object_wrong_colour": 0.125})

    rows = [student("DMD2", 0, 0.10, 6.0), student("SenseFlow", 0, 0.08, 8.0), student("SenseFlow + IDA", 0, 0.07, 7.0),
            student("DMD2", 1, 0.12, 7.0), student("SenseFlow", 1, 0.09, 5.0)]
    table = results_markdown(rows, "compositional accuracy",
                             parts=(("objects", "object_accuracy"), ("wrong colour", "object_wrong_colour"),
                                    ("missing", "object_missing")))
    assert "| method | compositional accuracy | objects | wrong colour | missing | FD (real) |" in table
    assert "| DMD2 | 10.0% | 75.0% | 12.5% | — | 20.0 | 6.0 | 4 | 10.00 |" in table   # a part it lacks: a dash
    assert "| DMD2 | 2 | 11.0% (10.0–12.0) | 6.5 (6.0–7.0) |" in table
    assert "| SenseFlow | 2 | 8.5% (8.0–9.0) | 6.5 (5.0–8.0) |" in table
    assert "| SenseFlow + IDA | 1 |" not in table                                    # one seed: no spread
    assert "| seed | DMD2 | SenseFlow |" in table and "| 0 | 6.0 | 8.0 |" in table and "| 1 | 7.0 | 5.0 |" in table

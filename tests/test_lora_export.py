"""``senseflow export --lora-rank R`` (senseflow/export.py, senseflow/lora_export.py): a full-weight student as a
diffusers LoRA on its teacher.

The promise: the student's difference from the teacher, factorised per layer by a truncated SVD
(ΔW ≈ B·A, B = U_r Σ_r^{1/2}, A = Σ_r^{1/2} V_rᵀ), is written as ``pytorch_lora_weights.safetensors``; the stock
pipeline of the family loaded from the teacher as the exported README says, plus ``load_lora_weights(folder)``,
makes the same images as the merged student exported as a full pipeline when ΔW has rank ≤ R; the error against
rank follows Eckart–Young and is reported per layer and overall; changed parameters a LoRA file cannot hold are
refused (or dropped on request); bad input is one line, exit code 2, nothing written.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from senseflow.export import main_export, pipeline_kwargs
from senseflow.lora_export import LORA_REPORT_NAME, LORA_WEIGHT_NAME, lowrank_factors
from senseflow.models.families import get_family

#: export family → tiny teacher kind
KINDS = {"flux": "flux", "sd3": "sd35-large", "sdxl": "sdxl"}
#: weights given a low-rank change per family: linear layers of every kind the family has (attention, MLP,
#: embedders, with and without a bias of their own) and its convolutions (SD3.5's 2×2 patch embedding; SDXL's 3×3
#: and 1×1). FLUX's top-level ``proj_out`` also names the end of every single block's ``proj_out``.
CHANGED = {
    "flux": ["x_embedder.weight", "transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.ff.net.2.weight",
             "single_transformer_blocks.1.proj_mlp.weight", "proj_out.weight"],
    "sd3": ["pos_embed.proj.weight", "transformer_blocks.0.attn.to_k.weight",
            "transformer_blocks.1.ff.net.0.proj.weight", "context_embedder.weight"],
    "sdxl": ["conv_in.weight", "down_blocks.1.resnets.0.conv_shortcut.weight",
             "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight", "add_embedding.linear_2.weight"],
}
RANK = 3
SIZE, STEPS = 64, 2
PROMPTS = ["a red fox in the snow"]


def teacher_weights(teacher: Path, family: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sub = get_family(family).denoiser_subfolder
    return load_file(str(teacher / sub / "diffusion_pytorch_model.safetensors"))


def with_low_rank_change(weights: dict[str, torch.Tensor], names: list[str], rank: int | None,
                         seed: int = 0) -> dict[str, torch.Tensor]:
    """``weights`` with W ← W + ΔW on ``names``: ΔW = B₀A₀ of rank ``rank`` (None: a full-rank Gaussian), scaled to
    half of ‖W‖ so that the change shows in the images."""
    g = torch.Generator().manual_seed(seed)
    out = dict(weights)
    for name in names:
        w = weights[name]
        rows, cols = w.shape[0], w[0].numel()
        delta = (torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g) if rank is not None
                 else torch.randn(rows, cols, generator=g))
        out[name] = w + (0.5 * w.norm() / delta.norm() * delta).reshape(w.shape)
    return out


def save_student(weights: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path))
    return path


def export_argv(teacher: Path, student: Path, family: str, out: Path, *extra: str) -> list[str]:
    return ["--teacher", str(teacher), "--checkpoint", str(student), "--family", family, "--out", str(out), *extra]


def stock_lora_pipeline(teacher: Path, folder: Path, family: str):
    """The README's call: the family's pipeline from the teacher (FLUX.1-dev: its transformer without the guidance
    embedder the student lacks), ``load_lora_weights(folder)``, and SDXL's exported scheduler from ``folder``."""
    import diffusers

    fam = get_family(family)
    pipeline = getattr(diffusers, fam.pipeline_class_name)
    components = {}
    if family == "flux":
        components["transformer"] = diffusers.FluxTransformer2DModel.from_pretrained(
            str(teacher), subfolder="transformer", guidance_embeds=False, local_files_only=True)
    pipe = pipeline.from_pretrained(str(teacher), local_files_only=True, **components)
    pipe.load_lora_weights(str(folder))
    if family == "sdxl":
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_pretrained(str(folder), subfolder="scheduler")
    return pipe


def images(pipe, family: str):
    """A 2-step generation in [0, 1] from a fixed generator."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPTS, height=SIZE, width=SIZE, output_type="np", generator=torch.Generator().manual_seed(0),
                **pipeline_kwargs(family, STEPS)).images


def full_pipeline(folder: Path, family: str):
    import diffusers

    return getattr(diffusers, get_family(family).pipeline_class_name).from_pretrained(str(folder),
                                                                                      local_files_only=True)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notice inside EulerDiscreteScheduler
@pytest.mark.parametrize("family", list(KINDS))
def test_lora_of_a_low_rank_student_gives_the_merged_students_images(family, tiny_teacher, tmp_path, capsys):
    teacher = tiny_teacher(KINDS[family])
    weights = with_low_rank_change(teacher_weights(teacher, family), CHANGED[family], RANK)
    student = save_student(weights, tmp_path / "student.safetensors")
    full, lora = tmp_path / "full", tmp_path / "lora"
    assert main_export(export_argv(teacher, student, family, full)) == 0
    capsys.readouterr()
    assert main_export(export_argv(teacher, student, family, lora, "--lora-rank", str(RANK))) == 0
    stdout = capsys.readouterr().out.splitlines()
    assert stdout[0].startswith(f"LoRA rank {RANK}: ") and stdout[1] == f"exported to {lora}"

    assert sorted(p.name for p in lora.iterdir()) == sorted(
        ["README.md", LORA_REPORT_NAME, LORA_WEIGHT_NAME, "senseflow_export.json"] + (["scheduler"] if family == "sdxl"
                                                                                      else []))
    report = json.loads((lora / LORA_REPORT_NAME).read_text())
    assert sorted(e["name"] for e in report["layers"]) == sorted(CHANGED[family])  # unchanged layers are omitted
    assert all(e["rank"] == RANK and e["relative_error"] < 1e-5 for e in report["layers"])
    assert report["overall"]["relative_error"] < 1e-5 and report["summary"] == stdout[0]

    fam = get_family(family)
    readme = (lora / "README.md").read_text()
    assert f'pipe.load_lora_weights("{lora.resolve()}")' in readme
    assert f"pipe = {fam.pipeline_class_name}.from_pretrained(teacher" in readme
    assert ('FluxTransformer2DModel.from_pretrained(teacher, subfolder="transformer", guidance_embeds=False'
            in readme) == (family == "flux")
    assert ('pipe.scheduler = EulerDiscreteScheduler.from_pretrained' in readme) == (family == "sdxl")

    merged = images(full_pipeline(full, family), family)
    pipe = stock_lora_pipeline(teacher, lora, family)
    ours = images(pipe, family)
    pipe.unload_lora_weights()
    without = images(pipe, family)  # the control: the same call without the LoRA
    diff, change = float(abs(ours - merged).max()), float(abs(without - merged).max())
    print(f"{family}: max |LoRA − merged| = {diff:.3g}, without the LoRA {change:.3g} (images in [0, 1])")
    assert ours.shape == merged.shape and diff < 1e-4
    assert change > 1e-2


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_biases_ride_in_lora_b_and_flux_attention_norms_are_stored_whole(tiny_teacher, tmp_path):
    """A changed bias becomes ``lora_B``'s bias (exact); FLUX's loader takes its attention RMSNorm weights as full
    tensors beside the LoRA. The images still equal the merged student's."""
    teacher = tiny_teacher("flux")
    weights = with_low_rank_change(teacher_weights(teacher, "flux"), ["transformer_blocks.0.attn.to_v.weight"], RANK)
    weights["context_embedder.bias"] = weights["context_embedder.bias"] + 0.1
    norm = "transformer_blocks.0.attn.norm_added_k.weight"
    weights[norm] = 1.5 * weights[norm]
    student = save_student(weights, tmp_path / "student.safetensors")
    full, lora = tmp_path / "full", tmp_path / "lora"
    assert main_export(export_argv(teacher, student, "flux", full)) == 0
    assert main_export(export_argv(teacher, student, "flux", lora, "--lora-rank", str(RANK))) == 0
    report = json.loads((lora / LORA_REPORT_NAME).read_text())
    assert report["counts"] == {"linear": 1, "conv": 0, "bias": 1, "full": 1, "dropped": 0}
    assert report["overall"]["relative_error"] < 1e-5
    meta = json.loads((lora / "senseflow_export.json").read_text())["lora"]
    assert meta["fusable"] is True  # every FLUX linear has a bias of its own, so lora_B's bias merges

    merged = images(full_pipeline(full, "flux"), "flux")
    ours = images(stock_lora_pipeline(teacher, lora, "flux"), "flux")
    assert float(abs(ours - merged).max()) < 1e-4


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed:UserWarning")  # the loader's notice of the same fact
def test_a_bias_on_a_layer_without_one_works_unfused_and_the_readme_says_so(tiny_teacher, tmp_path):
    """Once a bias changed, every LoRA layer carries a ``lora_B`` bias; SDXL's attention projections have no bias of
    their own, so the LoRA cannot be fused (peft refuses), which the README and senseflow_export.json state. Unfused,
    the images are the merged student's."""
    teacher = tiny_teacher("sdxl")
    to_q = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    weights = with_low_rank_change(teacher_weights(teacher, "sdxl"), [f"{to_q}.weight"], RANK)
    weights["conv_in.bias"] = weights["conv_in.bias"] + 0.05
    student = save_student(weights, tmp_path / "student.safetensors")
    full, lora = tmp_path / "full", tmp_path / "lora"
    assert main_export(export_argv(teacher, student, "sdxl", full)) == 0
    assert main_export(export_argv(teacher, student, "sdxl", lora, "--lora-rank", str(RANK))) == 0
    assert json.loads((lora / "senseflow_export.json").read_text())["lora"]["fusable"] is False
    assert f"e.g. `{to_q}`" in (lora / "README.md").read_text() and "fuse_lora()` is not possible" in (
        lora / "README.md").read_text()

    pipe = stock_lora_pipeline(teacher, lora, "sdxl")
    assert float(abs(images(pipe, "sdxl") - images(full_pipeline(full, "sdxl"), "sdxl")).max()) < 1e-4
    with pytest.raises(RuntimeError, match="base layer has no bias"):
        pipe.fuse_lora()


def test_changed_parameters_a_lora_cannot_hold_are_refused_unless_dropped(tiny_teacher, tmp_path, capsys):
    """SD3.5's loader takes no full tensors: a changed attention norm is one line, exit 2, nothing written; with
    ``--lora-drop-rest`` it is left out and reported with its share of the change."""
    teacher = tiny_teacher("sd35-large")
    weights = with_low_rank_change(teacher_weights(teacher, "sd3"), ["transformer_blocks.0.attn.to_q.weight"], RANK)
    norm = "transformer_blocks.1.attn.norm_q.weight"
    weights[norm] = weights[norm] + 0.25
    student = save_student(weights, tmp_path / "student.safetensors")
    out = tmp_path / "lora"
    capsys.readouterr()
    assert main_export(export_argv(teacher, student, "sd3", out, "--lora-rank", str(RANK))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and norm in err and "--lora-drop-rest" in err and "StableDiffusion3Pipeline" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.safetensors"]

    assert main_export(export_argv(teacher, student, "sd3", out, "--lora-rank", str(RANK), "--lora-drop-rest")) == 0
    report = json.loads((out / LORA_REPORT_NAME).read_text())
    dropped = [e for e in report["layers"] if e["kind"] == "dropped"]
    assert [e["name"] for e in dropped] == [norm] and dropped[0]["relative_error"] == 1.0
    to_q = next(e for e in report["layers"] if e["kind"] == "linear")
    share = dropped[0]["delta_norm"] / (dropped[0]["delta_norm"] ** 2 + to_q["delta_norm"] ** 2) ** 0.5
    assert report["overall"]["dropped_share"] == pytest.approx(share)
    assert report["overall"]["relative_error"] == pytest.approx(share, rel=1e-4)  # the LoRA part itself is exact
    assert "1 dropped" in capsys.readouterr().out


def test_truncated_svd_is_the_eckart_young_best_approximation():
    """``lowrank_factors`` on a full-rank 24 × 40 matrix: the error ‖ΔW − BA‖/‖ΔW‖ at every rank is
    sqrt(Σ_{i>r} σ_i²)/‖ΔW‖, decreases with the rank and is ~0 at full rank; beyond it the factors are padded."""
    delta = torch.randn(24, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma = torch.linalg.svdvals(delta)
    errors = []
    for r in range(1, 25):
        b, a = lowrank_factors(delta, r)
        assert b.shape == (24, r) and a.shape == (r, 40)
        errors.append(float((delta - b @ a).norm() / delta.norm()))
        assert errors[-1] == pytest.approx(float(sigma[r:].square().sum().sqrt() / delta.norm()), abs=1e-12)
        torch.testing.assert_close(b.T @ b, a @ a.T)  # the balanced split: BᵀB = AAᵀ = Σ_r
    assert all(x > y for x, y in zip(errors, errors[1:])) and errors[-1] < 1e-12
    b, a = lowrank_factors(delta, 30)
    assert b.shape == (24, 30) and not b[:, 24:].any() and not a[24:].any()
    torch.testing.assert_close(b @ a, delta)


def test_reported_error_against_rank_on_a_full_rank_change(tiny_teacher, tmp_path, capsys):
    """A full-rank ΔW on FLUX's 32 × 64 ``x_embedder``: the reported error per rank is the Eckart–Young value,
    decreases with the rank and is ~0 at rank 32."""
    teacher = tiny_teacher("flux")
    layer = "x_embedder.weight"
    before = teacher_weights(teacher, "flux")
    weights = with_low_rank_change(before, [layer], None)
    student = save_student(weights, tmp_path / "student.safetensors")
    delta = weights[layer].double() - before[layer].double()
    sigma = torch.linalg.svdvals(delta)
    errors = {}
    for r in (1, 2, 4, 8, 16, 32):
        out = tmp_path / f"r{r}"
        assert main_export(export_argv(teacher, student, "flux", out, "--lora-rank", str(r))) == 0
        report = json.loads((out / LORA_REPORT_NAME).read_text())
        (entry,) = report["layers"]
        errors[r] = entry["relative_error"]
        assert errors[r] == pytest.approx(float(sigma[r:].square().sum().sqrt() / sigma.square().sum().sqrt()),
                                          abs=1e-5)
        assert report["overall"]["relative_error"] == pytest.approx(errors[r])
    print("relative error by rank: " + ", ".join(f"r={r}: {e:.4g}" for r, e in errors.items()))
    values = list(errors.values())
    assert all(x > y for x, y in zip(values, values[1:])) and values[-1] < 1e-5


BAD_LORA_EXPORTS = {
    # name: (argv builder over (flux teacher, sdxl teacher, flux student, tmp), text of the error)
    "rank 0": (lambda f, s, c, d: export_argv(f, c, "flux", d / "out", "--lora-rank", "0"),
               "--lora-rank must be a positive integer, got 0"),
    "negative rank": (lambda f, s, c, d: export_argv(f, c, "flux", d / "out", "--lora-rank", "-4"),
                      "--lora-rank must be a positive integer, got -4"),
    "rank not a number": (lambda f, s, c, d: export_argv(f, c, "flux", d / "out", "--lora-rank", "four"),
                          "--lora-rank: invalid int value: 'four'"),
    "teacher of another family": (lambda f, s, c, d: export_argv(s, c, "flux", d / "out", "--lora-rank", "4"),
                                  "holds a StableDiffusionXLPipeline (sdxl); a flux teacher is a FluxPipeline folder"),
    "student of another family": (lambda f, s, c, d: export_argv(s, c, "sdxl", d / "out", "--lora-rank", "4"),
                                  "missing keys"),
    "drop without a rank": (lambda f, s, c, d: export_argv(f, c, "flux", d / "out", "--lora-drop-rest"),
                            "--lora-drop-rest applies to a LoRA export only"),
    "student equal to the teacher": (lambda f, s, c, d: export_argv(f, f, "flux", d / "out", "--lora-rank", "4"),
                                     "there is no change to export as a LoRA"),
}


@pytest.mark.parametrize("case", list(BAD_LORA_EXPORTS))
def test_bad_lora_export_input_exits_2_with_one_line(case, tiny_teacher, tmp_path, capsys):
    build, expected = BAD_LORA_EXPORTS[case]
    flux = tiny_teacher("flux")
    student = save_student(with_low_rank_change(teacher_weights(flux, "flux"), CHANGED["flux"][:1], RANK),
                           tmp_path / "student.safetensors")
    argv = build(flux, tiny_teacher("sdxl"), student, tmp_path)
    capsys.readouterr()
    assert main_export(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("senseflow export: error: ") and "Traceback" not in err, err
    assert expected in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.safetensors"]  # nothing written, no temp folder

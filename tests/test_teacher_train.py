"""``senseflow teacher train``: a teacher of every family from an image-caption set, resumable, refusing bad input.

Runs use the tiny coloured-shapes set and a few steps of each stage (the real digits teachers take minutes; their
numbers are in docs/teachers.md).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from senseflow.cli import main
from senseflow.teacher.train import CARD, CONFIG_FILE, Stage

FEW_STEPS = ["vae_training.steps=3", "vae_training.batch_size=4", "denoiser_training.steps=4",
             "denoiser_training.batch_size=4", "guidance_distillation.batch_size=4",
             "guidance_distillation.eval_samples=4",
             "sample.steps=2", "sample.num_prompts=2", "sample.images_per_prompt=2", "checkpoint_every=2"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from senseflow.tiny import build_tiny_dataset

    return build_tiny_dataset(tmp_path_factory.mktemp("shapes"), num_images=8)


def _train(data: Path, out: Path, family: str, *extra: str) -> int:
    guidance = ["guidance_distillation.steps=3"] if family == "flux" else []
    return main(["teacher", "train", "--family", family, "--data", str(data), "--out", str(out), "--no-progress",
                 *FEW_STEPS, *guidance, *extra])


@pytest.mark.parametrize("family, pipeline", [("sdxl", "StableDiffusionXLPipeline"),
                                              ("sd3", "StableDiffusion3Pipeline"),
                                              ("flux", "FluxPipeline")])
def test_each_family_trains_into_a_folder_its_stock_pipeline_loads(shapes, tmp_path, family, pipeline):
    import diffusers

    out = tmp_path / family
    assert _train(shapes, out, family) == 0
    pipe = getattr(diffusers, pipeline).from_pretrained(out, local_files_only=True)
    assert type(pipe).__name__ == pipeline
    card = json.loads((out / CARD).read_text())
    assert card["family"] == family and card["data"]["records"] == 8 and len(card["data"]["fingerprint"]) == 64
    assert card["settings"]["denoiser_training"]["steps"] == 4 and (out / "samples.png").is_file()
    assert len(card["curves"]["denoiser"]["loss"]) == 1     # one point per log_every (50) steps
    vae = pipe.vae.config                                   # the VAE's normalisation was measured, not left at 1/0
    assert vae.scaling_factor != 1.0
    if family == "sdxl":                                    # its pipeline decodes z = x / scale: no shift to set
        assert vae.shift_factor is None
    else:
        assert vae.shift_factor != 0.0
    if family == "flux":
        assert pipe.transformer.config.guidance_embeds
        errors = card["guidance_distillation"]
        assert errors["scales"][0] == 1.0 and errors["before"][0] < 1e-6   # zero-initialised embedding: g = 1 is c
        assert len(errors["after"]) == len(errors["scales"])
    else:
        assert "guidance_distillation" not in card


def test_the_sdxl_teacher_learns_the_zero_unconditional_of_its_pipeline(shapes, tmp_path):
    """SDXL's pipeline feeds zero embeddings as the unconditional input (force_zeros_for_empty_prompt): the
    family's training condition for a dropped caption is exactly that."""
    from senseflow.models.families import build_family

    out = tmp_path / "sdxl"
    assert _train(shapes, out, "sdxl") == 0
    family = build_family("sdxl", path=str(out), resolution=32)
    cond = family.training_condition(["a red circle", "a blue square"], torch.tensor([True, False]))
    assert cond.prompt_embeds[0].abs().max() == 0 and cond.pooled[0].abs().max() == 0
    assert cond.prompt_embeds[1].abs().max() > 0


def test_an_interrupted_run_continues_bit_exactly(shapes, tmp_path, monkeypatch):
    assert _train(shapes, tmp_path / "whole", "flux") == 0

    real_save = Stage._save

    def save_then_die(self):
        real_save(self)
        if self.name == "denoiser":       # killed right after the denoiser's first checkpoint (step 2 of 4)
            raise KeyboardInterrupt

    monkeypatch.setattr(Stage, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _train(shapes, tmp_path / "cut", "flux")
    monkeypatch.setattr(Stage, "_save", real_save)
    assert not (tmp_path / "cut" / CARD).exists()
    assert _train(shapes, tmp_path / "cut", "flux") == 0    # the same command continues it

    for part in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "text_encoder_2/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert (tmp_path / "whole" / part).read_bytes() == (tmp_path / "cut" / part).read_bytes(), part
    whole, cut = (json.loads((tmp_path / d / CARD).read_text()) for d in ("whole", "cut"))
    assert whole["curves"] == cut["curves"] and whole["guidance_distillation"] == cut["guidance_distillation"]


def _one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_inputs_get_one_line_before_any_training(shapes, tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"keys": [], "image_paths": [], "prompts": []}))
    base = ["teacher", "train", "--data", str(shapes)]
    err = _one_line_error(capsys, ["teacher", "train", "--family", "sd3", "--data", str(empty), "--out",
                                   str(tmp_path / "a")])
    assert "empty.json" in err
    err = _one_line_error(capsys, [*base, "--family", "sd4", "--out", str(tmp_path / "b")])
    assert "sd4" in err and "sdxl" in err
    err = _one_line_error(capsys, [*base, "--family", "sd3", "--resolution", "30", "--out", str(tmp_path / "c")])
    assert "resolution" in err and "multiple of 4" in err
    err = _one_line_error(capsys, [*base, "--family", "flux", "--out", str(tmp_path / "d"), "denoiser.num_layer=2"])
    assert "num_layers" in err                              # an architecture key is checked against its class
    err = _one_line_error(capsys, [*base, "--family", "sd3", "--out", str(tmp_path / "e"),
                                   "denoiser_training.caption_dropout=1.5"])
    assert "caption_dropout" in err
    err = _one_line_error(capsys, [*base, "--family", "sd3", "--out", str(tmp_path / "f"), "denoiser.in_channels=8"])
    assert "derived" in err                                 # a width another component fixes is not a setting
    err = _one_line_error(capsys, [*base, "--family", "sd3", "--out", str(tmp_path / "g"), "--device", "gpu"])
    assert "--device" in err
    assert not any((tmp_path / n).exists() for n in "abcdefg")   # nothing was written

    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"not ours")
    err = _one_line_error(capsys, [*base, "--family", "sd3", "--out", str(mine)])
    assert "holiday.jpg" in err
    assert sorted(p.name for p in mine.iterdir()) == ["holiday.jpg"]


def test_a_run_with_other_settings_is_refused_and_left_as_it_was(shapes, tmp_path, capsys):
    out = tmp_path / "t"
    assert _train(shapes, out, "sd3") == 0
    before = (out / CONFIG_FILE).read_text()
    err = _one_line_error(capsys, ["teacher", "train", "--family", "sd3", "--data", str(shapes), "--out", str(out),
                                   *FEW_STEPS, "--seed", "3"])
    assert "seed" in err and (out / CONFIG_FILE).read_text() == before
    assert _train(shapes, out, "sd3") == 0                  # a finished run re-run: nothing to do


def test_a_run_whose_data_changed_at_the_same_path_is_refused(tmp_path, capsys):
    from PIL import Image

    from senseflow.tiny import build_tiny_dataset

    data = build_tiny_dataset(tmp_path / "set", num_images=8)
    out = tmp_path / "t"
    real_save = Stage._save

    def die_after_first_save(self):
        real_save(self)
        raise KeyboardInterrupt

    Stage._save = die_after_first_save
    try:
        with pytest.raises(KeyboardInterrupt):
            _train(data, out, "sd3")
    finally:
        Stage._save = real_save
    image = tmp_path / "set" / json.loads(data.read_text())["image_paths"][0]
    Image.new("RGB", Image.open(image).size, (0, 0, 0)).save(image)   # one image edited in place
    err = _one_line_error(capsys, ["teacher", "train", "--family", "sd3", "--data", str(data), "--out", str(out),
                                   "--no-progress", *FEW_STEPS])
    assert "changed" in err

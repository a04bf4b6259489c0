"""Tiny teachers: complete diffusers folders that the stock pipelines load offline, reproducible by seed."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch

from senseflow.tiny import (
    TINY_KINDS,
    build_tiny_discriminator_backbones,
    build_tiny_teacher,
    main_tiny,
    tiny_clip_tokenizer,
    tiny_t5_tokenizer,
)

LAYOUT = {
    "sdxl": ("StableDiffusionXLPipeline", ["unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                                           "scheduler"]),
    "sd35-medium": ("StableDiffusion3Pipeline", ["transformer", "vae", "text_encoder", "text_encoder_2",
                                                 "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3",
                                                 "scheduler"]),
    "flux": ("FluxPipeline", ["transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                              "scheduler"]),
}
LAYOUT["sd35-large"] = LAYOUT["sd35-medium"]
LAYOUT["flux-dedistilled"] = LAYOUT["flux"]


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


@pytest.mark.parametrize("kind", sorted(TINY_KINDS))
def test_folder_has_the_diffusers_layout(tiny_teacher, kind):
    path = tiny_teacher(kind)
    pipeline, components = LAYOUT[kind]
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == pipeline
    for sub in components:
        assert index[sub][0] in ("diffusers", "transformers"), sub
        assert (path / sub).is_dir(), sub


def test_schedulers_and_vae_factors_are_the_real_ones(tiny_teacher):
    sdxl = json.loads((tiny_teacher("sdxl") / "scheduler" / "scheduler_config.json").read_text())
    assert sdxl["_class_name"] == "EulerDiscreteScheduler"
    assert (sdxl["beta_schedule"], sdxl["beta_start"], sdxl["beta_end"], sdxl["num_train_timesteps"]) == (
        "scaled_linear", 0.00085, 0.012, 1000
    )
    assert sdxl["prediction_type"] == "epsilon"
    sd3 = json.loads((tiny_teacher("sd35-medium") / "scheduler" / "scheduler_config.json").read_text())
    assert (
        sd3["_class_name"] == "FlowMatchEulerDiscreteScheduler" and sd3["shift"] == 3.0
        and not sd3["use_dynamic_shifting"]
    )
    flux = json.loads((tiny_teacher("flux") / "scheduler" / "scheduler_config.json").read_text())
    assert flux["use_dynamic_shifting"] and (flux["base_shift"], flux["max_shift"]) == (0.5, 1.15)
    assert (flux["base_image_seq_len"], flux["max_image_seq_len"]) == (256, 4096)

    vae = {k: json.loads((tiny_teacher(k) / "vae" / "config.json").read_text()) for k in ("sdxl", "sd35-large", "flux")}
    assert (
        vae["sdxl"]["scaling_factor"] == 0.13025 and vae["sdxl"]["shift_factor"] is None
        and vae["sdxl"]["latent_channels"] == 4
    )
    assert (vae["sd35-large"]["scaling_factor"], vae["sd35-large"]["shift_factor"]) == (1.5305, 0.0609)
    assert (vae["flux"]["scaling_factor"], vae["flux"]["shift_factor"]) == (0.3611, 0.1159)
    assert all(len(v["block_out_channels"]) == 4 for v in vae.values())  # 8x like the real VAEs


def test_denoiser_variants(tiny_teacher):
    medium = json.loads((tiny_teacher("sd35-medium") / "transformer" / "config.json").read_text())
    large = json.loads((tiny_teacher("sd35-large") / "transformer" / "config.json").read_text())
    flux = json.loads((tiny_teacher("flux") / "transformer" / "config.json").read_text())
    assert list(medium["dual_attention_layers"]) == [0] and medium["qk_norm"] == "rms_norm"
    assert list(large["dual_attention_layers"]) == [] and large["qk_norm"] == "rms_norm"
    assert flux["guidance_embeds"] is True
    dedistilled = json.loads((tiny_teacher("flux-dedistilled") / "transformer" / "config.json").read_text())
    assert dedistilled["guidance_embeds"] is False
    assert {k: v for k, v in dedistilled.items() if k != "guidance_embeds"} == {
        k: v for k, v in flux.items() if k != "guidance_embeds"
    }


@pytest.mark.parametrize("kind", sorted(TINY_KINDS))
def test_stock_pipeline_loads_offline(tiny_teacher, kind):
    import diffusers

    cls = getattr(diffusers, LAYOUT[kind][0])
    pipe = cls.from_pretrained(tiny_teacher(kind), local_files_only=True)
    assert type(pipe).__name__ == LAYOUT[kind][0]
    denoiser = pipe.unet if kind == "sdxl" else pipe.transformer
    assert sum(p.numel() for p in denoiser.parameters()) < 2_000_000


def test_same_seed_gives_byte_identical_folders(tmp_path):
    a = _digest(build_tiny_teacher("sd35-large", tmp_path / "a", seed=0))
    b = _digest(build_tiny_teacher("sd35-large", tmp_path / "b", seed=0))
    c = _digest(build_tiny_teacher("sd35-large", tmp_path / "c", seed=1))
    assert a == b
    changed = {f for f in a if a[f] != c[f]}
    assert changed == {f for f in a if f.endswith(".safetensors")}  # new weights; same tokenizers and configs


def test_build_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_teacher("flux", tmp_path / "f", seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_builds_take_seconds(tmp_path):
    for kind in sorted(TINY_KINDS):
        start = time.perf_counter()
        build_tiny_teacher(kind, tmp_path / kind, seed=3)
        assert time.perf_counter() - start < 30, kind


def test_non_empty_output_folder_needs_overwrite(tmp_path):
    build_tiny_teacher("flux", tmp_path / "t")
    with pytest.raises(FileExistsError, match="overwrite"):
        build_tiny_teacher("flux", tmp_path / "t")
    build_tiny_teacher("flux", tmp_path / "t", overwrite=True)


def test_unknown_kind_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="sd35-medium"):
        build_tiny_teacher("sd3-tiny", tmp_path / "x")


def test_clip_tokenizer_is_clip_like():
    tok = tiny_clip_tokenizer()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 1)
    ids = tok("A photo of a CAT", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == 0 and ids[-1] == 1
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a cat"  # CLIP lower-cases
    assert tok.model_max_length == 77


def test_t5_tokenizer_is_t5_like():
    tok = tiny_t5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("a photo of a cat").input_ids
    assert ids[-1] == 1 and tok.decode(ids, skip_special_tokens=True) == "a photo of a cat"
    padded = tok("a cat", padding="max_length", max_length=16).input_ids
    assert len(padded) == 16 and padded[-1] == 0


def test_discriminator_backbones(tmp_path):
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, Dinov2Model

    paths = build_tiny_discriminator_backbones(tmp_path / "bb", seed=0)
    dino = Dinov2Model.from_pretrained(paths["dino"], local_files_only=True)
    assert (
        dino.config.patch_size, dino.config.image_size, dino.config.hidden_size, dino.config.num_hidden_layers
    ) == (8, 64, 32, 4)
    out = dino(pixel_values=torch.zeros(2, 3, 64, 64), output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 1 + 64, 32) and len(out.hidden_states) == 5
    clip = CLIPTextModelWithProjection.from_pretrained(paths["clip"], local_files_only=True)
    tok = AutoTokenizer.from_pretrained(paths["clip"], local_files_only=True)
    ids = tok(["a cat", "a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert clip(ids).text_embeds.shape == (2, 32)


def test_cli_writes_a_teacher_and_backbones(tmp_path, capsys):
    assert main_tiny(["--kind", "sd35-medium", "--out", str(tmp_path / "t"), "--seed", "2"]) == 0
    assert (tmp_path / "t" / "model_index.json").is_file()
    assert main_tiny(["--kind", "backbones", "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "dinov2" / "config.json").is_file()
    assert "dino" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:  # an existing folder is a usage error, not a traceback
        main_tiny(["--kind", "flux", "--out", str(tmp_path / "t")])
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err

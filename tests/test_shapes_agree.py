"""Shapes agree: the data, the teacher and the guidance the config names fit each other, checked before any network
loads (docs/method.md §5 "Guidance kinds", §13.2).

* An LMDB whose latents are not the size the teacher's VAE makes at ``data.resolution`` is refused in one line
  naming both sizes, from the LMDB header and ``vae/config.json`` alone.
* ``method.*.guidance.kind`` is honoured or refused for every family: SDXL and SD3.5 guide with CFG; FLUX with its
  guidance embedding (FLUX.1-dev) or, for a teacher without the embedder (a de-distilled FLUX), with two-branch CFG.
* ``data.kind: auto`` (every preset, the SDXL ones included) reads an LMDB folder as latents and a JSON file as
  images.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from senseflow.data import DataError
from senseflow.data.factory import open_dataset
from senseflow.data.json_images import ImageCaptionDataset
from senseflow.data.lmdb_latents import (
    LatentLMDBDataset,
    check_latents_fit_teacher,
    latents_fit_problem,
    teacher_latent_shape,
)
from senseflow.data.training import build_training_data
from senseflow.models.families import FAMILY_NAMES, build_family, get_family, guidance_problem
from test_data_support import fp16_latents, write_json_set, write_raw_lmdb

REPO = Path(__file__).resolve().parents[1]
RES = 64  # the tiny teachers' VAEs downscale 8x: 8x8 latents
PROMPTS = ["a red circle on a white background", "a blue square"]
KEYS = ("method.dmd.guidance.kind", "method.isg.guidance.kind")


def lmdb_of(path: Path, shape: tuple[int, int, int], n: int = 3) -> Path:
    """A DMD2-layout LMDB of ``n`` random fp16 latents of ``shape``."""
    latents = [a.tobytes() for a in fp16_latents(n, shape)]
    return write_raw_lmdb(path, latents, [f"caption {i}".encode() for i in range(n)], shape=shape)


def metadata_only(teacher: Path, out: Path, *subfolders: str) -> Path:
    """A copy of the teacher folder holding only the ``config.json`` of ``subfolders``: no weights anywhere, so a
    check that works on it reads no network."""
    for sub in subfolders:
        (out / sub).mkdir(parents=True)
        shutil.copy(teacher / sub / "config.json", out / sub / "config.json")
    return out


# ---- latents against the teacher's VAE ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind,shape,sizes", [
    ("sdxl", (16, 8, 8), ("16×8×8", "4×8×8")),      # another VAE: FLUX/SD3-like 16 channels for a 4-channel teacher
    ("sdxl", (4, 16, 16), ("4×16×16", "4×8×8")),    # another resolution: 128 px latents for a 64 px run
    ("flux", (4, 8, 8), ("4×8×8", "16×8×8")),       # SDXL latents for a FLUX teacher
])
def test_latents_of_another_size_are_refused_naming_both_sizes(tiny_teacher, tmp_path, kind, shape, sizes):
    """The refusal comes from the LMDB header and vae/config.json alone (the teacher copy holds no weights)."""
    teacher = metadata_only(tiny_teacher(kind), tmp_path / "teacher", "vae")
    lmdb = lmdb_of(tmp_path / "latents.lmdb", shape)
    problem = latents_fit_problem(lmdb, "auto", RES, teacher)
    assert problem is not None and "\n" not in problem
    stored, expected = sizes
    assert f"holds latents of {stored}" in problem and f"makes {expected} at data.resolution={RES}" in problem
    assert "data.path" in problem and str(lmdb) in problem and str(teacher / "vae" / "config.json") in problem


@pytest.mark.parametrize("kind,channels", [("sdxl", 4), ("sd35-large", 16), ("flux", 16)])
def test_latents_of_the_teachers_vae_fit(tiny_teacher, tmp_path, kind, channels):
    teacher = tiny_teacher(kind)
    assert teacher_latent_shape(teacher, RES) == (channels, 8, 8)
    assert teacher_latent_shape(teacher, RES) == build_family(kind if kind != "sd35-large" else "sd3",
                                                              path=teacher).latent_shape(RES, RES)
    assert latents_fit_problem(lmdb_of(tmp_path / "ok.lmdb", (channels, 8, 8)), "lmdb", RES, teacher) is None


def test_image_sets_always_fit(tiny_teacher, tmp_path):
    """JSON sets are encoded by the teacher's own VAE: nothing to compare."""
    images = write_json_set(tmp_path / "data", n=2)
    assert latents_fit_problem(images, "auto", RES, tiny_teacher("sdxl")) is None
    assert latents_fit_problem(images, "json", RES, tiny_teacher("sdxl")) is None


def test_the_config_check_and_the_training_data_refuse_the_same_line(tiny_teacher, tmp_path):
    """``check_latents_fit_teacher(cfg)`` (the pre-flight's call) and ``build_training_data(..., teacher=)`` (where the
    data is built) refuse an LMDB of another VAE with the same line; the fitting set builds."""
    from senseflow.config import load_config

    teacher = tiny_teacher("sdxl")
    wrong = lmdb_of(tmp_path / "flux_latents.lmdb", (16, 8, 8))
    cfg = load_config(REPO / "configs" / "tiny" / "sdxl_senseflow.yaml",
                      [f"teacher.path={teacher}", f"data.path={wrong}"])
    with pytest.raises(DataError) as refused:
        check_latents_fit_teacher(cfg)
    line = str(refused.value)
    assert "16×8×8" in line and "4×8×8" in line and "\n" not in line
    with pytest.raises(DataError) as built:
        build_training_data(cfg.data, 2, 0, 0, 1, teacher=cfg.teacher)
    assert str(built.value) == line

    cfg.data.path = str(lmdb_of(tmp_path / "sdxl_latents.lmdb", (4, 8, 8)))
    check_latents_fit_teacher(cfg)
    batch = build_training_data(cfg.data, 2, 0, 0, 1, teacher=cfg.teacher).next()
    assert batch["latents"].shape == (2, 4, 8, 8)


# ---- guidance kinds per family -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family,kind,runs", [
    ("sdxl", "cfg", True), ("sdxl", "embedding", False),
    ("sd3", "cfg", True), ("sd3", "embedding", False),
    ("flux", "embedding", True), ("flux", "cfg", True),
])
def test_each_family_names_the_guidance_kinds_it_can_run(family, kind, runs):
    expected = get_family(family).guidance_kind_expectation(kind)
    if runs:
        assert expected is None
    else:
        assert expected == f"'cfg' for teacher.family={family} (only FLUX teachers have a guidance embedding)"


def test_every_family_declares_its_stock_kind_among_its_kinds():
    for name in FAMILY_NAMES:
        cls = get_family(name)
        assert cls.guidance_kind in cls.guidance_kinds, name
    assert get_family("flux").guidance_kinds == ("embedding", "cfg")


def guidance_cfg(family: str, teacher: Path | str, dmd: str, isg: str) -> dict:
    return {"teacher": {"family": family, "path": str(teacher)},
            "method": {"dmd": {"guidance": {"kind": dmd}}, "isg": {"guidance": {"kind": isg}}}}


@pytest.mark.parametrize("kind,dmd,isg,wrong,override", [
    ("flux-dedistilled", "embedding", "embedding", KEYS, "cfg"),
    ("flux-dedistilled", "cfg", "embedding", KEYS[1:], "cfg"),
    ("flux", "cfg", "cfg", KEYS, "embedding"),
    ("flux", "embedding", "cfg", KEYS[1:], "embedding"),
])
def test_a_flux_kind_that_does_not_fit_the_transformer_is_refused_with_the_override(
        tiny_teacher, tmp_path, kind, dmd, isg, wrong, override):
    """Read from transformer/config.json only (the copy holds no weights): the line names the first wrong key, the
    teacher's config file and every override that fits."""
    teacher = metadata_only(tiny_teacher(kind), tmp_path / "teacher", "transformer")
    problem = guidance_problem(guidance_cfg("flux", teacher, dmd, isg))
    assert problem is not None and "\n" not in problem
    assert problem.startswith(f"{wrong[0]} = ")
    assert str(teacher / "transformer" / "config.json") in problem
    assert problem.endswith("override " + " ".join(f"{key}={override}" for key in wrong))


@pytest.mark.parametrize("kind,fits", [("flux", "embedding"), ("flux-dedistilled", "cfg")])
def test_a_flux_kind_that_fits_the_transformer_passes(tiny_teacher, kind, fits):
    assert guidance_problem(guidance_cfg("flux", tiny_teacher(kind), fits, fits)) is None
    assert build_family("flux", path=tiny_teacher(kind)).guidance_kind == fits


@pytest.mark.parametrize("family,teacher", [("sdxl", "sdxl"), ("sd3", "sd35-medium")])
def test_cfg_families_refuse_the_embedding_kind(tiny_teacher, family, teacher):
    assert guidance_problem(guidance_cfg(family, tiny_teacher(teacher), "cfg", "cfg")) is None
    problem = guidance_problem(guidance_cfg(family, tiny_teacher(teacher), "cfg", "embedding"))
    assert problem == (f"method.isg.guidance.kind = 'embedding': expected 'cfg' for teacher.family={family} "
                       "(only FLUX teachers have a guidance embedding)")


def test_the_method_refuses_a_kind_that_does_not_fit_before_loading(tiny_teacher, tiny_backbones, tmp_path,
                                                                       monkeypatch):
    """FLUX.1-dev's preset kind (embedding) on a de-distilled teacher: the trainer stops at the guidance check with
    the override, and no denoiser is read."""
    from senseflow.config import load_config
    from senseflow.models.families.loading import DiffusersFamily
    from senseflow.trainer import get_trainer

    def no_load(*args, **kwargs):
        raise AssertionError("a denoiser was loaded before the guidance check")

    monkeypatch.setattr(DiffusersFamily, "load_denoiser", no_load)
    cfg = load_config(REPO / "configs" / "tiny" / "flux_senseflow.yaml",
                      flux_overrides(tiny_teacher("flux-dedistilled"), tiny_backbones, tmp_path))
    trainer = get_trainer("flux_senseflow")(cfg, tmp_path / "run")
    with pytest.raises(ValueError, match=r"override method\.dmd\.guidance\.kind=cfg method\.isg\.guidance\.kind=cfg"):
        trainer.setup()


# ---- FLUX classifier-free guidance -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dedistilled(tiny_teacher):
    """The tiny de-distilled FLUX family (no guidance embedder) and its fp32 teacher."""
    family = build_family("flux", path=tiny_teacher("flux-dedistilled"))
    return family, family.load_denoiser(torch.float32)


def test_flux_cfg_is_the_two_branch_formula(dedistilled):
    """v = v_u + s·(v_c − v_u) with v_u the empty prompt's velocity and v_c the caption's, computed here by two
    separate calls; a per-sample scale applies per sample, and the default kind of this teacher is cfg."""
    from senseflow.method.guidance import guided_prediction

    family, teacher = dedistilled
    x = torch.randn(2, *family.latent_shape(RES, RES), generator=torch.Generator().manual_seed(0))
    tau = torch.tensor([0.9, 0.4])
    cond = family.encode_prompts(PROMPTS)
    v_u = family.predict(teacher, x, tau, family.encode_prompts(["", ""]))
    v_c = family.predict(teacher, x, tau, cond)
    assert not torch.allclose(v_u, v_c, atol=1e-4)  # the caption matters: the formula is not trivially v_c
    scale = torch.tensor([3.5, 6.0])
    by_hand = v_u + scale.view(2, 1, 1, 1) * (v_c - v_u)
    torch.testing.assert_close(family.guided_predict(teacher, x, tau, cond, scale, kind="cfg"), by_hand,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(guided_prediction(family, teacher, x, tau, cond, 4.0, "cfg"),
                               v_u + 4.0 * (v_c - v_u), rtol=1e-5, atol=1e-5)
    assert family.guidance_kind == "cfg"
    torch.testing.assert_close(family.guided_predict(teacher, x, tau, cond, 4.0), v_u + 4.0 * (v_c - v_u),
                               rtol=1e-5, atol=1e-5)


def test_a_guidance_kind_the_net_cannot_run_is_refused(dedistilled, tiny_teacher):
    family, teacher = dedistilled
    x, tau = torch.zeros(1, *family.latent_shape(RES, RES)), torch.tensor([0.5])
    cond = family.encode_prompts(PROMPTS[:1])
    with pytest.raises(ValueError, match="guidance kind 'embedding' needs a guidance-distilled transformer"):
        family.guided_predict(teacher, x, tau, cond, 3.0, kind="embedding")
    distilled = build_family("flux", path=tiny_teacher("flux"))
    with pytest.raises(ValueError, match="guidance kind 'cfg' needs a transformer without a guidance embedder"):
        distilled.guided_predict(distilled.load_denoiser(torch.float32), x, tau, distilled.encode_prompts(PROMPTS[:1]),
                                 3.0, kind="cfg")
    sdxl = build_family("sdxl", path=tiny_teacher("sdxl"))
    with pytest.raises(ValueError, match="guidance kind 'embedding' is not one of the family's"):
        sdxl.guided_predict(torch.nn.Identity(), x, tau, cond, 3.0, kind="embedding")


def flux_overrides(teacher: Path, backbones: dict[str, Path], tmp_path: Path, *extra: str) -> list[str]:
    from senseflow.tiny import build_tiny_dataset

    data = tmp_path / "data"
    images = data / "dataset.json" if data.exists() else build_tiny_dataset(data, num_images=4)
    return [f"teacher.path={teacher}", f"data.path={images}", f"discriminator.dino_path={backbones['dino']}",
            f"discriminator.clip_path={backbones['clip']}", *extra]


def test_a_tiny_flux_run_with_a_dedistilled_teacher_trains_with_cfg(tiny_teacher, tiny_backbones, tmp_path,
                                                                      monkeypatch):
    """kind cfg on a teacher without the guidance embedder: two generator steps (gd 1) whose DMD and ISG teacher
    calls are all two-branch CFG; the generator moves and every logged loss is finite."""
    import math

    from senseflow.config import load_config
    from senseflow.models.families.flux import FluxFamily
    from senseflow.trainer import get_trainer

    overrides = flux_overrides(tiny_teacher("flux-dedistilled"), tiny_backbones, tmp_path,
                               *(f"{key}=cfg" for key in KEYS), "method.gd=1", "train.iterations=2")
    cfg = load_config(REPO / "configs" / "tiny" / "flux_senseflow.yaml", overrides)
    calls: list[str] = []
    real_cfg = FluxFamily.cfg_predict

    def counted(self, net, x, tau, cond, scale):
        calls.append("cfg")
        return real_cfg(self, net, x, tau, cond, scale)

    monkeypatch.setattr(FluxFamily, "cfg_predict", counted)
    trainer = get_trainer("flux_senseflow")(cfg, tmp_path / "run")
    trainer.setup()
    before = {k: v.detach().clone() for k, v in trainer.generator.state_dict().items()}
    trainer.train()
    assert len(calls) == 2 * 2  # per generator step: DMD's real score and ISG's teacher step
    assert any(not torch.equal(before[k], v) for k, v in trainer.generator.state_dict().items())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [v for row in rows for k, v in row.items() if k.startswith("loss/")]
    assert losses and all(math.isfinite(v) for v in losses)


# ---- data.kind: auto ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["sdxl_senseflow", "sdxl_dmd2"])
def test_the_sdxl_presets_detect_the_data_set_kind(preset):
    data = yaml.safe_load((REPO / "configs" / "sdxl" / f"{preset}.yaml").read_text())["data"]
    assert data["kind"] == "auto"


def test_auto_reads_an_lmdb_as_latents_and_a_json_file_as_images(tmp_path):
    """The resolved behaviour on an LMDB path is that of kind lmdb: the same samples."""
    lmdb = lmdb_of(tmp_path / "set.lmdb", (4, 8, 8))
    auto, explicit = open_dataset(lmdb, RES, kind="auto"), open_dataset(lmdb, RES, kind="lmdb")
    assert isinstance(auto, LatentLMDBDataset) and len(auto) == len(explicit) == 3
    for i in range(3):
        a, b = auto[i], explicit[i]
        assert torch.equal(a["latents"], b["latents"]) and a["caption"] == b["caption"]
    assert isinstance(open_dataset(write_json_set(tmp_path / "images", n=2), RES, kind="auto"), ImageCaptionDataset)

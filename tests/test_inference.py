"""Inference scripts and student loading (docs/method.md §16; senseflow/inference.py, senseflow/checkpoint_io.py).

What a user relies on:

* every ``scripts_*/`` script writes one PNG per prompt, named by the prompt's global index;
* both samplers work; an image depends only on (seed, prompt index), not on the batch size or ``--start_idx``;
* the stochastic sampler of the scripts is :func:`senseflow.method.sampling.sample_stochastic` with one generator
  per prompt;
* a student loads from ``{"model": sd}``, a bare state dict, ``.safetensors``, a diffusers folder or a training
  checkpoint (DCP), the FLUX.1-dev guidance embedder being ignored;
* bad input gives exit code 2 and one line on stderr naming the problem, before any weight is loaded.

The tiny teachers act as their own students (the teacher's weights saved as a checkpoint).
"""
from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from senseflow import inference
from senseflow.inference import SPECS, build_parser, load_runtime, main, prepare

REPO = Path(__file__).resolve().parents[1]
GUIDANCE_PREFIX = "time_text_embed.guidance_embedder."

#: spec name → (script, tiny teacher kind, student checkpoint format used by the script test)
SCRIPTS = {
    "flux": ("scripts_flux/test_flux_senseflow.py", "flux", "pth"),
    "sdxl": ("scripts_sdxl/test_sdxl_senseflow.py", "sdxl", "safetensors"),
    "sdxl-dmd2": ("scripts_sdxl/test_sdxl_dmd2.py", "sdxl", "pth"),
    "sd35-medium": ("scripts_sd35/test_senseflow_sd35.py", "sd35-medium", "safetensors"),
    "sd35-large": ("scripts_sd35/test_senseflow_sd35_large.py", "sd35-large", "pth"),
}
SIZE = ["--height", "64", "--width", "64"]


def teacher_state(teacher: Path, kind: str) -> dict[str, torch.Tensor]:
    """The tiny teacher's denoiser weights (FLUX: with its guidance embedder)."""
    from safetensors.torch import load_file

    sub = "unet" if kind == "sdxl" else "transformer"
    return load_file(str(teacher / sub / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def student(tiny_teacher, tmp_path_factory):
    """``student(kind, fmt)`` → a checkpoint of the teacher's own weights: ``pth`` = {"model": sd} with every
    teacher key (FLUX's guidance embedder included), ``safetensors`` = a bare file without the guidance keys."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("students")
    cache: dict[tuple[str, str], Path] = {}

    def get(kind: str, fmt: str = "pth") -> Path:
        if (kind, fmt) not in cache:
            sd = teacher_state(tiny_teacher(kind), kind)
            path = root / f"{kind}.{fmt}"
            if fmt == "pth":
                torch.save({"model": sd}, path)
            else:
                save_file({k: v for k, v in sd.items() if not k.startswith(GUIDANCE_PREFIX)}, str(path))
            cache[(kind, fmt)] = path
        return cache[(kind, fmt)]

    return get


def args_for(spec: str, teacher: Path, checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return [f"--{SPECS[spec].teacher_flag}", str(teacher), "--checkpoint", str(checkpoint), "--output_dir", str(out),
            *SIZE, *extra]


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "RGB"
        return np.asarray(im).astype(np.int16)


def test_shipped_prompts_file_has_23_distinct_prompts():
    prompts = inference.read_prompts(REPO / "senseflow_test_prompts.txt")
    assert len(prompts) == 23 == len(set(prompts))
    assert build_parser(SPECS["flux"]).parse_args(["--flux_ckpt", "x", "--checkpoint", "y"]).num_prompts == 23


# ---- every script, end to end --------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", list(SCRIPTS))
def test_script_writes_one_png_per_prompt_named_by_index(spec, tiny_teacher, student, tmp_path, monkeypatch):
    script, kind, fmt = SCRIPTS[spec]
    out = tmp_path / "out"
    extra = ["--start_idx", "3", "--num_prompts", "2", "--batch_size", "2"]
    if spec == "flux":
        extra += ["--steps", "6"]  # FLUX students run 4-8 steps
    monkeypatch.setattr(sys, "argv", [script, *args_for(spec, tiny_teacher(kind), student(kind, fmt), out, *extra)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPO / script), run_name="__main__")
    assert done.value.code == 0
    assert sorted(p.name for p in out.iterdir()) == ["00003.png", "00004.png"]
    assert read_png(out / "00003.png").shape == (64, 64, 3)


def test_script_runs_as_a_subprocess(tiny_teacher, student, tmp_path):
    """A real ``python scripts_x/...py`` run (euler, batch 2, default 23-prompt file clipped by --num_prompts)."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / SCRIPTS["flux"][0]),
           *args_for("flux", tiny_teacher("flux"), student("flux", "safetensors"), out,
                     "--sampler", "euler", "--num_prompts", "3", "--batch_size", "2")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "00002.png"]
    assert "wrote 3 images" in res.stdout


# ---- samplers and seeds --------------------------------------------------------------------------------------

def run_api(spec: str, teacher: Path, checkpoint: Path, out: Path, *extra: str) -> dict[int, np.ndarray]:
    args = build_parser(SPECS[spec]).parse_args(args_for(spec, teacher, checkpoint, out, *extra))
    plan = prepare(args, SPECS[spec])
    family, net = load_runtime(plan)
    paths = inference.generate(plan, family, net, progress=False)
    return {int(p.stem): read_png(p) for p in paths}


def test_images_depend_only_on_seed_and_prompt_index(tiny_teacher, student, tmp_path):
    teacher, ckpt = tiny_teacher("sd35-medium"), student("sd35-medium")
    one = run_api("sd35-medium", teacher, ckpt, tmp_path / "a", "--num_prompts", "3", "--batch_size", "1")
    again = run_api("sd35-medium", teacher, ckpt, tmp_path / "b", "--num_prompts", "3", "--batch_size", "1")
    batched = run_api("sd35-medium", teacher, ckpt, tmp_path / "c", "--num_prompts", "3", "--batch_size", "3")
    shifted = run_api("sd35-medium", teacher, ckpt, tmp_path / "d", "--start_idx", "1", "--num_prompts", "2",
                      "--batch_size", "2")
    other_seed = run_api("sd35-medium", teacher, ckpt, tmp_path / "e", "--num_prompts", "1", "--seed", "1")
    euler = run_api("sd35-medium", teacher, ckpt, tmp_path / "f", "--num_prompts", "1", "--sampler", "euler")
    for i in range(3):
        assert np.array_equal(one[i], again[i])  # deterministic
        assert np.abs(one[i] - batched[i]).max() <= 1  # batch size: at most a rounding flip
    for i in (1, 2):
        assert np.abs(one[i] - shifted[i]).max() <= 1  # start index
    assert np.abs(one[0] - other_seed[0]).mean() > 1  # the seed matters
    assert np.abs(one[0] - euler[0]).mean() > 1  # the samplers differ


def test_stochastic_sampler_equals_library_sampler_per_prompt(tiny_teacher, student, tmp_path):
    """Per-prompt generators (a list, one per sample) give each prompt what a batch of one with its generator gives."""
    from senseflow.core.anchors import make_anchors
    from senseflow.method.sampling import sample_stochastic

    args = build_parser(SPECS["flux"]).parse_args(args_for("flux", tiny_teacher("flux"), student("flux"), tmp_path))
    plan = prepare(args, SPECS["flux"])
    family, net = load_runtime(plan)
    schedule = family.schedule(64, 64)
    anchors = make_anchors(schedule, 4)
    cond = family.encode_prompts(["a red fox in the snow"])
    shape = (1, *family.latent_shape(64, 64))
    ref = sample_stochastic(family, net, cond, anchors, inference.prompt_generator(0, 5), shape, schedule=schedule)
    gens = [inference.prompt_generator(0, 9), inference.prompt_generator(0, 5)]
    pair = family.encode_prompts(["a blue bird", "a red fox in the snow"])
    noise = inference.initial_latents(shape[1:], gens, "cpu")
    ours = sample_stochastic(family, net, pair, anchors, gens, latents=noise, schedule=schedule)
    torch.testing.assert_close(ours[1:], ref, rtol=0, atol=1e-5)


# ---- student checkpoints -------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_student_loads_from_every_checkpoint_form(tiny_teacher, tmp_path):
    """{"model": sd}, a bare sd with DDP prefixes, .safetensors, a diffusers folder and a training run (its
    checkpoint's student.safetensors) give the same FLUX student; the guidance embedder is ignored. A checkpoint
    folder holding only DCP files is refused: DCP is read by resume alone (tests/test_run_safety.py)."""
    import torch.distributed.checkpoint as dcp
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from senseflow import checkpoint_io as cio

    teacher = tiny_teacher("flux")
    sd = teacher_state(teacher, "flux")
    plain = {k: v for k, v in sd.items() if not k.startswith(GUIDANCE_PREFIX)}
    config = cio.student_config(cio.read_json(teacher / "transformer" / "config.json"), {"guidance_embeds": False})
    torch.save({"model": sd}, tmp_path / "wrapped.pth")
    torch.save({f"module.{k}": v for k, v in plain.items()}, tmp_path / "bare.pt")
    save_file(plain, str(tmp_path / "g.safetensors"))
    folder = tmp_path / "exported"
    FluxTransformer2DModel.from_config(config).save_pretrained(folder / "transformer")
    save_file(plain, str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    ckpts = tmp_path / "run" / "checkpoints"
    dcp.save({"model/generator": plain, "model/fake": {k: torch.zeros_like(v) for k, v in plain.items()}},
             checkpoint_id=str(ckpts / "iter_000010"), no_dist=True)
    (ckpts / "latest").write_text("iter_000010")
    with pytest.raises(ValueError, match="holds no student_ema.safetensors or student.safetensors"):
        cio.resolve_student_source(ckpts)
    save_file(plain, str(ckpts / "iter_000010" / "student.safetensors"))

    for path in ("wrapped.pth", "bare.pt", "g.safetensors", "exported", "run/checkpoints"):
        source = cio.resolve_student_source(tmp_path / path)
        net = cio.load_student(source, config, ignore_prefixes=(GUIDANCE_PREFIX,))
        assert not net.config.guidance_embeds
        got = net.state_dict()
        assert got.keys() == plain.keys(), path
        assert all(torch.equal(got[k], plain[k]) for k in plain), path
    assert cio.resolve_student_source(ckpts).path == ckpts / "iter_000010" / "student.safetensors"


# ---- bad input: exit 2, one line, no traceback, nothing loaded -----------------------------------------------

def _incomplete_teacher(teacher: Path, root: Path) -> Path:
    """A copy of ``teacher`` (symlinks) without vae/."""
    out = root / "incomplete"
    out.mkdir()
    for entry in teacher.iterdir():
        if entry.name != "vae":
            (out / entry.name).symlink_to(entry)
    return out


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# name: (spec, argv builder over c = (sdxl teacher, flux teacher, sdxl student .pth, tmp dir), text of the error)
BAD_INPUTS = {
    "missing teacher": ("sdxl", lambda c: ["--sdxl_ckpt", str(c.tmp / "nope"), "--checkpoint", str(c.ckpt)],
                        "teacher folder not found"),
    "incomplete teacher": ("sdxl", lambda c: ["--sdxl_ckpt", str(_incomplete_teacher(c.sdxl, c.tmp)),
                                              "--checkpoint", str(c.ckpt)],
                           "is incomplete: missing vae/"),
    "missing checkpoint": ("sdxl", lambda c: ["--sdxl_ckpt", str(c.sdxl), "--checkpoint", str(c.tmp / "x.pth")],
                           "student checkpoint not found"),
    "corrupt checkpoint": ("sdxl", lambda c: ["--sdxl_ckpt", str(c.sdxl),
                                              "--checkpoint", str(_write(c.tmp / "junk.pth", b"\x80junk"))],
                           "torch.load(weights_only=True) can read"),
    "checkpoint of another family": ("flux", lambda c: ["--flux_ckpt", str(c.flux), "--checkpoint", str(c.ckpt)],
                                     "missing keys"),
    "empty prompts file": ("sdxl", lambda c: ["--sdxl_ckpt", str(c.sdxl), "--checkpoint", str(c.ckpt),
                                              "--prompts_file", str(_write(c.tmp / "p.txt", b"\n  \n"))], "is empty"),
    "missing prompts file": ("sdxl", lambda c: ["--sdxl_ckpt", str(c.sdxl), "--checkpoint", str(c.ckpt),
                                                "--prompts_file", str(c.tmp / "none.txt")], "prompts file not found"),
    "negative num_prompts": ("sdxl", lambda c: ["--sdxl_ckpt", str(c.sdxl), "--checkpoint", str(c.ckpt),
                                                "--num_prompts", "-3"],
                             "--num_prompts must be at least 1"),
    "start_idx beyond file": ("sdxl", lambda c: ["--sdxl_ckpt", str(c.sdxl), "--checkpoint", str(c.ckpt),
                                                 "--start_idx", "23"],
                              "beyond the end"),
    "unknown sampler": ("sdxl", lambda c: ["--sdxl_ckpt", str(c.sdxl), "--checkpoint", str(c.ckpt), "--sampler", "dpm"],
                        "--sampler 'dpm' is unknown"),
    "flux steps out of range": ("flux", lambda c: ["--flux_ckpt", str(c.flux), "--checkpoint", str(c.ckpt),
                                                   "--steps", "9"],
                                "allowed: 4..8"),
    "sdxl steps": ("sdxl", lambda c: ["--sdxl_ckpt", str(c.sdxl), "--checkpoint", str(c.ckpt), "--steps", "2"],
                   "--steps 2"),
    "size not a multiple": ("sdxl", lambda c: ["--sdxl_ckpt", str(c.sdxl), "--checkpoint", str(c.ckpt),
                                               "--height", "60"],
                            "multiple of 8"),
    "unknown flag": ("sdxl", lambda c: ["--sdxl_ckpt", str(c.sdxl), "--checkpoint", str(c.ckpt), "--cfg", "3"],
                     "unrecognized arguments"),
    "missing required flag": ("sdxl", lambda c: ["--sdxl_ckpt", str(c.sdxl)], "--checkpoint"),
    "config of another class": ("sdxl", lambda c: ["--sdxl_ckpt", str(c.sdxl), "--checkpoint", str(c.ckpt),
                                                   "--unet_config", str(c.flux / "transformer" / "config.json")],
                                "needs a UNet2DConditionModel"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_before_loading_weights(
    case, tiny_teacher, student, tmp_path, capsys, monkeypatch
):
    from types import SimpleNamespace

    spec, build, expected = BAD_INPUTS[case]
    ctx = SimpleNamespace(sdxl=tiny_teacher("sdxl"), flux=tiny_teacher("flux"), ckpt=student("sdxl"), tmp=tmp_path)

    def no_loading(plan):
        raise AssertionError("weights were loaded although the input is bad")

    monkeypatch.setattr(inference, "load_runtime", no_loading)
    out = tmp_path / "out"
    rc = main([*build(ctx), "--output_dir", str(out)], spec=spec, prog="script.py")
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("script.py: error: ") and "Traceback" not in err, err
    assert expected in err, err
    assert not out.exists()


def test_bad_input_in_a_real_process_prints_one_line(tiny_teacher, tmp_path):
    empty = _write(tmp_path / "p.txt", b"")
    cmd = [sys.executable, str(REPO / SCRIPTS["sd35-large"][0]), "--sd35_ckpt", str(tiny_teacher("sd35-large")),
           "--checkpoint", str(tmp_path / "missing.pth"), "--prompts_file", str(empty)]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert res.returncode == 2
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "prompts file" in lines[0] and "is empty" in lines[0]


def test_a_run_folder_or_its_latest_pointer_names_the_newest_student(tmp_path):
    """Users may pass the run folder, checkpoints/, or checkpoints/latest: all resolve to the newest checkpoint."""
    from senseflow.checkpoint_io import resolve_student_source

    ckpt = tmp_path / "run" / "checkpoints" / "iter_000010"
    ckpt.mkdir(parents=True)
    (ckpt / "student.safetensors").write_bytes(b"")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("iter_000010")
    for given in (tmp_path / "run", tmp_path / "run" / "checkpoints", tmp_path / "run" / "checkpoints" / "latest"):
        assert resolve_student_source(given).path == ckpt / "student.safetensors"

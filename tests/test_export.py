"""``senseflow export`` (senseflow/export.py): a student becomes a diffusers folder that the stock pipeline runs.

The promise: ``<Pipeline>.from_pretrained(out)`` called as the exported README says (FLUX: default scheduler,
``num_inference_steps=4``; SD3.5: ``sigmas=[1, .75, .5, .25]``, ``guidance_scale=1``, ``max_sequence_length=77``;
SDXL: ``timesteps=[999, 749, 499, 249]``, ``guidance_scale=0``) produces the latents of our Euler sampler
(docs/method.md §16.3) from the same initial noise. Also: a non-empty ``--out`` is refused, the write is atomic, and
bad input is one line with exit code 2.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from senseflow import inference
from senseflow.export import main_export, pipeline_kwargs
from senseflow.models.families import get_family

#: export family → tiny teacher kind
KINDS = {"flux": "flux", "sd3": "sd35-large", "sdxl": "sdxl"}
SIZE = 64
PROMPTS = ["a red fox in the snow", "a bowl of ramen with an egg"]


@pytest.fixture(scope="module")
def student_pth(tiny_teacher, tmp_path_factory):
    """``student_pth(kind)`` → {"model": the teacher's denoiser weights} (FLUX: with the guidance embedder)."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("export_students")

    def get(kind: str) -> Path:
        path = root / f"{kind}.pth"
        if not path.exists():
            sub = "unet" if kind == "sdxl" else "transformer"
            torch.save(
                {"model": load_file(str(tiny_teacher(kind) / sub / "diffusion_pytorch_model.safetensors"))}, path
            )
        return path

    return get


def run_export(*argv: str, capsys=None) -> tuple[int, str]:
    rc = main_export(list(argv))
    err = capsys.readouterr().err if capsys is not None else ""
    return rc, err


def our_euler_latents(
    family_name: str, teacher: Path, checkpoint: Path, noise: torch.Tensor, tmp: Path
) -> torch.Tensor:
    """Latents of the inference scripts' Euler sampler (student loaded from ``checkpoint`` like the scripts do)."""
    from senseflow.core.anchors import make_anchors
    from senseflow.method.sampling import sample_euler

    spec = inference.get_spec(family_name)
    args = inference.build_parser(spec).parse_args([f"--{spec.teacher_flag}", str(teacher), "--checkpoint",
                                                    str(checkpoint), "--output_dir", str(tmp), "--height", str(SIZE),
                                                    "--width", str(SIZE), "--sampler", "euler"])
    plan = inference.prepare(args, spec)
    family, net = inference.load_runtime(plan)
    schedule = family.schedule(SIZE, SIZE)
    cond = inference._encode(family, PROMPTS, SIZE, SIZE)
    return sample_euler(family, net, cond, make_anchors(schedule, 4), latents=noise, schedule=schedule)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notice inside EulerDiscreteScheduler
@pytest.mark.parametrize("family_name", list(KINDS))
def test_stock_pipeline_on_the_export_reproduces_our_euler_sampler(family_name, tiny_teacher, student_pth, tmp_path):
    import diffusers

    from senseflow.models.families.flux import pack_latents, unpack_latents

    kind = KINDS[family_name]
    teacher, ckpt, out = tiny_teacher(kind), student_pth(kind), tmp_path / "exported"
    assert main_export(["--teacher", str(teacher), "--checkpoint", str(ckpt), "--family", family_name,
                        "--out", str(out)]) == 0

    sub = "unet" if family_name == "sdxl" else "transformer"
    readme = (out / "README.md").read_text()
    kwargs = pipeline_kwargs(family_name, 4)
    pipeline = get_family(family_name).pipeline_class_name
    assert f"{pipeline}.from_pretrained" in readme
    assert all(f"{k}={v!r}" in readme for k, v in kwargs.items())
    assert json.loads((out / "senseflow_export.json").read_text())["pipeline_kwargs"] == json.loads(json.dumps(kwargs))
    if family_name == "flux":
        assert json.loads((out / sub / "config.json").read_text())["guidance_embeds"] is False

    c, h, w = 16 if family_name != "sdxl" else 4, SIZE // 8, SIZE // 8
    noise = torch.randn(len(PROMPTS), c, h, w, generator=torch.Generator().manual_seed(0))
    ours = our_euler_latents(family_name, teacher, ckpt, noise, tmp_path / "imgs")

    pipe = getattr(diffusers, pipeline).from_pretrained(str(out), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    latents = pack_latents(noise) if family_name == "flux" else noise
    theirs = pipe(PROMPTS, height=SIZE, width=SIZE, latents=latents, output_type="latent", **kwargs).images
    if family_name == "flux":
        theirs = unpack_latents(theirs, h, w)
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() < 1e-4


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_pipeline_arguments_give_the_training_anchors(tiny_teacher, tmp_path):
    """The exported schedulers with the README's arguments step through our anchors (docs/method.md §4.1, §16.3)."""
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sd3 = FlowMatchEulerDiscreteScheduler.from_pretrained(str(tiny_teacher("sd35-large")), subfolder="scheduler")
    sd3.set_timesteps(sigmas=pipeline_kwargs("sd3", 4)["sigmas"])
    torch.testing.assert_close(sd3.sigmas, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))

    flux = FlowMatchEulerDiscreteScheduler.from_pretrained(str(tiny_teacher("flux")), subfolder="scheduler")
    c = flux.config
    mu = calculate_shift(4096, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)  # 1024²: 1.15
    flux.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=mu)  # what FluxPipeline(num_inference_steps=4) does
    torch.testing.assert_close(flux.sigmas, torch.tensor([1.0, 0.90453, 0.75951, 0.51284, 0.0]), atol=1e-5, rtol=0)

    out = tmp_path / "sdxl"
    assert main_export(["--teacher", str(tiny_teacher("sdxl")), "--checkpoint", str(tiny_teacher("sdxl")),
                        "--family", "sdxl", "--out", str(out)]) == 0
    euler = EulerDiscreteScheduler.from_pretrained(str(out), subfolder="scheduler")
    euler.set_timesteps(timesteps=pipeline_kwargs("sdxl", 4)["timesteps"])
    assert euler.timesteps.tolist() == [999, 749, 499, 249]
    # the first UNet input is ε itself: init_noise_sigma·ε scaled by 1/√(σ₉₉₉² + 1)
    assert euler.init_noise_sigma == pytest.approx(float((euler.sigmas[0] ** 2 + 1) ** 0.5))


def test_export_links_teacher_files_or_copies_them(tiny_teacher, student_pth, tmp_path):
    teacher = tiny_teacher("flux")
    weights = Path("text_encoder_2") / "model.safetensors"
    linked, copied = tmp_path / "linked", tmp_path / "copied"
    assert main_export(["--teacher", str(teacher), "--checkpoint", str(student_pth("flux")), "--family", "flux",
                        "--out", str(linked)]) == 0
    assert main_export(["--teacher", str(teacher), "--checkpoint", str(student_pth("flux")), "--family", "flux",
                        "--out", str(copied), "--copy"]) == 0
    for comp in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler", "model_index.json"):
        assert (linked / comp).exists() and (copied / comp).exists()
    assert (linked / weights).read_bytes() == (teacher / weights).read_bytes() == (copied / weights).read_bytes()
    assert not os.path.samefile(copied / weights, teacher / weights)
    assert (teacher / "transformer" / "config.json").read_text() != (linked / "transformer" / "config.json").read_text()
    assert json.loads((teacher / "transformer" / "config.json").read_text())["guidance_embeds"] is True  # untouched


def test_non_empty_out_is_refused_unless_overwrite(tiny_teacher, student_pth, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    argv = ["--teacher", str(tiny_teacher("sd35-large")), "--checkpoint", str(student_pth("sd35-large")),
            "--family", "sd3", "--out", str(out)]
    rc, err = run_export(*argv, capsys=capsys)
    assert rc == 2 and err.count("\n") == 1 and "not empty" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "precious"
    rc, _ = run_export(*argv, "--overwrite", capsys=capsys)
    assert rc == 0
    assert not (out / "keep.txt").exists() and (out / "transformer" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or moved-aside folder left


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_export_from_a_training_checkpoint(tiny_teacher, tmp_path, capsys):
    """A training checkpoint folder exports the student.safetensors the trainer wrote beside its DCP files, never
    what the DCP files hold; a folder with DCP files only is refused with one line (exit 2)."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file, save_file

    teacher = tiny_teacher("sd35-large")
    capsys.readouterr()  # building the teacher talks
    weights = load_file(str(teacher / "transformer" / "diffusion_pytorch_model.safetensors"))
    generator = {k: v + 1.0 for k, v in weights.items()}
    ckpt = tmp_path / "run" / "checkpoints" / "iter_000300"
    dcp.save({"model/generator": weights, "model/fake": weights}, checkpoint_id=str(ckpt), no_dist=True)
    argv = ["--teacher", str(teacher), "--checkpoint", str(ckpt), "--family", "sd3", "--out", str(tmp_path / "out")]
    rc, err = run_export(*argv, capsys=capsys)
    assert rc == 2 and err.count("\n") == 1 and "holds no student_ema.safetensors or student.safetensors" in err
    assert not (tmp_path / "out").exists()

    save_file(generator, str(ckpt / "student.safetensors"))
    assert main_export(argv) == 0
    exported = load_file(str(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert exported.keys() == generator.keys()
    assert all(torch.equal(exported[k], generator[k]) for k in generator)


BAD_EXPORTS = {
    # name: (argv builder over (flux teacher, sdxl teacher, flux .pth, tmp), text of the error)
    "unknown family": (lambda f, s, c, d: ["--teacher", str(f), "--checkpoint", str(c), "--family", "sd4"],
                       "--family 'sd4' is unknown"),
    "family does not match the teacher": (lambda f, s, c, d: ["--teacher", str(s), "--checkpoint", str(c),
                                                              "--family", "flux"],
                                          "holds a StableDiffusionXLPipeline (sdxl); "
                                          "a flux teacher is a FluxPipeline folder"),
    "checkpoint of another family": (lambda f, s, c, d: ["--teacher", str(s), "--checkpoint", str(c),
                                                         "--family", "sdxl"],
                                     "missing keys"),
    "missing teacher": (lambda f, s, c, d: ["--teacher", str(d / "none"), "--checkpoint", str(c), "--family", "flux"],
                        "teacher folder not found"),
    "missing checkpoint": (lambda f, s, c, d: ["--teacher", str(f), "--checkpoint", str(d / "none.pth"),
                                               "--family", "flux"],
                           "student checkpoint not found"),
    "missing --out": (lambda f, s, c, d: ["--teacher", str(f), "--checkpoint", str(c), "--family", "flux"], "--out"),
    "bad dtype": (lambda f, s, c, d: ["--teacher", str(f), "--checkpoint", str(c),
                                      "--family", "flux", "--dtype", "int8"],
                  "--dtype 'int8'"),
}


@pytest.mark.parametrize("case", list(BAD_EXPORTS))
def test_bad_export_input_exits_2_with_one_line(case, tiny_teacher, student_pth, tmp_path, capsys):
    build, expected = BAD_EXPORTS[case]
    argv = build(tiny_teacher("flux"), tiny_teacher("sdxl"), student_pth("flux"), tmp_path)
    if "--out" not in argv and case != "missing --out":
        argv += ["--out", str(tmp_path / "out")]
    rc, err = run_export(*argv, capsys=capsys)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("senseflow export: error: ") and "Traceback" not in err, err
    assert expected in err, err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind

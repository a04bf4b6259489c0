"""A fourth teacher family, registered from this test alone (docs/adding_a_teacher.md): SD3 whose scheduler shifts by
2 instead of 3, under the new name ``sd3s2``. Its four files are written here: the family module (the class below,
given to ``register_family`` instead of a module in senseflow/models/families/), a preset and a tiny config (YAML in
a temporary folder) and a trainer shim (a DistillationTrainer subclass). Nothing in senseflow/ names it, yet it
trains, samples, exports and plans memory.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import MappingProxyType

import pytest
import torch

from senseflow.models.families.sd3 import SD3Family

REPO = Path(__file__).resolve().parents[1]
NAME = "sd3s2"
SIZE = 64
PROMPTS = ["a red circle on a white background", "a blue square"]


# ---- file 1 of 4: the family module -------------------------------------------------------------------------
class SD3Shift2Family(SD3Family):
    """SD3 with a scheduler shift of 2: every other fact (components, conditioning, export call) is SD3's."""

    name = NAME
    tiny_teachers = MappingProxyType({
        NAME: dataclasses.replace(SD3Family.tiny_teachers["sd35-large"], scheduler=dict(num_train_timesteps=1000,
                                                                                          shift=2.0)),
    })
    export_readme_note = "`sigmas` are the *unshifted* grid; the scheduler's shift 2 turns them into the anchors."


# ---- file 2 of 4: the preset; file 3 of 4: the tiny config --------------------------------------------------
PRESET = f"""defaults: [{REPO / 'configs' / 'SD35' / 'sd35_senseflow.yaml'}]
experiment:
  name: sd3s2_senseflow
teacher:
  family: {NAME}
"""
TINY = """defaults: [{preset}, {common}]
experiment:
  name: tiny_sd3s2_senseflow
teacher:
  path: {assets}/teacher
discriminator:
  dino_path: {assets}/backbones/dinov2
  clip_path: {assets}/backbones/clip_text
data:
  path: {assets}/data/dataset.json
method:
  gd: 2
train:
  iterations: 2                    # one generator step, two fake-score steps
"""


@pytest.fixture(scope="module")
def fourth(tmp_path_factory, one_torch_thread):
    """Register the family, build its tiny teacher and the shared tiny assets, write its preset and tiny config."""
    from senseflow.models.families import register_family, unregister_family
    from senseflow.tiny import build_tiny_dataset, build_tiny_discriminator_backbones, build_tiny_teacher

    register_family(SD3Shift2Family)
    try:
        root = tmp_path_factory.mktemp("fourth")
        build_tiny_teacher(NAME, root / "teacher")
        build_tiny_discriminator_backbones(root / "backbones")
        build_tiny_dataset(root / "data")
        preset = root / "sd3s2_senseflow.yaml"
        preset.write_text(PRESET)
        tiny = root / "tiny_sd3s2_senseflow.yaml"
        tiny.write_text(TINY.format(preset=preset, common=REPO / "configs" / "tiny" / "_tiny_common.yaml", assets=root))
        yield root, tiny
    finally:
        unregister_family(NAME)


@pytest.fixture(scope="module")
def trained(fourth):
    """Two iterations of the shared trainer on the tiny teacher; the run folder."""
    from senseflow.config import load_config
    from senseflow.trainer.base import DistillationTrainer

    class SD3Shift2SenseFlowTrainer(DistillationTrainer):  # file 4 of 4: the trainer shim
        family_name = NAME
        method_name = "senseflow"

    root, tiny = fourth
    SD3Shift2SenseFlowTrainer(load_config(tiny), root / "run").run()
    return root / "run"


def test_the_registry_and_the_config_know_the_new_family(fourth):
    from senseflow.config import ConfigError, load_config
    from senseflow.eval.config import load_eval_config
    from senseflow.models.families import build_family, family_names, get_family
    from senseflow.tiny import tiny_kinds

    root, tiny = fourth
    assert family_names()[-1] == NAME and get_family(NAME) is SD3Shift2Family
    assert tiny_kinds()[NAME] == NAME
    family = build_family(NAME, path=root / "teacher")
    assert family.schedule(SIZE, SIZE).shift == 2.0
    assert load_config(tiny).teacher.family == NAME
    with pytest.raises(ConfigError, match="expected 'cfg' for teacher.family=sd3s2"):
        load_config(tiny, ["method.dmd.guidance.kind=embedding"])
    assert load_eval_config(None, ["generation.family=sd3s2", "prompts.path=p.txt", "output_dir=o"]).generation \
        .family == NAME


def test_it_trains_and_samples(fourth, trained, tmp_path):
    from senseflow.inference import main

    root, _ = fourth
    assert (trained / "checkpoints" / "latest").is_file()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    argv = ["--sd35_ckpt", str(root / "teacher"), "--checkpoint", str(trained), "--output_dir", str(tmp_path / "out"),
            "--prompts_file", str(prompts), "--height", str(SIZE), "--width", str(SIZE), "--device", "cpu"]
    assert main(argv, spec=NAME, prog="infer") == 0  # the family's default spec and SD3's flags
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000.png", "00001.png"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_its_export_runs_our_euler_sampler_in_the_stock_pipeline(fourth, trained, tmp_path):
    """The exported folder (student trained above, teacher's shift-2 scheduler) reproduces the Euler sampler of the
    inference path in the stock StableDiffusion3Pipeline."""
    import diffusers
    from safetensors.torch import load_file

    from senseflow import inference
    from senseflow.core.anchors import make_anchors
    from senseflow.export import main_export, pipeline_kwargs
    from senseflow.method.sampling import sample_euler

    root, _ = fourth
    teacher, out = root / "teacher", tmp_path / "exported"
    assert main_export(["--teacher", str(teacher), "--checkpoint", str(trained), "--family", NAME,
                        "--out", str(out)]) == 0
    trained_weights = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    teacher_weights = load_file(str(teacher / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(trained_weights[k], teacher_weights[k]) for k in teacher_weights)  # G was trained

    spec = inference.get_spec(NAME)
    args = inference.build_parser(spec).parse_args(["--sd35_ckpt", str(teacher), "--checkpoint", str(out),
                                                    "--height", str(SIZE), "--width", str(SIZE)])
    family, net = inference.load_runtime(inference.prepare(args, spec))
    schedule = family.schedule(SIZE, SIZE)
    noise = torch.randn(len(PROMPTS), 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    ours = sample_euler(family, net, inference._encode(family, PROMPTS, SIZE, SIZE), make_anchors(schedule, 4),
                        latents=noise, schedule=schedule)

    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(str(out), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPTS, height=SIZE, width=SIZE, latents=noise, output_type="latent",
                  **pipeline_kwargs(NAME, 4)).images
    assert (theirs - ours).abs().max().item() < 1e-4


def test_it_plans_memory_like_sd3_on_the_same_networks(fourth, capsys):
    """``senseflow memory`` on the tiny config: the same networks as an sd3 teacher, so the same bytes."""
    from senseflow.memory import main_memory

    _, tiny = fourth
    plans = {}
    for family in (NAME, "sd3"):
        assert main_memory(["--config", str(tiny), "--gpus", "2", "--json", f"teacher.family={family}"]) == 0
        plans[family] = json.loads(capsys.readouterr().out)
    assert plans[NAME].pop("family") == NAME and plans["sd3"].pop("family") == "sd3"
    assert plans[NAME] == plans["sd3"]
    assert "T5-XXL encoder" in json.dumps(plans[NAME])


def test_a_module_in_the_families_package_is_found_without_registering(tmp_path, monkeypatch):
    """Adding a family is adding its module: the registry finds a module of senseflow/models/families/ (here a
    folder added to the package's path) that defines a TeacherFamily subclass with its own name."""
    import sys

    import senseflow.models.families as families

    (tmp_path / "sd3dropin.py").write_text(
        "from senseflow.models.families.sd3 import SD3Family\n\n\n"
        "class DropInFamily(SD3Family):\n    name = 'sd3dropin'\n    aliases = ('dropin',)\n")
    monkeypatch.setattr(families, "__path__", [*families.__path__, str(tmp_path)])
    monkeypatch.setattr(families, "_loaded", None)
    assert families.family_names()[:4] == ("sdxl", "sd3", "flux", "sd3dropin")  # after the shipped ones
    assert families.get_family("DropIn").__name__ == "DropInFamily"
    assert families.get_family("sd35").__name__ == "SD3Family"  # aliases are not inherited
    sys.modules.pop("senseflow.models.families.sd3dropin")  # monkeypatch restores __path__ and the registry

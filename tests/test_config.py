"""The config system: presets equal docs/method.md; bad configs fail early with one-line messages naming key, file."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from senseflow.config import (
    ConfigError,
    SenseFlowConfig,
    load_config,
    main_config_check,
    resolved_yaml,
    save_resolved,
    schema_keys,
    validate_paths,
)
from senseflow.core.schedules import FlowSchedule, TimestepSampler

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = {
    "sdxl": CONFIGS / "sdxl" / "sdxl_senseflow.yaml",
    "sdxl_dmd2": CONFIGS / "sdxl" / "sdxl_dmd2.yaml",
    "sd35m": CONFIGS / "SD35" / "sd35_senseflow.yaml",
    "sd35l": CONFIGS / "SD35" / "sd35_large_senseflow.yaml",
    "flux": CONFIGS / "FLUX" / "flux_senseflow.yaml",
}
SD35M = PRESETS["sd35m"]


def get(cfg: SenseFlowConfig, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def raises_config_error(*needles: str):
    """Context manager: a ConfigError whose one-line message contains every needle."""

    class _Check:
        def __enter__(self):
            self._ctx = pytest.raises(ConfigError)
            self.info = self._ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self._ctx.__exit__(*exc)
            message = str(self.info.value)
            assert "\n" not in message, message
            for needle in needles:
                assert needle in message, f"{needle!r} not in {message!r}"
            return handled

    return _Check()


# ---------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_loads_and_validates(name):
    cfg = load_config(PRESETS[name])
    assert isinstance(cfg, SenseFlowConfig)
    assert cfg.schedule.num_steps() == 4


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_spells_out_every_schema_key(name):
    """A preset is documentation: each value is written (and commented) in the YAML, none left to the schema."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(PRESETS[name]))

    def leaves(node, prefix=""):
        for k, v in node.items():
            key = f"{prefix}{k}"
            yield from (leaves(v, key + ".") if isinstance(v, dict) else [key])

    assert sorted(leaves(raw)) == sorted(schema_keys())


# docs/method.md values per preset (§2, §3, §5-§10, §11.1, §12, §14.3).
COMMON = {
    "experiment.seed": 71801,
    "teacher.resolution": 1024,
    "teacher.dtype": "bfloat16",
    "teacher.clip_max_length": 77,
    "schedule.anchor_indices": [999, 749, 499, 249],
    "method.dmd.weight": 1.0,
    "method.isg.huber_c": 1e-3,
    "method.isg.loss": "pseudo_huber",
    "method.isg.sdxl_mode": "intended",
    "method.isg.last_segment_end": "zero",
    "method.gan.time_weight": "reference",   # the released checkpoints' weights (docs/method.md decision 3)
    "discriminator.hooks": [2, 5, 8, 10, 14, 19, 23],
    "discriminator.cmap_dim": 64,
    "discriminator.downsample": 3,
    "discriminator.diffaug": ["color", "translation", "cutout"],
    "discriminator.translation_ratio": 0.125,
    "discriminator.cutout_ratio": 0.2,
    "optimizer.betas": [0.9, 0.999],
    "optimizer.eps": 1e-8,
    "optimizer.weight_decay": 0.0,
    "optimizer.warmup_steps": 500,
    "optimizer.decay": "none",
    "train.save_interval": 3000,
    "train.grad_accum": 1,
    "data.resolution": 1024,
}
SENSEFLOW = {
    "method.name": "senseflow",
    "method.backward_simulation_prob": 0.5,
    "method.isg.enabled": True,
    "method.gan.enabled": True,
    "method.dmd2_cls.enabled": False,
    "optimizer.lr_generator": 1e-6,
    "optimizer.lr_fake": 1e-6,
    "optimizer.lr_discriminator": 1e-6,
    "optimizer.lr_start": 1e-6,
    "optimizer.grad_clip": 1.0,
    "train.batch_size": 1,
}
SD3_TIMESTEPS = {
    "schedule.anchors": None,
    "method.dmd.timestep.kind": "uniform",
    "method.dmd.timestep.low": 20,
    "method.dmd.timestep.high": 980,
    "method.dmd.timestep.apply_shift": True,
    "method.fake.timestep.kind": "logit_normal",
    "method.fake.timestep.mean": 0.0,
    "method.fake.timestep.std": 1.0,
    "method.fake.timestep.apply_shift": True,
    "method.isg.margin": 50,
    "method.isg.margin_space": "index",
    "teacher.family": "sd3",
    "teacher.t5_max_length": 77,
    "teacher.text_encoder_dtype": "float32",
    "method.gan.weight": 0.1,
    "train.log_interval": 15,
}
SDXL_COMMON = {
    "teacher.family": "sdxl",
    "schedule.anchors": None,
    "method.gd": 5,
    "method.ida.enabled": False,
    "method.dmd.timestep.kind": "uniform",
    "method.dmd.timestep.low": 20,
    "method.dmd.timestep.high": 980,
    "method.dmd.guidance.kind": "cfg",
    "method.dmd.guidance.min": 8.0,
    "method.dmd.guidance.max": 8.0,
    "method.fake.timestep.kind": "uniform",
    "method.fake.timestep.low": 0,
    "method.fake.timestep.high": 999,
    "optimizer.name": "adamw",
    "train.log_interval": 25,
    "data.kind": "auto",
}
EXPECTED = {
    "sdxl": {
        **COMMON, **SENSEFLOW, **SDXL_COMMON,
        "method.isg.weight": 0.2,
        "method.isg.guidance.kind": "cfg",
        "method.isg.guidance.min": 3.0,
        "method.isg.guidance.max": 15.0,
        "method.isg.margin": 20,
        "method.gan.weight": 0.5,
    },
    "sdxl_dmd2": {
        **COMMON, **SDXL_COMMON,
        "method.name": "dmd2",
        "method.backward_simulation_prob": 1.0,
        "method.isg.enabled": False,
        "method.gan.enabled": False,
        "method.dmd2_cls.enabled": True,
        "method.dmd2_cls.gen_weight": 5e-3,
        "method.dmd2_cls.guidance_weight": 1e-2,
        "method.dmd2_cls.timestep.kind": "uniform",
        "method.dmd2_cls.timestep.low": 0,
        "method.dmd2_cls.timestep.high": 999,
        "optimizer.lr_generator": 5e-7,
        "optimizer.lr_fake": 5e-7,
        "optimizer.lr_start": 5e-7,
        "optimizer.grad_clip": 10.0,
        "train.batch_size": 2,
    },
    "sd35m": {
        **COMMON, **SENSEFLOW, **SD3_TIMESTEPS,
        "method.gd": 10,
        "method.ida.enabled": True,
        "method.ida.lam": 0.98,
        "method.isg.weight": 0.5,
        "method.isg.guidance.kind": "cfg",
        "method.isg.guidance.min": 2.0,
        "method.isg.guidance.max": 4.0,
        "method.dmd.guidance.kind": "cfg",
        "method.dmd.guidance.min": 2.0,
        "method.dmd.guidance.max": 8.0,
        "optimizer.name": "adamw",
    },
    "sd35l": {
        **COMMON, **SENSEFLOW, **SD3_TIMESTEPS,
        "method.gd": 5,
        "method.ida.enabled": True,
        "method.ida.lam": 0.97,
        "method.isg.weight": 1.0,
        "method.isg.guidance.kind": "cfg",
        "method.isg.guidance.min": 5.0,
        "method.isg.guidance.max": 5.0,
        "method.dmd.guidance.kind": "cfg",
        "method.dmd.guidance.min": 3.0,
        "method.dmd.guidance.max": 10.0,
        "optimizer.name": "adamw8bit",
    },
    "flux": {
        **COMMON, **SENSEFLOW,
        "teacher.family": "flux",
        "teacher.t5_max_length": 512,
        "teacher.text_encoder_dtype": "bfloat16",
        "schedule.anchors": [1.0, 0.904, 0.759, 0.512],
        "method.gd": 5,
        "method.ida.enabled": True,
        "method.ida.lam": 0.97,
        "method.isg.weight": 1.0,
        "method.isg.guidance.kind": "embedding",
        "method.isg.guidance.min": 1.0,
        "method.isg.guidance.max": 8.0,
        "method.isg.margin": 20,
        "method.isg.margin_space": "timestep",
        "method.dmd.guidance.kind": "embedding",
        "method.dmd.guidance.min": 1.0,
        "method.dmd.guidance.max": 8.0,
        "method.dmd.timestep.kind": "logit_normal",
        "method.dmd.timestep.mean": 0.0,
        "method.dmd.timestep.std": 1.0,
        "method.dmd.timestep.apply_shift": False,
        "method.fake.timestep.kind": "logit_normal",
        "method.fake.timestep.apply_shift": False,
        "method.gan.weight": 2.0,
        "optimizer.name": "adamw8bit",
        "train.log_interval": 15,
    },
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_values_equal_method_md(name):
    cfg = load_config(PRESETS[name])
    wrong = {k: (get(cfg, k), v) for k, v in EXPECTED[name].items() if get(cfg, k) != v}
    assert not wrong, f"{name}: key -> (preset, docs/method.md): {wrong}"


def test_sd35_preset_sections_build_the_reference_schedule_and_samplers():
    """The timestep sections feed TimestepSampler directly; SD3.5 anchors are s₃ of the index grid (§4.1)."""
    cfg = load_config(SD35M)
    sched = FlowSchedule(timestep_scale=1000, shift=3.0)
    sigmas = sched.anchors(indices=cfg.schedule.anchor_indices, explicit=cfg.schedule.anchors)
    assert sigmas.tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5], abs=1e-6)
    sampler = TimestepSampler(**dataclasses.asdict(cfg.method.dmd.timestep))
    assert (sampler.low, sampler.high, sampler.kind) == (20, 980, "uniform")


# ---------------------------------------------------------------------------------------------------------------
# Overrides, inheritance, saving
# ---------------------------------------------------------------------------------------------------------------


def test_overrides_set_values_with_yaml_typing():
    cfg = load_config(SD35M, ["method.gd=7", "train.iterations=20", "discriminator.hooks=[1,3]",
                              "schedule.anchors=[1.0,0.5]", "teacher.student_path=null", "method.isg.enabled=false"])
    assert cfg.method.gd == 7 and cfg.train.iterations == 20
    assert cfg.discriminator.hooks == [1, 3]
    assert cfg.schedule.anchors == [1.0, 0.5] and cfg.schedule.num_steps() == 2
    assert cfg.method.isg.enabled is False


def test_later_override_wins():
    assert load_config(SD35M, ["method.gd=3", "method.gd=4"]).method.gd == 4


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_inherit_from_a_relative_path_base_first(tmp_path):
    base = write(tmp_path / "base" / "base.yaml", f"defaults: {SD35M}\nmethod:\n  gd: 3\ntrain:\n  iterations: 7\n")
    child = write(tmp_path / "tiny" / "child.yaml", "defaults: ../base/base.yaml\nmethod:\n  gd: 2\ndata:\n")
    cfg = load_config(child)
    assert cfg.method.gd == 2  # child wins over base
    assert cfg.train.iterations == 7  # from base
    assert cfg.method.ida.lam == 0.98  # from the preset at the root of the chain
    assert load_config(base, ["method.gd=9"]).method.gd == 9  # command line wins over files


def test_defaults_may_be_a_list_merged_in_order(tmp_path):
    write(tmp_path / "a.yaml", "method:\n  gd: 3\n  ida:\n    lam: 0.5\n")
    write(tmp_path / "b.yaml", "method:\n  gd: 4\n")
    child = write(tmp_path / "c.yaml", f"defaults: [{SD35M}, a.yaml, b.yaml]\n")
    cfg = load_config(child)
    assert (cfg.method.gd, cfg.method.ida.lam) == (4, 0.5)


def test_defaults_cycle_and_missing_base_are_errors(tmp_path):
    write(tmp_path / "a.yaml", "defaults: b.yaml\n")
    write(tmp_path / "b.yaml", "defaults: a.yaml\n")
    with raises_config_error("cycle", "a.yaml", "b.yaml"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", "defaults: nowhere.yaml\n")
    with raises_config_error("c.yaml", "nowhere.yaml", "not found"):
        load_config(tmp_path / "c.yaml")


def test_save_resolved_round_trips(tmp_path):
    cfg = load_config(PRESETS["flux"], ["method.gd=3", "train.preview_prompts=['a cat', 'b: dog']"])
    target = save_resolved(cfg, tmp_path / "run")
    assert target == tmp_path / "run" / "config.yaml" and target.is_file()
    assert "defaults" not in target.read_text()
    assert load_config(target) == cfg
    assert resolved_yaml(load_config(target)) == resolved_yaml(cfg)


# ---------------------------------------------------------------------------------------------------------------
# Bad configs: one-line ConfigError naming the key (and the file or override)
# ---------------------------------------------------------------------------------------------------------------


def child_of_preset(tmp_path: Path, body: str) -> Path:
    return write(tmp_path / "bad.yaml", f"defaults: {SD35M}\n{body}")


def test_unknown_yaml_key_names_file_and_closest_key(tmp_path):
    bad = child_of_preset(tmp_path, "method:\n  isg:\n    wieght: 0.3\n")
    with raises_config_error("bad.yaml", "method.isg.wieght", "did you mean 'method.isg.weight'"):
        load_config(bad)


def test_unknown_section_and_misplaced_key(tmp_path):
    with raises_config_error("bad.yaml", "'methods'", "did you mean 'method'"):
        load_config(child_of_preset(tmp_path, "methods:\n  gd: 3\n"))
    with raises_config_error("bad.yaml", "'train.gd'", "did you mean 'method.gd'"):
        load_config(child_of_preset(tmp_path, "train:\n  gd: 3\n"))


def test_typo_in_command_line_override():
    with raises_config_error("command-line override 'method.gdd=10'", "did you mean 'method.gd'"):
        load_config(SD35M, ["method.gdd=10"])
    with raises_config_error("expected key=value"):
        load_config(SD35M, ["method.gd"])


def test_wrong_type_names_key_and_expected_type(tmp_path):
    with raises_config_error("bad.yaml", "method.gd", "expected an integer"):
        load_config(child_of_preset(tmp_path, "method:\n  gd: five\n"))
    with raises_config_error("method.isg.weight", "expected a number"):
        load_config(SD35M, ["method.isg.weight=heavy"])
    with raises_config_error("bad.yaml", "method.dmd", "expected a section"):
        load_config(child_of_preset(tmp_path, "method:\n  dmd: 3\n"))


@pytest.mark.parametrize(
    "override, needles",
    [
        ("method.gd=0", ["method.gd = 0", ">= 1"]),
        ("method.ida.lam=1.5", ["method.ida.lam = 1.5", "[0, 1]"]),
        ("method.isg.weight=-0.1", ["method.isg.weight", ">= 0"]),
        ("method.gan.weight=-2", ["method.gan.weight", ">= 0"]),
        ("method.dmd.weight=-1", ["method.dmd.weight", ">= 0"]),
        ("optimizer.lr_generator=-1e-6", ["optimizer.lr_generator", ">= 0"]),
        ("method.backward_simulation_prob=2", ["method.backward_simulation_prob", "[0, 1]"]),
        ("teacher.family=sdx", ["teacher.family", "one of: sdxl, sd3, flux", "did you mean 'sdxl'"]),
        ("method.isg.loss=huber", ["method.isg.loss", "pseudo_huber"]),
        ("optimizer.name=sgd", ["optimizer.name", "adamw, adamw8bit"]),
        ("method.dmd.guidance.max=1", ["method.dmd.guidance.max", ">= method.dmd.guidance.min"]),
        ("method.dmd.guidance.kind=embedding", ["method.dmd.guidance.kind", "guidance embedding"]),
        ("schedule.anchor_indices=[249,499]", ["schedule.anchor_indices", "strictly decreasing"]),
        ("method.isg.margin=200", ["method.isg.margin", "segment 0"]),
        ("data.resolution=512", ["data.resolution", "teacher.resolution"]),
        ("method.dmd2_cls.enabled=true", ["method.dmd2_cls.enabled", "SDXL"]),
        ("optimizer.decay=linear", ["optimizer.decay", "none, cosine"]),
        ("optimizer.decay=cosine", ["optimizer.decay", "optimizer.decay_steps > 0"]),
        ("optimizer.lr_end_factor=2", ["optimizer.lr_end_factor", "[0, 1]"]),
    ],
)
def test_out_of_range_values_name_key_origin_and_expectation(override, needles):
    with raises_config_error(*needles, f"command-line override '{override}'"):
        load_config(SD35M, [override])


def test_deleted_keys_are_unknown():
    """train.preview_steps was never read (previews sample with the anchors): it is no key of the schema."""
    assert "train.preview_steps" not in schema_keys()
    with raises_config_error("unknown key 'train.preview_steps'", "command-line override"):
        load_config(SD35M, ["train.preview_steps=4"])


@pytest.mark.parametrize("section", ["dmd", "isg"])
def test_guidance_kind_must_be_one_the_teacher_family_can_run(section):
    """method.*.guidance.kind states how the teacher guides: FLUX with its guidance embedding (FLUX.1-dev) or with
    two-call CFG (a de-distilled FLUX without the embedding), SDXL and SD3.5 only with CFG."""
    key = f"method.{section}.guidance.kind"
    assert getattr(load_config(PRESETS["flux"], [f"{key}=cfg"]).method, section).guidance.kind == "cfg"
    for name in ("sd35m", "sdxl"):
        with raises_config_error(f"{key} = 'embedding'", "expected 'cfg'", "only FLUX teachers"):
            load_config(PRESETS[name], [f"{key}=embedding"])


def test_family_guidance_kind_matches_the_familys_guided_prediction():
    """Each family's guidance_kind (what validation demands of method.*.guidance.kind) agrees with its
    guided_predict: CFG is the shared DiffusersFamily implementation (cfg_predict), FLUX overrides it with the
    guidance embedding."""
    from senseflow.models.families import FAMILY_NAMES, get_family
    from senseflow.models.families.loading import DiffusersFamily

    kinds = {name: get_family(name).guidance_kind for name in FAMILY_NAMES}
    assert kinds == {"sdxl": "cfg", "sd3": "cfg", "flux": "embedding"}
    for name, kind in kinds.items():
        cls = get_family(name)
        assert cls.name == name
        uses_cfg = cls.guided_predict is DiffusersFamily.guided_predict
        assert uses_cfg == (kind == "cfg"), name


def test_sdxl_mode_reference_is_for_sdxl_teachers_only():
    assert load_config(PRESETS["sdxl"], ["method.isg.sdxl_mode=reference"]).method.isg.sdxl_mode == "reference"
    for name in ("sd35m", "flux"):
        with raises_config_error("method.isg.sdxl_mode = 'reference'", "'intended' for teacher.family="):
            load_config(PRESETS[name], ["method.isg.sdxl_mode=reference"])


def test_range_error_names_the_file_that_set_the_value(tmp_path):
    with raises_config_error("method.gd = 0", "bad.yaml", ">= 1"):
        load_config(child_of_preset(tmp_path, "method:\n  gd: 0\n"))


def test_missing_required_key(tmp_path):
    bare = write(tmp_path / "bare.yaml", "teacher:\n  family: sd3\n")
    with raises_config_error("teacher.path is required", "bare.yaml"):
        load_config(bare, ["data.path=/x"])


def test_unparseable_yaml_and_missing_file(tmp_path):
    with raises_config_error("broken.yaml", "cannot parse YAML"):
        load_config(write(tmp_path / "broken.yaml", "method: [1\n"))
    with raises_config_error("absent.yaml", "not found"):
        load_config(tmp_path / "absent.yaml")


# ---------------------------------------------------------------------------------------------------------------
# Paths: checked before any model loads
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def real_paths(tmp_path) -> list[str]:
    teacher = tmp_path / "teacher"
    write(teacher / "model_index.json", json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    write(teacher / "vae" / "config.json", "{}")
    dataset = write(tmp_path / "data.json", json.dumps({"keys": [], "image_paths": [], "prompts": []}))
    dino = write(tmp_path / "dino" / "config.json", "{}").parent
    clip = write(tmp_path / "clip" / "config.json", "{}").parent
    return [f"teacher.path={teacher}", f"data.path={dataset}", f"discriminator.dino_path={dino}",
            f"discriminator.clip_path={clip}"]


def test_validate_paths_accepts_existing_folders(real_paths):
    validate_paths(load_config(SD35M, real_paths))


def test_preset_placeholders_are_reported_before_models_load():
    cfg = load_config(SD35M)  # loading does not touch the file system
    with raises_config_error("teacher.path", "/path/to/stable-diffusion-3.5-medium", "data.path", "placeholder"):
        validate_paths(cfg)


def test_missing_teacher_folder_and_model_index(tmp_path, real_paths):
    with raises_config_error("teacher.path", "nowhere", "diffusers folder"):
        validate_paths(load_config(SD35M, real_paths + [f"teacher.path={tmp_path / 'nowhere'}"]))
    empty = tmp_path / "empty_teacher"
    empty.mkdir()
    with raises_config_error("teacher.path", "model_index.json"):
        validate_paths(load_config(SD35M, real_paths + [f"teacher.path={empty}"]))


def test_missing_dataset(tmp_path, real_paths):
    with raises_config_error("data.path", "missing.json"):
        validate_paths(load_config(SD35M, real_paths + [f"data.path={tmp_path / 'missing.json'}"]))
    with raises_config_error("data.path", "LMDB folder"):
        validate_paths(load_config(SD35M, real_paths + ["data.kind=lmdb"]))


def test_discriminator_paths_needed_only_with_the_gan(real_paths):
    with raises_config_error("discriminator.dino_path", "method.gan.enabled"):
        validate_paths(load_config(SD35M, real_paths + ["discriminator.dino_path=null"]))
    validate_paths(load_config(SD35M, real_paths + ["discriminator.dino_path=null", "method.gan.enabled=false"]))


# ---------------------------------------------------------------------------------------------------------------
# `senseflow config` entry point
# ---------------------------------------------------------------------------------------------------------------


def test_config_command_prints_resolved_yaml(capsys):
    assert main_config_check([str(SD35M), "method.gd=3"]) == 0
    out = capsys.readouterr().out
    assert "gd: 3" in out and "lam: 0.98" in out


def test_config_command_exits_2_with_one_line_error(capsys):
    assert main_config_check([str(SD35M), "method.gdd=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and "method.gd" in err
    assert main_config_check([str(SD35M), "--check-paths"]) == 2
    assert "teacher.path" in capsys.readouterr().err

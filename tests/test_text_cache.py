"""``data.text_cache``: captions, the empty prompt and D's CLIP text features encoded once by ``senseflow data
text-cache``; with it the trainer loads no text encoder and trains the same student bit for bit (docs/method.md
§13.5), and a stale cache is refused with one line before any network loads.

The tiny assets and configs are those of tests/test_trainers.py (``configs/tiny/<trainer>.yaml``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from senseflow.config import load_config
from senseflow.data.cli import main_data
from senseflow.data.text_cache import check_text_cache
from senseflow.trainer import get_trainer
from senseflow.trainer.preflight import PreflightError, preflight

REPO = Path(__file__).resolve().parents[1]
KIND = {"sdxl": "sdxl", "sd35_large": "sd35-large", "sd35": "sd35-medium", "flux": "flux"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from senseflow.tiny import build_tiny_assets

    return build_tiny_assets(tmp_path_factory.mktemp("assets") / "tiny", seed=0)


def overrides(assets: Path, name: str, *extra: str) -> list[str]:
    kind = next(v for k, v in KIND.items() if name.startswith(k))
    data = assets / "data" / ("sdxl_latents.lmdb" if kind == "sdxl" else "dataset.json")
    return [f"teacher.path={assets / kind}", f"data.path={data}",
            f"discriminator.dino_path={assets / 'backbones' / 'dinov2'}",
            f"discriminator.clip_path={assets / 'backbones' / 'clip_text'}", *extra]


def config(name: str, assets: Path, *extra: str):
    return load_config(REPO / "configs" / "tiny" / f"{name}.yaml", overrides(assets, name, *extra))


def build_cache(name: str, assets: Path, out: Path, *extra: str) -> int:
    return main_data(["text-cache", "--config", str(REPO / "configs" / "tiny" / f"{name}.yaml"), "--out", str(out),
                      *overrides(assets, name, *extra)])


def train(name: str, assets: Path, run: Path, *extra: str):
    trainer = get_trainer(name)(config(name, assets, "train.iterations=3", "train.save_interval=3", *extra), run)
    trainer.setup()
    trainer.train()
    return trainer


@pytest.mark.parametrize("name", ["sdxl_senseflow", "flux_senseflow"])
def test_training_from_the_cache_loads_no_text_encoder_and_gives_the_same_student(name, assets, tmp_path):
    """SDXL (LMDB latents, time ids from sizes, zero unconditional) and FLUX (text ids, guidance embedding), both with
    the GAN: the student after 3 iterations is bit-identical with and without the cache, and with the cache neither
    the family's text encoders nor D's CLIP text model were built."""
    cache = tmp_path / "cache"
    assert build_cache(name, assets, cache) == 0
    plain = train(name, assets, tmp_path / "plain")
    cached = train(name, assets, tmp_path / "cached", f"data.text_cache={cache}")
    assert plain.family._text is not None  # on the fly: the encoders were loaded
    assert cached.family._text is None and cached.family.text_cache is not None
    assert not any(isinstance(m, torch.nn.Module) and "CLIPText" in type(m).__name__
                   for m in cached.text_conditioner.modules())
    for file in ("student.safetensors",):
        a = load_file(tmp_path / "plain" / "checkpoints" / "iter_000003" / file)
        b = load_file(tmp_path / "cached" / "checkpoints" / "iter_000003" / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file


def test_cached_rows_equal_on_the_fly_encoding_of_a_training_batch(assets, tmp_path):
    """SD3.5 (pooled = CLIP projections, whose matmul rounding depends on the batch size): a batch of
    ``train.batch_size`` captions and the empty prompt read from the cache equal the encoders' own outputs exactly."""
    name = "sd35_senseflow"
    assert build_cache(name, assets, tmp_path / "cache") == 0
    cfg = config(name, assets, f"data.text_cache={tmp_path / 'cache'}")
    from senseflow.data.text_cache import open_text_cache, training_captions
    from senseflow.models.families import build_family

    fam = build_family(cfg.teacher, "cpu")
    captions = training_captions(cfg.data)[3:5]
    live, uncond = fam.encode_prompts(captions), fam.unconditional(2)
    fam.text_cache = open_text_cache(cfg)
    fam._uncond = None
    cached, cached_uncond = fam.encode_prompts(captions), fam.unconditional(2)
    for field in ("prompt_embeds", "pooled"):
        assert torch.equal(getattr(live, field), getattr(cached, field))
        assert torch.equal(getattr(uncond, field), getattr(cached_uncond, field))


def test_a_stale_cache_is_refused_in_one_line_naming_what_changed(assets, tmp_path, monkeypatch):
    name = "sd35_senseflow"
    cache = tmp_path / "cache"
    assert build_cache(name, assets, cache) == 0
    check_text_cache(config(name, assets, f"data.text_cache={cache}"))  # fresh: passes
    # another T5 length changes every caption's T5 part
    stale = config(name, assets, f"data.text_cache={cache}", "teacher.t5_max_length=16")
    with pytest.raises(ValueError, match=r"^data.text_cache .*: stale, built for other the token lengths") as err:
        check_text_cache(stale)
    assert "\n" not in str(err.value) and "senseflow data text-cache" in str(err.value)
    # another caption list: a data set with one caption more
    data = json.loads((assets / "data" / "dataset.json").read_text())
    data["keys"].append("extra")
    data["image_paths"].append(data["image_paths"][0])
    data["prompts"].append("a caption the cache has never seen")
    moved = tmp_path / "dataset.json"
    moved.write_text(json.dumps({**data, "image_paths": [str(assets / "data" / p) if not os.path.isabs(p) else p
                                                         for p in data["image_paths"]]}))
    other = config(name, assets, f"data.text_cache={cache}", f"data.path={moved}")
    with pytest.raises(ValueError, match="stale, built for other the training captions"):
        check_text_cache(other)
    # the pre-flight of senseflow train refuses it too (index only, nothing loaded or written)
    with pytest.raises(PreflightError, match="data.text_cache"):
        preflight(other, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    # and the trainer itself, before the teacher family (any network) is built
    import senseflow.method.distillation as distillation

    def no_family(*args, **kwargs):
        raise AssertionError("a network was about to be loaded")

    monkeypatch.setattr(distillation, "build_family", no_family)
    with pytest.raises(ValueError, match="stale"):
        get_trainer(name)(other, tmp_path / "run2").setup()


def test_the_command_resumes_and_refuses_a_folder_that_is_not_a_cache(assets, tmp_path, capsys):
    name = "sd35_senseflow"
    cache = tmp_path / "cache"
    assert build_cache(name, assets, cache) == 0
    shards = sorted(cache.glob("shard_*"))
    assert build_cache(name, assets, cache) == 0  # up to date: nothing encoded, nothing rewritten
    assert "0 encoded now" in capsys.readouterr().out and sorted(cache.glob("shard_*")) == shards
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert build_cache(name, assets, busy) == 2
    assert "is not a text cache" in capsys.readouterr().err and sorted(busy.iterdir()) == [busy / "notes.txt"]
    assert main_data(["text-cache", "--config", str(REPO / "configs" / "tiny" / f"{name}.yaml"),
                      *overrides(assets, name)]) == 2  # no --out and no data.text_cache
    assert "--out" in capsys.readouterr().err


def test_previews_missing_from_the_cache_are_skipped_with_a_note(assets, tmp_path, capsys):
    name = "sd35_senseflow"
    cache = tmp_path / "cache"
    assert build_cache(name, assets, cache) == 0
    trainer = train(name, assets, tmp_path / "run", f"data.text_cache={cache}", "train.iterations=1",
                    "train.save_interval=1", "train.preview_interval=1",
                    "train.preview_prompts=[a prompt never cached]")
    assert not (tmp_path / "run" / "previews").exists() or not any((tmp_path / "run" / "previews").iterdir())
    assert "previews skipped" in capsys.readouterr().out
    assert trainer.method.preview(["a blue square"], 0) is not None  # cached preview prompt: sampled

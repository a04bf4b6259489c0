"""The shapes benchmark: seeded scenes with compositional captions, their JSON export, the reader that scores them."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from senseflow.data.check import check_dataset
from senseflow.shapes.reader import (
    GroundTruthReader,
    ReaderConfig,
    Readout,
    ShapesReader,
    compositional_accuracy,
    compositional_report,
    default_reader_path,
    fd_between,
    load_reader,
    object_errors,
    reader_metadata,
    save_reader,
    train_reader,
)
from senseflow.shapes.scenes import (
    HELDOUT_STREAM,
    RELATIONS,
    TRAIN_STREAM,
    ParsedCaption,
    ShapesConfig,
    export_json_dataset,
    generate_scenes,
    load_scenes_json,
    make_scene,
    parse_caption,
    relation_holds,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def heldout():
    return generate_scenes(300, ShapesConfig(), HELDOUT_STREAM)


# ---- scenes -----------------------------------------------------------------------------------------------------
def test_same_seed_gives_identical_images_and_captions_and_other_seeds_or_streams_differ():
    a, b = generate_scenes(8, ShapesConfig(seed=3)), generate_scenes(8, ShapesConfig(seed=3))
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert [s.to_dict() for s in a.scenes] == [s.to_dict() for s in b.scenes]
    # scene i does not depend on how many scenes are made, nor on where the batch starts
    pixels, scene = make_scene(5, ShapesConfig(seed=3))
    assert torch.equal(torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1, a.images[5])
    assert (
        scene.caption == a.captions[5]
        and generate_scenes(3, ShapesConfig(seed=3), start=5).captions[0] == a.captions[5]
    )
    other_seed = generate_scenes(8, ShapesConfig(seed=4))
    other_stream = generate_scenes(8, ShapesConfig(seed=3), HELDOUT_STREAM)
    for other in (other_seed, other_stream):
        assert not torch.equal(a.images, other.images) and a.captions != other.captions


def test_scenes_are_32px_rgb_dark_background_with_three_distinct_objects_inside_the_image():
    cfg = ShapesConfig()
    data = generate_scenes(100, cfg)
    assert data.images.shape == (100, 3, 32, 32) and data.images.dtype == torch.float32
    assert data.images.min() >= -1 and data.images.max() <= 1
    pixels = (data.images + 1) * 127.5
    assert pixels.median() < 40  # most of the image is dark background
    for scene in data.scenes:
        assert len(scene.objects) == 3 and len(set(scene.stated_pairs())) == 3
        assert sorted(scene.draw_order) == [0, 1, 2]
        for o in scene.objects:
            assert o.shape in cfg.shapes and o.colour in cfg.colour_names
            assert cfg.min_size <= o.size <= cfg.max_size
            assert cfg.edge_margin <= o.cx - o.size and o.cx + o.size <= 32 - cfg.edge_margin + 1e-3
            assert cfg.edge_margin <= o.cy - o.size and o.cy + o.size <= 32 - cfg.edge_margin + 1e-3
    # every object shows its colour at its centre (objects are readable: little overlap)
    for img, scene in zip(pixels[:30], data.scenes[:30]):
        front = scene.objects[scene.draw_order[-1]]  # the object drawn last is never covered
        y, x = int(front.cy + (front.size / 3 if front.shape == "triangle" else 0)), int(front.cx)
        assert (img[:, y, x] - torch.tensor(front.rgb, dtype=torch.float32)).abs().max() < 40


def test_object_counts_follow_min_and_max_and_a_single_object_states_no_relation():
    data = generate_scenes(60, ShapesConfig(min_objects=1, max_objects=2))
    counts = {len(s.objects) for s in data.scenes}
    assert counts == {1, 2}
    for s in data.scenes:
        assert len(s.relations) == len(s.objects) - 1
        if len(s.objects) == 1:
            assert s.caption.endswith(s.objects[0].name) and parse_caption(s.caption).relations == []


def test_every_caption_names_every_object_and_its_stated_relations_hold_on_the_ground_truth_with_the_margin():
    cfg = ShapesConfig()
    data = generate_scenes(300, cfg)
    for s in data.scenes:
        for o in s.objects:
            assert f"{o.colour} {o.shape}" in s.caption
        parsed = parse_caption(s.caption, cfg)
        assert parsed.objects == s.stated_pairs()
        assert sorted(parsed.relations) == sorted(s.stated_relations())
        centre = {o.pair: (o.cx, o.cy) for o in s.objects}
        for a, rel, b in parsed.relations:
            assert relation_holds(centre[a], rel, centre[b], cfg.relation_margin), (s.caption, a, rel, b)
    stated = [r for s in data.scenes for _, r, _ in s.stated_relations()]
    assert set(stated) == set(RELATIONS)  # all four relations are used
    assert any("them" in c or "both" in c for c in data.captions) and any(" the " in c for c in data.captions)


def test_caption_grammar_reads_back_objects_relations_and_references_to_every_earlier_object():
    parsed = parse_caption("a red circle to the left of a blue square, a white triangle above them")
    assert parsed.objects == [("red", "circle"), ("blue", "square"), ("white", "triangle")]
    assert parsed.relations == [
        (("red", "circle"), "left", ("blue", "square")),
        (("white", "triangle"), "above", ("red", "circle")),
        (("white", "triangle"), "above", ("blue", "square")),
    ]
    parsed = parse_caption(
        "a picture of a green square on the left of a yellow circle and a magenta triangle beneath the green square"
    )
    assert parsed.relations[1] == (("magenta", "triangle"), "below", ("green", "square"))
    with pytest.raises(ValueError, match="needs an object mention"):
        parse_caption("left of a red circle")


def test_relations_are_defined_by_centres_with_a_margin_and_y_grows_downwards():
    assert relation_holds((2.0, 5.0), "left", (6.0, 5.0), margin=4.0)
    assert not relation_holds((2.0, 5.0), "left", (5.9, 5.0), margin=4.0)  # a near tie is no relation
    assert relation_holds((6.0, 5.0), "right", (2.0, 5.0), margin=4.0)
    assert relation_holds((0.0, 1.0), "above", (0.0, 9.0), margin=4.0) and relation_holds(
        (0.0, 9.0), "below", (0.0, 1.0), 4.0
    )


def test_bad_shapes_configs_are_refused():
    with pytest.raises(ValueError, match="shapes"):
        ShapesConfig(shapes=("hexagon",))
    with pytest.raises(ValueError, match="min_objects"):
        ShapesConfig(min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="relation_margin"):
        ShapesConfig(relation_margin=0)
    with pytest.raises(ValueError, match="no scene found"):
        make_scene(
            0, ShapesConfig(min_objects=6, max_objects=6, min_size=6.0, max_size=6.0, max_overlap=0.0, scene_tries=2)
        )


def test_json_export_is_the_digits_format_with_relative_pngs_and_scenes_json_and_passes_data_check(tmp_path):
    cfg = ShapesConfig(num_scenes=12, seed=1)
    path = export_json_dataset(tmp_path / "shapes", cfg)
    blob = json.loads(path.read_text())
    assert set(blob) == {"keys", "image_paths", "prompts"}
    assert len(blob["keys"]) == len(blob["image_paths"]) == len(blob["prompts"]) == 12
    data = generate_scenes(12, cfg)
    assert blob["prompts"] == data.captions
    for i, rel in enumerate(blob["image_paths"]):
        assert not os.path.isabs(rel) and rel.endswith(".png")
        with Image.open(path.parent / rel) as im:
            assert im.mode == "RGB" and im.size == (32, 32)
            pixels = torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.equal(pixels, data.images[i])  # PNG is lossless and the images are the uint8 pixels exactly
    back_cfg, scenes = load_scenes_json(path.parent / "scenes.json")
    assert back_cfg == cfg and [s.to_dict() for s in scenes] == [s.to_dict() for s in data.scenes]
    assert json.loads((path.parent / "scenes.json").read_text())["keys"] == blob["keys"]
    report = check_dataset(path, 32)
    assert report.usable and report.checked == 12 and not report.issues



def test_data_shapes_command_writes_the_same_export_and_refuses_a_used_folder(tmp_path, capsys):
    from senseflow.data.cli import main_data

    assert main_data(["shapes", "--out", str(tmp_path / "cmd"), "--num-scenes", "5", "--seed", "1"]) == 0
    export_json_dataset(tmp_path / "api", ShapesConfig(num_scenes=5, seed=1))
    for name in ("dataset.json", "scenes.json", "images/00000004.png"):
        assert (tmp_path / "cmd" / name).read_bytes() == (tmp_path / "api" / name).read_bytes()
    before = (tmp_path / "cmd" / "dataset.json").read_bytes()
    assert main_data(["shapes", "--out", str(tmp_path / "cmd"), "--num-scenes", "3"]) == 2
    assert "--out" in capsys.readouterr().err
    assert (tmp_path / "cmd" / "dataset.json").read_bytes() == before      # the refused run wrote nothing
    assert main_data(["shapes", "--out", str(tmp_path / "held"), "--num-scenes", "2", "--heldout"]) == 0
    assert json.loads((tmp_path / "held" / "scenes.json").read_text())["stream"] == HELDOUT_STREAM

# ---- compositional accuracy -------------------------------------------------------------------------------------
_SWAP = {
    "left": "right",
    "right": "left",
    "above": "below",
    "below": "above",
    "over": "under",
    "under": "over",
    "beneath": "over",
}


def _swap_relations(caption: str) -> str:
    return re.sub(r"\b(left|right|above|below|over|under|beneath)\b", lambda m: _SWAP[m.group(1)], caption)


def test_ground_truth_read_by_an_oracle_scores_one_and_altered_captions_score_less(heldout):
    oracle = GroundTruthReader(heldout.scenes)
    assert compositional_accuracy(heldout.images, heldout.scenes, oracle) == 1.0
    assert compositional_accuracy(heldout.images, heldout.captions, oracle) == 1.0
    assert compositional_accuracy(heldout.images, [s.to_dict() for s in heldout.scenes], oracle) == 1.0
    # every relation turned round: no caption holds any more
    report = compositional_report(heldout.images, [_swap_relations(c) for c in heldout.captions], oracle)
    assert (
        report["compositional_accuracy"] == 0.0
        and report["relation_accuracy"] == 0.0
        and report["object_accuracy"] == 1.0
    )
    # one object recoloured to a colour-shape pair absent from the scene: that sample fails
    altered = list(heldout.captions)
    s = heldout.scenes[0]
    o = s.objects[0]
    new = next(c for c in ShapesConfig().colour_names if (c, o.shape) not in s.stated_pairs())
    altered[0] = altered[0].replace(f"{o.colour} {o.shape}", f"{new} {o.shape}")
    report = compositional_report(heldout.images, altered, oracle)
    assert report["correct"][0] is False and all(report["correct"][1:])
    assert report["compositional_accuracy"] == pytest.approx(1 - 1 / len(altered))


def test_relations_are_checked_with_a_tolerance_on_the_read_centres():
    pairs = (("red", "circle"), ("blue", "square"))
    stated = ParsedCaption(list(pairs), [(pairs[0], "left", pairs[1])])
    read = lambda dx: Readout(torch.ones(1, 2), torch.tensor([[[10.0, 10.0], [10.0 + dx, 10.0]]]), pairs)  # noqa: E731
    reader_at = lambda dx: type("R", (), {"read": lambda self, images: read(dx)})()  # noqa: E731
    images = torch.zeros(1, 3, 32, 32)
    assert compositional_accuracy(images, [stated], reader_at(1.5), tolerance=1.0) == 1.0
    assert compositional_accuracy(images, [stated], reader_at(0.5), tolerance=1.0) == 0.0
    assert compositional_accuracy(images, [stated], reader_at(-3.0), tolerance=1.0) == 0.0



def test_objects_not_read_are_split_into_wrong_colour_wrong_shape_and_missing():
    pairs = (("red", "circle"), ("blue", "circle"), ("red", "square"), ("green", "triangle"), ("blue", "square"))
    stated = ParsedCaption([("red", "circle"), ("green", "triangle"), ("blue", "square")], [])
    # image 0 reads a blue circle for the red one (wrong colour), nothing for the green triangle (missing) and the
    # blue square; image 1 reads a red square where the red circle should be (wrong shape) and everything else
    presence = torch.tensor([[0.0, 0.9, 0.0, 0.1, 0.8],
                             [0.2, 0.0, 0.7, 0.6, 0.9]])
    reader = type("R", (), {"read": lambda self, images: Readout(presence, torch.zeros(2, 5, 2), pairs)})()
    report = compositional_report(torch.zeros(2, 3, 32, 32), [stated, stated], reader)
    assert report["object_accuracy"] == pytest.approx(3 / 6)
    assert report["object_wrong_colour"] == pytest.approx(1 / 6)
    assert report["object_wrong_shape"] == pytest.approx(1 / 6)
    assert report["object_missing"] == pytest.approx(1 / 6)
    # a colour read on a shape the caption states in that colour elsewhere is not an error of this object
    stated_both = ParsedCaption([("red", "circle"), ("blue", "circle")], [])
    assert object_errors(Readout(presence[:1], torch.zeros(1, 5, 2), pairs), 0, stated_both) == (0, 0, 1)

# ---- the reader -------------------------------------------------------------------------------------------------
_SMALL = dict(channels=(8, 16, 32), head_dim=32, num_train_scenes=2500, epochs=8, batch_size=64, lr=4e-3)


@pytest.fixture(scope="module")
def small_reader():
    """A reader trained for 8 · ⌈2500/64⌉ = 320 steps (a few seconds of one CPU thread per epoch)."""
    return train_reader(ReaderConfig(**_SMALL), log=lambda s: None)


class _ChanceReader:
    """Guesses: each pair present with probability 3/18 and a uniformly random centre (seeded)."""

    def read(self, images):
        gen = torch.Generator().manual_seed(0)
        n, pairs = images.shape[0], ShapesConfig().pairs
        present = (torch.rand(n, len(pairs), generator=gen) < 3 / len(pairs)).float()
        return Readout(present, torch.rand(n, len(pairs), 2, generator=gen) * 32, pairs)


def test_a_reader_trained_for_a_few_hundred_steps_beats_chance_clearly(small_reader, heldout):
    chance = compositional_report(heldout.images, heldout.scenes, _ChanceReader())
    trained = compositional_report(heldout.images, heldout.scenes, small_reader)
    assert chance["compositional_accuracy"] < 0.02
    assert trained["compositional_accuracy"] > 0.3
    assert trained["object_accuracy"] > 0.8 and trained["relation_accuracy"] > 0.6
    # the reader reads captions as well as ground truth: same statements, same score
    assert compositional_accuracy(heldout.images, heldout.captions, small_reader) == trained["compositional_accuracy"]


def test_reader_round_trips_through_safetensors_and_checks_its_input(tmp_path, small_reader):
    path = save_reader(small_reader, tmp_path / "r.safetensors", extra={"note": "x"})
    back = load_reader(path)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    (p1, c1), (p2, c2) = small_reader(x), back(x)
    assert torch.equal(p1, p2) and torch.equal(c1, c2) and back.features(x).shape == (3, 64)
    assert back.config == small_reader.config and reader_metadata(path)["note"] == "x"
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        back(torch.zeros(2, 1, 32, 32))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_reader(tmp_path / "missing.safetensors")


def test_fd_on_reader_features_is_small_between_real_sets_and_large_against_noise(small_reader, heldout):
    other = generate_scenes(300, ShapesConfig(), TRAIN_STREAM, start=10_000)
    noise = torch.rand(300, 3, 32, 32) * 2 - 1
    real_real = fd_between(heldout.images, other.images, small_reader)
    real_noise = fd_between(heldout.images, noise, small_reader)
    assert fd_between(heldout.images, heldout.images, small_reader) == pytest.approx(0.0, abs=1e-6)
    assert real_noise > 10 * real_real


@pytest.mark.skipif(
    not default_reader_path().is_file(), reason="no shipped reader (trained weights live outside the repo)"
)
def test_shipped_reader_reads_heldout_scenes_with_95_percent_compositional_accuracy(heldout):
    reader = load_reader()
    assert isinstance(reader, ShapesReader)
    acc = compositional_accuracy(heldout.images, heldout.scenes, reader)
    assert acc >= 0.95
    assert reader_metadata()["heldout_compositional_accuracy"] >= 0.95


def test_shipped_shapes_teacher_is_an_sdxl_folder_under_10_mb_that_the_stock_pipeline_loads_offline():
    from diffusers import StableDiffusionXLPipeline

    folder = Path(__file__).resolve().parents[1] / "senseflow" / "assets" / "shapes_teacher"
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= 10 * 2**20, size
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    out = pipe(prompt=["a red circle to the left of a blue square, a white triangle above them"], height=32, width=32,
               num_inference_steps=2, guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
               output_type="pt").images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()

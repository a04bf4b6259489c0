"""Prompt sets of the evaluation suite (senseflow/eval/prompts.py): text, JSON and COCO-captions subsets."""
from __future__ import annotations

import json

import pytest

from senseflow.eval.prompts import load_prompt_set, read_prompt_set_file


def coco_file(path, n_images: int = 20):
    images = [{"id": 100 + 7 * i, "file_name": f"COCO_{i:06d}.jpg"} for i in range(n_images)]
    anns, aid = [], 1000
    for i, im in enumerate(images):
        for j in range(2 + i % 2):
            aid -= 1  # annotation ids decrease so that "first" is not simply the file order
            anns.append({"id": aid, "image_id": im["id"], "caption": f"  caption {j} of\nimage {im['id']} "})
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


def test_text_file_skips_blank_lines_collapses_whitespace_and_keeps_the_first_num(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n  a   red\tcar \nthe digit 7\n")
    assert load_prompt_set("text", f).prompts == ["a cat", "a red car", "the digit 7"]
    assert load_prompt_set("text", f, num=2).prompts == ["a cat", "a red car"]


def test_json_lists_of_strings_and_objects_with_metadata(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(["one", "two"]))
    assert load_prompt_set("json", f).prompts == ["one", "two"]
    f.write_text(json.dumps({"prompts": [{"text": "a seven", "digit": 7}, {"text": "a two", "digit": 2}]}))
    ps = load_prompt_set("json", f, key="text")
    assert ps.prompts == ["a seven", "a two"] and ps.meta == [{"digit": 7}, {"digit": 2}]
    with pytest.raises(ValueError, match=r"p\.json item 0 has no 'prompt' key"):
        load_prompt_set("json", f)


def test_coco_subset_is_seeded_sorted_and_one_caption_per_image(tmp_path):
    f = coco_file(tmp_path / "captions_val2014.json")
    a = load_prompt_set("coco", f, num=5, seed=0)
    assert len(a) == 5 and a.prompts == load_prompt_set("coco", f, num=5, seed=0).prompts
    ids = [m["image_id"] for m in a.meta]
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert ids != [m["image_id"] for m in load_prompt_set("coco", f, num=5, seed=1).meta]
    anns = json.loads(f.read_text())["annotations"]
    for prompt, m in zip(a.prompts, a.meta):  # "first" = the caption with the smallest annotation id
        own = [x for x in anns if x["image_id"] == m["image_id"]]
        first = min(own, key=lambda x: x["id"])
        assert m["annotation_id"] == first["id"]
        assert prompt == " ".join(first["caption"].split()) == f"caption {len(own) - 1} of image {m['image_id']}"
    rnd = load_prompt_set("coco", f, num=20, seed=3, caption="random")
    assert len(rnd) == 20


def test_written_prompt_set_reads_back(tmp_path):
    ps = load_prompt_set("coco", coco_file(tmp_path / "c.json"), num=4, seed=0)
    txt, js = ps.write(tmp_path / "out")
    assert txt.read_text().splitlines() == ps.prompts
    back = read_prompt_set_file(js)
    assert back.prompts == ps.prompts and back.meta == ps.meta


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_prompt_set("text", tmp_path / "nope.txt")
    f = coco_file(tmp_path / "c.json", n_images=3)
    with pytest.raises(ValueError, match="num = 5000 but .* 3 images"):
        load_prompt_set("coco", f, num=5000)
    with pytest.raises(ValueError, match="source"):
        load_prompt_set("csv", f)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        load_prompt_set("json", bad)
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a COCO captions file"):
        load_prompt_set("coco", listing)

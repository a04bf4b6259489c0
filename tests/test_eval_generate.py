"""Resumable generation of the evaluation suite (senseflow/eval/generate.py, senseflow/eval/images.py).

What a user relies on: killing a generation and running it again continues with the missing prompts only (finished
PNGs are neither recomputed nor rewritten); a half-written PNG is regenerated; images equal those of the inference
scripts; a folder never mixes images of two settings; teacher references are cached in their folder.
The tiny FLUX teacher acts as its own student.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from senseflow.eval import generate as gen
from senseflow.eval.images import image_path, indexed_images, is_complete_png, save_png_atomic

PROMPTS = ["a photo of a cat", "a red sports car", "a castle on a hill", "an owl at midnight", "a bowl of ramen"]


@pytest.fixture(scope="module")
def setup(tiny_teacher, tmp_path_factory):
    """(teacher folder, student checkpoint, prompts file)."""
    from safetensors.torch import load_file

    teacher = tiny_teacher("flux")
    root = tmp_path_factory.mktemp("eval_gen")
    ckpt = root / "student.pth"
    torch.save({"model": load_file(str(teacher / "transformer" / "diffusion_pytorch_model.safetensors"))}, ckpt)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return teacher, ckpt, prompts


def settings(teacher, ckpt, **kw) -> gen.StudentSettings:
    base = dict(spec="flux", teacher=str(teacher), checkpoint=str(ckpt), height=64, width=64, batch_size=2,
                device="cpu", dtype="fp32")
    return gen.StudentSettings(**{**base, **kw})


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


class ImageCounter:
    """Counts the images the student denoises: each sampler step calls it once per batch."""

    def __init__(self, module: torch.nn.Module, steps: int) -> None:
        self.rows, self.steps = 0, steps
        module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        self.rows += x.shape[0]

    @property
    def images(self) -> int:
        assert self.rows % self.steps == 0
        return self.rows // self.steps


def test_killed_generation_continues_without_regenerating_finished_images(setup, tmp_path):
    from senseflow.inference import load_runtime

    teacher, ckpt, prompts = setup
    s = settings(teacher, ckpt)
    out = tmp_path / "samples"
    plan = gen.plan_student(s, prompts, len(PROMPTS), out)
    family, student = load_runtime(plan)
    counter = ImageCounter(student, plan.steps)

    first = gen.generate_student(plan, family, student, limit=3, progress=False)  # "killed" after 3 images
    assert first.written == [0, 1, 2] and first.remaining == [3, 4] and counter.images == 3
    done_before = {i: p.stat().st_mtime_ns for i, p in indexed_images(out).items()}
    assert sorted(done_before) == [0, 1, 2]

    second = gen.generate_student(plan, family, student, progress=False)
    assert second.written == [3, 4] and second.skipped == [0, 1, 2] and second.complete
    assert counter.images == 5  # only the two missing prompts went through the student
    assert {i: image_path(out, i).stat().st_mtime_ns for i in done_before} == done_before

    third = gen.generate_student(plan, family, student, progress=False)
    assert third.written == [] and counter.images == 5
    assert not list(out.glob("*.tmp"))

    # the resumed folder holds the images of an uninterrupted run (prompt i depends on seed + i only)
    whole = tmp_path / "whole"
    plan_whole = gen.plan_student(s, prompts, len(PROMPTS), whole)
    gen.generate_student(plan_whole, family, student, progress=False)
    for i in range(len(PROMPTS)):
        assert np.abs(pixels(image_path(out, i)) - pixels(image_path(whole, i))).max() <= 1


def test_a_run_interrupted_mid_batch_leaves_only_complete_images_and_resumes(setup, tmp_path):
    from senseflow.inference import load_runtime

    teacher, ckpt, prompts = setup
    out = tmp_path / "samples"
    plan = gen.plan_student(settings(teacher, ckpt), prompts, len(PROMPTS), out)
    family, student = load_runtime(plan)
    calls = {"n": 0}

    def kill_in_second_batch(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] == plan.steps + 2:  # Ctrl-C inside the second batch's sampling
            raise KeyboardInterrupt

    handle = student.register_forward_pre_hook(kill_in_second_batch, with_kwargs=True)
    with pytest.raises(KeyboardInterrupt):
        gen.generate_student(plan, family, student, progress=False)
    handle.remove()
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png"]  # no partial or temporary file
    counter = ImageCounter(student, plan.steps)
    res = gen.generate_student(plan, family, student, progress=False)
    assert res.written == [2, 3, 4] and res.skipped == [0, 1] and counter.images == 3


def test_images_equal_those_of_the_inference_scripts(setup, tmp_path):
    from senseflow.inference import generate, load_runtime

    teacher, ckpt, prompts = setup
    plan = gen.plan_student(settings(teacher, ckpt, sampler="euler"), prompts, 3, tmp_path / "eval")
    family, student = load_runtime(plan)
    gen.generate_student(plan, family, student, progress=False)
    plan.output_dir = tmp_path / "script"
    generate(plan, family, student, progress=False)
    for i in range(3):
        np.testing.assert_array_equal(pixels(tmp_path / "eval" / f"{i:05d}.png"),
                                      pixels(tmp_path / "script" / f"{i:05d}.png"))


def test_a_truncated_png_is_regenerated_and_other_settings_are_refused(setup, tmp_path):
    teacher, ckpt, prompts = setup
    out = tmp_path / "samples"
    s = settings(teacher, ckpt)
    assert gen.run_student(s, prompts, 3, out, progress=False).written == [0, 1, 2]
    p = image_path(out, 1)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])  # a copy interrupted half-way
    assert not is_complete_png(p)
    again = gen.run_student(s, prompts, 3, out, progress=False)
    assert again.written == [1] and again.skipped == [0, 2] and is_complete_png(p)
    with pytest.raises(ValueError, match="other settings .*seed"):
        gen.run_student(settings(teacher, ckpt, seed=5), prompts, 3, out, progress=False)
    with pytest.raises(ValueError, match="other settings .*prompts_sha256"):
        gen.run_student(s, prompts, 4, out, progress=False)  # a different prompt list


def test_nothing_is_loaded_when_every_image_exists(setup, tmp_path, monkeypatch):
    teacher, ckpt, prompts = setup
    s = settings(teacher, ckpt)
    gen.run_student(s, prompts, 2, tmp_path, progress=False)

    def boom(plan):
        raise AssertionError("the runtime must not be loaded")

    monkeypatch.setattr("senseflow.inference.load_runtime", boom)
    res = gen.run_student(s, prompts, 2, tmp_path, progress=False)
    assert res.written == [] and res.skipped == [0, 1]


def test_teacher_references_use_the_stock_pipeline_and_are_cached(setup, tmp_path):
    teacher, _, _ = setup
    t = gen.TeacherSettings(teacher=str(teacher), family="flux", steps=3, guidance_scale=2.0, height=64, width=64,
                            batch_size=2, device="cpu", dtype="fp32", pipeline_kwargs={"max_sequence_length": 32})
    pipe = gen.load_teacher_pipeline(t)
    assert type(pipe).__name__ == "FluxPipeline"
    calls: list[list[int]] = []
    out = tmp_path / "reference"
    first = gen.generate_teacher_reference(t, PROMPTS[:4], out, limit=1, progress=False, pipeline=pipe,
                                           on_batch=calls.append)
    assert first.written == [0] and first.remaining == [1, 2, 3]
    second = gen.generate_teacher_reference(t, PROMPTS[:4], out, progress=False, pipeline=pipe, on_batch=calls.append)
    assert second.written == [1, 2, 3] and calls == [[0], [1, 2], [3]]

    class NoCalls:
        def __call__(self, **kwargs):
            raise AssertionError("cached references must not be regenerated")

    cached = gen.generate_teacher_reference(t, PROMPTS[:4], out, progress=False, pipeline=NoCalls())
    assert cached.skipped == [0, 1, 2, 3] and cached.complete
    assert pixels(image_path(out, 0)).shape == (64, 64, 3)
    with pytest.raises(ValueError, match="other settings .*steps"):
        gen.generate_teacher_reference(gen.TeacherSettings(**{**t.__dict__, "steps": 4}), PROMPTS[:4], out,
                                       progress=False, pipeline=NoCalls())


def test_atomic_png_writes_leave_no_partial_file(tmp_path):
    img = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    path = save_png_atomic(img, tmp_path / "00003.png")
    assert is_complete_png(path) and [p.name for p in tmp_path.iterdir()] == ["00003.png"]
    (tmp_path / "00004.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (tmp_path / "notes.png").write_bytes(path.read_bytes())
    assert list(indexed_images(tmp_path)) == [3]

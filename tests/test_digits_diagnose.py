"""The digits diagnosis (tools/digits_diagnosis.py, research tooling outside the package) on the shipped teacher,
with the teacher's own unguided copy as the "student" (what G is at initialisation): the two ends of the hand-over
are the two Euler samplers, and the student's velocity error is the unguided teacher's."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from senseflow.benchmark import Evaluator
from senseflow.benchmark.settings import load_settings
from senseflow.digits.teacher import default_teacher_path
from senseflow.method.sampling import sample_euler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # the diagnosis lives in tools/, not the package
from digits_diagnosis import (
    VelocityError,
    diagnosis_markdown,
    guided_regression,
    handover_sample,
    velocity_errors,
)


@pytest.fixture(scope="module")
def ev() -> Evaluator:
    settings = load_settings("digits")
    return Evaluator(default_teacher_path(), settings.make_suite(per_digit=1),
                     replace(settings.eval_spec(), batch_size=10))


@pytest.fixture(scope="module")
def initial_student(ev: Evaluator) -> torch.nn.Module:
    return ev.family.build_student(ev.teacher).eval()


def test_handover_ends_are_the_student_and_the_guided_teacher_euler_samplers(ev, initial_student):
    anchors = ev.anchors(4)
    s = ev.spec.teacher_guidance
    teacher_4 = sample_euler(ev.family, ev.teacher, ev.cond, anchors, latents=ev.noise, guidance_scale=s)
    student_4 = sample_euler(ev.family, initial_student, ev.cond, anchors, latents=ev.noise)
    assert torch.equal(handover_sample(ev, initial_student, 4, ev.cond, ev.noise), teacher_4)
    assert torch.equal(handover_sample(ev, initial_student, 0, ev.cond, ev.noise), student_4)
    # one guided step first: neither end
    mixed = handover_sample(ev, initial_student, 1, ev.cond, ev.noise)
    assert not torch.allclose(mixed, teacher_4, atol=1e-3) and not torch.allclose(mixed, student_4, atol=1e-3)
    with pytest.raises(ValueError, match="0..4"):
        handover_sample(ev, initial_student, 5, ev.cond, ev.noise)


def test_velocity_error_of_the_initial_student_is_the_unguided_teachers(ev, initial_student):
    errors = velocity_errors(ev, initial_student, [1.0, 0.5, 0.3], trajectory_steps=8)
    # σ snaps to the 8-step shifted grid s₃(1 − k/8) = 1, .955, .9, .833, .75, .643, .5, .3 (then 0)
    assert [round(e.sigma, 3) for e in errors] == [1.0, 0.5, 0.3]
    for e in errors:
        assert e.student == pytest.approx(e.unguided_teacher, rel=1e-6)
        assert e.unguided_teacher > 0  # CFG s = 4 changes the velocity everywhere on the trajectory
    assert errors[0].unguided_teacher > errors[-1].unguided_teacher  # guidance matters most at high noise
    with pytest.raises(ValueError, match="trajectory_steps"):
        velocity_errors(ev, initial_student, [0.5], trajectory_steps=0)


def test_diagnosis_markdown_labels_both_ends():
    md = diagnosis_markdown([(0, 20.4), (1, 20.5), (2, 23.5), (3, 20.5), (4, 10.5)],
                            [VelocityError(0.5, 0.1953, 0.1714)])
    assert "| 0 (student's Euler sampler) | 20.4 |" in md
    assert "| 4 (teacher 4-step Euler) | 10.5 |" in md
    assert "| 0.500 | 0.1953 | 0.1714 |" in md


def test_guided_regression_moves_the_student_toward_the_guided_teacher(ev, initial_student):
    before = velocity_errors(ev, initial_student, [1.0, 0.5], trajectory_steps=4)
    student, curve = guided_regression(ev, steps=24, lr=1e-3, batch_size=4, seed=0)
    after = velocity_errors(ev, student, [1.0, 0.5], trajectory_steps=4)
    assert curve == []  # no evaluation asked for
    assert after[0].student < 0.9 * before[0].student  # σ = 1 carries the largest guidance term (−19% here)
    assert after[0].unguided_teacher == before[0].unguided_teacher  # the teacher itself is untouched
    with pytest.raises(ValueError, match="guided_regression"):
        guided_regression(ev, steps=0, lr=1e-3, batch_size=4)

"""The embedded digits default: data set and JSON export, the shipped SD3 teacher, the classifier and its metrics."""
import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from senseflow.digits.classifier import (
    ClassifierConfig,
    DigitClassifier,
    accuracy,
    classifier_metadata,
    load_classifier,
    save_classifier,
)
from senseflow.digits.data import (
    DIGIT_WORDS,
    DigitsDataConfig,
    caption,
    export_json_dataset,
    load_digits_data,
    split_indices,
)
from senseflow.digits.metrics import fd_between, feature_stats, frechet_distance, prompt_accuracy
from senseflow.digits.teacher import default_teacher_path, generate_digits, load_teacher, teacher_record

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    return load_digits_data()


@pytest.fixture(scope="module")
def teacher():
    return load_teacher()


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


# ---- data ------------------------------------------------------------------------------------------------------
def test_digits_are_32px_rgb_in_unit_range_with_captions_naming_the_label(data):
    assert data.images.shape == (1797, 3, 32, 32)
    assert data.images.min() == -1.0 and data.images.max() <= 1.0
    assert torch.equal(data.images[:, 0], data.images[:, 2])  # grey repeated on three channels
    for lab, cap in zip(data.labels.tolist()[:50], data.captions[:50]):
        words = re.findall(r"[a-z0-9]+", cap)
        assert DIGIT_WORDS[lab] in words or str(lab) in words
    assert caption(7, "a handwritten digit {word}") == "a handwritten digit seven"
    assert caption(7, "the number {numeral} handwritten") == "the number 7 handwritten"


def test_split_is_fixed_by_seed_disjoint_and_complete():
    tr, ho = split_indices(1797, 0.2, seed=0)
    tr2, ho2 = split_indices(1797, 0.2, seed=0)
    _, ho3 = split_indices(1797, 0.2, seed=1)
    assert torch.equal(ho, ho2) and torch.equal(tr, tr2) and not torch.equal(ho, ho3)
    assert len(ho) == 359 and len(tr) == 1438
    assert torch.equal(torch.cat([tr, ho]).sort().values, torch.arange(1797))


def test_bad_data_config_is_refused():
    with pytest.raises(ValueError, match="names no digit"):
        DigitsDataConfig(templates=("a picture",))
    with pytest.raises(ValueError, match="interpolation"):
        DigitsDataConfig(interpolation="nearest")


def test_json_export_has_1797_records_with_relative_png_paths(tmp_path, data):
    path = export_json_dataset(tmp_path / "digits")
    blob = json.loads(path.read_text())
    assert set(blob) == {"keys", "image_paths", "prompts"}
    assert len(blob["keys"]) == len(blob["image_paths"]) == len(blob["prompts"]) == 1797
    assert len(set(blob["keys"])) == 1797 and blob["prompts"] == data.captions
    for i in (0, 1796):
        rel = blob["image_paths"][i]
        assert not os.path.isabs(rel) and rel.endswith(".png")
        with Image.open(path.parent / rel) as im:
            assert im.mode == "RGB" and im.size == (32, 32)
            pixels = torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1
        assert (pixels - data.images[i]).abs().max() <= 1 / 127.5  # uint8 rounding only


# ---- Fréchet distance -----------------------------------------------------------------------------------------
def _psd_sqrt(m):
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _fd_by_eigenvalues(mu1, s1, mu2, s2):
    # tr((Σ₁Σ₂)^½) = Σ √λᵢ(Σ₁^½ Σ₂ Σ₁^½): Σ₁Σ₂ is similar to that symmetric PSD matrix.
    r = _psd_sqrt(s1)
    lam = np.linalg.eigvalsh(r @ s2 @ r)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(lam, 0, None))))


def test_frechet_distance_equals_an_eigenvalue_computation_on_random_features():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 16))
    b = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    ours, ref = frechet_distance(mu1, s1, mu2, s2), _fd_by_eigenvalues(mu1, s1, mu2, s2)
    assert abs(ours - ref) / abs(ref) < 1e-6
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_1d_gaussians_is_mean_and_std_gap():
    # N(1, 2²) vs N(4, 3²): (1−4)² + (2−3)² = 10
    assert frechet_distance([1.0], [[4.0]], [4.0], [[9.0]]) == pytest.approx(10.0, rel=1e-12)
    with pytest.raises(ValueError, match="vectors of length"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ---- classifier -----------------------------------------------------------------------------------------------
def test_shipped_classifier_reaches_95_percent_on_the_heldout_split(classifier, data):
    acc = accuracy(classifier, *data.subset("heldout"))
    assert acc >= 0.95
    assert classifier_metadata()["heldout_accuracy"] == pytest.approx(acc)


def test_classifier_round_trips_through_safetensors_and_checks_its_input(tmp_path):
    model = DigitClassifier(ClassifierConfig(feature_dim=8))
    path = save_classifier(model, tmp_path / "c.safetensors", extra={"note": "x"})
    back = load_classifier(path)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    assert torch.equal(model(x), back(x)) and back.features(x).shape == (3, 8)
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        back(torch.zeros(2, 1, 32, 32))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_classifier(tmp_path / "missing.safetensors")


def test_real_digits_are_near_each_other_and_far_from_noise_in_feature_space(classifier, data):
    train, _ = data.subset("train")
    held, held_labels = data.subset("heldout")
    noise = torch.rand(300, 3, 32, 32) * 2 - 1
    assert fd_between(held, train, classifier) * 10 < fd_between(noise, train, classifier)
    mu, sigma = feature_stats(held, classifier)
    assert mu.shape == (64,) and sigma.shape == (64, 64) and mu.dtype == np.float64
    assert prompt_accuracy(held, held_labels, classifier) == accuracy(classifier, held, held_labels)


# ---- teacher ----------------------------------------------------------------------------------------------------
def test_shipped_teacher_loads_offline_with_the_sd3_pipeline_and_generates(teacher):
    from diffusers import StableDiffusion3Pipeline

    assert isinstance(teacher, StableDiffusion3Pipeline)
    out = teacher(["a handwritten digit three", "the number 5 handwritten"], num_inference_steps=2, guidance_scale=4.0,
                  height=32, width=32, max_sequence_length=77, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    size = sum(f.stat().st_size for f in default_teacher_path().rglob("*") if f.is_file())
    assert size < 5 * 2**20


def test_teacher_prompt_encoding_matches_the_sd3_pipeline(teacher):
    from senseflow.models.families import build_family

    family = build_family("sd3", path=default_teacher_path(), t5_max_length=77)
    prompts = ["a drawing of the digit four", ""]
    cond = family.encode_prompts(prompts)
    ref, _, ref_pooled, _ = teacher.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=77)
    assert cond.prompt_embeds.shape == (2, 154, 32) and cond.pooled.shape == (2, 32)
    # the pipeline runs with autograd on (other CPU kernels), hence float32 round-off rather than bit equality
    torch.testing.assert_close(cond.prompt_embeds, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(cond.pooled, ref_pooled, rtol=0, atol=1e-5)


def test_shipped_vae_factors_normalise_the_training_latents(teacher, data):
    vae = teacher.vae
    rec = teacher_record()["vae_scale"]
    assert vae.config.shift_factor == rec["shift_factor"] and vae.config.scaling_factor == rec["scaling_factor"]
    with torch.no_grad():
        z = vae.encode(data.subset("train")[0][:256]).latent_dist.sample(torch.Generator().manual_seed(0))
    x0 = (z - vae.config.shift_factor) * vae.config.scaling_factor
    assert abs(float(x0.mean())) < 0.1 and abs(float(x0.std()) - 1) < 0.1


def test_teacher_28_step_euler_cfg_samples_show_the_prompted_digit(teacher, classifier):
    digits = [d for d in range(10) for _ in range(10)]
    images = generate_digits(teacher, digits, "a handwritten digit {word}", num_inference_steps=28,
                             guidance_scale=4.0, seed=0)
    assert images.shape == (100, 3, 32, 32)
    assert prompt_accuracy(images, digits, classifier) >= 0.90


def test_load_teacher_names_the_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_teacher(tmp_path / "nothing")


def test_the_two_student_samplers_of_the_evaluator():
    """"Ours" re-noises x̂₀ with fresh noise at each anchor; "Ours (Euler)" is the deterministic 4-step ODE of the
    same velocity field: with the teacher itself as an (unguided) student it equals the teacher's 4-step Euler."""
    from dataclasses import replace

    from senseflow.benchmark import Evaluator
    from senseflow.benchmark.settings import load_settings
    from senseflow.method.sampling import sample_euler

    settings = load_settings("digits")
    ev = Evaluator(default_teacher_path(), settings.make_suite(per_digit=1),
                   replace(settings.eval_spec(), batch_size=10))
    student = ev.family.build_student(ev.teacher).eval()
    euler, _ = ev.student_images(student, "euler")
    expected = sample_euler(ev.family, ev.teacher, ev.cond, ev.anchors(4), latents=ev.noise)
    assert torch.allclose(euler, ev.family.decode_latents(expected).clamp(-1, 1), atol=1e-5)
    stochastic, _ = ev.student_images(student, "stochastic")
    assert stochastic.shape == euler.shape and not torch.allclose(stochastic, euler, atol=1e-3)
    with pytest.raises(ValueError, match="stochastic, euler"):
        ev.student_images(student, "heun")


def test_the_evaluation_cfg_scale_comes_from_the_teacher_record(tmp_path):
    from senseflow.benchmark import recorded_guidance

    assert recorded_guidance(default_teacher_path()) == teacher_record()["evaluation"]["settings"]["guidance_scale"]
    (tmp_path / "senseflow_digits_teacher.json").write_text(json.dumps({"config": {}}))
    with pytest.raises(ValueError, match="--teacher-guidance"):
        recorded_guidance(tmp_path)
    (tmp_path / "teacher_card.json").write_text(json.dumps({"generation": {"guidance_scale": 3.5}}))
    assert recorded_guidance(tmp_path) == 3.5   # a teacher of `senseflow teacher train` carries it in its card

"""Teacher families on tiny teachers: loading, docs/method.md §12 prompt encodings, predictions, guidance, students,
VAE."""
from __future__ import annotations

import shutil

import pytest
import torch

from senseflow.core.condition import Condition
from senseflow.core.schedules import DDPMSchedule, FlowSchedule, flux_mu
from senseflow.models.families import FAMILY_NAMES, build_family, get_family
from senseflow.models.families.flux import GUIDANCE_PREFIX, latent_image_ids, pack_latents, unpack_latents

PROMPTS = ["a photo of a cat", "two dogs playing with a ball in the park"]
RES = 64  # pixels → 8x8 latents (VAE 8x)
FAMILY_OF = {"sdxl": "sdxl", "sd35-medium": "sd3", "sd35-large": "sd3", "flux": "flux"}


@pytest.fixture(scope="module")
def families(tiny_teacher):
    """One family instance per tiny teacher kind (text encoders load lazily, once)."""
    out = {}
    for kind, name in FAMILY_OF.items():
        extra = {"resolution": RES} if name == "sdxl" else {}
        out[kind] = build_family(name, path=tiny_teacher(kind), **extra)
    return out


def _pipeline(kind, path):
    import diffusers

    cls = {
        "sdxl": diffusers.StableDiffusionXLPipeline,
        "sd3": diffusers.StableDiffusion3Pipeline,
        "flux": diffusers.FluxPipeline,
    }
    return cls[FAMILY_OF[kind]].from_pretrained(path, local_files_only=True)


# ---- registry and folder checks --------------------------------------------------------------------------------

def test_registry_names_and_aliases():
    assert set(FAMILY_NAMES) == {"sdxl", "sd3", "flux"}
    assert get_family("sd35") is get_family("sd3") is get_family("SD35-Large")
    assert get_family("flux").name == "flux" and get_family("sdxl").denoiser_subfolder == "unet"
    with pytest.raises(ValueError, match="did you mean 'flux'"):
        get_family("flx")


def test_build_family_from_a_teacher_config(tiny_teacher):
    from senseflow.config import TeacherConfig

    cfg = TeacherConfig(
        family="flux", path=str(tiny_teacher("flux")), dtype="bfloat16", t5_max_length=32, resolution=RES
    )
    fam = build_family(cfg, "cpu")
    assert type(fam).__name__ == "FluxFamily" and fam.denoiser_dtype == torch.bfloat16 and fam.t5_max_length == 32
    sdxl = build_family({"family": "sdxl", "path": str(tiny_teacher("sdxl")), "resolution": 512})
    assert sdxl.target_size == (512, 512)
    with pytest.raises(ValueError, match="text_encoder_dtype"):
        build_family({"family": "sd3", "path": str(tiny_teacher("sd35-large")), "text_encoder_dtype": "float8"})


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        build_family("flux", path=tmp_path / "does-not-exist")


def test_missing_component_is_named_before_any_weight_is_read(tiny_teacher, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_teacher("sd35-large"), broken)
    shutil.rmtree(broken / "text_encoder_3")
    # corrupt a weight file: if it were read first, the error would be a safetensors one
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    with pytest.raises(FileNotFoundError, match=r"broken.*'text_encoder_3'"):
        build_family("sd3", path=broken)


def test_missing_student_folder_is_named(tiny_teacher, tmp_path):
    with pytest.raises(FileNotFoundError, match="student folder"):
        build_family("flux", path=tiny_teacher("flux"), student_path=tmp_path / "nope")


# ---- §12 prompt encodings ----------------------------------------------------------------------------------------

def test_sdxl_encoding_shapes_and_time_ids(families):
    fam = families["sdxl"]
    cond = fam.encode_prompts(PROMPTS, original_sizes=torch.tensor([[100, 200], [300, 400]]), crop_coords=(5, 7))
    assert cond.prompt_embeds.shape == (2, 77, 16 + 32)  # [h₋₂(CLIP-L) ; h₋₂(CLIP-G)]
    assert cond.pooled.shape == (2, 24)  # CLIP-G projection
    assert cond.time_ids.tolist() == [[100, 200, 5, 7, RES, RES], [300, 400, 5, 7, RES, RES]]
    assert fam.encode_prompts(PROMPTS).time_ids.tolist() == [[RES, RES, 0, 0, RES, RES]] * 2
    with pytest.raises(ValueError, match="original_sizes"):
        fam.encode_prompts(PROMPTS, original_sizes=torch.zeros(3, 2))
    uncond = fam.unconditional(2)
    assert not uncond.prompt_embeds.any() and not uncond.pooled.any()  # zeros (§12)


def test_sd3_encoding_shapes_padding_and_unconditional(families):
    fam = families["sd35-medium"]
    cond = fam.encode_prompts(PROMPTS)
    assert cond.prompt_embeds.shape == (2, 77 + 77, 64)  # CLIP part then T5 part, at the T5 width
    assert cond.pooled.shape == (2, 16 + 24)  # [proj L ; proj G]
    assert not cond.prompt_embeds[:, :77, 48:].any()  # CLIP 16 + 32 channels zero-padded to 64
    assert cond.prompt_embeds[:, :77, :48].abs().sum() > 0
    empty = fam.encode_prompts([""])
    uncond = fam.unconditional(2)
    assert torch.equal(uncond.prompt_embeds, empty.prompt_embeds.expand(2, -1, -1))
    assert fam.unconditional(3).prompt_embeds.data_ptr() == uncond.prompt_embeds.data_ptr()  # computed once


def test_flux_encoding_shapes(families):
    fam = families["flux"]
    cond = fam.encode_prompts(PROMPTS)
    assert cond.prompt_embeds.shape == (2, 512, 32)  # T5 last hidden, 512 tokens
    assert cond.pooled.shape == (2, 24)  # CLIP-L pooler_output
    assert cond.text_ids.shape == (512, 3) and not cond.text_ids.any()  # 2-D zeros


@pytest.mark.parametrize("kind", ["sdxl", "sd35-large", "flux"])
def test_encodings_equal_the_stock_pipelines(families, tiny_teacher, kind):
    fam = families[kind]
    pipe = _pipeline(kind, tiny_teacher(kind))
    cond = fam.encode_prompts(PROMPTS)
    with torch.no_grad():  # as inside the pipelines' __call__ (grad mode changes T5's kernels in the last bits)
        if kind == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
        elif kind == "flux":
            embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=512)
            assert torch.equal(cond.text_ids, text_ids)
        else:
            embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                                      max_sequence_length=77)
    assert torch.equal(cond.prompt_embeds, embeds)
    assert torch.equal(cond.pooled, pooled)


def test_sd3_refuses_to_crop_clip_embeddings(tiny_teacher, tmp_path):
    from transformers import T5Config, T5EncoderModel

    narrow = tmp_path / "narrow"
    shutil.copytree(tiny_teacher("sd35-large"), narrow)
    shutil.rmtree(narrow / "text_encoder_3")
    old = T5Config.from_pretrained(tiny_teacher("sd35-large") / "text_encoder_3")
    T5EncoderModel(T5Config(**{**old.to_dict(), "d_model": 32})).save_pretrained(narrow / "text_encoder_3")
    with pytest.raises(ValueError, match="exceeds the T5 width 32"):
        build_family("sd3", path=narrow).encode_prompts(["a cat"])


# ---- predictions and guidance ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(FAMILY_OF))
def test_predict_returns_the_unpacked_layout(families, kind):
    fam = families[kind]
    net = fam.load_denoiser()
    shape = (2, *fam.latent_shape(RES, RES))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    tau = torch.tensor([999, 500]) if kind == "sdxl" else torch.tensor([1.0, 0.3])
    out = fam.predict(net, x, tau, fam.encode_prompts(PROMPTS), guidance=3.0)
    assert out.shape == shape and out.dtype == x.dtype and torch.isfinite(out).all()


def test_latent_shapes(families):
    assert families["sdxl"].latent_shape(128, 64) == (4, 16, 8)
    assert families["sd35-large"].latent_shape(128, 64) == (16, 16, 8)
    with pytest.raises(ValueError, match="multiples of 16"):
        families["flux"].latent_shape(72, 64)  # 9x8 latents cannot be 2x2-packed


def test_flux_packing_matches_diffusers():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 8, 6)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 8, 6))
    assert torch.equal(unpack_latents(packed, 8, 6), x)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 8 * 8, 6 * 8, 8), x)
    assert torch.equal(latent_image_ids(8, 6), FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32))


@pytest.mark.parametrize("kind", ["sdxl", "sd35-medium"])
def test_cfg_is_one_batched_forward_of_uncond_and_cond(families, kind):
    fam = families[kind]
    net = fam.load_denoiser()
    x = torch.randn(2, *fam.latent_shape(RES, RES), generator=torch.Generator().manual_seed(1))
    tau = torch.tensor([749, 249]) if kind == "sdxl" else torch.tensor([0.9, 0.5])
    cond = fam.encode_prompts(PROMPTS, original_sizes=(80, 96)) if kind == "sdxl" else fam.encode_prompts(PROMPTS)
    uncond = fam.unconditional(2)
    if kind == "sdxl":  # the zero branch keeps the conditional time ids
        uncond = Condition(uncond.prompt_embeds, uncond.pooled, time_ids=cond.time_ids)
    u, c = fam.predict(net, x, tau, uncond), fam.predict(net, x, tau, cond)
    scale = torch.tensor([2.0, 7.5])
    assert torch.allclose(fam.guided_predict(net, x, tau, cond, scale), u + scale.view(2, 1, 1, 1) * (c - u), atol=1e-5)
    assert torch.allclose(fam.guided_predict(net, x, tau, cond, 1.0), c, atol=1e-5)


def test_flux_guidance_is_the_embedding(families):
    fam = families["flux"]
    teacher = fam.load_denoiser()
    student = fam.build_student(teacher)
    x = torch.randn(2, *fam.latent_shape(RES, RES))
    cond, tau = fam.encode_prompts(PROMPTS), torch.tensor([0.8, 0.8])
    assert torch.equal(fam.guided_predict(teacher, x, tau, cond, 3.5), fam.predict(teacher, x, tau, cond, guidance=3.5))
    assert not torch.allclose(
        fam.predict(teacher, x, tau, cond, guidance=1.0), fam.predict(teacher, x, tau, cond, guidance=8.0)
    )
    with pytest.raises(ValueError, match="guidance"):
        fam.predict(teacher, x, tau, cond)
    with pytest.raises(ValueError, match="decision 4"):
        fam.guided_predict(student, x, tau, cond, 3.5)
    # the student takes no guidance: a value is ignored, as in FluxPipeline
    assert torch.equal(fam.predict(student, x, tau, cond, guidance=3.5), fam.predict(student, x, tau, cond))


# ---- schedules -----------------------------------------------------------------------------------------------

def test_schedules_come_from_the_scheduler_config(families, tiny_teacher):
    from diffusers import EulerDiscreteScheduler

    sdxl = families["sdxl"].schedule(RES, RES)
    ref = EulerDiscreteScheduler.from_pretrained(tiny_teacher("sdxl"), subfolder="scheduler")
    assert isinstance(sdxl, DDPMSchedule)
    assert torch.allclose(sdxl.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-5)
    sd3 = families["sd35-medium"].schedule(RES, RES)
    assert isinstance(sd3, FlowSchedule) and (sd3.shift, sd3.timestep_scale, sd3.mu) == (3.0, 1000.0, None)
    flux = families["flux"].schedule(1024, 1024)
    assert flux.timestep_scale == 1.0 and flux.mu == pytest.approx(1.15)  # 4096 packed tokens at 1024²
    assert families["flux"].schedule(RES, RES).mu == pytest.approx(flux_mu(16, 256, 4096, 0.5, 1.15))


# ---- students ------------------------------------------------------------------------------------------------

def test_flux_student_drops_only_the_guidance_embedder(families):
    fam = families["flux"]
    teacher = fam.load_denoiser()
    student = fam.build_student(teacher)
    assert teacher.config.guidance_embeds and not student.config.guidance_embeds
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    assert not any(k.startswith(GUIDANCE_PREFIX) for k in s_sd)
    assert set(t_sd) - set(s_sd) == {k for k in t_sd if k.startswith(GUIDANCE_PREFIX)} != set()
    assert all(torch.equal(s_sd[k], t_sd[k]) for k in s_sd)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in student.parameters()) and student.training
    before = [p.clone() for p in teacher.parameters()]
    with torch.no_grad():  # independent storage: training the student never moves the teacher
        for p in student.parameters():
            p.add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), before))


def test_student_of_a_bf16_teacher_keeps_the_full_precision_weights(families):
    fam = families["sd35-medium"]
    fp32 = fam.load_denoiser(torch.float32)
    student = fam.build_student(fam.load_denoiser(torch.bfloat16))
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), fp32.state_dict().values()))
    copy = fam.build_student(fp32)
    assert copy is not fp32 and all(a.data_ptr() != b.data_ptr() for a, b in zip(copy.parameters(), fp32.parameters()))


def test_flux_student_path_is_loaded_and_checked(families, tiny_teacher, tmp_path):
    fam = families["flux"]
    teacher = fam.load_denoiser()
    student = fam.build_student(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(0.5)
    student.save_pretrained(tmp_path / "student")
    loaded = build_family("flux", path=tiny_teacher("flux"), student_path=tmp_path / "student").build_student(teacher)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), student.state_dict().values()))
    teacher.save_pretrained(tmp_path / "guided")
    with pytest.raises(ValueError, match="guidance_embeds=True"):
        build_family("flux", path=tiny_teacher("flux"), student_path=tmp_path / "guided").build_student(teacher)


def test_block_types_cover_the_denoisers(families):
    for kind, fam in families.items():
        net = fam.load_denoiser()
        assert any(isinstance(m, fam.block_types()) for m in net.modules()), kind


# ---- VAE -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sdxl", "flux"])
def test_vae_uses_scaling_and_shift_factors(families, kind):
    fam = families[kind]
    cfg = fam.vae.config
    shift = cfg.shift_factor or 0.0
    pixels = torch.rand(2, 3, RES, RES) * 2 - 1
    z = fam.encode_pixels(pixels, generator=torch.Generator().manual_seed(0))
    raw = fam.vae.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, *fam.latent_shape(RES, RES))
    assert torch.allclose(z, (raw - shift) * cfg.scaling_factor, atol=1e-6)
    latents = torch.randn_like(z, requires_grad=True)
    images = fam.decode_latents(latents)
    with torch.no_grad():
        expected = fam.vae.decode(latents / cfg.scaling_factor + shift).sample
    assert torch.allclose(images, expected, atol=1e-6)
    images.sum().backward()  # differentiable for the GAN loss
    assert latents.grad is not None and latents.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", sorted(FAMILY_OF))
def test_bf16_teacher_takes_fp32_inputs_and_returns_fp32(families, kind):
    fam = families[kind]
    x = torch.randn(2, *fam.latent_shape(RES, RES), generator=torch.Generator().manual_seed(2))
    tau = torch.tensor([749, 249]) if kind == "sdxl" else torch.tensor([0.9, 0.5])
    cond = fam.encode_prompts(PROMPTS)
    ref = fam.guided_predict(fam.load_denoiser(torch.float32), x, tau, cond, 3.0)
    out = fam.guided_predict(fam.load_denoiser(torch.bfloat16), x, tau, cond, 3.0)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()  # same function, bf16 rounding only

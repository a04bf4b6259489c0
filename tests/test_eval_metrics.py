"""Metric backends of the evaluation suite, end to end on tiny random models of the real classes.

* FID-T / patch FID-T: our Inception-v3 of the FID graph (full size: the architecture of the released weights;
  tiny: the same class with widths ÷ 16), loaded from a local file;
* CLIP score, HPSv2, PickScore: ``transformers.CLIPModel`` folders; checked against CLIPModel's own forward;
* ImageReward: BLIP towers + head from a local folder; the converter of the released checkpoint is checked
  against a hand-written forward of BLIP's original ViT layout;
* the OpenCLIP → CLIPModel converter (for HPSv2) against a hand-written OpenCLIP forward;
* a missing metric model is reported as skipped and the other metrics are still computed.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from senseflow.eval.config import MetricsConfig
from senseflow.eval.fid import crop_boxes, fixed_crops
from senseflow.eval.images import indexed_images, load_rgb, save_png_atomic
from senseflow.eval.inception import FIDInceptionV3, load_fid_inception
from senseflow.eval.metrics import EvalInputs, compute_metrics
from senseflow.eval.prompts import PromptSet
from senseflow.eval.tiny_models import TINY_CLIP, build_tiny_metric_models

PROMPTS = ["a photo of a cat sitting on a red sofa", "a red sports car driving through the desert",
           "a small wooden cabin in a snowy forest", "an owl perched on a branch at midnight",
           "a bowl of ramen with an egg and green onions", "a corgi wearing sunglasses on the beach"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_tiny_metric_models(tmp_path_factory.mktemp("eval_models"), seed=0)


def write_images(folder, n: int, seed: int, size: int = 64, smooth: int = 8):
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        low = torch.rand(3, smooth, smooth, generator=g)
        x = F.interpolate(low[None], size=(size, size), mode="bilinear", align_corners=False)[0]
        arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        save_png_atomic(Image.fromarray(arr), folder / f"{i:05d}.png")
    return indexed_images(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_images")
    return {"a": write_images(root / "a", 6, seed=1), "b": write_images(root / "b", 6, seed=2, smooth=3)}


def inputs(folders, samples="a", reference="b") -> EvalInputs:
    return EvalInputs(samples=folders[samples], prompts=PromptSet(PROMPTS),
                      reference=folders[reference] if reference else None)


def cfg_with(models, **sections) -> MetricsConfig:
    cfg = MetricsConfig()
    cfg.fid_t.weights = str(models["inception"])
    cfg.patch_fid_t.patch_size = 32
    for name in ("clip", "hpsv2", "pickscore"):
        getattr(cfg, name).model = str(models["clip"])
    cfg.imagereward.model = str(models["imagereward"])
    for key, value in sections.items():
        section, field = key.split("__")
        setattr(getattr(cfg, section), field, value)
    return cfg


# ---- FID -------------------------------------------------------------------------------------------------------

def test_full_size_network_has_the_fid_graph_architecture_and_loads_a_state_dict_file(tmp_path):
    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    # Inception-v3 without the auxiliary head, 1008 logits: the parameter count of the FID graph's PyTorch port
    assert sum(p.numel() for p in net.parameters()) == 23_850_960
    assert net.feature_dim == 2048 and net.fc.out_features == 1008
    assert "Mixed_7c.branch3x3dbl_3b.bn.running_var" in net.state_dict()
    path = tmp_path / "pt_inception-2015-12-05-test.pth"
    torch.save(net.state_dict(), path)
    loaded = load_fid_inception(path)
    x = torch.randint(0, 256, (1, 3, 80, 72), dtype=torch.uint8)
    f = loaded.features(x)
    assert f.shape == (1, 2048) and (f >= 0).all()  # pool3 of ReLU outputs
    torch.testing.assert_close(f, net.features(x))


def test_fid_network_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_fid_inception(tmp_path / "missing.pth")
    bad = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048), "conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="other.pth: not an FID Inception-v3"):
        load_fid_inception(bad)


def test_crops_sit_at_fixed_positions_at_full_resolution():
    assert crop_boxes(1024, 1024, 299, "center") == [(362, 362)]
    assert crop_boxes(1024, 768, 299, "grid", 2) == [(0, 0), (0, 469), (725, 0), (725, 469)]
    assert crop_boxes(1024, 1024, 299, "grid", 3)[4] == (362, 362)
    x = torch.arange(2 * 3 * 8 * 8).reshape(2, 3, 8, 8)
    crops = fixed_crops(x, 4, "grid", 2)
    assert crops.shape == (8, 3, 4, 4)
    torch.testing.assert_close(crops[5], x[1, :, 0:4, 4:8])  # image 1, crop 1 (top right)
    with pytest.raises(ValueError, match="exceeds the image size"):
        crop_boxes(64, 64, 299)


def test_fid_t_and_patch_fid_t_end_to_end_on_a_tiny_network(models, folders):
    cfg = cfg_with(models, patch_fid_t__layout="grid", patch_fid_t__grid=2)
    res = compute_metrics(cfg, inputs(folders), only=["fid_t", "patch_fid_t"], log=lambda s: None)
    assert res["fid_t"].status == "ok" and res["fid_t"].value > 0
    assert res["fid_t"].details == {"n_samples": 6, "n_reference": 6, "feature_dim": 128}
    assert res["patch_fid_t"].status == "ok" and res["patch_fid_t"].value > 0
    assert res["patch_fid_t"].details["n_sample_patches"] == 6 * 4
    same = compute_metrics(cfg, inputs(folders, "a", "a"), only=["fid_t"], log=lambda s: None)
    assert same["fid_t"].value == pytest.approx(0, abs=1e-6)


# ---- CLIP score, HPSv2, PickScore ------------------------------------------------------------------------------

def test_clip_hps_and_pick_scores_equal_clipmodels_own_logits(models, folders):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    res = compute_metrics(cfg_with(models), inputs(folders), only=["clip", "hpsv2", "pickscore"], log=lambda s: None)
    model = CLIPModel.from_pretrained(str(models["clip"])).eval()
    tok = AutoTokenizer.from_pretrained(str(models["clip"]))
    proc = CLIPImageProcessor.from_pretrained(str(models["clip"]))
    images = [load_rgb(p) for p in folders["a"].values()]
    with torch.no_grad():
        out = model(**tok(PROMPTS, padding=True, return_tensors="pt"),
                    pixel_values=proc(images=images, return_tensors="pt")["pixel_values"])
    logits = out.logits_per_image.diagonal().double()  # exp(s) · cos(image i, prompt i)
    cos = logits / model.logit_scale.exp().double()
    assert res["clip"].value == pytest.approx(cos.mean().item(), abs=1e-5)
    assert res["hpsv2"].value == pytest.approx(cos.mean().item(), abs=1e-5)  # same folder here: same cosine
    assert res["pickscore"].value == pytest.approx(logits.mean().item(), rel=1e-5)
    assert res["clip"].details["n"] == 6


# ---- ImageReward -----------------------------------------------------------------------------------------------

def blip_vit_forward(sd: dict, prefix: str, x: torch.Tensor, heads: int, eps: float) -> torch.Tensor:
    """BLIP's ViT written from its original layout (timm names): patch conv, [CLS], positions, pre-norm blocks."""
    w = sd[prefix + "patch_embed.proj.weight"]
    h = F.conv2d(x, w, sd[prefix + "patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    h = torch.cat([sd[prefix + "cls_token"].expand(x.shape[0], -1, -1), h], 1) + sd[prefix + "pos_embed"]
    d = h.shape[-1]
    i = 0
    while f"{prefix}blocks.{i}.norm1.weight" in sd:
        b = f"{prefix}blocks.{i}."
        y = F.layer_norm(h, (d,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps)
        q, k, v = F.linear(y, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).chunk(3, -1)
        split = lambda t: t.unflatten(-1, (heads, d // heads)).transpose(1, 2)  # noqa: E731
        a = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads), -1) @ split(v)
        h = h + F.linear(a.transpose(1, 2).flatten(2), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        y = F.layer_norm(h, (d,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps)
        h = h + F.linear(F.gelu(F.linear(y, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                         sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        i += 1
    return F.layer_norm(h, (d,), sd[prefix + "norm.weight"], sd[prefix + "norm.bias"], eps)


def released_layout(model) -> dict[str, torch.Tensor]:
    """Our tiny ImageReward weights renamed to the released checkpoint's names (the converter's input)."""
    sd = model.state_dict()
    v = "vision."
    out = {"blip.visual_encoder.cls_token": sd[v + "embeddings.class_embedding"],
           "blip.visual_encoder.pos_embed": sd[v + "embeddings.position_embedding"],
           "blip.visual_encoder.patch_embed.proj.weight": sd[v + "embeddings.patch_embedding.weight"],
           "blip.visual_encoder.patch_embed.proj.bias": sd[v + "embeddings.patch_embedding.bias"],
           "blip.visual_encoder.norm.weight": sd[v + "post_layernorm.weight"],
           "blip.visual_encoder.norm.bias": sd[v + "post_layernorm.bias"],
           "blip.text_encoder.embeddings.position_ids": torch.arange(40)[None],
           "blip.text_proj.weight": torch.zeros(4, 32)}  # BLIP keys the scorer does not use
    names = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.qkv": "attn.qkv",
             "self_attn.projection": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for k, t in sd.items():
        if k.startswith(v + "encoder.layers."):
            i, rest = k[len(v + "encoder.layers."):].split(".", 1)
            part, kind = rest.rsplit(".", 1)
            out[f"blip.visual_encoder.blocks.{i}.{names[part]}.{kind}"] = t
        elif k.startswith("text."):
            out["blip.text_encoder." + k[len("text."):]] = t
    for j, i in enumerate([0, 2, 4]):  # the release's head: Linear, Dropout, Linear, Dropout, Linear, ...
        out[f"mlp.layers.{i}.weight"], out[f"mlp.layers.{i}.bias"] = sd[f"head.{j}.weight"], sd[f"head.{j}.bias"]
    return out


def test_image_reward_scores_and_the_release_converter_round_trip(models, folders, tmp_path):
    from senseflow.eval.image_reward import ImageRewardScorer, convert_imagereward_checkpoint, load_image_reward

    res = compute_metrics(cfg_with(models), inputs(folders), only=["imagereward"], log=lambda s: None)
    assert res["imagereward"].status == "ok" and res["imagereward"].details["n"] == 6
    scorer = ImageRewardScorer(models["imagereward"])
    images = [load_rgb(p) for p in folders["a"].values()]
    direct = scorer.score(images, PROMPTS)
    assert res["imagereward"].value == pytest.approx(direct.double().mean().item(), abs=1e-6)

    original = load_image_reward(models["imagereward"])
    ckpt = tmp_path / "ImageReward.pt"
    torch.save(released_layout(original), ckpt)
    # the released tokenizer is bert-base-uncased plus [DEC] and [ENC]; the converter adds them to the plain one
    scorer.tokenizer.save_pretrained(str(tmp_path / "bert"))
    out = convert_imagereward_checkpoint(ckpt, tmp_path / "bert", tmp_path / "converted", head_dim=8)
    converted = ImageRewardScorer(out)
    torch.testing.assert_close(converted.score(images, PROMPTS), direct)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["head_dims"] == [32, 16, 8, 1] and cfg["vision_config"]["image_size"] == 32
    pixels = scorer.processor(images=images[:2], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ours = converted.model.vision(pixel_values=pixels).last_hidden_state
    theirs = blip_vit_forward(released_layout(original), "blip.visual_encoder.", pixels, heads=4, eps=1e-6)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# ---- OpenCLIP → CLIPModel (HPSv2) ------------------------------------------------------------------------------

def openclip_state(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in OpenCLIP's layout with the tiny CLIP's sizes."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    vw, tw, e, p, ctx = 32, 32, TINY_CLIP["projection_dim"], 8, 77
    sd = {"visual.conv1.weight": r(vw, 3, p, p), "visual.class_embedding": r(vw),
          "visual.positional_embedding": r(17, vw), "visual.proj": r(vw, e),
          "token_embedding.weight": r(vocab, tw), "positional_embedding": r(ctx, tw), "text_projection": r(tw, e),
          "logit_scale": torch.tensor(math.log(1 / 0.07))}
    for name, w in (("visual.ln_pre", vw), ("visual.ln_post", vw), ("ln_final", tw)):
        sd[name + ".weight"], sd[name + ".bias"] = 1 + r(w), r(w)
    for prefix, w in (("visual.transformer", vw), ("transformer", tw)):
        for i in range(2):
            b = f"{prefix}.resblocks.{i}."
            for ln in ("ln_1", "ln_2"):
                sd[b + ln + ".weight"], sd[b + ln + ".bias"] = 1 + r(w), r(w)
            sd[b + "attn.in_proj_weight"], sd[b + "attn.in_proj_bias"] = r(3 * w, w), r(3 * w)
            sd[b + "attn.out_proj.weight"], sd[b + "attn.out_proj.bias"] = r(w, w), r(w)
            sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"] = r(48, w), r(48)
            sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"] = r(w, 48), r(w)
    return sd


def openclip_tower(sd, prefix, h, heads, causal):
    """OpenCLIP's residual attention blocks (fused in-projection, nn.MultiheadAttention semantics)."""
    d = h.shape[-1]
    mask = torch.full((h.shape[1], h.shape[1]), float("-inf")).triu(1) if causal else None
    i = 0
    while f"{prefix}resblocks.{i}.ln_1.weight" in sd:
        b = f"{prefix}resblocks.{i}."
        y = F.layer_norm(h, (d,), sd[b + "ln_1.weight"], sd[b + "ln_1.bias"], 1e-5)
        a, _ = F.multi_head_attention_forward(
            y.transpose(0, 1), y.transpose(0, 1), y.transpose(0, 1), d, heads, sd[b + "attn.in_proj_weight"],
            sd[b + "attn.in_proj_bias"], None, None, False, 0.0, sd[b + "attn.out_proj.weight"],
            sd[b + "attn.out_proj.bias"], need_weights=False, attn_mask=mask)
        h = h + a.transpose(0, 1)
        y = F.layer_norm(h, (d,), sd[b + "ln_2.weight"], sd[b + "ln_2.bias"], 1e-5)
        h = h + F.linear(F.gelu(F.linear(y, sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"])),
                         sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"])
        i += 1
    return h


def test_openclip_checkpoint_converts_to_a_clipmodel_with_the_same_embeddings(models, tmp_path):
    from transformers import AutoTokenizer, CLIPModel

    from senseflow.eval.openclip import convert_openclip_checkpoint

    tok = AutoTokenizer.from_pretrained(str(models["clip"]))
    sd = openclip_state(len(tok))
    ckpt = tmp_path / "HPS_tiny.pt"
    torch.save({"state_dict": sd}, ckpt)  # HPSv2 ships {"state_dict": ...}
    out = convert_openclip_checkpoint(ckpt, models["clip"], tmp_path / "hps")
    model = CLIPModel.from_pretrained(str(out)).eval()

    x = torch.randn(2, 3, 32, 32)
    ids = tok(PROMPTS[:2], padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=x).pooler_output)
        txt = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    # OpenCLIP: conv → [CLS] + positions → ln_pre → blocks → ln_post([CLS]) @ proj
    h = F.conv2d(x, sd["visual.conv1.weight"], stride=8).flatten(2).transpose(1, 2)
    h = torch.cat([sd["visual.class_embedding"].expand(2, 1, -1), h], 1) + sd["visual.positional_embedding"]
    h = F.layer_norm(h, (32,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], 1e-5)
    h = openclip_tower(sd, "visual.transformer.", h, heads=4, causal=False)
    ref_img = (
        F.layer_norm(h[:, 0], (32,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], 1e-5) @ sd["visual.proj"]
    )
    # text: token + positions → causal blocks → ln_final → the end-of-text token (the largest id) @ text_projection
    t = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    t = openclip_tower(sd, "transformer.", t, heads=4, causal=True)
    t = F.layer_norm(t, (32,), sd["ln_final.weight"], sd["ln_final.bias"], 1e-5)
    eot = (ids == tok.eos_token_id).int().argmax(-1)
    ref_txt = t[torch.arange(2), eot] @ sd["text_projection"]
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=1e-5)
    assert (out / "preprocessor_config.json").is_file() and (out / "tokenizer.json").is_file()


def test_openclip_converter_refuses_unknown_keys():
    from senseflow.eval.openclip import convert_openclip_state

    with pytest.raises(ValueError, match="'visual.trunk.stem.weight' has no transformers counterpart"):
        convert_openclip_state({"visual.trunk.stem.weight": torch.zeros(1)})


# ---- missing models --------------------------------------------------------------------------------------------

def test_a_missing_metric_model_is_skipped_and_the_others_are_computed(models, folders, tmp_path):
    broken = tmp_path / "broken_clip"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "preprocessor_config.json").write_text("{}")
    cfg = cfg_with(models, clip__model=str(tmp_path / "no_such_clip"), hpsv2__model=str(broken),
                   imagereward__model=None, fid_t__weights=str(tmp_path / "pt_inception.pth"))
    log: list[str] = []
    res = compute_metrics(cfg, inputs(folders), log=log.append)
    assert res["clip"].status == "skipped" and "no_such_clip" in res["clip"].message
    assert res["clip"].value is None  # never estimated
    assert res["fid_t"].status == "skipped" and "pt_inception.pth" in res["fid_t"].message
    assert res["patch_fid_t"].status == "skipped"  # falls back to FID-T's (missing) weights
    assert res["imagereward"].status == "skipped" and "no model configured" in res["imagereward"].message
    assert res["hpsv2"].status == "error"  # present but unreadable: reported, not hidden
    assert res["digits"].status == "skipped" and "disabled" in res["digits"].message
    assert res["pickscore"].status == "ok" and np.isfinite(res["pickscore"].value)
    assert any(line.startswith("metric clip: skipped (model not found") for line in log)
    no_ref = compute_metrics(cfg_with(models), inputs(folders, reference=None), only=["fid_t"], log=log.append)
    assert no_ref["fid_t"].status == "skipped" and "reference" in no_ref["fid_t"].message


# ---- digits backend --------------------------------------------------------------------------------------------

def test_prompted_digit_comes_from_metadata_or_the_one_digit_the_prompt_names():
    pytest.importorskip("senseflow.digits.data")
    from senseflow.eval.digits_backend import prompt_digit

    assert prompt_digit("a handwritten digit seven") == 7
    assert prompt_digit("the number 3 handwritten") == 3
    assert prompt_digit("a drawing", {"digit": 4}) == 4
    assert prompt_digit("a cat") is None and prompt_digit("one or two") is None and prompt_digit("a 12") is None


def test_digits_backend_scores_accuracy_and_frechet_distances(tmp_path, folders):
    pytest.importorskip("senseflow.digits.metrics")
    from senseflow.digits.classifier import ClassifierConfig, DigitClassifier, save_classifier

    torch.manual_seed(0)
    clf = save_classifier(DigitClassifier(ClassifierConfig()).eval(), tmp_path / "clf.safetensors")
    cfg = MetricsConfig()
    cfg.digits.enabled, cfg.digits.classifier = True, str(clf)
    digit_prompts = PromptSet([f"a handwritten digit {w}" for w in ("zero", "one", "two", "three", "four", "five")])
    res = compute_metrics(cfg, EvalInputs(folders["a"], digit_prompts, folders["b"]), only=["digits"],
                          log=lambda s: None)["digits"]
    assert res.status == "ok", res.message
    d = res.details
    assert d["n"] == d["n_labelled"] == 6 and 0 <= d["accuracy"] <= 1 and res.value == d["accuracy"]
    assert d["fd_t"] > 0 and d["fd_real"] > 0

"""VFM discriminator (docs/method.md §9): DiffAugment, BatchNormLocal, heads, the frozen DINOv2 backbone, CLIP text."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, Dinov2Config, Dinov2Model

from senseflow.models.diffaug import augment_cutout, augment_translation, diff_augment
from senseflow.models.discriminator import (
    BatchNormLocal,
    EqualLinear,
    TextConditioner,
    VFMDiscriminator,
    load_discriminator_backbones,
)

C_DIM = 8


def tiny_dino() -> Dinov2Model:
    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=2, image_size=64,
                       patch_size=8, num_channels=3, layerscale_value=1.0, use_swiglu_ffn=False)
    return Dinov2Model(cfg)


def tiny_disc(**kw) -> VFMDiscriminator:
    torch.manual_seed(1)
    args = dict(c_dim=C_DIM, hooks=[1, 3], cmap_dim=16, downsample=2, virtual_batch=8)
    args.update(kw)
    return VFMDiscriminator(tiny_dino(), **args)


def images(b=3, size=64, seed=0):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---- DiffAugment -----------------------------------------------------------------------------------------------------
def test_diffaugment_is_deterministic_per_generator_and_differentiable():
    x = images(4, 32).requires_grad_(True)
    a = diff_augment(x, torch.Generator().manual_seed(3))
    b = diff_augment(x, torch.Generator().manual_seed(3))
    c = diff_augment(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    (a * torch.randn_like(a)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_translation_shifts_by_bounded_integers_with_zero_padding():
    x = torch.ones(16, 1, 16, 16)
    out = augment_translation(x, torch.Generator().manual_seed(0), ratio=0.125)
    zero_rows = (out[:, 0].sum(dim=2) == 0).sum(dim=1)
    zero_cols = (out[:, 0].sum(dim=1) == 0).sum(dim=1)
    assert int(zero_rows.max()) <= 2 and int(zero_cols.max()) <= 2  # |Δ| ≤ round(0.125·16) = 2
    assert int((zero_rows + zero_cols).sum()) > 0
    # the rest of the image is the shifted input: values are exactly 0 or 1
    assert torch.all((out == 0) | (out == 1))


def test_cutout_zeroes_one_clipped_square_per_sample():
    x = torch.ones(32, 1, 20, 20)
    out = augment_cutout(x, torch.Generator().manual_seed(0), ratio=0.2)  # side round(0.2·20) = 4
    zeros = (out == 0).flatten(1).sum(dim=1)
    assert int(zeros.max()) == 16 and int(zeros.min()) >= 4  # a full 4×4 square or a border-clipped one


def test_colour_keeps_grey_images_grey():
    grey = torch.rand(2, 1, 8, 8).expand(2, 3, 8, 8).clone()
    out = diff_augment(grey, torch.Generator().manual_seed(0), policy=["color"])
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])
    with pytest.raises(ValueError, match="policy"):
        diff_augment(grey, torch.Generator(), policy=["flip"])


# ---- building blocks -------------------------------------------------------------------------------------------------
def test_batchnormlocal_normalises_each_virtual_group_separately():
    bn = BatchNormLocal(3, virtual_batch=4)
    x = torch.randn(10, 3, 5, 5) * 3 + 2  # ⌈10/4⌉ = 3 groups of 4, 3, 3 samples
    y = bn(x)
    for sl in (slice(0, 4), slice(4, 7), slice(7, 10)):
        g = y[sl]
        assert torch.allclose(g.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
        assert torch.allclose(g.var(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-3)
    x2 = x.clone()
    x2[8] += 100.0  # changing a sample of the last group leaves the other groups unchanged
    y2 = bn(x2)
    assert torch.equal(y2[:7], y[:7]) and not torch.allclose(y2[7:], y[7:])
    assert not any("running" in n for n, _ in bn.named_buffers())


def test_equal_linear_scales_weights_at_runtime():
    lin = EqualLinear(4, 2)
    x = torch.randn(3, 4)
    assert torch.allclose(lin(x), x @ (lin.weight / 2.0).T + lin.bias)


# ---- the discriminator ---------------------------------------------------------------------------------------------
def test_output_shape_and_gradients():
    d = tiny_disc().train()
    x, r = images(3, seed=0).requires_grad_(True), images(3, seed=1)
    c = torch.nn.functional.normalize(torch.randn(3, C_DIM), dim=-1)
    ref = d.reference_features(r)
    assert len(ref) == 3 and all(f.shape == (3, 32, 8, 8) and not f.requires_grad for f in ref)
    logits = d(x, c, ref, torch.Generator().manual_seed(0))
    # 3 maps (embedding + hooks 1, 3); 8×8 tokens → 2 stride-2 convs → 2×2 = 4 logits per head
    assert logits.shape == (3, 12)
    logits.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.heads.parameters())
    assert all(p.grad is None for p in d.dino.parameters())
    assert x.grad is not None and x.grad.abs().sum() > 0  # the generator's adversarial path reaches the image
    assert {id(p) for p in d.trainable_parameters()} == {id(p) for p in d.heads.parameters()}


def test_backbone_stays_frozen_and_in_eval_mode():
    d = tiny_disc()
    d.train()
    assert not d.dino.training and d.heads.training
    assert not any(p.requires_grad for p in d.dino.parameters())


def test_augmentation_is_deterministic_per_generator():
    d = tiny_disc().eval()  # eval: spectral norm does not advance its power iteration between calls
    x, r = images(2, seed=0), images(2, seed=1)
    c = torch.randn(2, C_DIM)
    ref = d.reference_features(r)
    a = d(x, c, ref, torch.Generator().manual_seed(5))
    b = d(x, c, ref, torch.Generator().manual_seed(5))
    e = d(x, c, ref, torch.Generator().manual_seed(6))
    n = d(x, c, ref, None)
    assert torch.equal(a, b) and not torch.allclose(a, e) and not torch.allclose(a, n)


def test_conditioning_on_text_and_reference_changes_logits():
    d = tiny_disc().eval()
    x = images(2, seed=0)
    ref_a, ref_b = d.reference_features(images(2, seed=1)), d.reference_features(images(2, seed=2))
    c1, c2 = torch.randn(2, C_DIM), torch.randn(2, C_DIM)
    base = d(x, c1, ref_a)
    assert not torch.allclose(base, d(x, c2, ref_a))
    assert not torch.allclose(base, d(x, c1, ref_b))


def test_resize_and_bad_arguments():
    d = tiny_disc(resize_to=64).eval()
    x = images(2, size=96)
    ref = d.reference_features(images(2, size=80))
    assert d(x, torch.randn(2, C_DIM), ref).shape == (2, 12)
    with pytest.raises(ValueError, match="reference maps"):
        d(x, torch.randn(2, C_DIM), ref[:2])
    with pytest.raises(ValueError, match="hooks"):
        tiny_disc(hooks=[4])


# ---- text condition --------------------------------------------------------------------------------------------------
def tiny_clip_text():
    torch.manual_seed(2)
    cfg = CLIPTextConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, projection_dim=8, bos_token_id=0,
                         pad_token_id=1, eos_token_id=3)
    return CLIPTextModelWithProjection(cfg)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<pad>": 1, "<unk>": 2, "<eos>": 3, "a": 4, "cat": 5, "dog": 6, "photo": 7, "of": 8}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 0), ("<eos>", 3)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def test_text_conditioner_returns_frozen_unit_embeddings():
    cond = TextConditioner(tiny_clip_text(), tiny_tokenizer(), max_length=8)
    c = cond(["a photo of a cat", "a dog"])
    assert c.shape == (2, 8) and cond.embed_dim == 8
    assert torch.allclose(c.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(c[0], c[1])
    assert not any(p.requires_grad for p in cond.parameters())
    ids = torch.tensor([[0, 4, 5, 3, 1, 1, 1, 1]])
    assert torch.allclose(cond.encode_ids(ids), cond(["a cat"]), atol=1e-6)


def test_loading_backbones_from_local_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="dino_path"):
        load_discriminator_backbones(tmp_path / "nope", tmp_path, "cpu", torch.float32)
    dino_dir, clip_dir = tmp_path / "dino", tmp_path / "clip"
    tiny_dino().save_pretrained(dino_dir)
    tiny_clip_text().save_pretrained(clip_dir)
    tiny_tokenizer().save_pretrained(clip_dir)
    bb = load_discriminator_backbones(dino_dir, clip_dir, "cpu", torch.float32)
    assert isinstance(bb.dino, Dinov2Model) and bb.image_mean == (0.485, 0.456, 0.406)
    d = VFMDiscriminator(bb.dino, c_dim=8, hooks=[0], downsample=1, image_mean=bb.image_mean, image_std=bb.image_std)
    text = TextConditioner(bb.text_model, bb.tokenizer, max_length=8)
    c = text(["a cat", "a dog"])
    assert d(images(2), c, d.reference_features(images(2, seed=3))).shape == (2, 2 * 16)


def test_kernel_size_sets_the_residual_basic_blocks_and_3_is_todays_network():
    """discriminator.kernel_size is k of the heads' residual basic blocks (§9.1); the first block stays 1×1 and the
    stride-2 convs 3×3. k = 3 is the default and builds the same network as before the key was wired."""
    d5 = tiny_disc(kernel_size=5)
    for stack in (d5.heads[0].main, d5.heads[0].refmapper[0]):
        convs = [m for m in stack.modules() if isinstance(m, torch.nn.Conv2d)]
        # downsample 2: Block₁ → SNConv₃ stride 2 → Res(Block_k) → SNConv₃ stride 2
        assert [c.kernel_size for c in convs] == [(1, 1), (3, 3), (5, 5), (3, 3)]
        assert convs[2].weight.shape == (32, 32, 5, 5) and convs[2].padding == (2, 2)
    x = images(2, seed=0)
    assert d5(x, torch.randn(2, C_DIM), d5.reference_features(images(2, seed=1))).shape == (2, 12)
    default, explicit = tiny_disc().state_dict(), tiny_disc(kernel_size=3).state_dict()
    assert default.keys() == explicit.keys() and all(torch.equal(default[k], explicit[k]) for k in default)
    assert default["heads.0.main.2.fn.0.parametrizations.weight.original"].shape == (32, 32, 3, 3)
    with pytest.raises(ValueError, match="kernel_size"):
        tiny_disc(kernel_size=4)


def test_from_config_passes_every_key_of_the_discriminator_section():
    """The trainer and the memory plan build D with from_config: hook_patch, kernel_size and the head sizes arrive."""
    from senseflow.config import DiscriminatorConfig

    section = DiscriminatorConfig(hooks=[1, 3], cmap_dim=16, downsample=2, virtual_batch=4, kernel_size=5,
                                  hook_patch=False, diffaug=["color"], translation_ratio=0.25, cutout_ratio=0.5,
                                  resolution=64)
    torch.manual_seed(1)
    d = VFMDiscriminator.from_config(tiny_dino(), C_DIM, section)
    direct = tiny_disc(cmap_dim=16, downsample=2, virtual_batch=4, kernel_size=5, use_embedding=False).state_dict()
    assert [k for k, v in d.state_dict().items() if not torch.equal(direct[k], v)] == []
    assert len(d.heads) == 2 and not d.use_embedding and d.hooks == [1, 3]
    assert d.heads[0].main[2].fn[0].parametrizations.weight.original.shape == (32, 32, 5, 5)
    assert d.heads[0].main[0][1].virtual_batch == 4 and d.heads[0].cmap_dim == 16
    assert (d.augment_policy, d.translation_ratio, d.cutout_ratio, d.resize_to) == (("color",), 0.25, 0.5, (64, 64))

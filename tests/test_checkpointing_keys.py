"""``train.vae_gradient_checkpointing`` and ``discriminator.gradient_checkpointing``: the same gradients, less memory.

* The VAE decode with grad (L_adv) through diffusers' ``enable_gradient_checkpointing`` and DINOv2 with each layer
  checkpointed give the gradients of the plain forwards, and autograd saves fewer bytes in the forward: the switches
  are not no-ops.
* transformers' own ``activation_checkpointing_enable`` (formerly ``gradient_checkpointing_enable``) does nothing for
  D's backbone, which always runs in eval mode; that is why the discriminator checkpoints its layers itself.
* On the tiny FLUX trainer, the generator's gradients of L_G (DMD + ISG + L_adv through the decode and D) are equal
  with both keys on and off.
* The memory plan honours both keys and ``data.text_cache``.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from senseflow.config import load_config
from senseflow.memory import plan_memory, trace_activations
from senseflow.tiny import DINO_BACKBONE, TINY_VAE

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from senseflow.tiny import build_tiny_assets

    return build_tiny_assets(tmp_path_factory.mktemp("assets") / "tiny", seed=0)


def held_after(run) -> int:
    """Bytes autograd keeps for backward after ``run()`` as a saved-tensor hook sees them (the memory plan's
    :func:`~senseflow.memory.trace_activations`): everything without checkpointing; with it only what is saved outside
    the checkpointed units (their insides are recomputed in backward)."""
    return trace_activations(torch.nn.Identity(), lambda _: run()).total


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(**TINY_VAE, latent_channels=4).eval().requires_grad_(False)


def test_vae_decoder_checkpointing_gives_the_same_latent_gradient_and_holds_less():
    vae = tiny_vae()
    z0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    weight = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))

    def grad_and_held() -> tuple[torch.Tensor, int]:
        z = z0.clone().requires_grad_(True)
        held = held_after(lambda: vae.decode(z0.clone().requires_grad_(True)).sample)
        (vae.decode(z).sample * weight).sum().backward()
        return z.grad, held

    plain, plain_held = grad_and_held()
    vae.enable_gradient_checkpointing()
    ckpt, ckpt_held = grad_and_held()
    torch.testing.assert_close(ckpt, plain, rtol=1e-6, atol=1e-7)
    assert ckpt_held < 0.6 * plain_held


def tiny_discriminator(checkpointing: bool):
    from transformers import Dinov2Config, Dinov2Model

    from senseflow.models.discriminator import VFMDiscriminator

    torch.manual_seed(0)
    dino = Dinov2Model(Dinov2Config(**DINO_BACKBONE))
    torch.manual_seed(1)
    return VFMDiscriminator(dino, c_dim=8, hooks=[1, 3], cmap_dim=8, downsample=2, resize_to=64,
                            gradient_checkpointing=checkpointing)


def test_dinov2_checkpointing_gives_the_same_pixel_gradient_and_holds_less():
    x0 = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    c = torch.nn.functional.normalize(torch.randn(2, 8, generator=torch.Generator().manual_seed(4)), dim=-1)
    results = {}
    for ckpt in (False, True):
        d = tiny_discriminator(ckpt)
        d.heads.requires_grad_(False)  # the G step: gradient to the pixels only
        refs = d.reference_features(x0)
        x = x0.clone().requires_grad_(True)
        held = held_after(lambda: d.features(x0.clone().requires_grad_(True))[-1])
        d(x, c, refs, torch.Generator().manual_seed(5)).mean().backward()
        results[ckpt] = (x.grad, held)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-6, atol=1e-8)
    assert results[True][1] < 0.8 * results[False][1]


def test_transformers_checkpointing_is_a_no_op_for_a_backbone_in_eval_mode():
    """Why the discriminator wraps its layers itself: transformers checkpoints a layer only in training mode."""
    d = tiny_discriminator(False)
    x0 = torch.rand(2, 3, 64, 64) * 2 - 1
    before = held_after(lambda: d.features(x0.clone().requires_grad_(True))[-1])
    d.dino.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert not d.dino.training
    assert held_after(lambda: d.features(x0.clone().requires_grad_(True))[-1]) == pytest.approx(before, rel=0.01)


def test_generator_gradients_of_the_tiny_flux_trainer_are_equal_with_both_keys(assets, tmp_path):
    """One micro-batch of the tiny FLUX trainer (GAN on): L_G's gradient on every generator parameter."""
    from test_trainers import make_trainer  # the tiny configs of the trainer tests

    grads = {}
    for on in (False, True):
        keys = [f"train.vae_gradient_checkpointing={str(on).lower()}",
                f"discriminator.gradient_checkpointing={str(on).lower()}", "method.backward_simulation_prob=0.0"]
        trainer = make_trainer("flux_senseflow", assets, tmp_path / f"run_{on}", *keys)
        assert bool(getattr(trainer.family.vae.decoder, "gradient_checkpointing", False)) == on
        method = trainer.method
        decisions = method.draw(trainer.rng)
        mb = method.micro_batches(decisions, trainer.rng, trainer.data.next)[0]
        gen = next(p for p in method.players if p.name == "generator")
        loss, logs = gen.loss(mb, True)
        assert "loss/adv" in logs
        loss.backward()
        grads[on] = {n: p.grad.clone() for n, p in method.generator.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-5, atol=1e-8, msg=name)


def test_memory_plan_honours_both_keys_and_the_text_cache(assets):
    """On the tiny FLUX teacher (the plan reads its folder's configs): each key lowers its activation term as traced
    with checkpointing units, and the text cache removes exactly the text encoders' rows."""
    from test_trainers import asset_overrides

    def plan(*extra: str):
        cfg = load_config(REPO / "configs" / "tiny" / "flux_senseflow.yaml",
                          asset_overrides(assets, "flux_senseflow") + ["dist.strategy=fsdp", *extra])
        return plan_memory(cfg, 2, scenarios=False)

    off = ("train.vae_gradient_checkpointing=false", "discriminator.gradient_checkpointing=false")
    plain = plan(*off)
    keyed = plan("train.vae_gradient_checkpointing=true", "discriminator.gradient_checkpointing=true")
    cached = plan(*off, "data.text_cache=cache")
    a, b = plain.activations, keyed.activations
    assert b["VAE decode (grad)"] < a["VAE decode (grad)"]
    assert b["DINOv2 + heads (grad to pixels)"] < a["DINOv2 + heads (grad to pixels)"]
    assert keyed.peak_bytes < plain.peak_bytes
    assert any("train.vae_gradient_checkpointing=true would save" in n for n in plain.notes)
    text_rows = {r.key for r in plain.networks} - {r.key for r in cached.networks}
    assert text_rows == {"text:text_encoder", "text:text_encoder_2", "disc_text"}
    removed = sum(r.param_bytes + r.buffer_bytes for r in plain.networks if r.key in text_rows)
    assert plain.static_bytes - cached.static_bytes == removed
    assert any("data.text_cache is set" in n for n in cached.notes)

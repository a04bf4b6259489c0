"""The five trainers on tiny teachers (CPU): update order, what moves and what stays frozen, IDA in the loop,
gradient accumulation, and the launchers.

Each run uses ``configs/tiny/<trainer>.yaml`` (the real preset's method numbers on a tiny teacher) with the asset
paths pointed at a session-built ``senseflow tiny --kind all`` folder.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from senseflow.config import load_config
from senseflow.trainer import TRAINERS, get_trainer

REPO = Path(__file__).resolve().parents[1]
TRAINER_NAMES = sorted(TRAINERS)
#: GD of each preset (docs/method.md §2): the tiny configs run 2·GD iterations
GD = {"sdxl_senseflow": 5, "sdxl_dmd2": 5, "sd35_senseflow": 10, "sd35_large_senseflow": 5, "flux_senseflow": 5}


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from senseflow.tiny import build_tiny_assets

    return build_tiny_assets(tmp_path_factory.mktemp("assets") / "tiny", seed=0)


def asset_overrides(assets: Path, name: str) -> list[str]:
    teacher = {"sdxl": "sdxl", "sd35_large": "sd35-large", "sd35": "sd35-medium", "flux": "flux"}
    kind = next(v for k, v in teacher.items() if name.startswith(k))
    return [
        f"teacher.path={assets / kind}",
        f"data.path={assets / 'data' / ('sdxl_latents.lmdb' if kind == 'sdxl' else 'dataset.json')}",
        f"discriminator.dino_path={assets / 'backbones' / 'dinov2'}",
        f"discriminator.clip_path={assets / 'backbones' / 'clip_text'}",
    ]


def make_trainer(name: str, assets: Path, run_dir: Path, *overrides: str):
    cfg = load_config(REPO / "configs" / "tiny" / f"{name}.yaml", asset_overrides(assets, name) + list(overrides))
    trainer = get_trainer(name)(cfg, run_dir)
    trainer.setup()
    return trainer


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def frozen_parts(trainer) -> dict[str, torch.nn.Module]:
    fam = trainer.family
    parts = {"teacher": trainer.teacher, "vae": fam.vae}
    parts.update({name: m for name, m in fam.text.items() if isinstance(m, torch.nn.Module)})
    if trainer.discriminator is not None:
        parts["dinov2"] = trainer.discriminator.dino
        parts["clip_text"] = trainer.text_conditioner
    return parts


def players(trainer) -> dict:
    return {p.name: p for p in trainer.method.players}


def optimizer_steps(opt: torch.optim.Optimizer) -> int:
    steps = {int(s["step"]) for s in opt.state.values() if "step" in s}
    assert len(steps) <= 1, steps
    return steps.pop() if steps else 0


@pytest.mark.parametrize("name", TRAINER_NAMES)
def test_trainer_runs_2gd_iterations_moves_trained_nets_and_freezes_the_rest(name, tiny_assets, tmp_path, monkeypatch):
    """2·GD iterations: G stepped twice, F and D heads every iteration, IDA right after each G step; the teacher,
    VAE, text encoders and DINOv2 / CLIP backbones are bit-identical afterwards; every logged loss is finite."""
    import senseflow.method.distillation as distillation

    trainer = make_trainer(name, tiny_assets, tmp_path / "run")
    gd = trainer.cfg.method.gd
    assert gd == GD[name] and trainer.cfg.train.iterations == 2 * gd
    trained = {"generator": snapshot(trainer.generator), "fake": snapshot(trainer.fake)}
    if trainer.discriminator is not None:
        trained["disc_heads"] = snapshot(trainer.discriminator.heads)
    frozen = {k: snapshot(m) for k, m in frozen_parts(trainer).items()}
    assert frozen["vae"] and frozen["teacher"]

    ida_calls = []
    real_ida = distillation.ida_update
    opt = {name: p.optimizer for name, p in players(trainer).items()}
    expected = ["generator", "fake"] + (["disc_heads"] if trainer.discriminator is not None else [])
    assert list(opt) == expected  # the method declares G, F (and D's heads) in the order of §1.3

    def checked_ida(fake, generator, lam):
        # the call happens right after the generator step: G has stepped once more than IDA has run
        assert optimizer_steps(opt["generator"]) == len(ida_calls) + 1
        phi = {n: p.detach().clone() for n, p in fake.named_parameters()}
        real_ida(fake, generator, lam)
        for n, theta in generator.named_parameters():
            expected = lam * phi[n] + (1 - lam) * theta.detach()
            torch.testing.assert_close(dict(fake.named_parameters())[n].detach(), expected, rtol=0, atol=1e-7)
        ida_calls.append(lam)

    monkeypatch.setattr(distillation, "ida_update", checked_ida)
    trainer.train()

    k = trainer.cfg.train.iterations // gd
    assert optimizer_steps(opt["generator"]) == k
    assert optimizer_steps(opt["fake"]) == gd * k
    if "disc_heads" in opt:
        assert optimizer_steps(opt["disc_heads"]) == gd * k
    expected_ida = k if trainer.cfg.method.ida.enabled else 0
    assert len(ida_calls) == expected_ida
    assert not same(trained["generator"], snapshot(trainer.generator))
    assert not same(trained["fake"], snapshot(trainer.fake))
    if "disc_heads" in trained:
        assert not same(trained["disc_heads"], snapshot(trainer.discriminator.heads))
    for part, module in frozen_parts(trainer).items():
        assert same(frozen[part], snapshot(module)), f"{part} changed"

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == trainer.cfg.train.iterations
    losses = [v for row in rows for key, v in row.items() if key.startswith("loss/")]
    assert losses and all(math.isfinite(v) for v in losses)
    assert sum(row["step/generator"] for row in rows) == k
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == f"iter_{2 * gd:06d}"
    assert (tmp_path / "run" / "config.yaml").exists()


def test_two_accumulation_steps_of_batch_1_equal_one_step_of_batch_2(tiny_assets, tmp_path):
    """Same samples, same per-sample noise, one shared set of decisions: the generator's accumulated gradient (the
    thing its optimiser steps on) and its updated weights agree.

    The GAN is off because BatchNormLocal normalises over the micro-batch (a batch of 2 is not two batches of 1).
    Tolerances: gradients within 1e-4 of each tensor's largest entry, weights 1e-5 absolute, 1% of the 1e-3 step,
    where the gradient is resolved (float32 summation order differs between one batch of 2 and two batches of 1).
    """
    common = ["method.gd=1", "train.iterations=1", "method.gan.enabled=false", "method.backward_simulation_prob=0.0",
              "optimizer.lr_generator=1e-3", "optimizer.lr_start=1e-3", "optimizer.grad_clip=null"]
    runs = {
        "batch2": make_trainer("sd35_senseflow", tiny_assets, tmp_path / "b2", *common, "train.batch_size=2"),
        "batch1x2": make_trainer("sd35_senseflow", tiny_assets, tmp_path / "b1x2", *common, "train.batch_size=1",
                                 "train.grad_accum=2"),
    }
    before = snapshot(runs["batch2"].generator)
    assert same(before, snapshot(runs["batch1x2"].generator))
    grads: dict[str, dict[str, torch.Tensor]] = {}
    for key, trainer in runs.items():
        real_step = trainer._clip_and_step

        def recording_step(player, key=key, real_step=real_step):
            if player.name == "generator":
                net = player.module
                grads[key] = {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}
            return real_step(player)

        trainer._clip_and_step = recording_step
        trainer.train()
    assert grads["batch2"].keys() == grads["batch1x2"].keys() and grads["batch2"]
    assert max(g.abs().max().item() for g in grads["batch2"].values()) > 0
    for name, g in grads["batch2"].items():
        scale = g.abs().max().item()
        assert (grads["batch1x2"][name] - g).abs().max().item() <= 1e-4 * scale + 1e-12, name
    after = {k: snapshot(t.generator) for k, t in runs.items()}
    assert max((after["batch2"][k] - before[k]).abs().max().item() for k in before) > 1e-4  # the update is real
    for key in before:
        # AdamW's first step moves a weight by ≈ lr·g/(|g| + eps): wherever the gradient is resolved (|g| above
        # twice the gradients' agreement) both runs take the same step; where |g| is within float noise of 0 its
        # sign, hence the step, is not determined by either run
        g = grads["batch2"].get(key)
        resolved = g.abs() > 2e-4 * g.abs().max() if g is not None else torch.ones_like(before[key], dtype=torch.bool)
        torch.testing.assert_close(after["batch1x2"][key][resolved], after["batch2"][key][resolved], rtol=0,
                                   atol=1e-5)


@pytest.mark.parametrize("name", TRAINER_NAMES)
def test_launcher_runs_the_tiny_config_with_one_process(name, tiny_assets, tmp_path):
    """`sh exp_*/train_*.sh 1 1 CONFIG SAVE overrides` (torchrun, one process, gloo/CPU) finishes and writes the
    resolved config, metrics with finite losses and a complete checkpoint with the consolidated student."""
    launcher = {
        "sdxl_senseflow": "exp_sdxl/train_sdxl_senseflow.sh",
        "sdxl_dmd2": "exp_sdxl/train_sdxl_dmd2.sh",
        "sd35_senseflow": "exp_sd35/train_SD35_senseflow.sh",
        "sd35_large_senseflow": "exp_sd35/train_SD35_large_senseflow.sh",
        "flux_senseflow": "exp_flux/train_flux_senseflow.sh",
    }[name]
    run = tmp_path / "run"
    env = dict(
        os.environ,
        MASTER_PORT=str(29500 + TRAINER_NAMES.index(name)),
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    )
    proc = subprocess.run(
        ["sh", str(REPO / launcher), "1", "1", str(REPO / "configs" / "tiny" / f"{name}.yaml"), str(run),
         *asset_overrides(tiny_assets, name)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * GD[name]
    assert all(math.isfinite(v) for row in rows for key, v in row.items() if key.startswith("loss/"))
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert (latest / ".metadata").exists() and (latest / "student.safetensors").exists()

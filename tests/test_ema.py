"""The EMA of the generator (``train.ema``): θ̄ ← d_n·θ̄ + (1 − d_n)·θ after each generator step, with the warm-up
d_n = min(d, (1 + n)/(w + n)), and the ``student_ema.safetensors`` that inference, export and the demo prefer.

(Its checkpointing and bit-identical resume under FSDP2 are covered by tests/test_resume.py.)
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from senseflow.checkpoint_io import resolve_student_source
from senseflow.method.optim import EMA


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))  # a buffer (running stats) the EMA must not touch
    net[1].weight.requires_grad_(False)  # frozen: not averaged
    return net


def test_constant_decay_without_warmup():
    net = tiny_net()
    ema = EMA(net, decay=0.9)
    start = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ema.update(net)
    assert torch.allclose(ema.shadow["0.weight"], start + 0.1)  # 0.9·θ̄ + 0.1·(θ̄ + 1)
    assert ema.num_updates == 1 and "1.weight" not in ema.shadow


def test_warmup_lowers_the_early_decay_then_reaches_the_configured_one():
    ema = EMA(tiny_net(), decay=0.95, warmup=10)
    seen = []
    for _ in range(200):
        seen.append(ema.current_decay())
        ema.num_updates += 1
    assert seen[0] == pytest.approx(2 / 11)                      # n = 1: (1 + 1)/(10 + 1)
    assert seen[9] == pytest.approx(11 / 20)                     # n = 10
    assert all(a <= b for a, b in zip(seen, seen[1:])) and seen[-1] == 0.95


def test_full_weights_swap_averaged_parameters_and_keep_the_rest():
    net = tiny_net()
    ema = EMA(net, decay=0.5)
    with torch.no_grad():
        net[0].bias.fill_(2.0)
    ema.update(net)
    full = {k: v.clone() for k, v in net.state_dict().items()}
    out = ema.full_weights(full)
    assert out.keys() == full.keys()
    assert torch.equal(out["0.bias"], ema.shadow["0.bias"]) and not torch.equal(out["0.bias"], full["0.bias"])
    for kept in ("1.weight", "1.running_mean", "1.num_batches_tracked"):
        assert torch.equal(out[kept], full[kept])
    assert ema.full_weights({}) == {}  # ranks that receive no consolidated state write nothing


def test_full_weights_reject_a_state_dict_without_the_averaged_names():
    ema = EMA(tiny_net(), decay=0.5)
    with pytest.raises(KeyError, match="0.weight"):
        ema.full_weights({"something.else": torch.zeros(1)})


def test_a_checkpoint_folder_resolves_to_its_ema_weights_when_present(tmp_path):
    ck = tmp_path / "iter_000010"
    ck.mkdir()
    save_file({"w": torch.zeros(1)}, str(ck / "student.safetensors"))
    assert resolve_student_source(ck).path.name == "student.safetensors"
    save_file({"w": torch.ones(1)}, str(ck / "student_ema.safetensors"))
    assert resolve_student_source(ck).path.name == "student_ema.safetensors"
    raw = resolve_student_source(ck / "student.safetensors")  # the raw generator stays reachable by its file
    assert raw.path.name == "student.safetensors"

"""IDA (docs/method.md §7): φ ← λφ + (1 − λ)θ by parameter name, atomic on error, plain tensors and DTensors."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from senseflow.method.ida import ida_update


class AB(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)


class BA(nn.Module):
    """Same names as AB, registered in the opposite order: positional matching would swap a and b."""

    def __init__(self):
        super().__init__()
        self.b = nn.Linear(3, 3)
        self.a = nn.Linear(3, 3)


def _snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def test_relation_holds_per_parameter_name():
    torch.manual_seed(0)
    gen, fake = AB(), BA()
    theta, phi = _snapshot(gen), _snapshot(fake)
    n = ida_update(fake, gen, 0.97)
    assert n == 4
    for name, p in fake.named_parameters():
        assert torch.allclose(p, 0.97 * phi[name] + 0.03 * theta[name], atol=1e-7), name
    for name, p in gen.named_parameters():
        assert torch.equal(p, theta[name])  # the generator is not touched


def test_lambda_one_keeps_fake_and_zero_copies_generator():
    torch.manual_seed(1)
    gen, fake = AB(), AB()
    phi = _snapshot(fake)
    ida_update(fake, gen, 1.0)
    assert all(torch.equal(p, phi[n]) for n, p in fake.named_parameters())
    ida_update(fake, gen, 0.0)
    assert all(torch.equal(p, dict(gen.named_parameters())[n]) for n, p in fake.named_parameters())


def test_frozen_generator_parameters_are_skipped():
    torch.manual_seed(2)
    gen, fake = AB(), AB()
    gen.b.requires_grad_(False)
    phi = _snapshot(fake)
    assert ida_update(fake, gen, 0.5) == 2
    assert torch.equal(fake.b.weight, phi["b.weight"])
    assert not torch.equal(fake.a.weight, phi["a.weight"])


def test_missing_name_and_shape_mismatch_are_errors_and_nothing_changes():
    torch.manual_seed(3)
    gen = AB()
    fake = nn.Module()
    fake.a = nn.Linear(3, 3)
    before = _snapshot(fake)
    with pytest.raises(ValueError, match="b.weight"):
        ida_update(fake, gen, 0.9)
    assert all(torch.equal(p, before[n]) for n, p in fake.named_parameters())  # checked before any update

    fake2 = AB()
    fake2.b = nn.Linear(3, 4)
    before2 = _snapshot(fake2)
    with pytest.raises(ValueError, match="shape"):
        ida_update(fake2, gen, 0.9)
    assert all(torch.equal(p, before2[n]) for n, p in fake2.named_parameters())
    with pytest.raises(ValueError, match="lambda"):
        ida_update(AB(), gen, 1.5)


def test_bf16_fake_with_fp32_generator():
    torch.manual_seed(4)
    gen = AB()
    fake = copy.deepcopy(gen).to(torch.bfloat16)
    with torch.no_grad():
        for p in fake.parameters():
            p.zero_()
    ida_update(fake, gen, 0.5)
    assert torch.allclose(fake.a.weight.float(), 0.5 * gen.a.weight, atol=1e-2)


def test_fsdp2_dtensor_parameters_update_local_shards():
    """FSDP2 (``fully_shard``) on a 1-process gloo group: parameters are DTensors; the relation still holds."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    started = False
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        started = True
    try:
        torch.manual_seed(5)
        mesh = init_device_mesh("cpu", (1,))
        gen, fake = AB(), AB()
        theta, phi = _snapshot(gen), _snapshot(fake)
        fully_shard(gen, mesh=mesh)
        fully_shard(fake, mesh=mesh)
        assert isinstance(fake.a.weight, DTensor)
        ida_update(fake, gen, 0.98)
        for name, p in fake.named_parameters():
            assert torch.allclose(p.full_tensor(), 0.98 * phi[name] + 0.02 * theta[name], atol=1e-7), name
        with pytest.raises(ValueError, match="DTensor"):
            ida_update(AB(), gen, 0.98)  # mixing wrapped and unwrapped models is an error
    finally:
        if started:
            dist.destroy_process_group()

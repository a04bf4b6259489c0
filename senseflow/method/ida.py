"""IDA, implicit distribution alignment (docs/method.md §7).

Right after each generator step, every trainable parameter θ_i of the generator G pulls the same-named
parameter φ_i of the fake score F toward it:

    φ_i ← λ·φ_i + (1 − λ)·θ_i            (no grad; λ = 0.98 SD3.5-M, 0.97 SD3.5-L / FLUX; SDXL: off)

Parameters are matched by name (``named_parameters()``), never by position. The update runs on whatever the
parameters are: fp32 master weights (decision 2), or FSDP2 ``DTensor`` shards, in which case each rank updates
its local shard (G and F share architecture, wrapping and mesh, so the shards line up one to one and no
communication is needed).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

__all__ = ["ida_update"]


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _check_pair(name: str, phi: Tensor, theta: Tensor) -> None:
    phi_d, theta_d = isinstance(phi, DTensor), isinstance(theta, DTensor)
    if phi_d != theta_d:
        raise ValueError(
            f"IDA: parameter {name!r} is a DTensor in {'the fake score' if phi_d else 'the generator'} only; "
            "wrap G and F the same way (both FSDP2 or neither)"
        )
    if phi.shape != theta.shape:
        raise ValueError(f"IDA: parameter {name!r} has shape {tuple(phi.shape)} in F but {tuple(theta.shape)} in G")
    if isinstance(phi, DTensor) and isinstance(theta, DTensor):
        if phi.placements != theta.placements or phi.device_mesh != theta.device_mesh:
            raise ValueError(
                f"IDA: parameter {name!r} is sharded differently in F ({phi.placements}) and G ({theta.placements})"
            )
        if phi.to_local().shape != theta.to_local().shape:
            raise ValueError(
                f"IDA: local shards of {name!r} differ: "
                f"F {tuple(phi.to_local().shape)} vs G {tuple(theta.to_local().shape)}"
            )


@torch.no_grad()
def ida_update(fake: nn.Module, generator: nn.Module, lam: float) -> int:
    """φ ← λ·φ + (1−λ)·θ for every trainable parameter θ of ``generator`` and the same-named φ of ``fake``.

    Returns the number of parameter tensors updated. Raises ``ValueError`` if λ is outside [0, 1], if a
    trainable generator parameter has no same-named fake parameter, or if shapes / shardings differ. All pairs
    are checked before any parameter is modified. θ is cast to φ's dtype (both are fp32 master weights in the
    supported setups).
    """
    lam = float(lam)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"IDA: lambda must lie in [0, 1], got {lam}")
    fake_params = dict(fake.named_parameters())
    pairs: list[tuple[Tensor, Tensor]] = []
    missing: list[str] = []
    for name, theta in generator.named_parameters():
        if not theta.requires_grad:
            continue
        phi = fake_params.get(name)
        if phi is None:
            missing.append(name)
            continue
        _check_pair(name, phi, theta)
        pairs.append((phi, theta))
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5])
        raise ValueError(
            f"IDA: {len(missing)} trainable generator parameter(s) have no same-named parameter in the fake score: "
            f"{shown}{' …' if len(missing) > 5 else ''}"
        )
    for phi_t, theta_t in pairs:
        phi_l, theta_l = _local(phi_t), _local(theta_t)
        phi_l.mul_(lam).add_(theta_l.to(phi_l.dtype), alpha=1.0 - lam)
    return len(pairs)

"""Per-player budget arithmetic of the memory plan: bytes of parameters, gradients and optimiser states per GPU.

FSDP2's per-tensor dim-0 shards, AdamW / 8-bit AdamW states, and :class:`NetworkMemory`, one network's row of the
plan, which ``_Net.row`` fills from the network's meta build for one setting of the options.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from senseflow.core.dtypes import DTYPES

GIB = 1024**3
DTYPE_BYTES = {name: dtype.itemsize for name, dtype in DTYPES.items()}
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes: tensors with fewer elements keep 32-bit states
BNB_BLOCK = 256  # bitsandbytes block-wise quantisation block size (one fp32 absmax per block and state)
BNB_QMAP_BYTES = 256 * 4  # one 256-entry fp32 quantisation map per state


class MemoryPlanError(ValueError):
    """Bad input to the memory plan (one line; the CLI prints it and exits with status 2)."""


def param_shapes(module: nn.Module, trainable_only: bool = False) -> list[torch.Size]:
    """Shapes of the module's parameters (all, or those that require grad)."""
    return [p.shape for p in module.parameters() if p.requires_grad or not trainable_only]


def shard_numel(shape: Sequence[int], shards: int) -> int:
    """Elements of one FSDP2 shard of a tensor: dim 0 is split into ``shards`` chunks of ⌈d₀/shards⌉ rows."""
    if shards < 1:
        raise MemoryPlanError(f"shards must be >= 1, got {shards}")
    if len(shape) == 0:
        return 1
    rows = math.ceil(shape[0] / shards)
    return rows * math.prod(shape[1:])


def tensor_bytes(shapes: Iterable[Sequence[int]], bytes_per_element: int, shards: int = 1) -> int:
    """Σ_tensors shard_numel · bytes (the largest shard, so the rank holding it)."""
    return sum(shard_numel(s, shards) for s in shapes) * bytes_per_element


def optimizer_state_bytes(shapes: Iterable[Sequence[int]], optimizer: str, shards: int = 1,
                          include_step: bool = True) -> int:
    """Bytes of the optimiser state of fp32 parameters with these shapes, per rank under ``shards``-way sharding.

    ``adamw``: 8 B/element (exp_avg, exp_avg_sq) + 4 B per tensor for ``step`` (a host tensor in torch's AdamW;
    ``include_step=False`` leaves it out). ``adamw8bit`` (bitsandbytes): tensors with ≥ 4096 elements hold two
    uint8 states (2 B/element), two fp32 absmax per 256-element block and two 256-entry fp32 maps; smaller ones
    hold two fp32 states.
    """
    total = 0
    for shape in shapes:
        n = shard_numel(shape, shards)
        if optimizer == "adamw":
            total += 8 * n + (4 if include_step else 0)
        elif optimizer == "adamw8bit":
            if n < BNB_MIN_8BIT_SIZE:
                total += 8 * n
            else:
                total += 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK) + 2 * BNB_QMAP_BYTES
        else:
            raise MemoryPlanError(f"optimizer.name: {optimizer!r} is not one of adamw, adamw8bit")
    return total


def _unit_params(module: nn.Module, unit_types: Sequence[str]) -> tuple[int, int]:
    """(largest unit's parameter count, parameters outside units) for FSDP working-set sizing."""
    names, largest, inside = set(unit_types), 0, 0

    def visit(m: nn.Module) -> None:
        nonlocal largest, inside
        for child in m.children():
            if type(child).__name__ in names:
                n = sum(p.numel() for p in child.parameters())
                largest, inside = max(largest, n), inside + n
            else:
                visit(child)

    visit(module)
    return largest, sum(p.numel() for p in module.parameters()) - inside


@dataclass
class NetworkMemory:
    """One network of the run and its per-GPU bytes for one setting of the options."""

    key: str
    label: str
    arch: str
    params: int  # parameter count (all)
    trainable: int  # parameters the optimiser holds
    dtype: str  # storage dtype of the parameters
    sharded: bool  # FSDP-sharded (else replicated on every GPU)
    param_bytes: int = 0  # per GPU (0 on the GPU when offloaded)
    buffer_bytes: int = 0
    grad_bytes: int = 0
    optim_bytes: int = 0
    host_bytes: int = 0  # per GPU, in host memory (CPU offload)
    unit_params: int = 0  # largest FSDP unit
    root_params: int = 0  # parameters outside FSDP units
    unit_grad_params: int = 0  # trained parameters of the largest FSDP unit (its fp32 gradient in the backward)

    @property
    def static_bytes(self) -> int:
        return self.param_bytes + self.buffer_bytes + self.optim_bytes


@dataclass
class _Net:
    """One network of the run with the facts the plan needs (shapes from its meta build)."""

    key: str
    label: str
    arch: str
    module: nn.Module
    trainable: bool
    dtype: str
    sharded: bool
    fsdp_units: tuple[str, ...] = ()
    # a LoRA adapter lives inside the shared base's FSDP units: the base (with its adapters) is what FSDP gathers,
    # and ``unit_grad`` adapter parameters of the largest unit get gradients
    unit_source: nn.Module | None = None
    unit_grad: int | None = None

    def row(self, optimizer: str, shards: int, offload: bool) -> NetworkMemory:
        """Per-GPU bytes: params in ``dtype``; for trained nets fp32 grads and the optimiser state."""
        shapes = param_shapes(self.module)
        s = shards if self.sharded else 1
        count = sum(math.prod(sh) for sh in shapes)
        params = tensor_bytes(shapes, DTYPE_BYTES[self.dtype], s)
        grads = tensor_bytes(shapes, 4, s) if self.trainable else 0
        optim = optimizer_state_bytes(shapes, optimizer, s, include_step=False) if self.trainable else 0
        buffers = sum(b.numel() * (DTYPE_BYTES[self.dtype] if b.is_floating_point() else b.element_size())
                      for b in self.module.buffers())
        source = self.module if self.unit_source is None else self.unit_source
        unit, root = _unit_params(source, self.fsdp_units) if self.sharded else (0, 0)
        unit_grad = (unit if self.unit_grad is None else self.unit_grad) if self.trainable else 0
        row = NetworkMemory(self.key, self.label, self.arch, count, count if self.trainable else 0, self.dtype,
                            self.sharded, params, buffers, grads, optim, 0, unit, root, unit_grad)
        if offload and self.sharded:
            row.host_bytes = params + grads + optim
            row.param_bytes = row.grad_bytes = row.optim_bytes = 0
        return row

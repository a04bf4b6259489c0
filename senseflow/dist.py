"""Process group, device and model wrapping for single-process, DDP and FSDP2 runs.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (several nodes: NODE_RANK too); without
them the run is a single process. The backend is NCCL on CUDA and gloo on CPU unless ``dist.backend`` says
otherwise.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str, local_rank: int) -> torch.device:
    """``auto`` → cuda:<local_rank> when available, else cpu."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device_request: str, backend: str = "auto") -> DistInfo:
    """Initialise the default process group from torchrun's environment (no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_request, local_rank)
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: float, device: torch.device) -> float:
    """Mean of a scalar over ranks (for logging)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_trainable(model: nn.Module, info: DistInfo, strategy: str, block_types: tuple[type, ...] = ()) -> nn.Module:
    """Wrap a trained network: ``none`` (single process), ``ddp`` or ``fsdp`` (FSDP2 ``fully_shard`` per block
    and at the root, fp32 master weights with bf16 compute on CUDA)."""
    if not info.distributed or strategy == "none":
        return model
    if strategy == "auto":
        strategy = "fsdp"
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if info.device.type == "cuda" else MixedPrecisionPolicy()
        for module in model.modules():
            if block_types and isinstance(module, block_types):
                fully_shard(module, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        return model
    raise ValueError(f"dist.strategy: {strategy!r} is not one of auto, none, ddp, fsdp")


def unwrap(model: Any) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 modules are their own module)."""
    return getattr(model, "module", model)

"""Process group, device mesh and the placement of every network in single-process, DDP-style and FSDP2 runs.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT (several nodes: NODE_RANK
too); without them the run is a single process. The backend is NCCL on CUDA and gloo on CPU unless ``dist.backend``
says otherwise.

Placement of the networks (``dist.strategy``; ``auto`` = ``fsdp`` with several processes, ``none`` with one):

* ``fsdp`` (FSDP2, :func:`torch.distributed.fsdp.fully_shard`): G, F and the teacher T are sharded per denoiser
  block (``family.block_types()``) and at the root, over a 1-D mesh of all W ranks, or with ``dist.hsdp`` over a
  2-D mesh (replicate across nodes × shard inside a node of ``LOCAL_WORLD_SIZE`` ranks). Parameters are fp32
  ``DTensor`` shards (fp32 master weights); on CUDA :class:`MixedPrecisionPolicy` gathers them in bf16 for compute
  and reduce-scatters gradients in fp32 (on CPU everything stays fp32). T is sharded too but has no optimiser.
  ``dist.cpu_offload`` keeps shards, gradients and optimiser states in host memory (``CPUOffloadPolicy``, CUDA only).
* ``ddp``: every network is a full replica on every rank (rank 0's weights broadcast once) and the gradients of
  the trained ones are averaged over ranks before each optimiser step (:func:`sync_replicated_grads`). This is
  DDP's arithmetic without the ``DistributedDataParallel`` wrapper, whose per-forward reducer does not fit a
  network called several times per backward, under ``no_grad`` in between, and with ``requires_grad`` toggled.
* small replicated trainables under either strategy (the discriminator heads, DMD2's classifier head) follow the
  ``ddp`` rule: rank 0's initial weights are broadcast, gradients averaged before the step. The frozen DINOv2 / CLIP
  backbones, the VAE and the text encoders are plain replicas.

Building a sharded network (:func:`build_sharded`): rank 0 reads the weights into host memory; every other rank
builds the same class from the same config on the ``meta`` device (no memory); all ranks shard, and rank 0's full
state dict is broadcast tensor by tensor, each rank keeping only its shard (:func:`load_full_from_rank0`, the
``broadcast_from_rank0`` route of ``set_model_state_dict``). Only rank 0 ever holds full copies: the teacher while
G and F are built from it, plus the one network being sharded.

Activation checkpointing (per block): diffusers' ``enable_gradient_checkpointing()`` when the network has it, else
torch's ``checkpoint_wrapper`` around every block (non-reentrant).
"""
from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence, TypeGuard

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

STRATEGIES = ("auto", "none", "ddp", "fsdp")


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass
class ShardOptions:
    """How networks are placed (the ``dist`` config section plus the run's compute dtype).

    ``strategy`` is already resolved (``none``, ``ddp`` or ``fsdp``); ``compute_dtype`` is the autocast dtype of the
    run (``None`` = fp32), used as FSDP2's ``param_dtype`` on CUDA.
    """

    strategy: str = "none"
    hsdp: bool = False
    cpu_offload: bool = False
    activation_checkpointing: bool = False
    compute_dtype: torch.dtype | None = None
    block_types: tuple[type, ...] = ()


# ---------------------------------------------------------------------------------------------------------------
# process group
# ---------------------------------------------------------------------------------------------------------------


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
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    device = pick_device(device_request, local_rank)
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, local_world_size=local_world)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each value averaged over the ranks (for logging), with one ``all_reduce`` of their stack in float64; a single
    process gets the same values back, untouched. A collective: every rank calls it with the same keys."""
    if not is_initialized() or dist.get_world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)  # the same order on every rank, whatever order each built its dict in
    t = torch.tensor([float(values[k]) for k in keys], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()


def resolve_strategy(strategy: str, info: DistInfo) -> str:
    """``auto`` → ``fsdp`` with several processes; every strategy is ``none`` for a single process."""
    if strategy not in STRATEGIES:
        raise ValueError(f"dist.strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if not info.distributed:
        return "none"
    return "fsdp" if strategy == "auto" else strategy


_MESHES: dict[tuple, Any] = {}


def device_mesh(info: DistInfo, hsdp: bool = False):
    """The FSDP2 mesh: 1-D over all ranks, or with ``hsdp`` 2-D (replicate, shard) = (W / L, L) with L ranks per node.

    Meshes are created once per process and shared by G, F and T (IDA pairs their shards one to one).
    """
    from torch.distributed.device_mesh import init_device_mesh

    shape: tuple[int, ...]
    names: tuple[str, ...]
    if hsdp:
        local = max(1, int(info.local_world_size))
        if info.world_size % local:
            raise ValueError(f"dist.hsdp: world size {info.world_size} is not a multiple of the {local} ranks per node")
        shape, names = (info.world_size // local, local), ("replicate", "shard")
    else:
        shape, names = (info.world_size,), ("shard",)
    key = (info.device.type, shape)
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh(info.device.type, shape, mesh_dim_names=names)
    return _MESHES[key]


# ---------------------------------------------------------------------------------------------------------------
# activation checkpointing
# ---------------------------------------------------------------------------------------------------------------


def enable_activation_checkpointing(model: nn.Module, block_types: tuple[type, ...]) -> str:
    """Per-block activation checkpointing; returns which mechanism was used (``diffusers``, ``torch`` or ``none``)."""
    enable = getattr(model, "enable_gradient_checkpointing", None)
    if callable(enable):
        enable()
        return "diffusers"
    if block_types:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            CheckpointImpl,
            apply_activation_checkpointing,
            checkpoint_wrapper,
        )

        apply_activation_checkpointing(
            model,
            checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
            check_fn=lambda m: isinstance(m, block_types),
        )
        return "torch"
    return "none"


# ---------------------------------------------------------------------------------------------------------------
# FSDP2
# ---------------------------------------------------------------------------------------------------------------


def is_sharded(model: nn.Module) -> TypeGuard[FSDPModule]:
    """Whether ``model`` is an FSDP2 module (its parameters are ``DTensor`` shards)."""
    return isinstance(model, FSDPModule)


def _fsdp_kwargs(info: DistInfo, opts: ShardOptions, trainable: bool) -> dict[str, Any]:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    kwargs: dict[str, Any] = {"mesh": device_mesh(info, opts.hsdp)}
    if info.device.type == "cuda" and trainable and opts.compute_dtype not in (None, torch.float32):
        # fp32 master shards, compute in bf16, gradients reduced in fp32
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=opts.compute_dtype, reduce_dtype=torch.float32)
    if opts.cpu_offload:
        if info.device.type == "cuda":
            kwargs["offload_policy"] = CPUOffloadPolicy()
        else:
            warnings.warn("dist.cpu_offload has no effect on a CPU run", stacklevel=3)
    return kwargs


def shard(model: nn.Module, info: DistInfo, opts: ShardOptions, trainable: bool = True) -> nn.Module:
    """``fully_shard`` every block of ``opts.block_types`` and then the root (in place; returns ``model``).

    FSDP2 keeps the root unit's parameters (embeddings, final layers and any module outside the blocks) gathered
    after a forward until the backward reshards them. Many forwards here run under ``no_grad`` (backward simulation,
    the fake score inside DMD, the teacher) and some losses depend on an inner output only (DMD2's classifier reads
    the UNet's mid block, so the root's pre-backward hook never fires and a checkpointed mid block is recomputed
    with the root's gathered parameters). The root therefore keeps FSDP2's default, and whoever touches parameters
    outside forward/backward (optimiser step, IDA, EMA, checkpoints) calls :func:`reshard` first.
    """
    from torch.distributed.fsdp import fully_shard

    kwargs = _fsdp_kwargs(info, opts, trainable)
    blocks = [m for m in model.modules() if opts.block_types and isinstance(m, opts.block_types)]
    if not blocks:
        warnings.warn(f"FSDP2: no block of {[t.__name__ for t in opts.block_types]} in {type(model).__name__}; "
                      "sharding it as one unit", stacklevel=2)
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def reshard(model: nn.Module) -> None:
    """Free any gathered parameters of the FSDP2 modules in ``model`` (itself or, e.g. in an ``nn.ModuleDict``, its
    children; no-op without any), so that their registered parameters are the ``DTensor`` shards the optimiser
    updates and the next forward gathers them afresh. Call it only when no backward through ``model`` is pending.
    A module that holds parameters of another network without owning it (a LoRA player's adapter weights on the
    shared base, :class:`senseflow.method.adapters.AdapterWeights`) names that network in ``shard_roots``."""
    for root in (model, *getattr(model, "shard_roots", ())):
        for m in root.modules():
            if is_sharded(m):
                m.reshard()


def _prepare(model: nn.Module, trainable: bool, opts: ShardOptions) -> nn.Module:
    if trainable:
        model.train().requires_grad_(True)
    else:
        model.eval().requires_grad_(False)
    if opts.activation_checkpointing:
        enable_activation_checkpointing(model, opts.block_types)
    return model


def _spec(model: nn.Module) -> dict[str, Any] | None:
    """What another rank needs to rebuild ``model``'s structure on the meta device (diffusers models only)."""
    cls = type(model)
    config = getattr(model, "config", None)
    if config is None or not hasattr(cls, "from_config"):
        return None
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1:
        return None
    return {"module": cls.__module__, "qualname": cls.__qualname__, "config": dict(config), "dtype": dtypes.pop()}


def _meta_from_spec(spec: dict[str, Any]) -> nn.Module:
    from accelerate import init_empty_weights

    cls: Any = importlib.import_module(spec["module"])
    for part in spec["qualname"].split("."):
        cls = getattr(cls, part)
    with init_empty_weights():
        model = cls.from_config(spec["config"])
    return model.to(spec["dtype"])


def build_sharded(
    build: Callable[[], nn.Module], info: DistInfo, opts: ShardOptions, trainable: bool,
    adapt: Callable[[nn.Module], nn.Module] | None = None,
) -> nn.Module:
    """Build one network and place it by ``opts.strategy``; every rank calls this in the same order.

    ``build`` returns the full network (weights read from disk, in its final dtype, preferably in host memory).
    ``adapt`` (optional) changes the built network on every rank before it is placed (LoRA adapters added to a
    frozen base, :mod:`senseflow.method.adapters`): rank 0's result is what every rank receives; such a network is
    prepared as ``trainable`` says (the caller marks the adapters trainable afterwards) but sharded with the
    mixed-precision policy of a trained network (fp32 adapters and a bf16 base are gathered in one compute dtype).

    * ``none``: ``build()`` moved to the device.
    * ``ddp``: ``build()`` on every rank, rank 0's parameters and buffers broadcast.
    * ``fsdp``: ``build()`` on rank 0 only; other ranks build the same class from rank 0's config on the meta
      device; all shard; rank 0's state dict is broadcast and each rank keeps its shard; buffers are broadcast.
      Networks that are not diffusers models (no ``config``/``from_config``) are built on every rank and sharded.
    """
    def adapted(model: nn.Module) -> nn.Module:
        return adapt(model) if adapt is not None else model

    if opts.strategy == "none" or not info.distributed:
        return _prepare(adapted(build()), trainable, opts).to(info.device)
    if opts.strategy == "ddp":
        replicated = _prepare(adapted(build()), trainable, opts).to(info.device)
        broadcast_module(replicated)
        return replicated
    if opts.strategy != "fsdp":
        raise ValueError(f"dist.strategy: {opts.strategy!r} is not one of none, ddp, fsdp")
    model = build() if info.is_main else None
    spec = [_spec(model) if model is not None else None]
    dist.broadcast_object_list(spec, src=0)
    mixed = trainable or adapt is not None  # the mixed-precision policy of a network with trained parameters
    if spec[0] is None:  # not rebuildable from a config: every rank builds it, rank 0's weights win
        model = adapted(build() if model is None else model)
        _prepare(model, trainable, opts)
        broadcast_module(model.to(info.device))
        return shard(model, info, opts, mixed)
    full: dict[str, Tensor] = {}
    if model is None:
        model = adapted(_meta_from_spec(spec[0]))
    else:
        model = adapted(model)
        full = {k: v.detach() for k, v in model.state_dict().items()}
    _prepare(model, trainable, opts)
    shard(model, info, opts, mixed)
    offload = opts.cpu_offload and info.device.type == "cuda"
    if not info.is_main:
        model.to_empty(device=torch.device("cpu") if offload else info.device)
    if offload:  # FSDP2 keeps the shards in host memory; buffers live on the accelerator
        for mod in model.modules():
            for name, buf in list(mod._buffers.items()):
                if buf is not None:
                    mod._buffers[name] = buf.to(info.device)
    load_full_from_rank0(model, full, info.device)
    del full
    return model


_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod.")


def _plain_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


@torch.no_grad()
def load_full_from_rank0(model: nn.Module, full: dict[str, Tensor], comm_device: torch.device) -> None:
    """Fill ``model`` (sharded or not; every rank calls this) with rank 0's full state dict ``full``.

    One tensor at a time: rank 0 sends the full tensor (on ``comm_device``: NCCL needs accelerator tensors, gloo
    host ones), every rank keeps its own shard of a ``DTensor`` parameter (the slice
    ``distribute_tensor(..., src_data_rank=None)`` takes, no further communication) or the whole of a replicated
    one. Buffers (persistent or not) are broadcast from rank 0's module itself. This is what
    ``set_model_state_dict(model, full, StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))`` does,
    written out so that it also works with FSDP2 CPU offload (host shards, NCCL collectives). Raises ``KeyError`` on
    rank 0 if ``full`` lacks a parameter or has keys the model does not (checked before any collective).
    """
    from torch.distributed.tensor import distribute_tensor

    params = [(n, p) for n, p in model.named_parameters()]
    error: list[str | None] = [None]
    if dist.get_rank() == 0:
        names = {_plain_name(n) for n, _ in params}
        persistent = {_plain_name(k) for k in model.state_dict().keys()}
        missing = sorted(names - set(full))
        unexpected = sorted(set(full) - persistent)
        if missing or unexpected:
            error[0] = (
                f"state dict does not fit {type(model).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise KeyError(error[0])
    for name, p in params:
        if dist.get_rank() == 0:
            t = full[_plain_name(name)].to(comm_device, p.dtype).contiguous()
        else:
            t = torch.empty(p.shape, dtype=p.dtype, device=comm_device)
        dist.broadcast(t, src=0)
        if isinstance(p, DTensor):
            local = distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None).to_local()
            p.to_local().copy_(local)
        else:
            p.copy_(t)
        del t
    _broadcast_buffers(model)


def broadcast_module(model: nn.Module) -> None:
    """Make every rank's parameters and buffers equal to rank 0's (replicated modules; no-op for one process)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for p in model.parameters():
            if not isinstance(p, DTensor):
                dist.broadcast(p.data, src=0)
    _broadcast_buffers(model)


def _broadcast_buffers(model: nn.Module) -> None:
    if not is_initialized() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for b in model.buffers():
            if not isinstance(b, DTensor):
                dist.broadcast(b, src=0)


# ---------------------------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------------------------


def _plain(params: Iterable[Tensor]) -> list[Tensor]:
    return [p for p in params if p.requires_grad and not isinstance(p, DTensor)]


def sync_replicated_grads(params: Iterable[Tensor], bucket_bytes: int = 64 << 20) -> None:
    """Average the gradients of replicated (non-``DTensor``) parameters over all ranks, in flat buckets.

    ``DTensor`` parameters are skipped (FSDP2 has reduce-scattered their gradients already). A parameter whose
    gradient is ``None`` on every rank stays ``None``; one that has a gradient on some ranks only gets zeros on the
    others first (so the collectives line up). No-op for one process.
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return
    params = _plain(params)
    if not params:
        return
    world = dist.get_world_size()
    dev = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=dev)
    dist.all_reduce(has)
    live = [p for p, n in zip(params, has.tolist()) if n > 0]
    groups: dict[tuple, list[Tensor]] = {}
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for grads in groups.values():
        bucket: list[Tensor] = []
        size = 0
        for g in [*grads, None]:
            if g is not None:
                bucket.append(g)
                size += g.numel() * g.element_size()
            if bucket and (g is None or size >= bucket_bytes):
                flat = torch.cat([t.reshape(-1) for t in bucket])
                dist.all_reduce(flat)
                flat.div_(world)
                offset = 0
                for t in bucket:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()
                bucket, size = [], 0


def clip_grad_norm(params: Iterable[Tensor], max_norm: float | None) -> float:
    """‖g‖₂ over all gradients (sharded ``DTensor`` and replicated plain ones together), then g ← g·min(1, c/(‖g‖+1e-6))
    as :func:`torch.nn.utils.clip_grad_norm_` does.

    ``max_norm=None`` measures without clipping. Returns the norm before clipping, identical on every rank.
    """
    from torch.nn.utils import get_total_norm

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    sharded: list[Tensor] = [g for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    parts: list[Tensor] = []
    if sharded:
        n = get_total_norm(sharded, 2.0)
        parts.append((n.full_tensor() if isinstance(n, DTensor) else n).float().cpu())
    if plain:
        parts.append(get_total_norm(plain, 2.0).float().cpu())
    total = parts[0] if len(parts) == 1 else torch.linalg.vector_norm(torch.stack(parts))
    if max_norm is not None:
        coef = float(torch.clamp(torch.tensor(float(max_norm)) / (total + 1e-6), max=1.0))
        with torch.no_grad():
            for g in sharded + plain:
                g.mul_(coef)
    return float(total)


# ---------------------------------------------------------------------------------------------------------------
# consistency checks
# ---------------------------------------------------------------------------------------------------------------


def assert_same_on_all_ranks(value: Any, what: str) -> None:
    """Gather ``value`` (any picklable object) from every rank and raise ``RuntimeError`` unless all are equal."""
    if not is_initialized() or dist.get_world_size() == 1:
        return
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values[1:]):
        shown = "; ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise RuntimeError(f"{what} differ across ranks (they must be drawn from the shared stream): {shown}")


def wrap_trainable(model: nn.Module, info: DistInfo, strategy: str, block_types: Sequence[type] = ()) -> nn.Module:
    """Place an already built trained network (kept for callers that build networks themselves).

    ``fsdp``: sharded in place by :func:`shard`; ``ddp``: rank 0's weights broadcast (gradients are averaged by
    :func:`sync_replicated_grads`); ``none`` or one process: unchanged.
    """
    strategy = resolve_strategy(strategy, info)
    if strategy == "none":
        return model
    if strategy == "ddp":
        broadcast_module(model)
        return model
    return shard(model, info, ShardOptions(strategy="fsdp", block_types=tuple(block_types)), trainable=True)

"""Per-GPU memory plan of a SenseFlow run (``senseflow memory``), computed without weights or a GPU.

Every network of the run is built on the ``meta`` device from its architecture config (the real ``config.json``
of the teacher folder when it exists, else the public config shipped in ``senseflow/assets/arch_configs``), so the
parameter counts are the real tensors' ``numel`` and cost no memory. Bytes per GPU, with W the FSDP shard degree
(W = N·M GPUs, or N with ``dist.hsdp``) and ⌈·⌉ the per-tensor dim-0 shard of FSDP2:

* **parameters**: trained nets (G, F: fp32 master weights, docs/method.md decision 2) and the frozen teacher T
  (``teacher.dtype``) hold Σ_tensors ⌈n/W⌉·bytes; replicated nets (VAE, text encoders, DINOv2, D's CLIP text model,
  D heads) hold Σ n·bytes. Buffers (e.g. SD3's positional table) are never sharded.
* **gradients**: fp32, same placement as the trained parameters. The trainer frees them after each player's step
  (``zero_grad(set_to_none=True)``), so only the player being updated holds gradients (see *phases* below).
* **optimiser states**: AdamW: exp_avg + exp_avg_sq in fp32, 8 B/element (+4 B ``step`` per tensor, on the host);
  8-bit AdamW (bitsandbytes): per tensor of n ≥ 4096 elements 2 B/element + 2·4·⌈n/256⌉ B block-wise absmax +
  2·1 KiB quantisation maps; smaller tensors keep 32-bit states (8 B/element).
* **activations** (bytes autograd keeps for backward): measured by running each network's forward on meta tensors
  under a saved-tensor hook, at ``teacher.resolution`` and ``train.batch_size``, deduplicated by storage and
  excluding parameters. bf16 autocast is emulated (matmul/linear/conv/attention inputs cast to bf16; norms,
  softmax, exp/pow in fp32) and attention is counted as a fused (flash) kernel saving q, k, v, out and the fp32
  log-sum-exp, i.e. no S² matrix. With activation checkpointing only the inputs of each checkpointed unit
  (transformer block, resnet) are kept, plus the saved tensors outside units, plus one unit recomputed at a time:

      A_ckpt = A_outside + Σ_units |inputs(u)| + max_u A(u)        A_full = A_outside + Σ_u A(u)

* **phases** (the peak is the largest; the trainer runs them in this order each iteration):
  - G step, three moments: (1) the no-grad forwards of T, F, G for DMD and ISG while G's graph is alive:
    A(G) + one block + T/F's gathered FSDP units; (2) the VAE decode, DINOv2 and heads, whose activations live until
    the single backward of L_G: A(G) + A(VAE decode) + A(DINOv2 → pixels, heads) + working;
    (3) G's own backward: grads(G) + A(G) + working;
  - F step: grads(F) + A(F) + working;
  - D step: grads(D heads) + 2·A(heads) (real and fake branch in one backward) + working.
  "working" = the largest unit's activations (its gradient buffers during backward) + FSDP's gathered units
  (two units in bf16 — current and prefetched — the root's unsharded params, and one unit's fp32 gradient).
* **CPU offload** (``dist.cpu_offload``): sharded params, grads and optimiser states of G, F (and T) live in host
  memory; the GPU keeps FSDP's working set only.
* **fit**: peak ≤ gpu_gib·(1 − reserve_frac) − context_gib (allocator fragmentation, CUDA context and NCCL).

``main_memory`` prints a table (or ``--json``); :func:`plan_memory` returns the :class:`MemoryPlan`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "ARCH_DIR",
    "MemoryPlanError",
    "GIB",
    "arch_names",
    "load_arch_config",
    "build_meta",
    "param_shapes",
    "shard_numel",
    "tensor_bytes",
    "optimizer_state_bytes",
    "analytic_head_params",
    "ActivationProfile",
    "trace_activations",
    "NetworkMemory",
    "MemoryOptions",
    "MemoryPlan",
    "plan_memory",
    "format_plan",
    "main_memory",
]

ARCH_DIR = Path(__file__).resolve().parent / "assets" / "arch_configs"
GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes: tensors with fewer elements keep 32-bit states
BNB_BLOCK = 256  # bitsandbytes block-wise quantisation block size (one fp32 absmax per block and state)
BNB_QMAP_BYTES = 256 * 4  # one 256-entry fp32 quantisation map per state


class MemoryPlanError(ValueError):
    """Bad input to the memory plan (one line; the CLI prints it and exits with status 2)."""


# ================================================================================== architecture configs
def arch_names() -> list[str]:
    """Names of the shipped architecture configs (``senseflow/assets/arch_configs/<name>.json``)."""
    return sorted(p.stem for p in ARCH_DIR.glob("*.json"))


def load_arch_config(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """A shipped config by name (e.g. ``flux_dev_transformer``), or a ``config.json`` file / a folder holding one."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    elif not path.suffix:
        path = ARCH_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise FileNotFoundError(f"architecture config {str(name_or_path)!r} not found (expected a config.json or "
                                f"one of: {', '.join(arch_names())})")
    with open(path, encoding="utf-8") as fh:
        config = json.load(fh)
    if "_class_name" not in config and not config.get("architectures"):
        raise MemoryPlanError(f"{path}: neither '_class_name' (diffusers) nor 'architectures' (transformers) is set")
    return config


def build_meta(config: dict[str, Any], device: str | torch.device = "meta") -> nn.Module:
    """Instantiate the network a diffusers / transformers config describes, on ``device`` (meta: no memory)."""
    with torch.device(device):
        if "_class_name" in config:
            import diffusers

            cls = getattr(diffusers, config["_class_name"], None)
            if cls is None:
                raise MemoryPlanError(f"unknown diffusers class {config['_class_name']!r}")
            return cls.from_config(dict(config))
        import transformers

        name = config["architectures"][0]
        cls = getattr(transformers, name, None)
        if cls is None:
            raise MemoryPlanError(f"unknown transformers class {name!r}")
        kwargs = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype", "transformers_version")}
        return cls(cls.config_class(**kwargs))


# ================================================================================== parameter and state bytes
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


# ================================================================================== activation tracing
class _FlashAttention(torch.autograd.Function):
    """Stand-in for a fused attention kernel: output of the right shape; saves q, k, v, out and the fp32
    log-sum-exp (B, H, S_q), as flash / memory-efficient attention do (no S_q × S_k matrix)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:  # type: ignore[override]
        out = q.new_empty(tuple(q.shape[:-1]) + (v.shape[-1],))
        lse = q.new_empty(tuple(q.shape[:-1]), dtype=torch.float32)
        saved = (q, k, v, out, lse) + ((mask,) if mask is not None else ())
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:  # pragma: no cover - never called (tracing only)
        raise RuntimeError("memory tracing only")


def _tensor_method(name: str) -> list[Any]:
    return [getattr(Tensor, name)] if hasattr(Tensor, name) else []


_LOW_PRECISION_FUNCS = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, torch.matmul,
                        torch.mm, torch.bmm, torch.baddbmm, torch.addmm, torch.addbmm, torch.einsum,
                        *_tensor_method("__matmul__"), *_tensor_method("matmul"), *_tensor_method("mm"),
                        *_tensor_method("bmm")}
_FP32_FUNCS = {F.layer_norm, F.group_norm, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, torch.exp,
               torch.log, torch.pow, torch.rsqrt, F.mse_loss, torch.norm, torch.cumsum, F.normalize,
               *_tensor_method("softmax"), *_tensor_method("log_softmax"), *_tensor_method("exp"),
               *_tensor_method("log"), *_tensor_method("pow"), *_tensor_method("rsqrt"), *_tensor_method("norm")}


def _cast_floats(value: Any, dtype: torch.dtype, only_from: tuple[torch.dtype, ...]) -> Any:
    if isinstance(value, Tensor):
        return value.to(dtype) if value.dtype in only_from else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_floats(v, dtype, only_from) for v in value)
    return value


class _TraceMode(TorchFunctionMode):
    """Fused attention always; with ``autocast_dtype`` also torch.autocast's (CUDA) casting rules, which do not
    act on meta tensors: matmul/linear/conv/attention inputs → autocast dtype, norms/softmax/exp/pow → fp32."""

    def __init__(self, autocast_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.low = autocast_dtype

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if self.low is not None:
            if func in _LOW_PRECISION_FUNCS or func is F.scaled_dot_product_attention:
                args = _cast_floats(args, self.low, (torch.float32, torch.float16))
                kwargs = {k: _cast_floats(v, self.low, (torch.float32, torch.float16)) for k, v in kwargs.items()}
            elif func in _FP32_FUNCS:
                args = _cast_floats(args, torch.float32, (torch.bfloat16, torch.float16))
                kwargs = {k: _cast_floats(v, torch.float32, (torch.bfloat16, torch.float16)) for k, v in kwargs.items()}
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask")
            bound = dict(zip(names, args))
            bound.update({k: v for k, v in kwargs.items() if k in names})
            q, k, v, mask = (bound.get(n) for n in names)
            return _FlashAttention.apply(q, k, v, mask if isinstance(mask, Tensor) else None)
        return func(*args, **kwargs)


def _storage_key(t: Tensor) -> int:
    return t.untyped_storage()._cdata


def _storage_bytes(t: Tensor) -> int:
    return t.untyped_storage().nbytes()


def _tensors_in(value: Any) -> Iterable[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_in(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v)


@dataclass
class ActivationProfile:
    """Bytes autograd keeps for backward in one forward with grad (deduplicated by storage, parameters excluded).

    ``outside``: saved outside any checkpoint unit; ``per_unit``: saved inside each unit (first attribution wins);
    ``unit_inputs``: the units' input tensors (what activation checkpointing keeps).
    """

    outside: int = 0
    unit_inputs: int = 0
    per_unit: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        """A_full: every saved tensor (no activation checkpointing)."""
        return self.outside + sum(self.per_unit)

    @property
    def max_unit(self) -> int:
        return max(self.per_unit, default=0)

    @property
    def num_units(self) -> int:
        return len(self.per_unit)

    def saved(self, checkpointing: bool) -> int:
        """A_ckpt = outside + unit inputs + one recomputed unit, or A_full."""
        return self.outside + self.unit_inputs + self.max_unit if checkpointing else self.total


def trace_activations(module: nn.Module, run: Callable[[nn.Module], Any], unit_types: Sequence[str] = (),
                      autocast_dtype: torch.dtype | None = None) -> ActivationProfile:
    """Run ``run(module)`` with grad enabled and record what autograd saves.

    ``unit_types`` are class names of the checkpoint units (e.g. ``FluxTransformerBlock``); a saved tensor belongs
    to the outermost unit running when it is saved. Works on meta tensors (no memory, no compute) and on real ones.
    """
    names = set(unit_types)
    param_keys = {_storage_key(t) for t in list(module.parameters()) + list(module.buffers())}
    seen: set[int] = set(param_keys)
    keep: list[Tensor] = []  # keeps storages alive so their keys are not reused during the trace
    prof = ActivationProfile()
    stack: list[int] = []
    input_keys: set[int] = set()

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            keep.append(t)
            size = _storage_bytes(t)
            if stack:
                prof.per_unit[stack[0]] += size
            else:
                prof.outside += size
        return t

    def pre_hook(mod: nn.Module, args: Any, kwargs: Any) -> None:
        if not stack:
            for t in _tensors_in((args, kwargs)):
                key = _storage_key(t)
                if key not in input_keys and key not in param_keys:
                    input_keys.add(key)
                    keep.append(t)
                    prof.unit_inputs += _storage_bytes(t)
            prof.per_unit.append(0)
            stack.append(len(prof.per_unit) - 1)
        else:
            stack.append(stack[0])

    def post_hook(mod: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        stack.pop()

    handles = []
    for m in module.modules():
        if type(m).__name__ in names:
            handles.append(m.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(m.register_forward_hook(post_hook, with_kwargs=True))
    try:
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        with torch.enable_grad(), hooks, _TraceMode(autocast_dtype):
            run(module)
    finally:
        for h in handles:
            h.remove()
    return prof


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


# ================================================================================== the networks of a run
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

    @property
    def static_bytes(self) -> int:
        return self.param_bytes + self.buffer_bytes + self.optim_bytes


@dataclass
class MemoryOptions:
    """The knobs of one scenario (defaults from the config)."""

    checkpointing: bool
    optimizer: str
    cpu_offload: bool


@dataclass
class MemoryPlan:
    """Per-GPU bytes of one run under one :class:`MemoryOptions`, plus the other scenarios' totals."""

    config_path: str
    family: str
    denoiser_arch: str
    resolution: int
    batch_size: int
    gpus_per_node: int
    nodes: int
    shard_degree: int
    gpu_gib: float
    reserve_frac: float
    context_gib: float
    options: MemoryOptions
    networks: list[NetworkMemory]
    activations: dict[str, int]  # named activation terms of the chosen options
    phases: dict[str, int]  # phase → transient bytes (grads + activations + working set)
    notes: list[str]
    scenarios: list[dict[str, Any]] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def static_bytes(self) -> int:
        return sum(n.static_bytes for n in self.networks) + self.activations.get("batch tensors", 0)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.__getitem__)

    @property
    def peak_bytes(self) -> int:
        return self.static_bytes + self.phases[self.peak_phase]

    @property
    def usable_bytes(self) -> int:
        return int((self.gpu_gib * (1.0 - self.reserve_frac) - self.context_gib) * GIB)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.usable_bytes

    @property
    def host_bytes_per_node(self) -> int:
        return sum(n.host_bytes for n in self.networks) * self.gpus_per_node

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(world_size=self.world_size, static_bytes=self.static_bytes, peak_phase=self.peak_phase,
                 peak_bytes=self.peak_bytes, usable_bytes=self.usable_bytes, fits=self.fits,
                 host_bytes_per_node=self.host_bytes_per_node)
        return d


# ---- which networks a family uses --------------------------------------------------------------------------
_DENOISER_UNITS = {
    "flux": ("FluxTransformerBlock", "FluxSingleTransformerBlock"),
    "sd3": ("JointTransformerBlock",),
    "sdxl": ("ResnetBlock2D", "BasicTransformerBlock"),  # what diffusers checkpoints inside the UNet
}
_FSDP_UNITS = {  # one FSDP unit each (senseflow.models.families.*.block_types)
    "flux": ("FluxTransformerBlock", "FluxSingleTransformerBlock"),
    "sd3": ("JointTransformerBlock",),
    "sdxl": ("DownBlock2D", "CrossAttnDownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
}
_TEXT_ENCODERS = {
    "flux": [("CLIP-L text", "clip_vit_l14_text", "text_encoder"),
             ("T5-XXL encoder", "t5_v1_1_xxl_encoder", "text_encoder_2")],
    "sd3": [("CLIP-L text", "clip_vit_l14_text_with_projection", "text_encoder"),
            ("CLIP-G text", "clip_bigg14_text_with_projection", "text_encoder_2"),
            ("T5-XXL encoder", "t5_v1_1_xxl_encoder", "text_encoder_3")],
    "sdxl": [("CLIP-L text", "clip_vit_l14_text", "text_encoder"),
             ("CLIP-bigG text", "clip_bigg14_text_with_projection", "text_encoder_2")],
}
_VAE = {"flux": "flux_vae", "sd3": "sd3_vae", "sdxl": "sdxl_vae"}
_DENOISER_SUBFOLDER = {"flux": "transformer", "sd3": "transformer", "sdxl": "unet"}
_DISC_BACKBONE, _DISC_TEXT = "dinov2_large", "clip_vit_l14_text_with_projection"


def _resolve_denoiser(cfg: Any, denoiser: str | None) -> tuple[str, dict[str, Any]]:
    """The teacher's architecture: ``denoiser`` (a shipped name or a path), else the teacher folder's own
    ``config.json`` when it exists, else the shipped public config for the family."""
    family = cfg.teacher.family
    if denoiser:
        return str(denoiser), load_arch_config(denoiser)
    local = Path(cfg.teacher.path) / _DENOISER_SUBFOLDER[family] / "config.json"
    if local.is_file():
        return str(local), load_arch_config(local)
    if family == "flux":
        return "flux_dev_transformer", load_arch_config("flux_dev_transformer")
    if family == "sdxl":
        return "sdxl_unet", load_arch_config("sdxl_unet")
    hint = f"{cfg.experiment.name} {cfg.teacher.path}".lower()
    for size in ("large", "medium"):
        if size in hint:
            return f"sd35_{size}_transformer", load_arch_config(f"sd35_{size}_transformer")
    raise MemoryPlanError("teacher.family=sd3: cannot tell SD3.5 Medium from Large (no 'medium'/'large' in "
                          "experiment.name or teacher.path, no local transformer/config.json); pass --denoiser "
                          "sd35_medium_transformer or sd35_large_transformer")


def _local_or_shipped(cfg: Any, subfolder: str, shipped: str) -> dict[str, Any]:
    local = Path(cfg.teacher.path) / subfolder / "config.json"
    return load_arch_config(local if local.is_file() else shipped)


def _denoiser_inputs(family: str, config: dict[str, Any], cfg: Any, batch: int, lat: int, dtype: torch.dtype,
                     device: str = "meta") -> Callable[[nn.Module], Any]:
    """A closure running the student's forward (no guidance input) on inputs of the run's shapes: latents of
    side ``lat``, the config's text lengths."""
    kw = dict(device=device, dtype=dtype)
    if family == "flux":
        n_img = (lat // 2) ** 2
        text_len = int(cfg.teacher.t5_max_length)
        x = torch.zeros(batch, n_img, config["in_channels"], requires_grad=True, **kw)
        context = torch.zeros(batch, text_len, config["joint_attention_dim"], **kw)
        inputs = dict(hidden_states=x, encoder_hidden_states=context,
                      pooled_projections=torch.zeros(batch, config["pooled_projection_dim"], **kw),
                      timestep=torch.ones(batch, device=device), img_ids=torch.zeros(n_img, 3, device=device),
                      txt_ids=torch.zeros(text_len, 3, device=device))
    elif family == "sd3":
        text_len = int(cfg.teacher.clip_max_length) + int(cfg.teacher.t5_max_length)
        x = torch.zeros(batch, config["in_channels"], lat, lat, requires_grad=True, **kw)
        context = torch.zeros(batch, text_len, config["joint_attention_dim"], **kw)
        inputs = dict(hidden_states=x, encoder_hidden_states=context,
                      pooled_projections=torch.zeros(batch, config["pooled_projection_dim"], **kw),
                      timestep=torch.ones(batch, device=device))
    else:
        x = torch.zeros(batch, config["in_channels"], lat, lat, requires_grad=True, **kw)
        n_time = 6 * int(config.get("addition_time_embed_dim") or 0)
        text_embeds = int(config.get("projection_class_embeddings_input_dim") or 0) - n_time
        inputs = dict(sample=x, timestep=torch.ones(batch, device=device),
                      encoder_hidden_states=torch.zeros(batch, int(cfg.teacher.clip_max_length),
                                                        config["cross_attention_dim"], **kw),
                      added_cond_kwargs={"text_embeds": torch.zeros(batch, text_embeds, **kw),
                                         "time_ids": torch.zeros(batch, 6, **kw)})
    return lambda net: net(**inputs, return_dict=False)[0]


# ---- the plan -------------------------------------------------------------------------------------------------
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
        unit, root = _unit_params(self.module, self.fsdp_units) if self.sharded else (0, 0)
        row = NetworkMemory(self.key, self.label, self.arch, count, count if self.trainable else 0, self.dtype,
                            self.sharded, params, buffers, grads, optim, 0, unit, root)
        if offload and self.sharded:
            row.host_bytes = params + grads + optim
            row.param_bytes = row.grad_bytes = row.optim_bytes = 0
        return row


@dataclass
class _Traces:
    """Activation profiles of one iteration's forwards with grad (see the module docstring)."""

    denoiser: ActivationProfile  # G (and F) forward with grad
    vae: ActivationProfile  # decode with grad, units = resnets / attention (working-set size)
    vae_ckpt: ActivationProfile  # the same, units = diffusers' checkpointed decoder blocks
    disc_g: ActivationProfile  # DINOv2 + heads, gradient to the pixels (G step)
    disc_d: ActivationProfile  # heads, gradient to their parameters (one branch of the D step)
    batch_tensors: int  # pixels, latents, reference features of the batch
    compute: torch.dtype | None  # autocast dtype (None: fp32)


@contextlib.contextmanager
def _no_power_iterations() -> Any:
    """Skip spectral norm's power iterations (no-grad, in-place buffer updates: no memory of their own) while
    building and tracing on meta, where the 15 initial iterations per conv would take seconds."""
    from torch.nn.utils import parametrizations

    cls = parametrizations._SpectralNorm
    original = cls._power_method
    cls._power_method = lambda self, weight_mat, n_power_iterations: None
    try:
        yield
    finally:
        cls._power_method = original


def _discriminator(cfg: Any, dino: nn.Module, c_dim: int) -> tuple[nn.Module | None, str]:
    """The real VFMDiscriminator built on meta around the meta DINOv2 (None if its constructor does not fit)."""
    d = cfg.discriminator
    try:
        from senseflow.models.discriminator import VFMDiscriminator

        with torch.device("meta"), _no_power_iterations():
            return VFMDiscriminator.from_config(dino, c_dim, d), ""  # the trainer's constructor path
    except Exception as exc:  # fall back to the analytic head count of docs/method.md §9.1
        return None, f"discriminator heads counted analytically (VFMDiscriminator could not be built: {exc})"


def analytic_head_params(channels: int, c_dim: int, cmap_dim: int, downsample: int, kernel: int = 3) -> int:
    """Trainable parameters of one D head (docs/method.md §9.1): main and refmapper stacks (1×1 block, ``downsample``
    stride-2 3×3 convs, ``downsample``−1 residual k×k blocks, BatchNormLocal affines), cls and refmapper 1×1
    projections to cmap_dim, and the equalised linear c_dim → cmap_dim."""
    conv = lambda k, cin, cout: k * k * cin * cout + cout  # noqa: E731
    block = lambda k: conv(k, channels, channels) + 2 * channels  # noqa: E731
    stack = block(1) + downsample * conv(3, channels, channels) + max(downsample - 1, 0) * block(kernel)
    return 2 * stack + 2 * conv(1, channels, cmap_dim) + c_dim * cmap_dim + cmap_dim


@contextlib.contextmanager
def _quiet_diffusers() -> Any:
    """Silence diffusers' advice printed when a meta model is cast with ``.to(dtype)``."""
    try:
        from diffusers.utils import logging as dlog
    except ImportError:  # pragma: no cover
        yield
        return
    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def _build_networks(cfg: Any, denoiser: str | None, fsdp: bool, teacher_sharded: bool,
                    disc_backbone_dtype: str) -> tuple[str, dict[str, Any], list[_Net], nn.Module | None, list[str]]:
    """(teacher arch name, its config, the run's networks on meta, the meta VFMDiscriminator or None, notes)."""
    family = cfg.teacher.family
    arch, den_cfg = _resolve_denoiser(cfg, denoiser)
    student_cfg = dict(den_cfg, guidance_embeds=False) if family == "flux" else den_cfg  # docs/method.md decision 4
    units, notes = _FSDP_UNITS[family], []
    nets = [
        _Net("generator", "generator G", arch, build_meta(student_cfg), True, "float32", fsdp, units),
        _Net("fake", "fake score F", arch, build_meta(student_cfg), True, "float32", fsdp, units),
        _Net("teacher", "teacher T", arch, build_meta(den_cfg), False, cfg.teacher.dtype, fsdp and teacher_sharded,
             units),
        _Net("vae", "VAE", _VAE[family], build_meta(_local_or_shipped(cfg, "vae", _VAE[family])), False,
             cfg.teacher.vae_dtype, False),
    ]
    for label, name, sub in _TEXT_ENCODERS[family]:
        nets.append(_Net(f"text:{sub}", label, name, build_meta(_local_or_shipped(cfg, sub, name)), False,
                         cfg.teacher.text_encoder_dtype, False))
    disc = None
    if cfg.method.gan.enabled:
        d = cfg.discriminator
        local = lambda path: path and Path(path, "config.json").is_file()  # noqa: E731
        dino = build_meta(load_arch_config(d.dino_path if local(d.dino_path) else _DISC_BACKBONE))
        clip_cfg = load_arch_config(d.clip_path if local(d.clip_path) else _DISC_TEXT)
        if clip_cfg.get("model_type") == "clip":  # a full CLIP folder: its text tower with projection
            clip_cfg = dict(clip_cfg["text_config"], architectures=["CLIPTextModelWithProjection"],
                            projection_dim=clip_cfg.get("projection_dim", 768))
        clip_text = build_meta(clip_cfg)
        nets.append(_Net("disc_backbone", "D backbone DINOv2", _DISC_BACKBONE, dino, False, disc_backbone_dtype, False))
        nets.append(_Net("disc_text", "D text CLIP-L/14", _DISC_TEXT, clip_text, False, disc_backbone_dtype, False))
        c_dim = int(clip_text.config.projection_dim)
        disc, why = _discriminator(cfg, dino, c_dim)
        if disc is not None:
            heads: nn.Module = disc.heads
            label = f"D heads ×{len(disc.heads)}"
        else:  # one flat meta tensor of the analytic size (docs/method.md §9.1)
            notes.append(why)
            n_heads = len(d.hooks) + int(d.hook_patch)
            per_head = analytic_head_params(dino.config.hidden_size, c_dim, d.cmap_dim, d.downsample, d.kernel_size)
            size = n_heads * per_head
            heads = nn.ParameterList([nn.Parameter(torch.empty(size, device="meta"))])
            label = f"D heads ×{n_heads} (analytic)"
        nets.append(_Net("disc_heads", label, "VFMDiscriminator heads", heads, True, "float32", False))
    if cfg.method.dmd2_cls.enabled and family == "sdxl":
        from senseflow.models.dmd2_head import DMD2ClassifierHead, bottleneck_shape

        lat = int(cfg.teacher.resolution) // 8
        ch, h, _ = bottleneck_shape(nets[1].module.config, (lat, lat))
        with torch.device("meta"):
            head = DMD2ClassifierHead(ch, h)
        nets.append(_Net("dmd2_head", "DMD2 classifier head", "DMD2ClassifierHead", head, True, "float32", False))
        notes.append("DMD2 classifier: its fake-UNet forward with grad is counted as one more denoiser activation "
                     "in the G and F steps (upper bound)")
    return arch, student_cfg, nets, disc, notes


def _trace_run(cfg: Any, student_cfg: dict[str, Any], nets: list[_Net], disc: nn.Module | None,
               disc_backbone_dtype: str) -> _Traces:
    """Trace the forwards with grad of one iteration at the config's resolution and per-GPU batch."""
    family, batch, res = cfg.teacher.family, int(cfg.train.batch_size), int(cfg.teacher.resolution)
    compute = None if cfg.train.mixed_precision == "fp32" else torch.bfloat16
    by = {n.key: n.module for n in nets}
    vae = by["vae"].to(getattr(torch, cfg.teacher.vae_dtype))
    lat = res // (2 ** (len(vae.config.block_out_channels) - 1))  # latent side (VAE downsampling 8)
    gen = by["generator"].to(compute or torch.float32)  # FSDP2 MixedPrecisionPolicy: blocks compute in bf16
    den = trace_activations(gen, _denoiser_inputs(family, student_cfg, cfg, batch, lat, compute or torch.float32),
                            _DENOISER_UNITS[family], compute)
    gen.float()
    channels = int(vae.config.latent_channels)
    z = torch.zeros(batch, channels, lat, lat, device="meta", dtype=getattr(torch, cfg.teacher.vae_dtype),
                    requires_grad=True)
    batch_tensors = 2 * batch * 3 * res * res * 4 + 3 * batch * channels * lat * lat * 4  # pixels; latents, x_in
    empty = ActivationProfile()
    if disc is None:  # no GAN: the decode with grad and the discriminator do not run
        return _Traces(den, empty, empty, empty, empty, batch_tensors, compute)
    decode = lambda m: m.decode(z).sample  # noqa: E731
    vae_prof = trace_activations(vae, decode, ("ResnetBlock2D", "Attention"), compute)
    vae_ckpt = trace_activations(vae, decode, ("UNetMidBlock2D", "UpDecoderBlock2D"), compute)
    disc.to(getattr(torch, disc_backbone_dtype))
    disc.heads.float()
    dino_cfg = disc.dino.config
    judged = res if cfg.discriminator.resolution is None else int(cfg.discriminator.resolution)
    side = judged // int(dino_cfg.patch_size)
    refs = [torch.zeros(batch, int(dino_cfg.hidden_size), side, side, device="meta") for _ in range(len(disc.heads))]
    c = torch.zeros(batch, int(by["disc_text"].config.projection_dim), device="meta")
    x = torch.zeros(batch, 3, res, res, device="meta", requires_grad=True)
    x_detached = torch.zeros(batch, 3, res, res, device="meta")
    with _no_power_iterations():
        disc.heads.requires_grad_(False)  # G step: gradient to the pixels only
        disc_g = trace_activations(disc, lambda m: m(x, c, refs, None), ("Dinov2Layer",), compute)
        disc.heads.requires_grad_(True)  # D step: gradient to the heads only, pixels detached
        disc_d = trace_activations(disc, lambda m: m(x_detached, c, refs, None), ("DiscriminatorHead",), compute)
    batch_tensors += sum(r.numel() for r in refs) * 4
    return _Traces(den, vae_prof, vae_ckpt, disc_g, disc_d, batch_tensors, compute)


def _phases(rows: list[NetworkMemory], t: _Traces, checkpointing: bool) -> tuple[dict[str, int], dict[str, int]]:
    """(activation terms, phase → grads + live activations + working set), per GPU."""
    by = {r.key: r for r in rows}

    def fsdp_working(key: str, backward: bool) -> int:  # two gathered units + the root (+ one unit's fp32 grad)
        r = by.get(key)
        if r is None or not r.sharded:
            return 0
        gathered = (2 * r.unit_params + r.root_params) * (2 if t.compute is not None else DTYPE_BYTES[r.dtype])
        return gathered + (r.unit_params * 4 if backward else 0)

    grads = lambda key: by[key].grad_bytes if key in by else 0  # noqa: E731
    a_g = t.denoiser.saved(checkpointing)
    a_g += a_g if "dmd2_head" in by else 0  # the DMD2 classifier's fake-UNet forward with grad
    nograd_gather = max(fsdp_working("teacher", False), fsdp_working("fake", False))
    fsdp_g, fsdp_f = fsdp_working("generator", True), fsdp_working("fake", True)
    acts = {
        "G forward (grad)": a_g,
        "VAE decode (grad)": t.vae.total,
        "DINOv2 + heads (grad to pixels)": t.disc_g.total,
        "F forward (grad)": a_g,
        "D heads, real + fake branch": 2 * t.disc_d.total,
        "largest unit: denoiser block": t.denoiser.max_unit,
        "largest unit: VAE decoder": t.vae.max_unit,
        "largest unit: DINOv2 layer / D head": max(t.disc_g.max_unit, t.disc_d.max_unit),
        "FSDP gathered units, G/F backward": fsdp_g,
        "FSDP gathered units, no-grad T/F": nograd_gather,
        "batch tensors": t.batch_tensors,
    }
    phases = {
        "G step, no-grad T/F/G forwards (DMD, ISG)": a_g + t.denoiser.max_unit + nograd_gather,
        "G step, VAE + D graph and its backward": a_g + t.vae.total + t.disc_g.total
        + max(t.vae.max_unit, t.disc_g.max_unit),
        "G step, G backward": grads("generator") + a_g + t.denoiser.max_unit + fsdp_g,
        "F step": grads("fake") + grads("dmd2_head") + a_g + t.denoiser.max_unit + fsdp_f,
        "D step": grads("disc_heads") + 2 * t.disc_d.total + t.disc_d.max_unit,
    }
    return acts, phases


def plan_memory(cfg: Any, gpus_per_node: int, nodes: int = 1, gpu_gib: float = 80.0, *,
                config_path: str = "", denoiser: str | None = None, teacher_sharded: bool = True,
                disc_backbone_dtype: str = "float32", reserve_frac: float = 0.10, context_gib: float = 1.5,
                checkpointing: bool | None = None, optimizer: str | None = None,
                cpu_offload: bool | None = None, scenarios: bool = True) -> MemoryPlan:
    """Per-GPU memory of the run that ``cfg`` (a loaded :class:`senseflow.config.SenseFlowConfig`) describes on
    ``gpus_per_node`` × ``nodes`` GPUs of ``gpu_gib`` GiB. ``checkpointing`` / ``optimizer`` / ``cpu_offload``
    default to ``train.gradient_checkpointing`` / ``optimizer.name`` / ``dist.cpu_offload``; with ``scenarios``
    the totals of all 8 combinations are added. ``denoiser`` picks the teacher architecture (see
    ``--denoiser``); ``teacher_sharded=False`` replicates T. No weights, paths or GPU are needed.
    Raises :class:`MemoryPlanError` on bad arguments."""
    if gpus_per_node < 1 or nodes < 1:
        raise MemoryPlanError(f"--gpus and --nodes must be >= 1 (got {gpus_per_node} and {nodes})")
    if gpu_gib <= 0:
        raise MemoryPlanError(f"--gpu-gib must be > 0 (got {gpu_gib})")
    if not 0 <= reserve_frac < 1 or context_gib < 0:
        raise MemoryPlanError(f"reserve_frac must be in [0, 1) and context_gib >= 0 "
                              f"(got {reserve_frac}, {context_gib})")
    with _quiet_diffusers():
        return _plan_memory(cfg, gpus_per_node, nodes, gpu_gib, config_path, denoiser, teacher_sharded,
                            disc_backbone_dtype, reserve_frac, context_gib, checkpointing, optimizer, cpu_offload,
                            scenarios)


def _plan_memory(cfg: Any, gpus_per_node: int, nodes: int, gpu_gib: float, config_path: str, denoiser: str | None,
                 teacher_sharded: bool, disc_backbone_dtype: str, reserve_frac: float, context_gib: float,
                 checkpointing: bool | None, optimizer: str | None, cpu_offload: bool | None,
                 scenarios: bool) -> MemoryPlan:
    dtypes = (("teacher.dtype", cfg.teacher.dtype), ("teacher.vae_dtype", cfg.teacher.vae_dtype),
              ("teacher.text_encoder_dtype", cfg.teacher.text_encoder_dtype), ("disc backbone", disc_backbone_dtype))
    for name, dt in dtypes:
        if dt not in DTYPE_BYTES:
            raise MemoryPlanError(f"{name} = {dt!r}: expected one of {', '.join(DTYPE_BYTES)}")
    chosen = MemoryOptions(bool(cfg.train.gradient_checkpointing) if checkpointing is None else checkpointing,
                           cfg.optimizer.name if optimizer is None else optimizer,
                           bool(cfg.dist.cpu_offload) if cpu_offload is None else cpu_offload)
    if chosen.optimizer not in ("adamw", "adamw8bit"):
        raise MemoryPlanError(f"optimizer {chosen.optimizer!r} is not one of adamw, adamw8bit")
    world = gpus_per_node * nodes
    fsdp = world > 1 and cfg.dist.strategy in ("auto", "fsdp")
    shard = (gpus_per_node if cfg.dist.hsdp else world) if fsdp else 1
    arch, student_cfg, nets, disc, notes = _build_networks(cfg, denoiser, fsdp, teacher_sharded, disc_backbone_dtype)
    traces = _trace_run(cfg, student_cfg, nets, disc, disc_backbone_dtype)

    def make(opts: MemoryOptions) -> MemoryPlan:
        rows = [n.row(opts.optimizer, shard, opts.cpu_offload) for n in nets]
        acts, phases = _phases(rows, traces, opts.checkpointing)
        return MemoryPlan(config_path, cfg.teacher.family, arch, int(cfg.teacher.resolution), int(cfg.train.batch_size),
                          gpus_per_node, nodes, shard, float(gpu_gib), reserve_frac, context_gib, opts, rows, acts,
                          phases, list(notes))

    plan = make(chosen)
    plan.notes.extend(_savings_notes(cfg, plan, traces.vae.total - traces.vae_ckpt.saved(True),
                                     traces.disc_g.total - traces.disc_g.saved(True), fsdp and teacher_sharded, shard))
    if not fsdp:
        plan.notes.append(f"no FSDP sharding (world size {world}, dist.strategy={cfg.dist.strategy}): "
                          "trained nets are replicated")
    if cfg.dist.strategy == "ddp" and world > 1:
        plan.notes.append("DDP's gradient buckets hold up to one more copy of the gradients (not counted)")
    if scenarios:
        for ckpt in (True, False):
            for opt in ("adamw8bit", "adamw"):
                for off in (False, True) if fsdp else (False,):
                    p = make(MemoryOptions(ckpt, opt, off))
                    plan.scenarios.append(dict(checkpointing=ckpt, optimizer=opt, cpu_offload=off,
                                               static_bytes=p.static_bytes, peak_phase=p.peak_phase,
                                               peak_bytes=p.peak_bytes, fits=p.fits,
                                               host_bytes_per_node=p.host_bytes_per_node))
    return plan


def _savings_notes(cfg: Any, plan: MemoryPlan, vae_ckpt_saving: int, dino_ckpt_saving: int, teacher_sharded: bool,
                   shard: int) -> list[str]:
    """What the main alternatives would change (GiB per GPU), for the user to weigh."""
    notes = []
    if vae_ckpt_saving > 0:
        held = plan.activations["VAE decode (grad)"] / GIB
        notes.append(f"the VAE decode with grad holds {held:.2f} GiB; diffusers' vae.enable_gradient_checkpointing() "
                     f"would save {vae_ckpt_saving / GIB:.2f} GiB (not enabled by the trainer)")
    if dino_ckpt_saving > 0:
        notes.append(f"checkpointing the DINOv2 layers in the G step would save {dino_ckpt_saving / GIB:.2f} GiB "
                     "(not enabled by the trainer)")
    text = [r for r in plan.networks if r.key.startswith("text:")]
    if cfg.teacher.text_encoder_dtype == "float32" and text:
        saving = sum(r.param_bytes for r in text) // 2
        notes.append(f"teacher.text_encoder_dtype=bfloat16 would save {saving / GIB:.2f} GiB")
    teacher = next(r for r in plan.networks if r.key == "teacher")
    if teacher_sharded and not plan.options.cpu_offload:
        extra = teacher.param_bytes * shard - teacher.param_bytes
        notes.append(f"the teacher is FSDP-sharded here; replicating it (--teacher replicate) costs "
                     f"{extra / GIB:.2f} GiB more")
    return notes


# ================================================================================== output
def _gib(n: int) -> str:
    return f"{n / GIB:7.2f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a readable text table (GiB = 2³⁰ bytes, per GPU)."""
    o = plan.options
    place = f"FSDP full shard over {plan.shard_degree}" if plan.shard_degree > 1 else "no sharding"
    lines = [
        f"SenseFlow memory plan: {plan.config_path}",
        f"teacher family {plan.family} ({plan.denoiser_arch}), {plan.resolution}² px, batch {plan.batch_size}/GPU, "
        f"{plan.world_size} GPUs ({plan.nodes} node{'s' if plan.nodes > 1 else ''} × {plan.gpus_per_node}), {place}",
        f"options: activation checkpointing {'on' if o.checkpointing else 'off'}, optimizer {o.optimizer}, "
        f"CPU offload {'on' if o.cpu_offload else 'off'}",
        "",
        f"{'network':<22} {'params':>10} {'dtype':>9} {'placement':>14} | {'params':>7} {'buffers':>7} "
        f"{'grads*':>7} {'optim':>7} {'host':>7}   (GiB per GPU)",
        "-" * 109,
    ]
    for r in plan.networks:
        role = ("trained " if r.trainable else "frozen ") + (f"/{plan.shard_degree}" if r.sharded else "repl.")
        lines.append(f"{r.label:<22} {_count(r.params):>10} {r.dtype:>9} {role:>14} | {_gib(r.param_bytes)} "
                     f"{_gib(r.buffer_bytes)} {_gib(r.grad_bytes)} {_gib(r.optim_bytes)} {_gib(r.host_bytes)}")
    tot = lambda attr: sum(getattr(r, attr) for r in plan.networks)  # noqa: E731
    lines.append("-" * 109)
    lines.append(f"{'total':<22} {'':>10} {'':>9} {'':>14} | {_gib(tot('param_bytes'))} {_gib(tot('buffer_bytes'))} "
                 f"{_gib(tot('grad_bytes'))} {_gib(tot('optim_bytes'))} {_gib(tot('host_bytes'))}")
    lines.append("* gradients exist only for the player being updated (freed after each step): counted in its phase")
    lines.append("")
    lines.append("activations and working memory (GiB per GPU)")
    for k, v in plan.activations.items():
        lines.append(f"  {k:<43} {_gib(v)}")
    lines.append("")
    static = plan.static_bytes
    lines.append(f"resident: params + buffers + optimiser + batch     {_gib(static)}")
    lines.append("phases: + grads of the player + live activations + working set")
    for k, v in plan.phases.items():
        mark = "  <- peak" if k == plan.peak_phase else ""
        lines.append(f"  + {k:<43} {_gib(v)}  = {_gib(static + v)}{mark}")
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    lines.append(f"peak per GPU {_gib(plan.peak_bytes).strip()} GiB vs usable {_gib(plan.usable_bytes).strip()} GiB "
                 f"({plan.gpu_gib:g} GiB − {plan.reserve_frac:.0%} fragmentation − {plan.context_gib:g} GiB CUDA "
                 f"context/NCCL): {verdict}")
    if plan.host_bytes_per_node:
        lines.append(f"host memory for offloaded states: {_gib(plan.host_bytes_per_node).strip()} GiB per node")
    if plan.scenarios:
        lines.append("")
        lines.append("scenarios (GiB per GPU)")
        lines.append(f"  {'ckpt':<5} {'optimizer':<10} {'offload':<8} {'resident':>8} {'peak':>8}  {'fits':<5} "
                     f"{'host/node':>9}")
        for s in plan.scenarios:
            lines.append(f"  {'on' if s['checkpointing'] else 'off':<5} {s['optimizer']:<10} "
                         f"{'on' if s['cpu_offload'] else 'off':<8} {_gib(s['static_bytes']):>8} "
                         f"{_gib(s['peak_bytes']):>8}  {'yes' if s['fits'] else 'NO':<5} "
                         f"{_gib(s['host_bytes_per_node']):>9}")
    for note in plan.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


class _ArgError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _ArgError(message)


def main_memory(argv: Sequence[str] | None = None) -> int:
    """``senseflow memory --config YAML --gpus N [--nodes M] [--gpu-gib 80] [--json] [key=value ...]``.

    Prints the per-GPU memory plan; exit code 2 on bad input; with ``--check`` 1 when the config does not fit.
    """
    p = _Parser(prog="senseflow memory", description="Per-GPU memory plan of a SenseFlow run (no weights needed).")
    p.add_argument("--config", required=True, help="YAML preset, e.g. configs/FLUX/flux_senseflow.yaml")
    p.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    p.add_argument("--reserve-frac", type=float, default=0.10, help="fraction kept free for fragmentation (0.10)")
    p.add_argument("--context-gib", type=float, default=1.5, help="CUDA context + NCCL buffers in GiB (1.5)")
    denoisers = ", ".join(n for n in arch_names() if "transformer" in n or "unet" in n)
    p.add_argument("--denoiser", default=None,
                   help=f"teacher architecture: a shipped name ({denoisers}) or a config.json / folder")
    p.add_argument("--teacher", choices=("shard", "replicate"), default="shard",
                   help="frozen teacher placement (default shard: FSDP like G and F)")
    p.add_argument("--disc-backbone-dtype", choices=tuple(DTYPE_BYTES), default="float32",
                   help="dtype of DINOv2 and D's CLIP text model (the trainer loads them in float32)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--check", action="store_true", help="exit with status 1 when the config's options do not fit")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.batch_size=2")
    try:
        args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    except _ArgError as exc:
        print(f"error: senseflow memory: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    from senseflow.config import ConfigError, load_config

    try:
        if args.gpus < 1 or args.nodes < 1:
            raise MemoryPlanError(f"--gpus and --nodes must be >= 1 (got --gpus {args.gpus} --nodes {args.nodes})")
        if not 0 <= args.reserve_frac < 1 or args.context_gib < 0:
            raise MemoryPlanError("--reserve-frac must be in [0, 1) and --context-gib >= 0")
        if not Path(args.config).is_file():
            raise FileNotFoundError(f"--config {args.config}: no such file")

        cfg = load_config(args.config, list(args.overrides))
        plan = plan_memory(cfg, args.gpus, args.nodes, args.gpu_gib, config_path=args.config, denoiser=args.denoiser,
                           teacher_sharded=args.teacher == "shard", disc_backbone_dtype=args.disc_backbone_dtype,
                           reserve_frac=args.reserve_frac, context_gib=args.context_gib)
    except (ConfigError, MemoryPlanError, FileNotFoundError) as exc:
        print(f"error: senseflow memory: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(format_plan(plan))
    return 1 if args.check and not plan.fits else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main_memory())

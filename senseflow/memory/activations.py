"""Activation tracing: the bytes autograd saves for backward in one forward with grad, measured on meta tensors
under a saved-tensor hook with bf16 autocast emulated and attention counted as a fused (flash) kernel."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode


class _FlashAttention(torch.autograd.Function):
    """Stand-in for a fused attention kernel: output of the right shape; saves q, k, v, out and the fp32
    log-sum-exp (B, H, S_q), as flash / memory-efficient attention do (no S_q × S_k matrix)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
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


@dataclass
class _Traces:
    """Activation profiles of one iteration's forwards with grad (see senseflow/memory/__init__.py)."""

    denoiser: ActivationProfile  # G (and F) forward with grad
    vae: ActivationProfile  # decode with grad, units = resnets / attention (working-set size)
    vae_ckpt: ActivationProfile  # the same, units = diffusers' checkpointed decoder blocks
    disc_g: ActivationProfile  # DINOv2 + heads, gradient to the pixels (G step)
    disc_d: ActivationProfile  # heads, gradient to their parameters (one branch of the D step)
    batch_tensors: int  # pixels, latents, reference features of the batch
    compute: torch.dtype | None  # autocast dtype (None: fp32)

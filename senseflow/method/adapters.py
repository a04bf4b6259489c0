"""LoRA players on one shared frozen base: the adapters, their switching, IDA on them, their exports (docs/method.md
§3.8, §7.1).

With ``model.lora.<player>.rank > 0`` a player is not a full fp32 copy of the teacher but a peft LoRA adapter on the
teacher's own frozen network W₀: per target layer ΔW = s·B·A (B: out × r, A: r × in, s = alpha/r). The teacher T,
the generator G (adapter ``student``) and the fake score F (adapter ``fake``) are then one network: T = W₀ (adapters
off), G = W₀ + s·B_G A_G, F = W₀ + s·B_F A_F. A player that is not LoRA keeps its own full copy.

Which adapter a call runs is chosen by :meth:`SharedBase.active`, a context manager every call of the networks goes
through (:class:`AdapterView` enters it around each forward): ``with shared.active("student"): ...`` runs G,
``with shared.active(None): ...`` the teacher. On exit the previous choice is restored, so nested calls cannot leave
a wrong adapter behind. With activation checkpointing the recomputation in the backward re-enters the adapter that
was active when the block ran forward (:meth:`SharedBase.checkpoint_function`), not the one active at backward time.

Switching uses peft's per-layer ``set_adapter`` / ``enable_adapters``; those also set ``requires_grad`` of the
inactive adapters to False, so every switch sets it back to True on every trained adapter (a trained parameter's
flag never changes, which FSDP2 relies on: it fixes an unsharded parameter's flag when it first gathers it).

Only the adapters are trained: each LoRA player's module is an :class:`AdapterWeights`, which registers the
adapter's ``lora_A`` / ``lora_B`` layers of every target layer and nothing of the base, so its optimiser, gradient
clipping, checkpoints (``model/<player>`` holds the adapter only) and EMA see the adapter alone.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, cast

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from senseflow.method.lora_mix import mix_lora

__all__ = [
    "ADAPTER_NAMES",
    "AdapterSpec",
    "AdapterView",
    "AdapterWeights",
    "SharedBase",
    "adapter_file_name",
    "adapter_state",
    "adapter_specs",
    "check_lora_fits_teacher",
    "ida_on_adapters",
    "merged_weights",
]

#: the peft adapter name of each LoRA player (``model.lora.<key>``)
ADAPTER_NAMES = {"student": "student", "fake": "fake"}


def adapter_file_name(student_file: str) -> str:
    """The adapter file written beside a student file (``student.safetensors`` → ``student_lora.safetensors``)."""
    stem = student_file.removesuffix(".safetensors")
    return f"{stem}_lora.safetensors"


@dataclass(frozen=True)
class AdapterSpec:
    """One LoRA player: peft adapter ``name``, rank r, alpha, target-module patterns, dropout."""

    name: str
    rank: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float

    @property
    def scaling(self) -> float:
        """s = alpha / r."""
        return self.alpha / self.rank

    def peft_config(self) -> Any:
        """The ``peft.LoraConfig`` of this adapter (peft's default initialisation: A Kaiming-uniform, B = 0, so the
        player starts as the teacher)."""
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=cast(Any, self.alpha), target_modules=list(self.targets),
                          lora_dropout=self.dropout, bias="none")


def adapter_specs(lora_cfg: Any, default_targets: tuple[str, ...]) -> dict[str, AdapterSpec]:
    """The LoRA players of ``model.lora`` (rank > 0 only), by player key (``student``, ``fake``)."""
    out: dict[str, AdapterSpec] = {}
    for key, name in ADAPTER_NAMES.items():
        c = getattr(lora_cfg, key)
        if int(c.rank) <= 0:
            continue
        targets = tuple(str(t) for t in c.target_modules) if c.target_modules is not None else tuple(default_targets)
        if not targets:
            raise ValueError(f"model.lora.{key}.target_modules: the teacher family names no default target modules; "
                             "give a list of module-name patterns")
        alpha = float(c.alpha) if c.alpha is not None else float(c.rank)
        out[key] = AdapterSpec(name, int(c.rank), alpha, targets, float(c.dropout))
    return out


def check_lora_fits_teacher(family: Any, specs: Mapping[str, AdapterSpec]) -> None:
    """Refuse (one line, before any weight is read) a LoRA player whose student architecture differs from the
    teacher's: adapters live on the teacher's own network (FLUX.1-dev's student drops the guidance embedder,
    docs/method.md decision 4)."""
    if not specs:
        return
    differs = {k: v for k, v in family.student_overrides.items() if family.denoiser_config.get(k) != v}
    if differs:
        keys = " and ".join(f"model.lora.{k}.rank" for k in specs)
        raise ValueError(
            f"{keys} > 0: the {family.name} student differs from this teacher ({differs}, docs/method.md decision 4), "
            "so it cannot be an adapter on the teacher's weights; use a teacher without those entries or rank 0")


class AdapterWeights(nn.Module):
    """The trained parameters of one adapter: for every LoRA layer of ``base`` that carries it, that layer's
    ``lora_A[name]`` and ``lora_B[name]`` registered under ``layers[<layer path, '.' → ':'>].A`` / ``.B``.

    The layers are the base's own modules (shared, not copied), so a step on these parameters changes the adapter
    the base runs; under FSDP2 they are the base's ``DTensor`` shards. ``shard_roots`` names the base so that
    :func:`senseflow.dist.reshard` frees the base's gathered parameters before anyone reads these.
    """

    def __init__(self, base: nn.Module, name: str) -> None:
        from peft.tuners.lora import LoraLayer

        super().__init__()
        self.adapter = name
        self.layers = nn.ModuleDict()
        self.paths: dict[str, str] = {}  # key in ``layers`` → the layer's module path in the plain denoiser
        self.scaling: dict[str, float] = {}
        for path, module in base.named_modules():
            if isinstance(module, LoraLayer) and name in module.lora_A:
                plain = _plain_path(path)
                key = plain.replace(".", ":")
                self.layers[key] = nn.ModuleDict({"A": module.lora_A[name], "B": module.lora_B[name]})
                self.paths[key] = plain
                self.scaling[key] = float(module.scaling[name])
        if not self.paths:
            raise ValueError(f"LoRA adapter {name!r}: no layer of {type(base).__name__} matches its target modules")
        object.__setattr__(self, "shard_roots", (base,))  # not a submodule: its parameters are not this module's

    def factors(self) -> Iterator[tuple[str, nn.Parameter, nn.Parameter]]:
        """(key, B, A) of every layer, in registration order."""
        for key, pair in self.layers.items():
            layers = cast(nn.ModuleDict, pair)
            yield key, cast(nn.Parameter, layers["B"].weight), cast(nn.Parameter, layers["A"].weight)


def _plain_path(path: str) -> str:
    for wrapper in ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod."):
        path = path.replace(wrapper, "")
    return path


class SharedBase:
    """The teacher's network carrying the LoRA players' adapters, and the switch between them (module docstring).

    ``base`` is the (placed) teacher network after :meth:`add_adapters`; ``weights`` the trained parameters of each
    adapter by player key.
    """

    def __init__(self, base: nn.Module, specs: Mapping[str, AdapterSpec]) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.base, self.specs = base, dict(specs)
        self.layers = [m for m in base.modules() if isinstance(m, BaseTunerLayer)]
        self.weights = {key: AdapterWeights(base, spec.name) for key, spec in specs.items()}
        self.current: str | None = None  # adapter name now active; None: adapters off (the teacher)
        self._apply(None)

    @staticmethod
    def add_adapters(base: nn.Module, specs: Mapping[str, AdapterSpec]) -> nn.Module:
        """Add every adapter of ``specs`` to the diffusers model ``base`` (diffusers' ``add_adapter``), adapter
        parameters in fp32 (master weights, docs/method.md decision 2), the base frozen; returns ``base``."""
        import warnings

        with warnings.catch_warnings():  # peft warns that a second adapter joins the first: that is the intent
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            for spec in specs.values():
                cast(Any, base).add_adapter(spec.peft_config(), adapter_name=spec.name)
        base.requires_grad_(False)
        for name, p in base.named_parameters():
            if ".lora_" in name:
                p.data = p.data.to(torch.float32)
                p.requires_grad_(True)
        return base

    def trainable(self) -> None:
        """Every trained adapter parameter requires grad (peft's switches unset it on inactive adapters)."""
        for w in self.weights.values():
            w.requires_grad_(True)

    def _apply(self, name: str | None) -> None:
        for layer in self.layers:
            if name is None:
                layer.enable_adapters(False)
            else:
                layer.set_adapter(name)
                layer.enable_adapters(True)
        self.trainable()
        self.current = name

    @contextlib.contextmanager
    def active(self, name: str | None) -> Iterator[None]:
        """Run the base with adapter ``name`` only (``None``: no adapter, the teacher) inside the block; the previous
        choice is restored on exit."""
        if name is not None and name not in {s.name for s in self.specs.values()}:
            raise KeyError(f"no LoRA adapter {name!r} (have: {', '.join(s.name for s in self.specs.values())})")
        previous = self.current
        if name != previous:
            self._apply(name)
        try:
            yield
        finally:
            if self.current != previous:
                self._apply(previous)

    def view(self, key: str | None) -> AdapterView:
        """The network of player ``key`` (``student``, ``fake``; ``None``: the teacher) as a callable module."""
        return AdapterView(self, None if key is None else self.specs[key].name)

    def checkpoint_function(self) -> Callable[..., Any]:
        """A ``gradient_checkpointing_func`` for diffusers' ``enable_gradient_checkpointing``: torch's non-reentrant
        checkpoint whose recomputation runs with the adapter that was active in the forward."""
        from torch.utils.checkpoint import checkpoint

        def contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
            return contextlib.nullcontext(), self.active(self.current)

        def run(module: Callable[..., Any], *args: Any) -> Any:
            return checkpoint(module, *args, use_reentrant=False, context_fn=contexts)

        return run


class AdapterView(nn.Module):
    """One player's network on the shared base: every forward runs inside ``shared.active(adapter)``.

    It registers nothing (its parameters and attributes such as ``config`` are the base's), so code that takes a
    denoiser (``family.predict(net, ...)``) takes a view unchanged.
    """

    def __init__(self, shared: SharedBase, adapter: str | None) -> None:
        super().__init__()
        object.__setattr__(self, "_shared", shared)
        self.adapter = adapter

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        shared: SharedBase = self.__dict__["_shared"]
        with shared.active(self.adapter):
            return shared.base(*args, **kwargs)

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return self.__dict__["_shared"].base.parameters(recurse)

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]:
        return self.__dict__["_shared"].base.named_parameters(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__"):
                raise
            return getattr(self.__dict__["_shared"].base, name)


def _full(t: Tensor) -> Tensor:
    """The whole tensor of a ``DTensor`` shard (a collective), else ``t``."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def _copy_into(param: Tensor, full: Tensor) -> None:
    """Write the whole value ``full`` into ``param`` (each rank its own shard of a ``DTensor``)."""
    if isinstance(param, DTensor):
        from torch.distributed.tensor import distribute_tensor

        local = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(local.to_local())
    else:
        param.copy_(full.to(param.dtype))


@torch.no_grad()
def ida_on_adapters(fake: AdapterWeights, generator: AdapterWeights, lam: float) -> dict[str, float]:
    """IDA φ ← λφ + (1 − λ)θ on two adapters of one shape (docs/method.md §7.1): per layer, F's factors become the
    best rank-r factors of λ·B_F A_F + (1 − λ)·B_G A_G (:func:`senseflow.method.lora_mix.mix_lora`; both adapters
    share the scale s, so the mix of s·BA is s times the mix of BA).

    A layer where both B are zero (neither player has moved it) is left as it is: the mix is exactly F's. Under FSDP2
    the factors are gathered (a collective, every rank in the same order), mixed identically on every rank and each
    rank keeps its shard. Returns ``ida/lora_truncation``: the relative Frobenius error ‖M − B'A'‖/‖M‖ over all
    layers together, and ``ida/lora_truncation_max``: the largest of one layer.
    """
    if list(fake.paths.values()) != list(generator.paths.values()):
        raise ValueError("IDA on adapters: the fake score's and the generator's adapters adapt different layers")
    err_sq = norm_sq = worst = 0.0
    for (key, b_f, a_f), (_, b_g, a_g) in zip(fake.factors(), generator.factors()):
        if abs(fake.scaling[key] - generator.scaling[key]) > 1e-12 * abs(fake.scaling[key]):
            raise ValueError(f"IDA on adapters: layer {fake.paths[key]} has scale {fake.scaling[key]} in F but "
                             f"{generator.scaling[key]} in G")
        bf, af, bg, ag = (_full(t).reshape(t.shape[0], -1) for t in (b_f, a_f, b_g, a_g))
        if not torch.count_nonzero(bf) and not torch.count_nonzero(bg):
            continue
        mix = mix_lora(bf, af, bg, ag, lam)
        total = float(mix.singular_values.square().sum())
        err_sq += mix.relative_error ** 2 * total
        norm_sq += total
        worst = max(worst, mix.relative_error)
        _copy_into(b_f, mix.b.reshape(b_f.shape))
        _copy_into(a_f, mix.a.reshape(a_f.shape))
    return {"ida/lora_truncation": math.sqrt(err_sq / norm_sq) if norm_sq > 0 else 0.0,
            "ida/lora_truncation_max": worst}


def merged_weights(base_state: Mapping[str, Tensor], factors: Mapping[str, tuple[Tensor, Tensor]],
                   ) -> dict[str, Tensor]:
    """The plain denoiser state dict of base + adapter: ``base_state`` is the full state dict of the shared base
    (peft's names: ``<layer>.base_layer.weight``, ``<layer>.lora_*``), ``factors`` maps a layer path to its (s·B, A)
    (ΔW = s·B·A). LoRA entries are dropped, ``.base_layer.`` names renamed, and every adapted weight becomes
    W₀ + s·B·A (in W₀'s dtype; the sum in fp32)."""
    out: dict[str, Tensor] = {}
    for name, t in base_state.items():
        if ".lora_" in name:
            continue
        out[name.replace(".base_layer.", ".")] = t
    for path, (b, a) in factors.items():
        w = out[f"{path}.weight"]
        delta = (b.float() @ a.float().reshape(a.shape[0], -1)).reshape(w.shape)
        out[f"{path}.weight"] = (w.float() + delta).to(w.dtype)
    return out


def adapter_state(weights: AdapterWeights, values: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The adapter as a file: ``<layer>.lora_A.weight`` = A and ``<layer>.lora_B.weight`` = s·B (the scale folded
    into B, so ΔW = B·A exactly: a LoRA of alpha = rank). ``values`` (e.g. the EMA's, by this module's parameter
    names) replaces the current parameters; a collective under FSDP2 (shards are gathered), CPU tensors."""
    out: dict[str, Tensor] = {}
    for key, b, a in weights.factors():
        names = {"B": f"layers.{key}.B.weight", "A": f"layers.{key}.A.weight"}
        bt = values[names["B"]] if values is not None else b
        at = values[names["A"]] if values is not None else a
        path = weights.paths[key]
        out[f"{path}.lora_A.weight"] = _full(at).detach().float().cpu().contiguous()
        out[f"{path}.lora_B.weight"] = (_full(bt).detach().float().cpu() * weights.scaling[key]).contiguous()
    return out

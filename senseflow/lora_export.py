"""A full-weight student as a diffusers LoRA: truncated SVD of its difference from the teacher.

``senseflow export --lora-rank R`` (:mod:`senseflow.export`) calls :func:`extract_lora` and :func:`write_lora`.
For every weight of a ``Linear`` or (ungrouped) ``Conv2d`` layer of the denoiser,

    ΔW = W_student − W_teacher ≈ B·A,   B = U_r Σ_r^{1/2},  A = Σ_r^{1/2} V_rᵀ,

with ΔW = U Σ Vᵀ its SVD (a convolution's weight read as an out × (in·k_h·k_w) matrix; A is then a convolution
with the layer's kernel, stride and padding into r channels and B a 1×1 convolution, peft's convolutional LoRA) and
r = min(R, rank bound of the layer). By Eckart–Young this is the best rank-r approximation in Frobenius norm, with
relative error ‖ΔW − BA‖/‖ΔW‖ = sqrt(Σ_{i>r} σ_i²)/sqrt(Σ σ_i²). Every LoRA layer of the file has rank R: a layer
whose rank bound min(out, in·k_h·k_w) is below R is exact and its factors are padded with zero rows/columns (the
product is unchanged), so the file needs no per-layer rank pattern. Layers whose ΔW is exactly zero get no factors.

What a LoRA file cannot hold as factors:

* **biases** of those layers: stored exactly as the bias of ``lora_B`` (peft's ``lora_bias``, which diffusers'
  loader recognises). A layer whose base has no bias then cannot be fused (``fuse_lora``), which the README says;
* **other changed parameters** (normalisation weights, embeddings): stored as full tensors where the family's
  pipeline loads them beside the LoRA (``FluxPipeline`` loads ``norm_q``/``norm_k``/``norm_added_q``/``norm_added_k``,
  its ``_control_lora_supported_norm_keys``); every other one is refused unless ``drop_rest`` is set, in which
  case it is left out and listed with its share of the student's change.

The file is written the way diffusers' own LoRA training writes one: peft's ``LoraConfig`` (``lora_alpha = r`` so
that the scale α/r is 1) injected into the denoiser's architecture (on the meta device: no base weight is
allocated), the factors set, ``get_peft_model_state_dict`` and the family pipeline's ``save_lora_weights`` with the
adapter metadata. ``<Pipeline>.from_pretrained(teacher).load_lora_weights(folder)`` reads it.

Memory: the student's state dict plus one teacher tensor at a time (the teacher is read lazily from its
safetensors).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, cast

import torch
from torch import Tensor, nn

__all__ = [
    "LORA_WEIGHT_NAME",
    "LORA_REPORT_NAME",
    "LoraEntry",
    "LoraExtraction",
    "lowrank_factors",
    "matrix_layers",
    "extra_full_keys",
    "teacher_tensors",
    "extract_lora",
    "lora_state_dict",
    "unfusable_layers",
    "write_lora",
    "trained_adapter_file",
    "adapter_extraction",
]

#: the file name ``load_lora_weights(folder)`` looks for
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: per-layer and overall errors of an SVD-extracted LoRA
LORA_REPORT_NAME = "lora_report.json"
#: peft adapter name used while building the state dict (not stored: get_peft_model_state_dict removes it)
_ADAPTER = "default"


def lowrank_factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The best rank-``rank`` factors of the matrix ``delta`` (m × n): ``B`` (m × rank) and ``A`` (rank × n) with
    B = U_r Σ_r^{1/2}, A = Σ_r^{1/2} V_rᵀ from the thin SVD, in float32 or wider; when rank > min(m, n) the factors
    are exact and padded with zeros to ``rank``."""
    if delta.dim() != 2:
        raise ValueError(f"lowrank_factors needs a matrix, got shape {tuple(delta.shape)}")
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    work = delta if delta.dtype in (torch.float32, torch.float64) else delta.float()
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b = work.new_zeros(work.shape[0], rank)
    a = work.new_zeros(rank, work.shape[1])
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    return b, a


def matrix_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module name → layer, for the layers whose weight a LoRA can hold: ``nn.Linear`` and ``nn.Conv2d`` with one
    group (peft's LoRA layers for them compose A and B as the same linear map)."""
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1):
            out[name] = module
    return out


def extra_full_keys(pipeline_class: type) -> tuple[str, ...]:
    """Name fragments of full (non-LoRA) denoiser parameters that ``pipeline_class.load_lora_weights`` loads beside
    the LoRA: diffusers' ``_control_lora_supported_norm_keys`` (FLUX's attention RMSNorm weights), else none."""
    return tuple(getattr(pipeline_class, "_control_lora_supported_norm_keys", ()) or ())


@contextlib.contextmanager
def teacher_tensors(folder: Path) -> Iterator[Callable[[str], Tensor]]:
    """Inside the context, ``get(name)`` reads one tensor of the diffusers model ``folder`` (its
    ``*.safetensors.index.json`` shards, else ``diffusion_pytorch_model.safetensors``, else its ``*.safetensors``)
    without loading the others."""
    import json

    from safetensors import safe_open

    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        names = sorted(set(json.loads(index[0].read_text()).get("weight_map", {}).values()))
        files = [folder / n for n in names]
    elif (folder / "diffusion_pytorch_model.safetensors").is_file():
        files = [folder / "diffusion_pytorch_model.safetensors"]
    else:
        files = sorted(folder.glob("*.safetensors"))
    with contextlib.ExitStack() as stack:
        where: dict[str, Any] = {}
        for f in files:
            handle = stack.enter_context(safe_open(str(f), framework="pt"))
            for key in handle.keys():
                where[key] = handle
        yield lambda name: where[name].get_tensor(name)


@dataclass(frozen=True)
class LoraEntry:
    """One changed parameter and how it is stored: ``kind`` is ``linear`` / ``conv`` (factors of rank ``rank``),
    ``bias`` (``lora_B``'s bias), ``full`` (the whole tensor, loaded beside the LoRA) or ``dropped``. Norms are
    Frobenius norms of the change ΔW and of what the export misses of it, ΔW − stored."""

    name: str
    kind: str
    shape: tuple[int, ...]
    rank: int
    delta_norm: float
    error_norm: float

    @property
    def relative_error(self) -> float:
        """‖ΔW − stored‖ / ‖ΔW‖ (0 when nothing changed)."""
        return self.error_norm / self.delta_norm if self.delta_norm > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape), "rank": self.rank,
                "delta_norm": self.delta_norm, "error_norm": self.error_norm, "relative_error": self.relative_error}


@dataclass
class LoraExtraction:
    """What :func:`extract_lora` found: the factors (module name → (B, A), B: out × R, A: R × in·k_h·k_w), the bias
    changes (module name → Δb), the full tensors to store (parameter name → student value) and one
    :class:`LoraEntry` per changed parameter."""

    rank: int
    factors: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    biases: dict[str, Tensor] = field(default_factory=dict)
    full: dict[str, Tensor] = field(default_factory=dict)
    entries: list[LoraEntry] = field(default_factory=list)

    @property
    def dropped(self) -> list[LoraEntry]:
        return [e for e in self.entries if e.kind == "dropped"]

    def overall(self) -> dict[str, float]:
        """``relative_error``: ‖Δ − stored‖/‖Δ‖ over every changed parameter (dropped ones count whole);
        ``matrix_relative_error``: the same over the factorised layers only; ``dropped_share``: ‖Δ_dropped‖/‖Δ‖."""

        def ratio(entries: list[LoraEntry], num: Callable[[LoraEntry], float]) -> float:
            den = math.sqrt(sum(e.delta_norm ** 2 for e in entries))
            return math.sqrt(sum(num(e) ** 2 for e in entries)) / den if den > 0 else 0.0

        matrices = [e for e in self.entries if e.kind in ("linear", "conv")]
        return {
            "relative_error": ratio(self.entries, lambda e: e.error_norm),
            "matrix_relative_error": ratio(matrices, lambda e: e.error_norm),
            "dropped_share": ratio(self.entries, lambda e: e.delta_norm if e.kind == "dropped" else 0.0),
        }

    def report(self) -> dict[str, Any]:
        """The content of ``lora_report.json``."""
        counts = {k: sum(e.kind == k for e in self.entries) for k in ("linear", "conv", "bias", "full", "dropped")}
        return {"rank": self.rank, "counts": counts, "overall": self.overall(),
                "layers": [e.as_dict() for e in self.entries]}

    def summary(self) -> str:
        """One line for stdout."""
        o, c = self.overall(), self.report()["counts"]
        worst = max((e for e in self.entries if e.kind in ("linear", "conv")), key=lambda e: e.relative_error,
                    default=None)
        worst_text = f", worst layer {worst.relative_error:.3g} ({worst.name})" if worst is not None else ""
        return (f"LoRA rank {self.rank}: {c['linear']} linear + {c['conv']} conv layers, {c['bias']} biases, "
                f"{c['full']} full tensors, {c['dropped']} dropped; relative error {o['relative_error']:.3g} "
                f"(matrices {o['matrix_relative_error']:.3g}{worst_text}; dropped share {o['dropped_share']:.3g})")


def _as_matrix(weight: Tensor) -> Tensor:
    return weight.reshape(weight.shape[0], -1)


def extract_lora(
    model: nn.Module,
    teacher: Callable[[str], Tensor],
    student: Mapping[str, Tensor],
    rank: int,
    full_keys: tuple[str, ...] = (),
    dtype: torch.dtype | None = None,
) -> LoraExtraction:
    """Factorise the student's change from the teacher (see the module docstring).

    ``model`` gives the architecture (its parameters may be on the meta device); ``teacher(name)`` and
    ``student[name]`` the two values of each of its parameters. Parameters whose name contains one of
    ``full_keys`` are stored whole; other non-matrix changes are ``dropped`` entries (the caller refuses or
    drops them). Factors, biases and full tensors are in ``dtype`` (``None``: the student's), and the errors
    are those of these stored values.
    """
    if rank < 1:
        raise ValueError(f"--lora-rank must be at least 1, got {rank}")
    layers = matrix_layers(model)
    owner = {f"{m}.{p}": (m, p) for m, layer in layers.items() for p, _ in layer.named_parameters(recurse=False)}
    out = LoraExtraction(rank=rank)
    for name, _ in model.named_parameters():
        s = student[name]
        delta = s.float() - teacher(name).float()
        if not torch.count_nonzero(delta):
            continue
        keep = dtype or s.dtype
        delta_norm = float(delta.norm())
        module, pname = owner.get(name, ("", ""))
        if pname == "weight":
            b, a = lowrank_factors(_as_matrix(delta), rank)
            b, a = b.to(keep), a.to(keep)
            err = float((_as_matrix(delta) - b.float() @ a.float()).norm())
            out.factors[module] = (b, a)
            kind = "conv" if isinstance(layers[module], nn.Conv2d) else "linear"
            bound = min(_as_matrix(delta).shape)
            out.entries.append(LoraEntry(name, kind, tuple(s.shape), min(rank, bound), delta_norm, err))
        elif pname == "bias":
            out.biases[module] = delta.to(keep)
            err = float((delta - out.biases[module].float()).norm())
            out.entries.append(LoraEntry(name, "bias", tuple(s.shape), 0, delta_norm, err))
        elif any(k in name for k in full_keys):
            out.full[name] = s.to(keep)
            err = float((s.float() - out.full[name].float()).norm())
            out.entries.append(LoraEntry(name, "full", tuple(s.shape), 0, delta_norm, err))
        else:
            out.entries.append(LoraEntry(name, "dropped", tuple(s.shape), 0, delta_norm, delta_norm))
    return out


def lora_state_dict(model: nn.Module, extraction: LoraExtraction) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The peft LoRA state dict of ``extraction`` and its adapter metadata (the ``LoraConfig`` arguments).

    peft's ``LoraConfig(r=R, lora_alpha=R)`` (scale 1) is injected into ``model`` (modified in place; parameters
    may be on the meta device) with the factorised and bias-changed layers as target modules; layers peft matches
    besides them (a target name that ends another module's name) get zero factors, exactly what the loader would
    give them. Keys are those of ``get_peft_model_state_dict`` (``<module>.lora_A.weight``, ``…lora_B.weight``,
    ``…lora_B.bias``), followed by the full tensors.
    """
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    targets = sorted(set(extraction.factors) | set(extraction.biases))
    if not targets:
        return dict(extraction.full), {}
    r = extraction.rank
    metadata: dict[str, Any] = {"r": r, "lora_alpha": r, "target_modules": targets,
                                "lora_bias": bool(extraction.biases)}
    with warnings.catch_warnings():  # bias-less base layers under lora_bias: the README says fuse_lora is impossible
        warnings.filterwarnings("ignore", message=".*lora_bias=True. was passed but the targeted layer")
        inject_adapter_in_model(LoraConfig(**metadata), model, adapter_name=_ADAPTER, low_cpu_mem_usage=True)
    stored = [f[0] for f in extraction.factors.values()] + list(extraction.biases.values())
    dtype = stored[0].dtype
    values: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        a_shape, b_shape = _weight_shape(module.lora_A[_ADAPTER]), _weight_shape(module.lora_B[_ADAPTER])
        b, a = extraction.factors.get(name, (torch.zeros(b_shape[0], r, dtype=dtype),
                                             torch.zeros(r, math.prod(a_shape[1:]), dtype=dtype)))
        values[f"{name}.lora_A.{_ADAPTER}.weight"] = a.reshape(a_shape).contiguous()
        values[f"{name}.lora_B.{_ADAPTER}.weight"] = b.reshape(b_shape).contiguous()
        if getattr(module.lora_B[_ADAPTER], "bias", None) is not None:
            values[f"{name}.lora_B.{_ADAPTER}.bias"] = extraction.biases.get(
                name, torch.zeros(b_shape[0], dtype=b.dtype)).contiguous()
    result = model.load_state_dict(values, strict=False, assign=True)
    if result.unexpected_keys:  # peft named its LoRA parameters otherwise than this module expects
        raise RuntimeError(f"peft's LoRA layers do not take {result.unexpected_keys[:3]}")
    with warnings.catch_warnings():  # peft takes lora_B's 1-D bias for an unsharded FSDP / ZeRO-3 tensor
        warnings.filterwarnings("ignore", message=".*LoRA tensor\\(s\\) have invalid shape")
        state = dict(get_peft_model_state_dict(model, adapter_name=_ADAPTER))
    state.update(extraction.full)
    return state, metadata


def unfusable_layers(model: nn.Module) -> list[str]:
    """Names of the LoRA layers of ``model`` (after :func:`lora_state_dict`) whose ``lora_B`` has a bias but whose
    base layer has none: peft cannot merge those (``fuse_lora``)."""
    from peft.tuners.lora import LoraLayer

    return sorted(name for name, m in model.named_modules()
                  if isinstance(m, LoraLayer) and any(getattr(b, "bias", None) is not None for b in m.lora_B.values())
                  and getattr(m.get_base_layer(), "bias", None) is None)


def _weight_shape(module: nn.Module) -> tuple[int, ...]:
    weight = module.weight
    if not isinstance(weight, Tensor):
        raise TypeError(f"{type(module).__name__}.weight is not a tensor")
    return tuple(weight.shape)


def write_lora(folder: Path, pipeline_class: Any, denoiser_subfolder: str, state: Mapping[str, Tensor],
               metadata: Mapping[str, Any]) -> Path:
    """``pipeline_class.save_lora_weights(folder, <denoiser>_lora_layers=state, <denoiser>_lora_adapter_metadata=…)``
    (safetensors, :data:`LORA_WEIGHT_NAME`); returns the file."""
    kwargs: dict[str, Any] = {f"{denoiser_subfolder}_lora_layers": dict(state)}
    if metadata:
        kwargs[f"{denoiser_subfolder}_lora_adapter_metadata"] = dict(metadata)
    pipeline_class.save_lora_weights(str(folder), weight_name=LORA_WEIGHT_NAME, safe_serialization=True, **kwargs)
    return folder / LORA_WEIGHT_NAME


def trained_adapter_file(student_file: Path) -> Path | None:
    """The adapter a LoRA-trained run wrote beside ``student_file`` (``student.safetensors`` →
    ``student_lora.safetensors``, docs/method.md §3.8), or None for a full-weight run."""
    from senseflow.method.adapters import adapter_file_name

    path = student_file.with_name(adapter_file_name(student_file.name))
    return path if student_file.suffix == ".safetensors" and path.is_file() else None


def adapter_extraction(model: nn.Module, adapter: Mapping[str, Tensor], rank: int, source: Path,
                       dtype: torch.dtype | None = None) -> LoraExtraction:
    """A LoRA-trained student's own adapter as the export's factors: exact, no SVD. ``adapter`` holds
    ``<layer>.lora_A.weight`` = A and ``<layer>.lora_B.weight`` = s·B (ΔW = B·A); its rank must be ``rank``
    (``--lora-rank``). Every layer's relative error is 0 (up to ``dtype`` rounding, which the entries measure)."""
    layers = matrix_layers(model)
    paths = sorted(k.removesuffix(".lora_A.weight") for k in adapter if k.endswith(".lora_A.weight"))
    ranks = {int(adapter[f"{p}.lora_A.weight"].shape[0]) for p in paths}
    if ranks != {rank}:
        raise ValueError(f"--lora-rank {rank}: {source.name} is the run's own LoRA adapter of rank "
                         f"{', '.join(map(str, sorted(ranks)))}; pass --lora-rank {max(ranks, default=rank)} to export "
                         "it exactly")
    out = LoraExtraction(rank=rank)
    for path in paths:
        if path not in layers:
            raise ValueError(f"{source.name}: adapter layer {path!r} is not a linear or convolution layer of the "
                             "student")
        b, a = adapter[f"{path}.lora_B.weight"].float(), adapter[f"{path}.lora_A.weight"].float()
        delta = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
        keep = dtype or adapter[f"{path}.lora_A.weight"].dtype
        bs, as_ = b.reshape(b.shape[0], -1).to(keep), a.reshape(a.shape[0], -1).to(keep)
        out.factors[path] = (bs, as_)
        err = float((delta - bs.float() @ as_.float()).norm())
        kind = "conv" if isinstance(layers[path], nn.Conv2d) else "linear"
        shape = tuple(cast(Tensor, layers[path].weight).shape)
        out.entries.append(LoraEntry(f"{path}.weight", kind, shape, rank, float(delta.norm()), err))
    return out

"""Loading a distilled student G_θ from any of the forms a user may hold, safely and with clear errors.

Accepted forms of ``checkpoint`` (docs/method.md §15-§16):

* a ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` file read with ``torch.load(weights_only=True)``: either
  ``{"model": state_dict}`` (the authors' ``ckpt_model_N.pth``) or a bare state dict;
* a ``.safetensors`` file (e.g. ``student.safetensors`` of one of our training checkpoints);
* a diffusers folder: a whole exported pipeline (the student in ``transformer/`` or ``unet/``), or a bare model
  folder holding ``config.json`` and ``diffusion_pytorch_model*.safetensors`` (the released ``SenseFlow-FLUX``);
* one of our training checkpoints (``iter_XXXXXX/``), its parent ``checkpoints/`` folder, the ``latest`` pointer
  file in it, or the run folder itself: the consolidated ``student_ema.safetensors`` (G's EMA, written when
  ``train.ema.enabled``) or else ``student.safetensors`` that the trainer writes beside every checkpoint. To sample
  the raw generator of a run trained with EMA, pass its ``student.safetensors`` file itself.

Nothing here unpickles what a checkpoint folder carries: a training checkpoint's DCP files (``.metadata`` is a
pickle, and DCP ``torch.load``-s non-tensor entries without ``weights_only``) can run code, so they are read only by
resume (:mod:`senseflow.trainer.checkpoint`, after checking the digest the run recorded). A checkpoint folder without
``student_ema.safetensors`` / ``student.safetensors`` is refused with one line.

The student's architecture always comes from a diffusers model config (its ``_class_name`` names the class). Keys are
compared with the architecture *before* any weight is read, from the safetensors header or a memory-mapped
``torch.load``: a mismatch is a :class:`CheckpointMismatchError` that names a few missing and unexpected keys.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from senseflow.models.families import family_names, get_family

if TYPE_CHECKING:
    from diffusers.configuration_utils import ConfigMixin
    from diffusers.models.modeling_utils import ModelMixin

    from senseflow.core.family import TeacherFamily

    # ignore: diffusers types ConfigMixin.config_name as None and ModelMixin's as str; its models mix both alike
    class DiffusersModel(ModelMixin, ConfigMixin):  # type: ignore[misc]
        """What a student class is to the type checker: a diffusers model built from its config (the families'
        ``UNet2DConditionModel``, ``SD3Transformer2DModel``, ``FluxTransformer2DModel``, …)."""


__all__ = [
    "CheckpointMismatchError",
    "StudentSource",
    "denoiser_subfolders",
    "denoiser_classes",
    "resolve_student_source",
    "denoiser_class",
    "read_json",
    "student_config",
    "checked_student_config",
    "empty_model",
    "checkpoint_shapes",
    "check_keys",
    "check_student_keys",
    "read_state_dict",
    "load_student",
]

def denoiser_subfolders() -> tuple[str, ...]:
    """Subfolders of a diffusers pipeline folder that may hold the denoiser (the registered families'
    ``denoiser_subfolder``), in search order (sorted: a pipeline folder holds one denoiser, the order only makes the
    search deterministic)."""
    return tuple(sorted({get_family(n).denoiser_subfolder for n in family_names()}))


def denoiser_classes() -> tuple[str, ...]:
    """The diffusers classes a student may be (the registered families' ``denoiser_class_name``; ``_class_name`` of
    its config is checked against them)."""
    return tuple(dict.fromkeys(get_family(n).denoiser_class_name for n in family_names()))


#: wrapper prefixes that DDP, torch.compile and FSDP1 add to parameter names
_WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")
#: keys of a ``torch.save``-d dict that may hold the student's state dict, in preference order
_STATE_KEYS: tuple[str, ...] = ("model", "state_dict", "generator", "student")
#: the consolidated students a training checkpoint holds, in preference order (the EMA is the model a run publishes)
STUDENT_FILES: tuple[str, ...] = ("student_ema.safetensors", "student.safetensors")


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not match the student architecture."""


@dataclass(frozen=True)
class StudentSource:
    """Where the student's weights (and, for a diffusers folder, its config) live.

    ``kind`` is one of ``pth``, ``safetensors`` or ``diffusers`` (``path`` is the model folder itself).
    """

    kind: str
    path: Path
    config_path: Path | None = None


def read_json(path: Path | str) -> dict[str, Any]:
    """A JSON object from ``path`` with a one-line error naming the file on failure."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _model_folder(folder: Path) -> Path | None:
    """The folder holding a diffusers model config + weights: ``folder`` itself or its transformer/ or unet/."""
    for cand in (folder, *(folder / s for s in denoiser_subfolders())):
        if (cand / "config.json").is_file() and any(cand.glob("*.safetensors")):
            return cand
    return None


def resolve_student_source(checkpoint: Path | str) -> StudentSource:
    """Classify ``checkpoint`` (see the module docstring); raises FileNotFoundError / ValueError with its name.

    Never reads a DCP file: a training checkpoint resolves to the safetensors the trainer wrote beside it.
    """
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"student checkpoint not found: {path}")
    if path.is_file() and path.name == "latest" and not path.suffix:
        path = path.parent  # the pointer file itself: resolve through its checkpoints/ folder below
    if path.is_dir() and (path / "checkpoints" / "latest").is_file():
        path = path / "checkpoints"  # a training run folder
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            return StudentSource("safetensors", path)
        if suffix in (".pth", ".pt", ".bin", ".ckpt"):
            return StudentSource("pth", path)
        raise ValueError(
            f"student checkpoint {path}: unknown file type {suffix!r} (expected .pth, .pt, .bin, .ckpt or "
            ".safetensors)"
        )
    # folders: a run's checkpoints/ with a 'latest' pointer -> the newest complete checkpoint
    if (path / "latest").is_file():
        name = (path / "latest").read_text().strip()
        if not name or Path(name).name != name or name in (".", ".."):
            raise ValueError(f"{path / 'latest'} must name a checkpoint folder beside it, found {name!r}")
        path = path / name
        if not path.is_dir():
            raise FileNotFoundError(f"{checkpoint}/latest names {path.name}, which does not exist")
    for name in STUDENT_FILES:
        if (path / name).is_file():
            return StudentSource("safetensors", path / name)
    if (path / ".metadata").exists() or any(path.glob("*.distcp")):
        raise ValueError(
            f"checkpoint folder {path} holds no {' or '.join(STUDENT_FILES)}; its DCP files are never read outside "
            "resume (they can carry pickled code): pass a folder or file with the student's safetensors"
        )
    model_dir = _model_folder(path)
    if model_dir is not None:
        return StudentSource("diffusers", model_dir, model_dir / "config.json")
    raise ValueError(
        f"student checkpoint folder {path} holds neither a diffusers model (config.json + *.safetensors, or a "
        f"transformer/ or unet/ subfolder with them) nor a training checkpoint's {' or '.join(STUDENT_FILES)}"
    )


def denoiser_class(config: Mapping[str, Any], fallback: str | None = None) -> type[DiffusersModel]:
    """The diffusers class named by a model config's ``_class_name`` (or ``fallback``), restricted to students."""
    import diffusers

    name, classes = config.get("_class_name") or fallback, denoiser_classes()
    if name not in classes:
        raise ValueError(f"model config names class {name!r}; a student must be one of {', '.join(classes)}")
    return getattr(diffusers, name)


def student_config(base_config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A copy of ``base_config`` with ``overrides`` applied.

    FLUX: ``{"guidance_embeds": False}`` (docs/method.md, decision 4).
    """
    cfg = dict(base_config)
    cfg.update(overrides or {})
    return cfg


def checked_student_config(cfg_path: Path, family: type[TeacherFamily], needs: str) -> dict[str, Any]:
    """The student's config: the model config at ``cfg_path`` with the family's ``student_overrides``; a ValueError
    ``"<cfg_path> describes a <class>; <needs>"`` when it names another class than the family's denoiser."""
    config = student_config(read_json(cfg_path), family.student_overrides)
    cls = denoiser_class(config, family.denoiser_class_name)
    if cls.__name__ != family.denoiser_class_name:
        raise ValueError(f"{cfg_path} describes a {cls.__name__}; {needs}")
    return config


def empty_model(config: Mapping[str, Any], fallback_class: str | None = None) -> DiffusersModel:
    """The architecture of ``config`` with parameters on the meta device (no memory); buffers stay real."""
    from accelerate import init_empty_weights

    cls = denoiser_class(config, fallback_class)
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(dict(config))
    assert not isinstance(model, tuple)  # (model, unused kwargs) only with return_unused_kwargs=True
    return model


def _strip_wrappers(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name.replace("._fsdp_wrapped_module", "").replace("._checkpoint_wrapped_module", "")


def _unwrap_saved_dict(obj: Any, path: Path) -> Mapping[str, Any]:
    """``{"model": sd}`` (and a few other wrappers) or a bare state dict → the state dict."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a state dict or {{'model': state_dict}}")
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        return obj
    for key in _STATE_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
            return inner
    raise ValueError(
        f"{path} holds a dict with keys {sorted(map(str, obj))[:6]}; expected a state dict of tensors or one under "
        f"one of {list(_STATE_KEYS)}"
    )


def _load_pth(path: Path) -> Mapping[str, Tensor]:
    """``torch.load(weights_only=True)`` (memory-mapped when the file allows it): only tensors and plain containers."""
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol N": the error below says it all
            warnings.simplefilter("ignore", UserWarning)
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # legacy (non-zip) files cannot be memory-mapped
                if "mmap" not in str(exc):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or a pickle with objects that weights_only refuses
        raise ValueError(
            f"{path} is not a checkpoint that torch.load(weights_only=True) can read ({type(exc).__name__}); "
            "expected tensors in plain dicts"
        ) from None
    return _unwrap_saved_dict(obj, path)


def _safetensors_files(source: StudentSource) -> list[Path]:
    if source.kind == "safetensors":
        return [source.path]
    index = sorted(source.path.glob("*.safetensors.index.json"))
    if index:
        names = sorted(set(read_json(index[0]).get("weight_map", {}).values()))
        return [source.path / n for n in names]
    files = (
        sorted(source.path.glob("diffusion_pytorch_model*.safetensors"))
        or sorted(source.path.glob("*.safetensors"))
    )
    return files


def checkpoint_shapes(source: StudentSource) -> dict[str, tuple[int, ...]]:
    """Parameter names → shapes of ``source`` without reading the tensors (safetensors header, mmap).

    Names are returned without wrapper prefixes (``module.``, ``_orig_mod.``).
    """
    if source.kind == "pth":
        return {_strip_wrappers(k): tuple(v.shape) for k, v in _load_pth(source.path).items()}
    if source.kind in ("safetensors", "diffusers"):
        from safetensors import safe_open

        out: dict[str, tuple[int, ...]] = {}
        files = _safetensors_files(source)
        if not files:
            raise FileNotFoundError(f"no .safetensors weights in {source.path}")
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as handle:
                    for k in handle.keys():
                        out[_strip_wrappers(k)] = tuple(handle.get_slice(k).get_shape())
            except Exception as exc:  # header corrupt / not a safetensors file
                raise ValueError(f"{f} is not a readable safetensors file ({exc})".splitlines()[0]) from None
        return out
    raise ValueError(f"unknown checkpoint kind {source.kind!r}")


def _few(names: Iterable[str], n: int = 3) -> str:
    names = sorted(names)
    more = f", … (+{len(names) - n})" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def check_keys(
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[int, ...]],
    where: str,
    ignore_prefixes: Sequence[str] = (),
) -> list[str]:
    """Compare names and shapes; raise :class:`CheckpointMismatchError` naming a few offenders.

    Keys of ``found`` under ``ignore_prefixes`` and absent from ``expected`` (FLUX.1-dev's
    ``time_text_embed.guidance_embedder.*`` when the student has ``guidance_embeds=False``, §3.6) are dropped and
    returned.
    """
    ignored = [k for k in found if k not in expected and any(k.startswith(p) for p in ignore_prefixes)]
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected and k not in ignored]
    wrong = [
        f"{k} {tuple(found[k])}≠{tuple(expected[k])}"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_few(unexpected)})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches ({_few(wrong, 2)})")
        raise CheckpointMismatchError(f"checkpoint does not match {where}: " + "; ".join(parts))
    return ignored


def check_student_keys(source: StudentSource, config: Mapping[str, Any], family: type[TeacherFamily],
                       where: str) -> None:
    """The keys and shapes of ``source`` against the family's student built from ``config`` (:func:`check_keys`,
    ``where`` names that architecture), from headers / a memory map only: no weight is read."""
    expected = {k: tuple(v.shape) for k, v in empty_model(config, family.denoiser_class_name).state_dict().items()}
    check_keys(expected, checkpoint_shapes(source), where, family.student_ignore_prefixes)


def read_state_dict(source: StudentSource) -> dict[str, Tensor]:
    """All tensors of ``source`` (CPU, as stored), with wrapper prefixes stripped."""
    if source.kind == "pth":
        return {_strip_wrappers(k): v for k, v in _load_pth(source.path).items()}
    if source.kind in ("safetensors", "diffusers"):
        from safetensors.torch import load_file

        out: dict[str, Tensor] = {}
        for f in _safetensors_files(source):
            out.update({_strip_wrappers(k): v for k, v in load_file(str(f), device="cpu").items()})
        return out
    raise ValueError(f"unknown checkpoint kind {source.kind!r}")


def load_student(
    source: StudentSource,
    config: Mapping[str, Any],
    dtype: torch.dtype | None = torch.float32,
    device: torch.device | str = "cpu",
    ignore_prefixes: Sequence[str] = (),
    fallback_class: str | None = None,
    where: str = "the student",
) -> DiffusersModel:
    """Build the architecture of ``config`` and load ``source`` into it (strict), in ``dtype`` on ``device``.

    ``dtype=None`` keeps the stored dtype (parameters take the checkpoint's tensors, ``load_state_dict(assign=True)``).
    Keys and shapes are checked first (:func:`check_keys`), so a mismatch costs no weight reading. The module is
    returned in eval mode with gradients off.
    """
    model = empty_model(config, fallback_class)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys(expected, checkpoint_shapes(source), where, ignore_prefixes)
    state = read_state_dict(source)
    state = {k: v for k, v in state.items() if k in expected}
    model.load_state_dict(state, strict=True, assign=True)
    # nn.Module.to: ModelMixin.to warns about fp32-kept modules, and students have none
    nn.Module.to(model, device=device) if dtype is None else nn.Module.to(model, device=device, dtype=dtype)
    return model.eval().requires_grad_(False)

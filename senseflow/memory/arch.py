"""Architecture configs and meta builds: every network of a run is instantiated on the ``meta`` device from its
``config.json`` (the teacher folder's own, else the public one shipped in ``senseflow/assets/arch_configs``), so its
parameter shapes are the real ones and cost no memory."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from senseflow.memory.budget import MemoryPlanError

ARCH_DIR = Path(__file__).resolve().parent.parent / "assets" / "arch_configs"


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


def build_meta(config: dict[str, Any], device: str | torch.device = "meta") -> Any:
    """Instantiate the network a diffusers / transformers config describes, on ``device`` (meta: no memory).

    Typed Any: a diffusers ``ModelMixin`` or transformers ``PreTrainedModel``, whose ``config`` attributes are
    dynamic."""
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


@contextlib.contextmanager
def _no_power_iterations() -> Any:
    """Skip spectral norm's power iterations (no-grad, in-place buffer updates: no memory of their own) while
    building and tracing on meta, where the 15 initial iterations per conv would take seconds."""
    from torch.nn.utils import parametrizations

    cls = parametrizations._SpectralNorm
    original = cls._power_method
    setattr(cls, "_power_method", lambda self, weight_mat, n_power_iterations: None)  # a deliberate monkeypatch
    try:
        yield
    finally:
        setattr(cls, "_power_method", original)


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

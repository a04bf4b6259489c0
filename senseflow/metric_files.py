"""The file format of the small metric networks the project trains (digit classifier, shapes reader).

One safetensors file: the weights, and string metadata ``format`` (which network), ``config`` (JSON of its config
dataclass) and any ``extra`` entries (JSON: held-out accuracy, seed, training time ...). Nothing is unpickled.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["save_metric_model", "read_metric_model", "metric_model_metadata"]


def save_metric_model(model: nn.Module, config: Any, path: str | Path, fmt: str, extra: dict | None = None) -> Path:
    """Write ``model``'s weights with metadata ``format`` = ``fmt``, ``config`` = JSON of the dataclass ``config``
    and ``extra`` (each value JSON); returns the path."""
    from safetensors.torch import save_file

    from senseflow.core.io import apply_umask

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": fmt, "config": json.dumps(asdict(config))}
    meta.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    apply_umask(path)  # safetensors writes 0600; the user's umask decides (senseflow.core.io)
    return path


def read_metric_model(path: Path, fmt: str, what: str, train_hint: str) -> tuple[dict, dict]:
    """(state dict, config dict) of a file written by :func:`save_metric_model` with format ``fmt``; a missing file
    or another format is one clear error naming ``what`` the file should be and how to make one."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a {what} safetensors file (train one with: {train_hint})")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != fmt or "config" not in meta:
            raise ValueError(f"{path}: metadata lacks format={fmt!r} and a 'config' entry; not a {what}")
        state = {k: f.get_tensor(k) for k in f.keys()}
    return state, json.loads(meta["config"])


def metric_model_metadata(path: Path) -> dict:
    """The JSON-decoded metadata (config, extra entries) of a file written by :func:`save_metric_model`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items() if k != "format"}

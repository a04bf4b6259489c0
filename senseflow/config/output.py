"""Writing a resolved config: the YAML that ``--dry-run`` and ``senseflow config`` print and every run saves."""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from senseflow.config.schema import SenseFlowConfig
from senseflow.core.io import atomic_write_text

__all__ = ["resolved_yaml", "save_resolved"]


def resolved_yaml(cfg: SenseFlowConfig | DictConfig) -> str:
    """The complete resolved config as YAML (``--dry-run``); loading it back gives an equal config."""
    node = cfg if isinstance(cfg, (DictConfig, ListConfig)) else OmegaConf.structured(cfg)
    return OmegaConf.to_yaml(node, resolve=True)


def save_resolved(cfg: SenseFlowConfig, run_dir: str | os.PathLike) -> Path:
    """Write ``run_dir/config.yaml`` (atomically) and return its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / "config.yaml"
    text = "# Resolved SenseFlow config (senseflow.config.save_resolved); reload with load_config(this file).\n"
    text += resolved_yaml(cfg)
    return atomic_write_text(target, text)

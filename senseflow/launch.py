"""Launching a training run from Python: the trainers' launchers, the checkout, the command line, the assets.

Shared by ``senseflow demo`` (:mod:`senseflow.digits.demo`) and the benchmarks (:mod:`senseflow.benchmark`):

* :data:`LAUNCHERS`: the launcher script of each trainer (``sh <launcher> NODES GPUS CONFIG RUN_DIR key=value…``);
* :func:`repo_root`: the source checkout holding ``configs/`` and the launchers;
* :func:`train_command`: a one-node, one-process launcher command with the teacher / data / backbone paths;
* :func:`free_port`: a free local TCP port for ``MASTER_PORT``;
* :func:`discriminator_backbones`: the tiny random DINOv2 / CLIP-text folders of the VFM discriminator.
"""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Sequence

__all__ = ["LAUNCHERS", "repo_root", "train_command", "free_port", "discriminator_backbones"]

#: the launcher of each trainer (the demo's default: sd35_senseflow)
LAUNCHERS: dict[str, str] = {
    "sd35_senseflow": "exp_sd35/train_SD35_senseflow.sh",
    "sd35_large_senseflow": "exp_sd35/train_SD35_large_senseflow.sh",
    "sdxl_senseflow": "exp_sdxl/train_sdxl_senseflow.sh",
    "sdxl_dmd2": "exp_sdxl/train_sdxl_dmd2.sh",
    "flux_senseflow": "exp_flux/train_flux_senseflow.sh",
}
#: the launcher whose presence marks the source checkout
_MARKER = LAUNCHERS["sd35_senseflow"]


def repo_root() -> Path:
    """The source checkout holding ``configs/`` and ``exp_sd35/`` (the package is installed editable)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / _MARKER).is_file():
        raise FileNotFoundError(f"{root / _MARKER} not found: launching a training run needs the source checkout "
                                "(pip install -e .)")
    return root


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now (the run's ``MASTER_PORT``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def train_command(config: Path, run_dir: Path, teacher: Path, assets: dict[str, Path], iterations: int | None,
                  overrides: Sequence[str] = (), trainer: str = "sd35_senseflow") -> list[str]:
    """The launcher command line (one node, one process) with ``assets``' paths as ``key=value`` overrides.

    ``iterations`` sets ``train.iterations`` and ``optimizer.decay_steps`` together, so a cosine decay (the digits
    config's) spans the whole run instead of ending at the config's length and leaving the LR at its end value;
    an ``optimizer.decay_steps=…`` in ``overrides`` comes later and wins.
    """
    cmd = ["sh", str(repo_root() / LAUNCHERS[trainer]), "1", "1", str(config), str(run_dir),
           f"teacher.path={teacher}", f"data.path={assets['data']}",
           f"discriminator.dino_path={assets['dino']}", f"discriminator.clip_path={assets['clip']}"]
    if iterations is not None:
        cmd += [f"train.iterations={iterations}", f"optimizer.decay_steps={iterations}"]
    return cmd + list(overrides)


def discriminator_backbones(out: Path, seed: int = 0) -> dict[str, Path]:
    """The tiny random DINOv2 / CLIP-text folders of the VFM discriminator under ``out/backbones`` (kept if already
    there): ``{"dino": …, "clip": …}``."""
    from senseflow.tiny import build_tiny_discriminator_backbones

    backbones = Path(out) / "backbones"
    if not (backbones / "dinov2" / "config.json").is_file():
        build_tiny_discriminator_backbones(backbones, seed=seed, overwrite=True)
    return {"dino": backbones / "dinov2", "clip": backbones / "clip_text"}

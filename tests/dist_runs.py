"""Helpers of the multi-process tests (tests/test_dist.py, tests/test_resume.py): tiny assets built once per
session, ``torchrun`` launches of ``senseflow train`` and of tools/dist_probe.py, and checkpoint comparison.

Every launch runs ``python -m torch.distributed.run --standalone`` (a free rendezvous port is picked by torchrun)
with one thread per process, gloo on the CPU and the hub offline.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
#: which tiny teacher folder each trainer distils
TEACHER_KIND = {"flux_senseflow": "flux", "sd35_senseflow": "sd35-medium", "sd35_large_senseflow": "sd35-large",
                "sdxl_senseflow": "sdxl", "sdxl_dmd2": "sdxl"}


def build_assets(root: Path, kinds: Sequence[str] = ("flux", "sd35-medium")) -> Path:
    """The tiny teachers of ``kinds``, the discriminator backbones and the image-caption set under ``root``
    (each built once; later calls of the same session reuse them)."""
    from senseflow.tiny import build_tiny_dataset, build_tiny_discriminator_backbones, build_tiny_teacher

    root.mkdir(parents=True, exist_ok=True)
    for kind in kinds:
        if not (root / kind / ".done").exists():
            build_tiny_teacher(kind, root / kind, seed=0, overwrite=True)
            (root / kind / ".done").touch()
    if not (root / "backbones" / ".done").exists():
        build_tiny_discriminator_backbones(root / "backbones", seed=0, overwrite=True)
        (root / "backbones" / ".done").touch()
    if not (root / "data" / ".done").exists():
        build_tiny_dataset(root / "data", seed=0, overwrite=True)
        (root / "data" / ".done").touch()
    if "sdxl" in kinds and not (root / "data" / "sdxl_latents.done").exists():
        from senseflow.data.build_lmdb import build_latent_lmdb

        lmdb = root / "data" / "sdxl_latents.lmdb"
        if lmdb.exists():
            shutil.rmtree(lmdb)
        build_latent_lmdb(root / "data" / "dataset.json", root / "sdxl", lmdb, resolution=64, batch_size=8, seed=0,
                          progress=False)
        (root / "data" / "sdxl_latents.done").touch()
    return root


def asset_overrides(assets: Path, trainer: str) -> list[str]:
    kind = TEACHER_KIND[trainer]
    return [
        f"teacher.path={assets / kind}",
        f"data.path={assets / 'data' / ('sdxl_latents.lmdb' if kind == 'sdxl' else 'dataset.json')}",
        f"discriminator.dino_path={assets / 'backbones' / 'dinov2'}",
        f"discriminator.clip_path={assets / 'backbones' / 'clip_text'}",
    ]


def config_path(trainer: str) -> Path:
    return REPO / "configs" / "tiny" / f"{trainer}.yaml"


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENSEFLOW_TEST_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    env.update(extra or {})
    return env


def torchrun(nproc: int, args: Sequence[str], cwd: Path, env: dict[str, str] | None = None,
             timeout: float = 600) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node nproc ARGS`` (ARGS: ``-m module ...`` or ``script ...``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(env), capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_nodes(nodes: int, args: Sequence[str], cwd: Path, env: dict[str, str] | None = None,
                   timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """``nodes`` torchrun launches of one process each on this machine, as ``nodes`` nodes would run them
    (``--nnodes N --node_rank i --master_addr 127.0.0.1 --master_port P``); returns every node's result."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc_per_node", "1",
             "--node_rank", str(i), "--master_addr", "127.0.0.1", "--master_port", str(port), *args],
            cwd=cwd, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(nodes)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def train_args(trainer: str, run_dir: Path, assets: Path, *overrides: str) -> list[str]:
    """``-m senseflow.cli train ...`` for the tiny config of ``trainer``."""
    return ["-m", "senseflow.cli", "train", "--trainer", trainer, "--config_path", str(config_path(trainer)),
            "--save_path", str(run_dir), *asset_overrides(assets, trainer), *overrides]


def tail(proc: subprocess.CompletedProcess, n: int = 4000) -> str:
    return (proc.stdout[-n // 2:] + "\n---stderr---\n" + proc.stderr[-n:])


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts / lists → {"a.b.0": leaf}."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: tree}


def dcp_contents(checkpoint: Path, scratch: Path) -> dict[str, Any]:
    """Every entry of a DCP checkpoint (networks, optimisers, EMA), read in this single process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = scratch / f"{checkpoint.parent.parent.name}_{checkpoint.name}.pt"
    dcp_to_torch_save(str(checkpoint), str(out))
    return flatten(torch.load(out, weights_only=True))


def differing(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys whose values are not bit-identical (tensors: torch.equal; other leaves: ==), plus keys in one only."""
    keys = sorted(set(a) | set(b))
    bad = []
    for k in keys:
        if k not in a or k not in b:
            bad.append(k)
        elif isinstance(a[k], torch.Tensor) or isinstance(b[k], torch.Tensor):
            if not (isinstance(a[k], torch.Tensor) and isinstance(b[k], torch.Tensor) and a[k].dtype == b[k].dtype
                    and torch.equal(a[k], b[k])):
                bad.append(k)
        elif a[k] != b[k]:
            bad.append(k)
    return bad

"""Complete, atomic checkpoints with torch.distributed.checkpoint (DCP); resuming is running the same command.

Layout under ``<run_dir>/checkpoints``::

    iter_000300/                 one complete checkpoint
        .metadata, __*_*.distcp  DCP shards: every trained network, optimiser, LR scheduler, EMA
        extra_rank{r}.pt         per-rank state: RNG streams, data position (tensors and ints only)
        student.safetensors      the consolidated generator, for inference and export (rank 0)
        config.yaml              the resolved config of the run
    latest                       text file naming the newest complete checkpoint; moved last

A checkpoint is written into ``.tmp-iter_XXXXXX`` and renamed when whole, and only then does ``latest`` move
(write-then-rename), so a run killed mid-save resumes from the previous complete checkpoint; the last
``keep_last`` checkpoints are kept and older ones are deleted only after the new one is complete.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

_NAME = re.compile(r"^iter_(\d{6,})$")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Checkpointer:
    """Saves and restores named networks with their optimisers plus free-form per-rank extras."""

    def __init__(self, run_dir: Path, keep_last: int, rank: int) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = max(1, int(keep_last))
        self.rank = rank

    # ---- discovery ---------------------------------------------------------------------------------------
    def latest(self) -> Path | None:
        """The newest complete checkpoint named by ``latest`` (None when the run is new)."""
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / ".metadata").exists():
            raise RuntimeError(f"{pointer} names {path.name}, which is not a complete checkpoint (no .metadata)")
        return path

    # ---- save ----------------------------------------------------------------------------------------------
    def save(
        self,
        iteration: int,
        models: dict[str, nn.Module],
        optimizers: dict[str, tuple[nn.Module, torch.optim.Optimizer]],
        schedulers: dict[str, Any],
        extra_state: dict[str, Any],
        shared_extra: dict[str, Any],
        student: Callable[[], dict[str, torch.Tensor]],
        config_yaml: str,
    ) -> Path:
        """Write checkpoint ``iteration`` atomically; every rank calls this."""
        name = f"iter_{iteration:06d}"
        final, tmp = self.root / name, self.root / f".tmp-{name}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        state: dict[str, Any] = {f"model/{k}": get_model_state_dict(m) for k, m in models.items()}
        for k, (m, opt) in optimizers.items():
            state[f"optim/{k}"] = get_optimizer_state_dict(m, opt)
        for k, s in schedulers.items():
            state[f"sched/{k}"] = {"last_epoch": torch.tensor(s.last_epoch)}
        for k, v in shared_extra.items():
            state[f"shared/{k}"] = v
        dcp.save(state, checkpoint_id=str(tmp))
        torch.save(extra_state, tmp / f"extra_rank{self.rank}.pt")
        full_student = student()  # collective under FSDP: every rank takes part
        if self.rank == 0:
            save_file({k: v.detach().contiguous().cpu() for k, v in full_student.items()}, str(tmp / "student.safetensors"))
            (tmp / "config.yaml").write_text(config_yaml)
        _barrier()
        if self.rank == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_text_atomic(self.root / "latest", name)
            self._prune(keep=final)
        _barrier()
        return final

    def _prune(self, keep: Path) -> None:
        done = sorted(p for p in self.root.iterdir() if _NAME.match(p.name))
        for old in done[: max(0, len(done) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-iter_*"):
            shutil.rmtree(stale, ignore_errors=True)

    # ---- load ----------------------------------------------------------------------------------------------
    def load(
        self,
        path: Path,
        models: dict[str, nn.Module],
        optimizers: dict[str, tuple[nn.Module, torch.optim.Optimizer]],
        schedulers: dict[str, Any],
        shared_extra: dict[str, Any],
    ) -> dict[str, Any]:
        """Restore everything saved by :meth:`save`; returns this rank's extras (empty when its file is absent,
        e.g. after resuming on more processes than wrote the checkpoint)."""
        state: dict[str, Any] = {f"model/{k}": get_model_state_dict(m) for k, m in models.items()}
        for k, (m, opt) in optimizers.items():
            state[f"optim/{k}"] = get_optimizer_state_dict(m, opt)
        for k in schedulers:
            state[f"sched/{k}"] = {"last_epoch": torch.tensor(0)}
        state.update({f"shared/{k}": v for k, v in shared_extra.items()})
        dcp.load(state, checkpoint_id=str(path))
        for k, m in models.items():
            set_model_state_dict(m, state[f"model/{k}"], options=StateDictOptions(strict=True))
        for k, (m, opt) in optimizers.items():
            set_optimizer_state_dict(m, opt, state[f"optim/{k}"])
        for k, s in schedulers.items():
            s.last_epoch = int(state[f"sched/{k}"]["last_epoch"])
            s._last_lr = [group["lr"] for group in s.optimizer.param_groups]
        for k in shared_extra:
            shared_extra[k] = state[f"shared/{k}"]
        extra_file = path / f"extra_rank{self.rank}.pt"
        extras = torch.load(extra_file, weights_only=True) if extra_file.exists() else {}
        extras["shared"] = shared_extra
        return extras

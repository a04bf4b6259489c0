"""DistillationTrainer: the generic loop over a method's players — precision, order of updates, logging, checkpoints
(docs/method.md §1.3).

Per iteration ``it`` (counting from 1):

1. the method draws the shared decisions from the shared stream (checked equal on every rank on a process's first
   iteration) and prepares ``grad_accum`` micro-batches;
2. each player in the method's order (:class:`~senseflow.method.players.Player`): when due (``it mod every = 0``)
   its gradients are cleared and ``loss / grad_accum`` back-propagated per micro-batch (with the player's ``frozen``
   modules held without gradient), then the replicated gradients are averaged over ranks, the global norm clipped,
   the optimiser stepped and the post-step hooks run; when not due its loss callable still runs (it may produce what
   later players read) without a backward; its LR scheduler steps once per iteration either way;
3. log (losses averaged over the ranks), preview and checkpoint on their periods;
4. stop if SIGTERM or Ctrl-C asked to (every rank at the same iteration): checkpoint unless step 3 just did, print
   how to resume, exit with 128 + the signal number (:mod:`senseflow.trainer.stop`).

The trainer computes no loss and names no player: the method (:class:`~senseflow.method.distillation.Distillation`)
declares them; the method's attributes (its networks, for scripts and tests) read through the trainer.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from senseflow import dist as sfdist
from senseflow.config import resolved_yaml, save_resolved
from senseflow.core.checks import need
from senseflow.core.rng import RunRNG
from senseflow.data.seeding import mix_seed
from senseflow.data.training import build_training_data
from senseflow.imageio import save_grid
from senseflow.method.distillation import Distillation
from senseflow.method.optim import require_optimizer_backend
from senseflow.method.players import Player, Runtime, frozen
from senseflow.quiet import quiet_libraries
from senseflow.trainer.checkpoint import (
    TEST_KILL_AT_ENV,
    Checkpointer,
    init_optimizer_state,
    kill_if_requested,
    player_parts,
    resumed_line,
    said_by_rank0,
)
from senseflow.trainer.logger import RunLogger, rewind_metrics
from senseflow.trainer.run_lock import RunLock, exit_with_launcher, lock_run_folder
from senseflow.trainer.stop import StopOnSignal, exit_stopped

#: debug: gather and compare the shared decisions of every iteration across ranks (always done for the first one)
CHECK_DECISIONS_ENV = "SENSEFLOW_DEBUG_CHECK_DECISIONS"


class DistillationTrainer:
    """Shared trainer of every preset. Subclasses only name their teacher family and ``method.name``."""

    #: the teacher family this trainer distils (checked against ``teacher.family``)
    family_name: str | None = None
    #: the ``method.name`` this trainer runs (checked against the config)
    method_name: str = "senseflow"

    def __init__(self, cfg: Any, save_path: str | Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(save_path)
        if self.family_name is not None and cfg.teacher.family != self.family_name:
            raise ValueError(
                f"{type(self).__name__} distils teacher.family={self.family_name!r}, config has {cfg.teacher.family!r}"
            )
        if cfg.method.name != self.method_name:
            raise ValueError(
                f"{type(self).__name__} runs method.name={self.method_name!r}, config has {cfg.method.name!r}"
            )
        require_optimizer_backend(str(cfg.optimizer.name))
        self.run_lock: RunLock | None = None

    def __getattr__(self, name: str) -> Any:
        """The method's attributes (its networks, teacher family, ...) read through the trainer."""
        method = self.__dict__.get("method")
        if method is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(method, name)

    # ================================================================== setup
    def setup(self) -> None:
        cfg = self.cfg
        exit_with_launcher()  # a torchrun worker on Linux ends when torchrun does (senseflow.trainer.run_lock)
        quiet_libraries()
        # a player's LR scheduler steps every iteration although the player may step every n-th (§1.3); a single
        # process saves DCP checkpoints without a process group. Both are intended.
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        self.info = sfdist.init_distributed(str(cfg.train.device), str(cfg.dist.backend))
        self.device = self.info.device
        torch.manual_seed(int(cfg.experiment.seed) + self.info.rank)
        self.rng = RunRNG(int(cfg.experiment.seed), self.info.rank, slots=self.samples_per_iteration)
        self.autocast_dtype = self._autocast_dtype()
        self.shard_opts = self._shard_options()
        self._decisions_checked = False
        self.run_lock = lock_run_folder(self.run_dir, self.info)  # rank 0 holds it; every rank stops if refused
        sfdist.barrier()
        self.method = Distillation(cfg, Runtime(self.info, self.shard_opts, self.autocast))
        self.players: list[Player] = self.method.players
        for p in self.players:  # state exists before any checkpoint touches it (see init_optimizer_state)
            init_optimizer_state(p.optimizer)
        self.data = build_training_data(  # with the teacher: its VAE's latent size and scale factor (§13.2)
            cfg.data, int(cfg.train.batch_size), int(cfg.experiment.seed), self.info.rank, self.info.world_size,
            teacher=cfg.teacher,
        )
        self.iteration = 0
        self.checkpointer = Checkpointer(self.run_dir, int(cfg.train.keep_last), self.info.rank, resolved_yaml(cfg))
        self._resume()
        if self.info.is_main:  # once nothing refused the run: a refused re-run leaves the run's config.yaml as it was
            save_resolved(cfg, self.run_dir)

    @property
    def samples_per_iteration(self) -> int:
        """Per-rank samples of one iteration (batch size × accumulation steps): one noise slot each."""
        return int(self.cfg.train.batch_size) * int(self.cfg.train.grad_accum)

    def _autocast_dtype(self) -> torch.dtype | None:
        mode = str(self.cfg.train.mixed_precision)
        if mode == "fp32":
            return None
        if mode == "bf16":
            return torch.bfloat16
        # auto: bf16 compute on accelerators that support it, fp32 on CPU
        return torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else None

    def _shard_options(self) -> sfdist.ShardOptions:
        """Placement of the method's large networks (see :mod:`senseflow.dist`). Per-block activation
        checkpointing is on with ``train.gradient_checkpointing`` (§3.1)."""
        d = self.cfg.dist
        strategy = sfdist.resolve_strategy(str(d.strategy), self.info)
        ckpt = bool(self.cfg.train.gradient_checkpointing)
        return sfdist.ShardOptions(strategy=strategy, hsdp=bool(d.hsdp), cpu_offload=bool(d.cpu_offload),
                                   activation_checkpointing=ckpt, compute_dtype=self.autocast_dtype)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ================================================================== checkpoints
    def _parts(self) -> dict[str, Any]:
        return player_parts(self.players, self.method.extra_state())

    def save(self) -> Path:
        """Checkpoint the run (every rank; see :mod:`senseflow.trainer.checkpoint` for the layout). A save that cannot
        write its files (disk full) ends the run with one line and exit 2 (:func:`said_by_rank0`)."""
        trainer_state = {
            "iteration": self.iteration,
            "world_size": self.info.world_size,
            "data": self.data.state_dict(),  # a global consumed-sample count: the same on every rank
            "rng_shared": self.rng.shared.get_state(),
            "schedulers": {p.name: p.scheduler.state_dict() for p in self.players},
            **self.method.host_state(),
        }
        rank_state = {"rng": self.rng.state_dict(), "torch_rng": torch.get_rng_state()}
        for p in self.players:
            sfdist.reshard(p.module)
        with said_by_rank0(self.info.is_main):
            return self.checkpointer.save(self.iteration, self._parts(), trainer_state, rank_state,
                                          self.method.exports)

    def _resume(self) -> None:
        """Continue from ``checkpoints/latest`` if there is one (resuming is running the same command again).

        Everything global is restored exactly: the players' networks, optimisers and LR schedulers, the method's
        extra state, iteration, the data position and the shared RNG stream (so shared decisions stay
        identical on every rank). Each rank restores its own noise streams from ``rank{r}_state.pt``. On a different
        number of processes: ranks that wrote no file (more processes now) start fresh noise streams seeded from
        (seed, iteration, rank); the streams of ranks that no longer exist (fewer processes now) are dropped; the
        data position is kept (rounded down to a multiple of the new world size). Such a run continues correctly
        but is not bit-identical to any uninterrupted run, since the global batch itself changed.
        """
        with said_by_rank0(self.info.is_main):  # only this run's own checkpoint, once it matches its digest
            path = self.checkpointer.latest()
            if path is None:
                if self.info.is_main:  # rows of an earlier attempt killed before its first checkpoint
                    rewind_metrics(self.run_dir / "metrics.jsonl", 0)
                return
            state, mine = self.checkpointer.load(path, self._parts())
        self.iteration = int(state["iteration"])
        self.method.load_host_state(state)
        for p in self.players:
            p.scheduler.load_state_dict(state["schedulers"][p.name])
        seed, slots = int(self.cfg.experiment.seed), self.samples_per_iteration
        if mine is not None and self.rng.holds_layout(mine["rng"]):
            self.rng.load_state_dict(mine["rng"])
            torch.set_rng_state(mine["torch_rng"])
        else:
            self.rng = RunRNG(mix_seed(seed, self.iteration), self.info.rank, slots=slots)
            if self.info.is_main or mine is None:
                print(f"[senseflow] rank {self.info.rank}: no noise streams of this rank and batch layout in {path}; "
                      f"fresh per-rank streams seeded from (seed, iteration {self.iteration}, rank)", flush=True)
        self.rng.shared.set_state(state["rng_shared"])
        self.data.load_state_dict(state["data"])
        if self.info.is_main:
            rewind_metrics(self.run_dir / "metrics.jsonl", self.iteration)
            saved_world = int(state.get("world_size", self.info.world_size))
            print(resumed_line(path, self.iteration, saved_world, self.info.world_size), flush=True)

    # ================================================================== training
    def _clip_and_step(self, player: Player) -> float:
        """Average replicated gradients over ranks (FSDP2 shards are reduced already), clip the global norm, step."""
        clip = self.cfg.optimizer.grad_clip  # None: no clipping (the norm is still measured and logged)
        params = player.parameters()
        sfdist.sync_replicated_grads(params)
        norm = sfdist.clip_grad_norm(params, None if clip is None else float(clip))
        sfdist.reshard(player.module)  # a root gathered by a forward without backward would keep stale weights
        player.optimizer.step()
        player.optimizer.zero_grad(set_to_none=True)
        return norm

    def _check_decisions(self, it: int, values: tuple) -> None:
        """Gather this iteration's shared decisions from every rank and fail unless they agree (the first iteration
        of every process, and every iteration with SENSEFLOW_DEBUG_CHECK_DECISIONS=1)."""
        if not self.info.distributed or (self._decisions_checked and os.environ.get(CHECK_DECISIONS_ENV) != "1"):
            return
        sfdist.assert_same_on_all_ranks(values, f"iteration {it}: shared decisions")
        self._decisions_checked = True

    def train_iteration(self, it: int) -> dict[str, float]:
        """One iteration: every player in the method's order (module docstring); returns the logs."""
        accum = int(self.cfg.train.grad_accum)
        d = self.method.draw(self.rng)
        self._check_decisions(it, d.values())
        logs: dict[str, float] = dict(d.logs())
        micro = self.method.micro_batches(d, self.rng, self.data.next)
        for p in self.players:
            due = p.due(it)
            if due:
                p.optimizer.zero_grad(set_to_none=True)
            for mb in micro:
                with frozen(p.frozen if due else ()):
                    loss, new = p.loss(mb, due)
                    if due:
                        (need(loss, f"player {p.name!r}'s loss on a due iteration") / accum).backward()
                for k, v in new.items():
                    logs[k] = logs.get(k, 0.0) + float(v) / accum
            if due:
                logs[f"grad_norm/{p.label}"] = self._clip_and_step(p)
                for hook in p.post_step:
                    logs.update(hook() or {})
            p.scheduler.step()
            logs[f"lr/{p.label}"] = p.optimizer.param_groups[0]["lr"]
            logs[f"step/{p.label}"] = float(due)
        return logs

    def train(self) -> None:
        cfg = self.cfg
        total = int(cfg.train.iterations)
        logger = RunLogger(self.run_dir, total, self.iteration, self.info.is_main, self.device)
        log_every, save_every = int(cfg.train.log_interval), int(cfg.train.save_interval)
        preview_every = int(cfg.train.preview_interval)
        stopped: tuple[int, Path] | None = None  # (signal, checkpoint) of a clean stop
        with contextlib.closing(logger), StopOnSignal(announce=self.info.is_main) as stop:
            while self.iteration < total:
                it = self.iteration + 1
                t0 = time.perf_counter()
                logs = self.train_iteration(it)
                logs["time/iteration_s"] = time.perf_counter() - t0
                self.iteration = it
                kill_if_requested(TEST_KILL_AT_ENV, it)  # test-only hook (see senseflow.trainer.checkpoint)
                for k, v in logs.items():
                    if k.startswith("loss/") and not math.isfinite(v):
                        raise FloatingPointError(f"iteration {it}: {k} = {v} is not finite")
                logger.progress(it, {k: logs[k] for p in self.players if (k := f"loss/{p.label}") in logs})
                if it % log_every == 0 or it == total:
                    logger.scalars(it, logs)
                if preview_every > 0 and (it % preview_every == 0 or it == total):
                    self.preview(it)
                saved = self.save() if (save_every > 0 and it % save_every == 0) or it == total else None
                if it < total and (signum := stop.agreed(self.device)):
                    stopped = (signum, saved or self.save())
                    break
        if stopped is not None:
            exit_stopped(stopped[0], self.iteration, stopped[1], announce=self.info.is_main)

    def preview(self, it: int) -> Path | None:
        """The method's sample of the fixed preview prompts as one image grid (written by rank 0)."""
        images = self.method.preview(list(self.cfg.train.preview_prompts), int(self.cfg.experiment.seed))
        return None if images is None else save_grid(images, self.run_dir / "previews" / f"iter_{it:06d}.png")

    def run(self) -> None:
        try:
            self.setup()
            self.train()
        finally:
            sfdist.cleanup()
            if self.run_lock is not None:  # rank 0 gives the run folder back (also done at interpreter exit)
                self.run_lock.release()

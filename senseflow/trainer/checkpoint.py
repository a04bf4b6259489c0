"""Complete, atomic checkpoints with torch.distributed.checkpoint (DCP); resuming is running the same command.

Layout under ``<run_dir>/checkpoints``::

    iter_000300/                 one complete checkpoint
        .metadata, __*_*.distcp  DCP: a dict of stateful parts — every player's module and optimiser
                                 (``model/<name>``, ``optim/<name>``: G, F, D heads) and the method's extra state
                                 (``extra/<key>``: G's EMA); sharded DTensors are saved by their owners and
                                 re-sharded on load, so a checkpoint resumes on any number of processes
        trainer_state.pt         rank 0: iteration, world size, data position (global), the shared RNG stream,
                                 every player's LR scheduler, the method's small values (the EMA's update count)
        rank{r}_state.pt         rank r: its per-sample noise streams and torch's global RNG state
        student.safetensors      the method's exports, written by rank 0: the consolidated generator, for
        student_ema.safetensors  inference and export, and the same with G's EMA weights when ``train.ema.enabled``
                                 (inference, export and the digits demo prefer it to student.safetensors)
        config.yaml              the resolved config of the run
    iter_000300.sha256.json      the digest this run recorded of every file of iter_000300/ (see "Digests")
    latest                       text file naming the newest complete checkpoint; moved last

Atomicity: every file is written into ``.tmp-iter_XXXXXX``; after a barrier (all ranks done) rank 0 renames it to
``iter_XXXXXX`` and only then rewrites ``latest`` (write-then-rename). A run killed at any point therefore resumes
from the previous complete checkpoint and a half-written one never becomes ``latest``; stale temporary folders are
removed by the next save. The last ``keep_last`` checkpoints are kept (0 = all); older ones are deleted only after
the new one is complete.

A save that fails to write (a full disk, a quota, any ``OSError`` on any rank: the ranks agree on the outcome after
each stage of writing) removes its temporary folder, leaves ``latest`` on the previous checkpoint and raises
:class:`CheckpointNotSaved` on every rank; the message (one line, on rank 0) names the checkpoint, the error, the
space the save needs and the free space. The space needed is the size of the previous checkpoint when there is one
(the next holds the same tensors), else the bytes of training-state tensors the save was writing (a lower bound:
the exported students come on top); the message says which.

Digests: a DCP checkpoint can run code when read (``.metadata`` is a pickle, and DCP ``torch.load``-s non-tensor
entries without ``weights_only``), so resume reads one only after checking it against what this run wrote. Once
every file of a checkpoint is complete, the ranks hash them (sha256, each rank a share of the files) and rank 0
writes ``iter_XXXXXX.sha256.json`` beside the folder (plain JSON, atomically) before it moves ``latest``::

    {"format": "senseflow-checkpoint-digest/1", "checkpoint": "iter_000300", "algorithm": "sha256",
     "files": {".metadata": "<hex>", "__0_0.distcp": "<hex>", "trainer_state.pt": "<hex>", ...}}

Resume (:meth:`Checkpointer.load`) hashes the recorded files again before DCP opens anything and refuses, with one
line (:class:`CheckpointRefused`), a checkpoint with no record or with any file that differs; only recorded files
are read. ``latest`` must name an ``iter_XXXXXX`` folder inside this run's ``checkpoints/``. The digest guards
against a checkpoint this run did not write (copied in, swapped, truncated); whoever can write arbitrary files in
the run folder can also rewrite the record. A checkpoint of an older version (no record) that you wrote yourself
can be vouched for with :func:`record_digest`.

Test-only hooks (environment variables, read at the named point, never set by the framework itself):

* ``SENSEFLOW_TEST_KILL_AT=<it>``: every rank SIGKILLs itself right after iteration ``it``'s updates, before its
  logging and checkpoint (see :meth:`~senseflow.trainer.base.DistillationTrainer.train`).
* ``SENSEFLOW_TEST_KILL_IN_SAVE=<it>``: every rank SIGKILLs itself while saving checkpoint ``it``, after all of its
  files are written into the temporary folder and before the rename.
* ``SENSEFLOW_TEST_DISK_FULL_IN_SAVE=<it>``: while saving checkpoint ``it``, DCP's writer on every rank writes its
  files and then raises ``OSError(ENOSPC)``, as a disk that fills up during the save would.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NoReturn

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from senseflow.core.io import apply_umask, atomic_write_text, fsync_file

if TYPE_CHECKING:
    from senseflow.method.players import Player, Stateful

__all__ = ["Checkpointer", "CheckpointRefused", "ModelState", "OptimizerState", "player_parts", "init_optimizer_state",
           "digest_path", "record_digest", "kill_if_requested", "TEST_KILL_AT_ENV", "TEST_KILL_IN_SAVE_ENV",
           "CheckpointNotSaved", "format_bytes", "TEST_DISK_FULL_ENV",
           "dcp_failure", "said_by_rank0", "resumed_line"]

_NAME = re.compile(r"^iter_(\d{6,})$")
TRAINER_STATE = "trainer_state.pt"
#: ``checkpoints/iter_XXXXXX`` + this: the digest record of that checkpoint
DIGEST_SUFFIX = ".sha256.json"
DIGEST_FORMAT = "senseflow-checkpoint-digest/1"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
#: test-only: SIGKILL every rank right after this iteration's updates
TEST_KILL_AT_ENV = "SENSEFLOW_TEST_KILL_AT"
#: test-only: SIGKILL every rank inside the save of this iteration, after the files are written, before the rename
TEST_KILL_IN_SAVE_ENV = "SENSEFLOW_TEST_KILL_IN_SAVE"
#: test-only: DCP's writer raises ENOSPC (after writing its files) in the save of this iteration
TEST_DISK_FULL_ENV = "SENSEFLOW_TEST_DISK_FULL_IN_SAVE"


def kill_if_requested(env_name: str, iteration: int) -> None:
    """Test hook: SIGKILL this process when environment variable ``env_name`` equals ``iteration``."""
    if os.environ.get(env_name, "").strip() == str(iteration):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


class CheckpointRefused(ValueError):
    """A checkpoint resume will not read (see "Digests" above); the message is one line."""


class CheckpointNotSaved(ValueError):
    """A save that could not write its files (see "A save that fails" above); the message is one line."""


@contextlib.contextmanager
def said_by_rank0(is_main: bool) -> Iterator[None]:
    """Around a collective save or load: a :class:`CheckpointRefused` / :class:`CheckpointNotSaved` propagates on
    rank 0 (which says why, in one line) and ends every other rank quietly with exit status 2."""
    try:
        yield
    except (CheckpointRefused, CheckpointNotSaved):
        if not is_main:
            raise SystemExit(2) from None
        raise


def resumed_line(path: Path, iteration: int, saved_world: int, world: int) -> str:
    """The line a resumed run prints (with the process counts when they changed)."""
    note = (f" (written by {saved_world} process{'es' if saved_world > 1 else ''}, now {world})"
            if saved_world != world else "")
    return f"[senseflow] resumed from {path} at iteration {iteration}{note}"


class _DiskFullWriter(FileSystemWriter):
    """Test-only (``SENSEFLOW_TEST_DISK_FULL_IN_SAVE``): writes every file, then fails as a full disk would."""

    def write_data(self, plan: Any, planner: Any) -> Any:
        super().write_data(plan, planner).wait()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))


def format_bytes(n: int) -> str:
    """``n`` bytes for people: ``"512 B"``, ``"1.5 KiB"``, ``"12.3 MiB"``, ``"4.0 GiB"``."""
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"


def _tensor_bytes(tree: Any) -> int:
    """Bytes of the tensors in a nested dict / list (a DTensor counts its local shard)."""
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_tensor_bytes(v) for v in tree)
    if isinstance(tree, torch.Tensor):
        local = tree.to_local() if hasattr(tree, "to_local") else tree
        return int(local.numel() * local.element_size())
    return 0


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _first_os_error(exc: BaseException) -> OSError | None:
    """The ``OSError`` behind a failed write: ``exc`` itself, or the first one of any rank that DCP gathered into
    its ``CheckpointException``."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, CheckpointException):
        for _, (err, _) in sorted(exc.failures.items()):
            if isinstance(err, OSError):
                return err
    return None


def _os_error_of(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> OSError | None:
    """Run ``fn``; the ``OSError`` it failed with (also one of DCP's ranks), else None. Other errors propagate."""
    try:
        fn(*args, **kwargs)
    except (Exception, CheckpointException) as e:  # the latter is a BaseException
        error = _first_os_error(e)
        if error is None:
            raise
        return error
    return None


def _agree(error: OSError | None, written: int = 0) -> tuple[str | None, int]:
    """Every rank's write outcome on every rank (a collective, also a barrier): the first failing rank's error as
    text (None: every rank succeeded) and the sum of ``written`` over the ranks."""
    rank, world = _rank_world()
    mine = (None if error is None else f"{error}{f' (rank {rank})' if world > 1 else ''}", written)
    if world == 1:
        return mine
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, mine)
    failed = next((text for text, _ in parts if text is not None), None)
    return failed, sum(n for _, n in parts)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (``value`` itself in a single process)."""
    if _rank_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def digest_path(checkpoint: Path) -> Path:
    """Where the run records the digest of ``checkpoint``: ``iter_XXXXXX.sha256.json`` beside the folder."""
    return checkpoint.with_name(checkpoint.name + DIGEST_SUFFIX)


def _sha256(path: Path) -> str | None:
    """Hex sha256 of a regular file (None when missing or not a regular file: never blocks on a FIFO)."""
    if not path.is_file():
        return None
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def _hash_files(folder: Path, names: list[str]) -> dict[str, str | None]:
    """sha256 of ``folder/<name>`` for every name, every rank hashing a share; a collective under a process group
    (every rank passes the same names) and every rank gets all the digests."""
    rank, world = _rank_world()
    mine = {n: _sha256(folder / n) for n in names[rank::world]}
    if world == 1:
        return mine
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def _digest_json(checkpoint: Path, digests: dict[str, str | None]) -> str:
    missing = [n for n, d in digests.items() if d is None]
    if missing:
        raise RuntimeError(f"checkpoint {checkpoint}: cannot hash {', '.join(missing[:3])} (vanished while saving?)")
    record = {"format": DIGEST_FORMAT, "checkpoint": checkpoint.name, "algorithm": "sha256",
              "files": dict(sorted(digests.items()))}
    return json.dumps(record, indent=1) + "\n"


def record_digest(checkpoint: Path | str) -> Path:
    """Record the digest of every file of ``checkpoint`` now (one process), so that resume accepts it.

    The trainer does this itself at every save; call it only for a checkpoint you know your own run wrote, e.g. one
    saved by a version of senseflow that recorded no digest. Returns the record's path.
    """
    checkpoint = Path(checkpoint)
    if not (checkpoint / ".metadata").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a DCP checkpoint folder (no .metadata)")
    names = sorted(p.name for p in checkpoint.iterdir() if p.is_file())
    out = digest_path(checkpoint)
    atomic_write_text(out, _digest_json(checkpoint, {n: _sha256(checkpoint / n) for n in names}), fsync=True)
    return out


def _read_digest(checkpoint: Path) -> tuple[dict[str, str] | None, str | None]:
    """The recorded ``{file: sha256}`` of ``checkpoint``, or None and why there is none (plain JSON only)."""
    path = digest_path(checkpoint)
    if not path.is_file():
        return None, f"no digest recorded: {path.name} is missing"
    try:
        record = json.loads(path.read_text())
        files = record["files"]
        ok = (record.get("format") == DIGEST_FORMAT and record.get("checkpoint") == checkpoint.name
              and isinstance(files, dict) and ".metadata" in files and TRAINER_STATE in files
              and all(isinstance(n, str) and Path(n).name == n and n not in (".", "..")
                      and isinstance(d, str) and _HEX64.match(d) for n, d in files.items()))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        ok = False
    if not ok:
        return None, f"{path.name} is not a digest record of {checkpoint.name}"
    return dict(files), None


def _save_torch(obj: Any, path: Path) -> None:
    torch.save(obj, path)
    fsync_file(path)


@torch.no_grad()
def init_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Create ``opt``'s per-parameter state now, exactly as its first real step would (moments 0, step 0).

    DCP can only save or load optimiser state that exists; ``get_optimizer_state_dict`` would otherwise create it
    with a zero-gradient step that advances the step counter (and Adam's bias correction) of an optimiser that has
    not stepped yet — e.g. G's between generator iterations — so a checkpoint would change the training it records.
    Here the step runs with zero gradients and lr 0 (parameters unchanged: AdamW's moments stay 0, decay ×1) and
    every ``step`` counter is reset to 0. No-op when the state exists.
    """
    if opt.state:
        return
    params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
    if not params:
        return
    saved_grads = [p.grad for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = torch.zeros_like(g["lr"]) if isinstance(g["lr"], torch.Tensor) else 0.0
    opt.step()
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    for p, grad in zip(params, saved_grads):
        p.grad = grad
    for state in opt.state.values():
        if "step" in state:
            step = state["step"]
            state["step"] = torch.zeros_like(step) if isinstance(step, torch.Tensor) else 0


class ModelState:
    """A module as a DCP stateful part (FSDP2 DTensor shards or plain tensors; loaded strictly)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.module)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.module, state, options=StateDictOptions(strict=True))


class OptimizerState:
    """An optimiser of ``module`` as a DCP stateful part (its state must exist: :func:`init_optimizer_state`)."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.module, self.optimizer = module, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.module, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.module, self.optimizer, state)


def player_parts(players: list[Player], extra: dict[str, Stateful]) -> dict[str, Stateful]:
    """The DCP parts of a run: ``model/<name>`` of every player, then ``optim/<name>``, then ``extra/<key>``."""
    parts: dict[str, Stateful] = {f"model/{p.name}": ModelState(p.module) for p in players}
    parts.update({f"optim/{p.name}": OptimizerState(p.module, p.optimizer) for p in players})
    parts.update({f"extra/{k}": v for k, v in extra.items()})
    return parts


class Checkpointer:
    """Saves and restores a dict of stateful parts through DCP, plus the trainer's and each rank's own state and the
    consolidated exports; ``config_yaml`` is written into every checkpoint."""

    def __init__(self, run_dir: Path, keep_last: int, rank: int, config_yaml: str = "") -> None:
        self.root = Path(run_dir) / "checkpoints"
        if int(keep_last) < 0:
            raise ValueError(f"train.keep_last must be >= 0 (0 = keep all), got {keep_last}")
        self.keep_last = int(keep_last)
        self.rank = rank
        self.config_yaml = config_yaml

    # ---- discovery ---------------------------------------------------------------------------------------
    def latest(self) -> Path | None:
        """The newest complete checkpoint named by ``latest`` (None when the run is new); always a folder of this
        run's ``checkpoints/`` (CheckpointRefused otherwise)."""
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        name = pointer.read_text().strip()
        if not _NAME.match(name):
            raise CheckpointRefused(f"{pointer} names {name!r}, which is not a checkpoint of this run (iter_NNNNNN)")
        path = self.root / name
        if path.resolve().parent != self.root.resolve():
            raise CheckpointRefused(f"{path} leads outside {self.root}; resume reads only this run's own checkpoints")
        for needed in (".metadata", TRAINER_STATE):
            if not (path / needed).exists():
                raise CheckpointRefused(f"{pointer} names {path.name}, which is not a complete checkpoint "
                                        f"(no {needed})")
        return path

    # ---- save ----------------------------------------------------------------------------------------------
    def save(
        self,
        iteration: int,
        parts: dict[str, Stateful],
        trainer_state: dict[str, Any],
        rank_state: dict[str, Any],
        exports: Callable[[], dict[str, dict[str, torch.Tensor]]] = dict,
    ) -> Path:
        """Write checkpoint ``iteration`` atomically; every rank calls this.

        ``parts``: stateful parts saved through DCP under their keys (:func:`player_parts`); ``trainer_state``: rank
        0's global state (torch.save-able, identical on every rank); ``rank_state``: this rank's own state;
        ``exports()``: consolidated weights by file name (a collective; only rank 0's are written, as safetensors).
        A failed write on any rank raises :class:`CheckpointNotSaved` on every rank, with ``latest`` untouched.
        """
        name = f"iter_{iteration:06d}"
        final, tmp = self.root / name, self.root / f".tmp-{name}"
        failed, written = _agree(_os_error_of(self._make_tmp, tmp) if self.rank == 0 else None)
        if failed is None:  # DCP's own collectives bring every rank's failure to every rank
            state = {k: part.state_dict() for k, part in parts.items()}
            disk_full = os.environ.get(TEST_DISK_FULL_ENV, "").strip() == str(iteration)
            writer = (_DiskFullWriter if disk_full else FileSystemWriter)(str(tmp))
            error = _os_error_of(dcp.save, state, checkpoint_id=str(tmp), storage_writer=writer)
            failed, written = _agree(error, _tensor_bytes(state))
            del state
        if failed is None:
            error = _os_error_of(_save_torch, rank_state, tmp / f"rank{self.rank}_state.pt")
            files = exports()  # collective under FSDP: every rank takes part, also after a failed write of its own
            if self.rank == 0 and error is None:
                error = _os_error_of(self._write_main_files, tmp, files, trainer_state)
            del files
            failed, _ = _agree(error)
        if failed is not None:
            self._give_up(final, tmp, failed, written)
        kill_if_requested(TEST_KILL_IN_SAVE_ENV, iteration)
        # every file is complete: hash them (each rank a share), record the digest, then publish
        names = _from_rank0(sorted(p.name for p in tmp.iterdir() if p.is_file()) if self.rank == 0 else None)
        digests = _hash_files(tmp, names)
        error = None
        if self.rank == 0:
            error = _os_error_of(self._publish, tmp, final, _digest_json(final, digests))
            if error is None:
                self._prune(keep=final)
        failed, _ = _agree(error)
        if failed is not None:
            self._give_up(final, tmp, failed, written)
        return final

    def _make_tmp(self, tmp: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)

    def _write_main_files(self, tmp: Path, files: dict[str, dict[str, torch.Tensor]],
                          trainer_state: dict[str, Any]) -> None:
        """Rank 0's files: the exports (safetensors), the config and the trainer state."""
        for file, weights in files.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / file))
            apply_umask(tmp / file)  # safetensors creates its file 0600
            fsync_file(tmp / file)
        (tmp / "config.yaml").write_text(self.config_yaml)
        _save_torch(trainer_state, tmp / TRAINER_STATE)

    def _give_up(self, final: Path, tmp: Path, error: str, written: int) -> NoReturn:
        """After a failed write on any rank: rank 0 removes the temporary folder and says why in one line; every
        rank raises :class:`CheckpointNotSaved` (``latest`` is untouched)."""
        if self.rank != 0:
            raise CheckpointNotSaved(f"checkpoint {final} not saved: {error}")
        shutil.rmtree(tmp, ignore_errors=True)
        pointer = self.root / "latest"
        previous = pointer.read_text().strip() if pointer.is_file() else ""
        if final.exists() and previous != final.name:  # renamed, but its record or ``latest`` failed to write
            shutil.rmtree(final, ignore_errors=True)
            digest_path(final).unlink(missing_ok=True)
        if _NAME.match(previous) and (self.root / previous).is_dir():
            need = f"about {format_bytes(_folder_bytes(self.root / previous))} (the size of the previous checkpoint)"
            kept = f"checkpoints/latest still names {previous}"
        else:
            need = (f"at least {format_bytes(written)} (the training-state tensors it was writing, without the "
                    "exported students)")
            kept = "there is no earlier checkpoint"
        where = self.root
        while not where.exists() and where != where.parent:
            where = where.parent
        removed = "could not be removed" if tmp.exists() else "is removed"
        raise CheckpointNotSaved(
            f"checkpoint {final} not saved: {error}; it needs {need}, {format_bytes(shutil.disk_usage(where).free)} "
            f"is free there; its temporary folder {tmp.name} {removed} and {kept}; make room, then run the same "
            "command again"
        )

    def _publish(self, tmp: Path, final: Path, digest: str) -> None:
        """Rename the complete temporary folder into place, record its digest beside it, then move ``latest``
        (rank 0)."""
        old = None
        if final.exists():  # an earlier attempt at this iteration that never became (or no longer is) latest
            old = final.with_name(f".old-{final.name}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_file(self.root)
        atomic_write_text(digest_path(final), digest, fsync=True)
        atomic_write_text(self.root / "latest", final.name, fsync=True)
        fsync_file(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _prune(self, keep: Path) -> None:
        done = sorted(p for p in self.root.iterdir() if _NAME.match(p.name))
        if self.keep_last > 0:
            for old in done[: max(0, len(done) - self.keep_last)]:
                if old != keep:
                    shutil.rmtree(old, ignore_errors=True)
                    digest_path(old).unlink(missing_ok=True)
        for record in self.root.glob(f"iter_*{DIGEST_SUFFIX}"):  # records whose checkpoint is gone
            if not record.with_name(record.name[: -len(DIGEST_SUFFIX)]).is_dir():
                record.unlink(missing_ok=True)
        for stale in list(self.root.glob(".tmp-iter_*")) + list(self.root.glob(".old-iter_*")):
            shutil.rmtree(stale, ignore_errors=True)

    # ---- load ----------------------------------------------------------------------------------------------
    def verify(self, path: Path) -> dict[str, str]:
        """Check every file recorded for ``path`` against its digest (a collective: each rank hashes a share) and
        return the record; :class:`CheckpointRefused` when the record is missing or any file differs."""
        record, problem = _from_rank0(_read_digest(path) if _rank_world()[0] == 0 else None)
        if record is not None:
            got = _hash_files(path, sorted(record))
            bad = sorted(n for n in record if got.get(n) != record[n])
            if bad:
                more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
                problem = f"{', '.join(bad[:3])}{more} differ{'s' if len(bad) == 1 else ''} or missing"
        if problem is not None:
            raise CheckpointRefused(
                f"checkpoint {path} does not match the digest this run recorded ({problem}); refusing to read it, "
                "since DCP files can carry pickled code (see docs/distributed_training.md, Resuming)"
            )
        return record

    def load(
        self, path: Path, parts: dict[str, Stateful]
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Restore every part from ``path``: DCP loads into the parts' own state dicts, then each part's
        ``load_state_dict`` runs in the dict's order.

        Returns ``(trainer_state, rank_state)``; ``rank_state`` is None when no file of this rank was recorded (the
        run resumes on more processes than wrote the checkpoint). Optimiser state must exist before the call
        (:func:`init_optimizer_state`). Nothing is read before :meth:`verify` accepts the checkpoint, and only
        recorded files are read.
        """
        recorded = self.verify(path)
        state = {k: part.state_dict() for k, part in parts.items()}
        try:
            dcp.load(state, checkpoint_id=str(path))
        except (Exception, dcp.api.CheckpointException) as e:  # the latter is a BaseException: one line too
            raise CheckpointRefused(
                f"checkpoint {path} does not match this run (different networks, optimiser or EMA settings?): "
                f"{dcp_failure(e)}; resume with the settings that wrote it or use a new save folder"
            ) from e
        for k, part in parts.items():
            part.load_state_dict(state[k])
        trainer_state = torch.load(path / TRAINER_STATE, weights_only=True)
        rank_file = path / f"rank{self.rank}_state.pt"
        rank_state = torch.load(rank_file, weights_only=True) if rank_file.name in recorded else None
        return trainer_state, rank_state


def dcp_failure(err: BaseException) -> str:
    """One line saying why DCP failed: the first rank's own error of a ``CheckpointException`` (which is a
    ``BaseException`` whose text is every rank's traceback), else the first line of ``err``."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        if isinstance(inner, tuple) and inner and isinstance(inner[0], BaseException):
            err = inner[0]
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__

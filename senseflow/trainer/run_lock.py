"""One writer per run folder, and workers that do not outlive their launcher.

**The lock.** ``<run>/.senseflow.lock`` holds ``{"host", "pid", "started", "proc_start", "token"}`` (JSON;
``proc_start``: the pid's start time on Linux, else null) of the process that writes the run (rank 0 of a
multi-process run). :func:`acquire_run_lock` takes it before anything else is written into the folder; it is
created complete and atomically (written to a private temporary file, then hard-linked to its name, which fails
when the name exists, as ``O_CREAT | O_EXCL`` would, also on NFS). When the lock exists:

* its holder runs on this host (``os.kill(pid, 0)`` finds the pid, and on Linux the pid's start time is the one the
  holder recorded, so a reused pid is not mistaken for it): refused with one line naming host, pid and folder;
* its holder is gone from this host (e.g. ``kill -9``): the lock is taken over with a one-line notice;
* it names another host: refused with one line (this host cannot tell whether that process lives; remove the file
  once that run is over);
* it names this very process (a second trainer object in one Python process, e.g. a notebook): taken over silently.

:func:`check_run_lock` gives the same answer without writing anything (``senseflow train``'s pre-flight).

Take-overs on one host are serialised by an ``flock`` of the run folder (best effort: where the file system does not
support it, two processes taking over the same dead lock at the same instant could both proceed). The lock is
released (removed, if it is still ours) by :meth:`RunLock.release` and at interpreter exit; a killed process leaves
it behind for the next run to take over.

**Workers die with their launcher.** torchrun starts each worker in a session of its own, so killing the launcher's
process group (``kill -9 -PGID``, or Ctrl-C of a wrapper that dies first) leaves the worker training on, writing into
the run folder next to whatever is started next. :func:`exit_with_launcher` asks the kernel to send the worker
SIGTERM when its parent (torchrun's agent) dies: ``prctl(PR_SET_PDEATHSIG)``, Linux only; elsewhere it does nothing.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

__all__ = ["LOCK_NAME", "RunFolderBusy", "RunLock", "acquire_run_lock", "check_run_lock", "exit_with_launcher",
           "lock_run_folder"]

LOCK_NAME = ".senseflow.lock"
_PR_SET_PDEATHSIG = 1


class RunFolderBusy(ValueError):
    """Another process holds the run folder's lock; the message is one line."""


def _proc_start(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (Linux ``/proc/<pid>/stat`` field 22), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, start: Any) -> bool:
    """Whether ``pid`` is a running process of this host, and the same one that recorded ``start``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    except (OverflowError, ValueError):
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
        if state[state.rindex(")") + 2] == "Z":  # exited, not yet reaped
            return False
    except (OSError, ValueError, IndexError):
        pass
    now = _proc_start(pid)
    return not (isinstance(start, int) and now is not None and now != start)


@contextlib.contextmanager
def _folder_flock(folder: Path) -> Iterator[None]:
    """Exclusive ``flock`` of ``folder`` for the duration (best effort; no-op where unsupported)."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the flock


def _read_holder(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _refusal(run_dir: Path, lock: Path, holder: dict[str, Any] | None) -> str | None:
    """Why the lock ``holder`` (read from ``lock``) keeps this process out of ``run_dir`` (one line), or None when
    the lock may be taken over: its holder is gone from this host, or it is this very process."""
    if holder is None:
        return f"run folder {run_dir} has a lock file {lock} that is not a senseflow lock; remove it if no run is " \
               "writing there"
    host, hpid = holder.get("host"), holder.get("pid")
    who = f"pid {hpid} on {host} (since {holder.get('started', '?')})"
    if host != socket.gethostname():
        return f"run folder {run_dir} is locked by {who}, another host; if that run is over, remove {lock}"
    if not isinstance(hpid, int) or isinstance(hpid, bool):
        return f"run folder {run_dir} has a lock file {lock} without a pid; remove it if no run is writing there"
    if hpid != os.getpid() and _alive(hpid, holder.get("proc_start")):
        return f"run folder {run_dir} is in use by {who}; stop that run or choose another --save_path"
    return None


def check_run_lock(run_dir: Path | str) -> None:
    """Raise :class:`RunFolderBusy` when :func:`acquire_run_lock` would refuse ``run_dir`` now; writes nothing (the
    pre-flight check of ``senseflow train``). A lock that could be taken over passes."""
    run_dir = Path(run_dir)
    lock = run_dir / LOCK_NAME
    if not lock.exists() and not lock.is_symlink():
        return
    try:
        holder = _read_holder(lock)
    except FileNotFoundError:  # released meanwhile
        return
    refusal = _refusal(run_dir, lock, holder)
    if refusal is not None:
        raise RunFolderBusy(refusal)


@dataclass
class RunLock:
    """The lock of one run folder, held by this process."""

    path: Path
    record: dict[str, Any] = field(default_factory=dict)

    def release(self) -> None:
        """Remove the lock file if it is still this holder's (idempotent)."""
        atexit.unregister(self.release)
        with contextlib.suppress(OSError, ValueError):
            holder = _read_holder(self.path)
            if holder is not None and holder.get("token") == self.record.get("token"):
                self.path.unlink()


def acquire_run_lock(run_dir: Path | str) -> RunLock:
    """Create ``run_dir`` if needed and take its lock (module docstring); :class:`RunFolderBusy` if held."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_NAME
    pid = os.getpid()
    record: dict[str, Any] = {"host": socket.gethostname(), "pid": pid, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "proc_start": _proc_start(pid), "token": uuid.uuid4().hex}
    tmp = run_dir / f"{LOCK_NAME}.{pid}.{record['token'][:8]}.tmp"
    tmp.write_text(json.dumps(record) + "\n")
    try:
        with _folder_flock(run_dir):
            for _ in range(3):
                try:
                    os.link(tmp, lock)
                    break
                except FileExistsError:
                    pass
                try:
                    holder = _read_holder(lock)
                except FileNotFoundError:  # released between our attempt and the read: try again
                    continue
                refusal = _refusal(run_dir, lock, holder)
                if refusal is not None:
                    raise RunFolderBusy(refusal)
                hpid = holder.get("pid") if holder is not None else None
                who = f"pid {hpid} on {record['host']} (since {(holder or {}).get('started', '?')})"
                if hpid != pid:
                    print(f"[senseflow] run folder {run_dir}: taking over the lock of {who}, which is no longer "
                          "running", file=sys.stderr, flush=True)
                lock.unlink(missing_ok=True)
            else:
                raise RunFolderBusy(f"run folder {run_dir}: could not take its lock {lock} (contended); try again")
    finally:
        tmp.unlink(missing_ok=True)
    held = RunLock(lock, record)
    atexit.register(held.release)
    return held


def exit_with_launcher() -> bool:
    """In a torchrun worker on Linux: SIGTERM this process when its parent (torchrun's agent) dies.

    Returns whether it was armed (False outside torchrun — no ``TORCHELASTIC_RUN_ID`` / ``LOCAL_RANK`` — and off
    Linux, where there is no such mechanism).
    """
    if not sys.platform.startswith("linux"):
        return False
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def lock_run_folder(run_dir: Path | str, info: Any) -> RunLock | None:
    """Every rank's side of taking the lock: rank 0 (``info.is_main``) takes it before anything is written in the
    run folder and tells the other ranks whether it could; when it could not, rank 0 raises :class:`RunFolderBusy`
    (one line, exit code 2) and the others exit with code 2 quietly. Returns rank 0's lock, None elsewhere."""
    import torch.distributed as torch_dist

    lock, refusal = None, None
    if info.is_main:
        try:
            lock = acquire_run_lock(run_dir)
        except RunFolderBusy as err:
            refusal = str(err)
    if info.distributed and torch_dist.is_available() and torch_dist.is_initialized():
        box = [refusal]
        torch_dist.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal is not None:
        if info.is_main:
            raise RunFolderBusy(refusal)
        raise SystemExit(2)
    return lock

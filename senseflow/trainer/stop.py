"""A clean stop on SIGTERM and Ctrl-C (SIGINT): finish the iteration, checkpoint, exit 128 + signal number.

Clusters ask a job to stop with SIGTERM some time before they kill it (preemption, time limits, ``scancel``);
Ctrl-C sends SIGINT. :class:`StopOnSignal` turns the first such signal into a request that the training loop reads
once per iteration (:meth:`StopOnSignal.agreed`): the loop finishes the iteration it is in, writes a checkpoint
unless that iteration was just saved, prints one line saying how to resume, and exits with ``128 + signum`` (143
for SIGTERM, 130 for SIGINT), so a scheduler sees that the job did not finish. Running the same command again
resumes bit-identically (docs/distributed_training.md, Preemption).

* **Every rank stops at the same iteration.** With several processes, the ranks agree once per iteration with one
  ``all_reduce`` (MAX) of their requested signal number, so a signal that reached some ranks only (one node
  preempted) stops all of them after the same iteration. A single process does no collective.
* **A second signal stops at once**: the handlers the process had before are restored and the signal is delivered
  again (SIGTERM: the process ends; SIGINT: ``KeyboardInterrupt``). Except a SIGTERM within :data:`REPEAT_WINDOW_S`
  seconds of the first, which is the same request arriving twice: a scheduler that signals every process of a job
  reaches a torchrun worker directly and once more through torchrun.
* **A SIGTERM after the launcher died stops at once.** On Linux a torchrun worker asks for SIGTERM when its parent
  dies (:func:`senseflow.trainer.run_lock.exit_with_launcher`); its launcher was killed, so the worker does not
  outlive it by an iteration and a save.

**What torchrun does** (torch.distributed.elastic, read from torch 2.13): torchrun's agent handles SIGTERM, SIGINT,
SIGHUP and SIGQUIT (``TORCHELASTIC_SIGNALS_TO_HANDLE``). On one, it sends the same signal to every worker's process
group (each worker runs in a session of its own, so a terminal's Ctrl-C reaches workers only this way), waits up to
``--shutdown-timeout`` seconds in total (environment ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``; default 30) for them to
exit, sends SIGKILL to those still running, and then exits with code 1 and a ``SignalException`` traceback,
whatever its workers' exit codes were. The stop therefore has that long for the rest of the iteration and the
save; raise the timeout (and the cluster's own grace period) when a save takes longer.

Data-loader worker processes leave the stop to the trainer: they ignore SIGINT and run in a process group of their
own (:mod:`senseflow.data.loader`), so the signal torchrun sends to the trainer's group does not end them first.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from types import FrameType, TracebackType
from typing import Any, Callable, NoReturn

import torch
import torch.distributed as dist

__all__ = ["REPEAT_WINDOW_S", "STOP_SIGNALS", "StopOnSignal", "stop_line", "exit_stopped"]

#: the signals that ask for a clean stop
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)
#: a SIGTERM this many seconds or less after the first is the same request delivered twice (see the docstring)
REPEAT_WINDOW_S = 2.0

_Handler = Callable[[int, FrameType | None], Any] | int | None


class StopOnSignal:
    """Context manager: while active (main thread only), SIGTERM / SIGINT request a stop instead of ending the
    process. ``signum``: the first signal received (None: none yet)."""

    def __init__(self, announce: bool = True) -> None:
        self.announce = announce  # one notice on stderr when the first signal arrives (rank 0)
        self.signum: int | None = None
        self._first_at = 0.0
        self._parent = os.getppid()
        self._previous: dict[int, _Handler] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._parent = os.getppid()
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        orphaned = signum == signal.SIGTERM and os.getppid() != self._parent
        if self.signum is None and not orphaned:
            self.signum, self._first_at = signum, now
            if self.announce:  # os.write: safe even if the signal interrupted a print
                name = signal.Signals(signum).name
                os.write(2, f"\n[senseflow] {name} received: stopping after this iteration with a checkpoint "
                            f"(send it again to stop at once)\n".encode())
            return
        if signum == signal.SIGTERM == self.signum and now - self._first_at <= REPEAT_WINDOW_S and not orphaned:
            return  # the same request delivered twice
        previous = self._previous.get(signum, signal.SIG_DFL)
        self._restore()
        if callable(previous):
            previous(signum, frame)  # Python's SIGINT handler: KeyboardInterrupt
        elif previous != signal.SIG_IGN:
            with contextlib.suppress(Exception):  # a flush the signal interrupted cannot be re-entered
                sys.stdout.flush()
                sys.stderr.flush()
            os.kill(os.getpid(), signum)  # the default action, now restored: the process ends

    def agreed(self, device: torch.device | str = "cpu") -> int:
        """The signal number every rank stops for (0: go on): this process's own request, or with several processes
        the largest requested on any rank (one ``all_reduce``; every rank calls this at the same iteration)."""
        mine = self.signum or 0
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return mine
        flag = torch.tensor([mine], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def stop_line(signum: int, iteration: int, checkpoint: object) -> str:
    """The one line a stopped run prints."""
    return (f"[senseflow] stopped by {signal.Signals(signum).name} after iteration {iteration}; checkpoint "
            f"{checkpoint}; to resume, run the same command again")


def exit_stopped(signum: int, iteration: int, checkpoint: object, announce: bool) -> NoReturn:
    """End a run stopped by ``signum`` after its checkpoint: :func:`stop_line` (when ``announce``: rank 0) and exit
    status 128 + signum, so a scheduler sees the run did not finish."""
    if announce:
        print(stop_line(signum, iteration, checkpoint), file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)

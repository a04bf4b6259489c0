"""Preemption: SIGTERM and Ctrl-C stop a run cleanly, a full disk fails a save cleanly, and the same command resumes
bit-identically (docs/distributed_training.md, Preemption; senseflow/trainer/stop.py).

* SIGTERM to the launcher (``sh exp_sdxl/train_sdxl_senseflow.sh 1 1 ...``, i.e. torchrun, which forwards it to its
  worker) at a random iteration: the worker finishes that iteration, checkpoints it and prints one line saying how
  to resume; torchrun exits non-zero. Running the same command again ends bit-identical to a run never stopped.
* Ctrl-C (SIGINT to the process group of a one-process ``python -m senseflow.cli train``): the same, exit code 130.
* A full disk (the test-only hook ``SENSEFLOW_TEST_DISK_FULL_IN_SAVE``, see senseflow/trainer/checkpoint.py):
  one line with the error, the space needed and the free space, exit 2, the temporary folder gone, ``latest`` on
  the previous checkpoint.
* ``metrics.jsonl`` after a resume holds every iteration once, in order: rows logged after the checkpoint a run
  resumes from (or by a run killed before its first checkpoint) are dropped and logged again.

All end-to-end runs use the tiny SDXL teacher: GD = 2, 6 iterations, a checkpoint every 2.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_runs import REPO, _env, asset_overrides, build_assets, config_path, free_port, train_args
from senseflow.trainer import stop as stop_module
from senseflow.trainer.checkpoint import (
    TEST_DISK_FULL_ENV,
    Checkpointer,
    CheckpointNotSaved,
    ModelState,
    OptimizerState,
    format_bytes,
    init_optimizer_state,
)
from senseflow.trainer.logger import rewind_metrics
from senseflow.trainer.stop import StopOnSignal

TRAINER = "sdxl_senseflow"
ITERATIONS, SAVE_EVERY = 6, 2
OVERRIDES = ("method.gd=2", f"train.iterations={ITERATIONS}", f"train.save_interval={SAVE_EVERY}")
#: the iteration after which the signal is sent is drawn from this seed (1 .. ITERATIONS-2; any must resume exactly)
SIGNAL_SEED = 20260317
STOP_LINE = re.compile(r"^\[senseflow\] stopped by (SIG[A-Z]+) after iteration (\d+); checkpoint (\S+); "
                       r"to resume, run the same command again$", re.M)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_assets(tmp_path_factory.getbasetemp() / "dist_assets", kinds=("sdxl",))


def launcher_cmd(run: Path, assets: Path) -> list[str]:
    return ["sh", str(REPO / "exp_sdxl" / "train_sdxl_senseflow.sh"), "1", "1", str(config_path(TRAINER)), str(run),
            *asset_overrides(assets, TRAINER), *OVERRIDES]


def direct_cmd(run: Path, assets: Path) -> list[str]:
    return [sys.executable, *train_args(TRAINER, run, assets, *OVERRIDES)]


class Launch:
    """One command in the background, in a session of its own (its process group is its pid), output to files."""

    def __init__(self, cmd: list[str], run: Path, env: dict[str, str] | None = None) -> None:
        self.run, self.log = run, run.parent / f"{run.name}.{time.monotonic_ns()}"
        self.rows_before = logged(run)
        run.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{self.log}.out", "w") as out, open(f"{self.log}.err", "w") as err:
            env = _env({"MASTER_PORT": str(free_port()), **(env or {})})
            self.proc = subprocess.Popen(cmd, cwd=run.parent, env=env, stdout=out, stderr=err, text=True,
                                         start_new_session=True)

    def wait_for_row(self, iteration: int, timeout: float = 600) -> None:
        """Until this command has logged ``iteration`` (metrics.jsonl changed since the start and has the rows 1 ..
        ``iteration`` or more, in order): its training loop is running past that iteration."""
        deadline = time.monotonic() + timeout
        while (rows := logged(self.run)) == self.rows_before or rows[:iteration] != list(range(1, iteration + 1)):
            assert self.proc.poll() is None, f"ended before iteration {iteration}: {self.finish()[2][-3000:]}"
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.05)

    def finish(self, timeout: float = 600) -> tuple[int, str, str]:
        rc = self.proc.wait(timeout=timeout)
        return rc, Path(f"{self.log}.out").read_text(), Path(f"{self.log}.err").read_text()


def logged(run: Path) -> list[int]:
    """The iterations of the complete rows of metrics.jsonl, in file order."""
    path = run / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line)["iteration"] for line in text.splitlines(keepends=True) if line.endswith("\n")]


def metrics(run: Path) -> list[dict]:
    """metrics.jsonl without the timings (which differ from run to run)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def latest(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


def assert_same_final_student(run: Path, reference: Path) -> None:
    name = f"iter_{ITERATIONS:06d}"
    assert latest(run) == name
    a = (run / "checkpoints" / name / "student.safetensors").read_bytes()
    b = (reference / "checkpoints" / name / "student.safetensors").read_bytes()
    assert a == b, "the final student differs from the uninterrupted run's"
    assert logged(run) == list(range(1, ITERATIONS + 1))
    assert metrics(run) == metrics(reference)


@pytest.fixture(scope="module")
def reference(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run (one process, without torchrun: the same arithmetic as the launcher's one process)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    rc, _, err = Launch(direct_cmd(run, assets), run).finish()
    assert rc == 0, err[-3000:]
    return run


# ---- end to end -------------------------------------------------------------------------------------------------

def test_sigterm_to_the_launcher_stops_after_the_iteration_and_the_same_command_resumes_bit_identically(
        reference, assets, tmp_path):
    after = random.Random(SIGNAL_SEED).randint(1, ITERATIONS - 2)
    run = tmp_path / "run"
    first = Launch(launcher_cmd(run, assets), run)
    first.wait_for_row(after)
    first.proc.send_signal(signal.SIGTERM)  # to torchrun alone, as a cluster asks a job to stop
    rc, out, err = first.finish()
    assert rc != 0, "a stopped run must not look finished to a scheduler"  # torchrun itself exits 1 on a signal
    lines = STOP_LINE.findall(out + err)
    assert len(lines) == 1, err[-3000:]
    signame, stopped_at, checkpoint = lines[0][0], int(lines[0][1]), lines[0][2]
    assert signame == "SIGTERM" and after <= stopped_at < ITERATIONS
    assert Path(checkpoint) == run / "checkpoints" / f"iter_{stopped_at:06d}" and latest(run) == Path(checkpoint).name
    assert logged(run) == list(range(1, stopped_at + 1))
    assert f'File "{REPO / "senseflow"}' not in err  # no traceback of the worker (torchrun prints its own)

    rc, out, err = Launch(launcher_cmd(run, assets), run).finish()  # the same command again
    assert rc == 0, err[-3000:]
    assert f"resumed from {checkpoint} at iteration {stopped_at}" in out + err
    assert_same_final_student(run, reference)



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the worker's end with its launcher is Linux-only")
def test_kill_9_of_the_launcher_group_then_the_same_command_takes_over_and_ends_bit_identical(
        reference, assets, tmp_path):
    """The natural "kill, then re-run": SIGKILL to the launcher's whole process group (torchrun and the shell; the
    worker sits in a process group of its own) leaves no writer behind: the worker ends with its launcher, so the
    same command takes over the dead lock and ends bit-identical to a run never stopped."""
    from senseflow.trainer.run_lock import LOCK_NAME

    run = tmp_path / "run"
    first = Launch(launcher_cmd(run, assets), run)
    first.wait_for_row(3)
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(timeout=60)
    holder = json.loads((run / LOCK_NAME).read_text())["pid"]   # the worker that held the folder
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and Path(f"/proc/{holder}").exists() and \
            Path(f"/proc/{holder}/stat").read_text().split()[2] != "Z":
        time.sleep(0.1)
    assert not Path(f"/proc/{holder}").exists() or Path(f"/proc/{holder}/stat").read_text().split()[2] == "Z", \
        "the worker outlived its launcher"

    rc, out, err = Launch(launcher_cmd(run, assets), run).finish()  # the same command again
    assert rc == 0, err[-3000:]
    assert "taking over the lock" in out + err
    assert_same_final_student(run, reference)

def test_a_full_disk_then_ctrl_c_then_the_same_command_ends_bit_identical(reference, assets, tmp_path):
    """One process started without torchrun, three times with the same command line (an environment hook makes the
    disk full in the first): a full disk at the second checkpoint, Ctrl-C, the rest."""
    run = tmp_path / "run"
    ckpts = run / "checkpoints"

    # the disk fills up while checkpoint 4 is written
    rc, out, err = Launch(direct_cmd(run, assets), run, {TEST_DISK_FULL_ENV: "4"}).finish()
    assert rc == 2, err[-3000:]
    message = [line for line in err.splitlines() if "not saved" in line]
    assert len(message) == 1 and "Traceback" not in err, err[-3000:]
    previous = sum(p.stat().st_size for p in (ckpts / "iter_000002").iterdir())
    assert message[0].startswith(f"senseflow train: error: checkpoint {ckpts / 'iter_000004'} not saved: "
                                 "[Errno 28] No space left on device")
    assert f"it needs about {format_bytes(previous)} (the size of the previous checkpoint), " in message[0]
    assert re.search(r", \d+(\.\d)? [KMGT]?i?B is free there; its temporary folder .tmp-iter_000004 is removed and "
                     r"checkpoints/latest still names iter_000002;", message[0]), message[0]
    assert sorted(p.name for p in ckpts.iterdir()) == ["iter_000002", "iter_000002.sha256.json", "latest"]
    assert logged(run) == [1, 2, 3, 4]  # 3 and 4 come after the checkpoint the next start resumes from

    # the same command: resumes at 2 (rows 3 and 4 dropped), then Ctrl-C (SIGINT to the process group)
    second = Launch(direct_cmd(run, assets), run)
    second.wait_for_row(3)
    os.killpg(second.proc.pid, signal.SIGINT)
    rc, out, err = second.finish()
    assert "resumed from" in out + err and "at iteration 2" in out + err
    assert rc == 128 + signal.SIGINT, err[-3000:]
    (signame, stopped_at, checkpoint), = STOP_LINE.findall(err)
    assert signame == "SIGINT" and 3 <= int(stopped_at) < ITERATIONS and latest(run) == Path(checkpoint).name
    assert "Traceback" not in err
    assert logged(run) == list(range(1, int(stopped_at) + 1))

    rc, _, err = Launch(direct_cmd(run, assets), run).finish()
    assert rc == 0, err[-3000:]
    assert_same_final_student(run, reference)


# ---- the pieces ---------------------------------------------------------------------------------------------------

def test_the_first_signal_asks_to_stop_and_a_second_stops_at_once(monkeypatch):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with StopOnSignal(announce=False) as stop:
        assert stop.agreed() == 0
        signal.raise_signal(signal.SIGINT)
        assert stop.signum == signal.SIGINT and stop.agreed() == signal.SIGINT  # one process: no collective
        with pytest.raises(KeyboardInterrupt):  # Python's own Ctrl-C behaviour is back
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]

    delivered: list[int] = []
    monkeypatch.setattr(stop_module.os, "kill", lambda pid, sig: delivered.append(sig))  # instead of ending pytest
    with StopOnSignal(announce=False) as stop:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # at once: the same request delivered twice (scheduler + torchrun)
        assert stop.signum == signal.SIGTERM and delivered == []
        monkeypatch.setattr(stop_module, "REPEAT_WINDOW_S", -1.0)
        signal.raise_signal(signal.SIGTERM)  # a second request: default action (the process would end)
        assert delivered == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) == before[signal.SIGTERM]
    assert {s: signal.getsignal(s) for s in before} == before


def test_every_rank_stops_for_a_signal_that_reached_one_rank(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(
        "import signal, torch.distributed as dist\n"
        "from senseflow.trainer.stop import StopOnSignal\n"
        "dist.init_process_group('gloo')\n"
        "rank = dist.get_rank()\n"
        "with StopOnSignal(announce=False) as stop:\n"
        "    seen = [stop.agreed()]\n"
        "    if rank == 1:\n"
        "        signal.raise_signal(signal.SIGTERM)\n"
        "    seen.append(stop.agreed())\n"
        "print(f'rank {rank} agreed {seen}', flush=True)\n"
        "dist.destroy_process_group()\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env({"PYTHONPATH": str(REPO)}), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(re.findall(r"rank \d agreed \[\d+, \d+\]", proc.stdout)) == [
        f"rank 0 agreed [0, {int(signal.SIGTERM)}]", f"rank 1 agreed [0, {int(signal.SIGTERM)}]"]


def test_loader_workers_survive_the_signal_torchrun_sends_to_the_trainers_process_group(tmp_path):
    """torchrun signals a worker's whole process group, a terminal's Ctrl-C the foreground group: the trainer's
    data-loader workers must keep serving batches while it finishes the iteration and saves."""
    script = tmp_path / "loader.py"
    script.write_text(
        "import os, signal\n"
        "from senseflow.data.loader import build_dataloader, infinite_batches\n"
        "from senseflow.trainer.stop import StopOnSignal\n"
        "loader = build_dataloader([{'x': i} for i in range(64)], 2, num_workers=2, pin_memory=False,\n"
        "                          persistent_workers=True, seed=0, rank=0, world_size=1)\n"
        "batches = infinite_batches(loader)\n"
        "with StopOnSignal(announce=False) as stop:\n"
        "    next(batches), next(batches)  # one batch from each worker: both have started (worker_init_fn ran)\n"
        "    os.killpg(os.getpgrp(), signal.SIGTERM)  # what torchrun sends\n"
        "    served = sum(1 for _ in zip(range(20), batches))\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "os.killpg(os.getpgrp(), signal.SIGINT)  # a terminal's Ctrl-C\n"
        "served += sum(1 for _ in zip(range(20), batches))\n"
        "print(f'served {served} batches after signal {stop.signum}', flush=True)\n"
    )
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env({"PYTHONPATH": str(REPO)}),
                          capture_output=True, text=True, timeout=300, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"served 40 batches after signal {int(signal.SIGTERM)}"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_failed_save_removes_its_folder_and_keeps_latest(tmp_path, monkeypatch):
    import torch

    import senseflow.trainer.checkpoint as checkpoint

    net = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(net.parameters())
    init_optimizer_state(opt)
    parts = {"model/net": ModelState(net), "optim/net": OptimizerState(net, opt)}
    ck = Checkpointer(tmp_path, keep_last=2, rank=0)
    exports = lambda: {"student.safetensors": net.state_dict()}  # noqa: E731

    monkeypatch.setenv(TEST_DISK_FULL_ENV, "1")  # no earlier checkpoint: the bytes of the state it was writing
    with pytest.raises(CheckpointNotSaved) as err:
        ck.save(1, parts, {"iteration": 1}, {}, exports)
    state_bytes = 3 * (16 + 4) * 4  # weights, AdamW's two moments (float32); the step counters are 0-d
    assert f"it needs at least {format_bytes(state_bytes + 2 * 4)} (the training-state tensors" in str(err.value)
    assert "there is no earlier checkpoint" in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == []

    monkeypatch.delenv(TEST_DISK_FULL_ENV)
    ck.save(1, parts, {"iteration": 1}, {}, exports)

    def full(*args, **kwargs):  # rank 0's own files (not DCP's): the same outcome
        raise OSError(28, "No space left on device", "student.safetensors")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(CheckpointNotSaved, match=r"checkpoint .*iter_000002 not saved: \[Errno 28\] No space left "
                                                 r"on device: 'student.safetensors'; it needs about .* \(the size of "
                                                 r"the previous checkpoint\)"):
        ck.save(2, parts, {"iteration": 2}, {}, exports)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "iter_000001", "iter_000001.sha256.json", "latest"]
    assert ck.latest().name == "iter_000001"
    assert ck.load(ck.latest(), parts)[0] == {"iteration": 1}  # the previous checkpoint is intact


def test_a_start_without_a_checkpoint_drops_the_rows_of_an_earlier_killed_start(tmp_path):
    """A run killed before its first checkpoint left rows 1 and 2; the next start begins at iteration 0 again."""
    from types import SimpleNamespace

    from senseflow.trainer.base import DistillationTrainer

    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1}\n{"iteration": 2}\n')
    new_run = SimpleNamespace(checkpointer=Checkpointer(tmp_path, keep_last=1, rank=0),
                              info=SimpleNamespace(is_main=True, rank=0), run_dir=tmp_path)
    DistillationTrainer._resume(new_run)
    assert logged(tmp_path) == []


def test_rewind_metrics_keeps_the_rows_up_to_the_resumed_iteration(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = "".join(json.dumps({"iteration": i, "loss/x": 0.5}) + "\n" for i in range(1, 6))
    path.write_text(rows + '{"iteration": 6, "loss')  # the last row cut short by a kill
    rewind_metrics(path, 3)
    assert logged(tmp_path) == [1, 2, 3] and path.read_text().endswith("\n")
    rewind_metrics(path, 0)  # resumed from nothing: every row goes
    assert path.read_text() == ""
    shutil.rmtree(tmp_path)
    rewind_metrics(path, 3)  # no file: nothing to do

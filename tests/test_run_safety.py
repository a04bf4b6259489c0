"""Run folders are safe to be handed around and hard to write twice (docs/distributed_training.md).

* Nothing unpickles what it did not write. A training checkpoint's DCP ``.metadata`` is a pickle: a planted one runs
  code when DCP reads it (checked below, so these tests cannot pass for the wrong reason). Inference and export read a
  checkpoint folder only through the ``student(_ema).safetensors`` the trainer wrote beside it, and refuse a folder
  without them; resume reads DCP only after the files match the digest the run recorded, and refuses with one line
  otherwise. The planted pickle's marker file must never appear.
* One writer per run folder: ``<run>/.senseflow.lock`` names host and pid; a second start while the holder lives is
  refused with one line before anything is written, a dead holder (``kill -9``) is taken over, a normal run leaves
  no lock behind. A torchrun worker dies with its launcher (Linux).
* Every ``torch.load`` in the repository passes ``weights_only=True``.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dist_runs import REPO, _env, build_assets, train_args
from senseflow.cli import main as senseflow_main
from senseflow.inference import SPECS
from senseflow.trainer.run_lock import LOCK_NAME, RunFolderBusy, acquire_run_lock

TRAINER = "flux_senseflow"
#: one iteration, one checkpoint, no preview: the smallest real run of the tiny FLUX config
OVERRIDES = ("train.iterations=1", "train.save_interval=1", "train.preview_interval=0", "train.ema.enabled=true")


class _Planted:
    """Unpickling this creates ``marker``: what a malicious ``.metadata`` could do with any code at all."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(metadata: Path, marker: Path) -> None:
    metadata.write_bytes(pickle.dumps(_Planted(marker)))


def planted_run(root: Path, marker: Path) -> tuple[Path, Path]:
    """``root/run`` whose newest checkpoint holds DCP files only (a planted ``.metadata`` and a dummy shard), as a
    run folder downloaded from someone else could: (run folder, checkpoint folder)."""
    ckpt = root / "run" / "checkpoints" / "iter_000010"
    ckpt.mkdir(parents=True)
    plant(ckpt / ".metadata", marker)
    (ckpt / "__0_0.distcp").write_bytes(b"\0" * 64)
    (ckpt.parent / "latest").write_text(ckpt.name)
    return root / "run", ckpt


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes: equal before and after a command that changed nothing there."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_lock(run: Path, pid: int, host: str | None = None) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / LOCK_NAME).write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid,
                                             "started": "2026-01-01T00:00:00", "token": "someone-else"}))


def train(run: Path, assets: Path, capsys) -> tuple[int, str, str]:
    """``senseflow train`` of the tiny FLUX config into ``run``, in this process: (exit code, stderr, stdout)."""
    rc = senseflow_main(train_args(TRAINER, run, assets, *OVERRIDES)[2:])
    out = capsys.readouterr()
    return rc, out.err, out.out


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_assets(tmp_path_factory.getbasetemp() / "dist_assets", kinds=("flux",))


@pytest.fixture(scope="module")
def trained(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """A finished one-iteration run, trained by ``senseflow train`` in its own process over the lock file that a
    ``kill -9``-ed run left behind."""
    run = tmp_path_factory.mktemp("trained") / "run"
    write_lock(run, dead_pid())
    cmd = [sys.executable, *train_args(TRAINER, run, assets, *OVERRIDES)]
    proc = subprocess.run(cmd, cwd=run.parent, env=_env(None), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, proc


# ---- inference and export: safetensors only ----------------------------------------------------------------------

def test_a_planted_metadata_pickle_runs_code_when_dcp_reads_it(tmp_path):
    """The threat is real: DCP's reader unpickles ``.metadata`` (so the tests below would see the marker)."""
    from torch.distributed.checkpoint import FileSystemReader

    plant(tmp_path / ".metadata", tmp_path / "marker")
    try:
        opened = FileSystemReader(str(tmp_path)).read_metadata()  # the planted call's result: an open file
        opened.close()
    except Exception:  # a later torch may check what it unpickled; the code has run by then
        pass
    assert (tmp_path / "marker").exists()


def test_a_checkpoint_folder_is_read_only_through_its_safetensors(tmp_path):
    from senseflow import checkpoint_io as cio

    marker = tmp_path / "marker"
    run, ckpt = planted_run(tmp_path, marker)
    given = (run, ckpt.parent, ckpt.parent / "latest", ckpt)
    for path in given:  # DCP files only: refused, with one line naming the folder and what was expected
        with pytest.raises(ValueError) as err:
            cio.resolve_student_source(path)
        msg = str(err.value)
        assert "\n" not in msg and str(ckpt) in msg and "student_ema.safetensors or student.safetensors" in msg
    weights = {"w": torch.arange(4.0)}
    save_file(weights, str(ckpt / "student.safetensors"))
    for path in given:  # the trainer's export beside the DCP files: read, and nothing else
        source = cio.resolve_student_source(path)
        assert (source.kind, source.path) == ("safetensors", ckpt / "student.safetensors")
        assert torch.equal(cio.read_state_dict(source)["w"], weights["w"])
    save_file({"w": weights["w"] * 2}, str(ckpt / "student_ema.safetensors"))
    assert cio.resolve_student_source(tmp_path / "run").path == ckpt / "student_ema.safetensors"
    assert not marker.exists()


def test_export_of_a_planted_checkpoint_folder_never_runs_its_pickle(tiny_teacher, tmp_path, capsys):
    teacher = tiny_teacher("sd35-large")
    capsys.readouterr()  # building the teacher talks
    marker = tmp_path / "marker"
    ckpt = tmp_path / "iter_000300"
    ckpt.mkdir()
    plant(ckpt / ".metadata", marker)
    argv = ["export", "--teacher", str(teacher), "--checkpoint", str(ckpt), "--family", "sd3",
            "--out", str(tmp_path / "out")]
    assert senseflow_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no student_ema.safetensors or student.safetensors" in err, err
    shutil.copy(teacher / "transformer" / "diffusion_pytorch_model.safetensors", ckpt / "student.safetensors")
    assert senseflow_main(argv) == 0
    assert (tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert not marker.exists()


#: every inference entry point a user runs (``python scripts_x/...py``), found on disk so a new script is covered too
INFERENCE_SCRIPTS = sorted(str(p.relative_to(REPO)) for p in REPO.glob("scripts_*/*.py"))
#: how a script names its inference spec (senseflow/inference.py, SPECS)
SCRIPT_SPEC = re.compile(r"\bmain\(spec=[\"']([\w-]+)[\"']\)")
#: the one refusal line's essentials (senseflow/checkpoint_io.py, resolve_student_source)
EXPECTED = "holds no student_ema.safetensors or student.safetensors"


def test_the_inference_scripts_are_found():
    """The table below covers every script of every family (an empty glob would make it pass vacuously)."""
    specs = {SCRIPT_SPEC.search((REPO / s).read_text()).group(1) for s in INFERENCE_SCRIPTS}
    assert specs == set(SPECS), INFERENCE_SCRIPTS


@pytest.mark.parametrize("given", ["run folder", "checkpoint folder"])
@pytest.mark.parametrize("script", INFERENCE_SCRIPTS)
def test_an_inference_script_given_a_planted_run_never_runs_its_pickle(
    script, given, tiny_teacher, tmp_path, capsys, monkeypatch
):
    """``python scripts_x/...py --<teacher> T --checkpoint <run or its checkpoint>``: exit 2, one line naming the
    checkpoint folder and the student safetensors it lacks, nothing written, the marker absent."""
    spec = SPECS[SCRIPT_SPEC.search((REPO / script).read_text()).group(1)]
    teacher = tiny_teacher(spec.preset)  # the tiny teacher kinds are named as the specs' presets
    capsys.readouterr()  # building the teacher talks
    marker = tmp_path / "marker"
    run, ckpt = planted_run(tmp_path, marker)
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    argv = [f"--{spec.teacher_flag}", str(teacher), "--checkpoint", str(run if given == "run folder" else ckpt),
            "--output_dir", str(out), "--height", "64", "--width", "64", "--num_prompts", "1"]
    monkeypatch.setattr(sys, "argv", [str(REPO / script), *argv])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPO / script), run_name="__main__")
    err = capsys.readouterr().err
    assert done.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"{Path(script).name}: error: ") and "Traceback" not in err, err
    assert f"checkpoint folder {ckpt} {EXPECTED}" in err, err
    assert not marker.exists()
    assert not out.exists() and snapshot(tmp_path) == before


@pytest.mark.parametrize("given", ["run folder", "checkpoint folder"])
def test_eval_given_a_planted_run_never_runs_its_pickle(given, tiny_teacher, tmp_path, capsys):
    """``senseflow eval`` with ``generation.student.checkpoint`` = a planted run: exit 2, one line naming the
    checkpoint folder and the student safetensors it lacks, nothing written (not even the prompt set), the marker
    absent."""
    import yaml

    teacher = tiny_teacher("flux")
    capsys.readouterr()
    marker = tmp_path / "marker"
    run, ckpt = planted_run(tmp_path, marker)
    (tmp_path / "prompts.txt").write_text("a red fox in the snow\n")
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({
        "name": "planted", "output_dir": str(tmp_path / "eval_out"),
        "prompts": {"source": "text", "path": str(tmp_path / "prompts.txt")},
        "generation": {"teacher": str(teacher), "height": 64, "width": 64, "device": "cpu", "dtype": "fp32",
                       "student": {"spec": "flux", "checkpoint": str(run if given == "run folder" else ckpt)}}}))
    before = snapshot(tmp_path)
    assert senseflow_main(["eval", "--config", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("senseflow eval: error: ") and "Traceback" not in err, err
    assert f"checkpoint folder {ckpt} {EXPECTED}" in err, err
    assert not marker.exists()
    assert not (tmp_path / "eval_out").exists() and snapshot(tmp_path) == before


# ---- resume: the digest the run recorded ----------------------------------------------------------------------------

def test_a_run_records_the_digest_of_every_checkpoint_file(trained):
    import hashlib

    run, _ = trained
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    record = json.loads((run / "checkpoints" / f"{ckpt.name}.sha256.json").read_text())
    assert record["format"] == "senseflow-checkpoint-digest/1" and record["checkpoint"] == ckpt.name
    files = sorted(p.name for p in ckpt.iterdir())
    assert sorted(record["files"]) == files and ".metadata" in files and "student_ema.safetensors" in files
    assert all(record["files"][n] == hashlib.sha256((ckpt / n).read_bytes()).hexdigest() for n in files)


def test_resume_refuses_a_tampered_checkpoint_before_reading_it(trained, assets, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    ckpt = run / "checkpoints" / "iter_000001"

    rc, err, out = train(run, assets, capsys)  # untouched: the same command resumes (nothing left to train)
    assert rc == 0 and f"resumed from {ckpt} at iteration 1" in out + err, err

    marker = tmp_path / "marker"
    original = (ckpt / ".metadata").read_bytes()
    plant(ckpt / ".metadata", marker)
    rc, err, _ = train(run, assets, capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert f"checkpoint {ckpt} does not match the digest this run recorded (.metadata differs" in err
    assert not marker.exists()

    (ckpt / ".metadata").write_bytes(original)
    (run / "checkpoints" / "iter_000001.sha256.json").unlink()  # e.g. a checkpoint copied in from elsewhere
    rc, err, _ = train(run, assets, capsys)
    assert rc == 2 and err.count("\n") == 1 and "no digest recorded" in err, err
    assert not (run / LOCK_NAME).exists()  # a refused resume gives the folder back too


def test_resume_reads_only_this_runs_own_checkpoints(tmp_path):
    from senseflow.trainer.checkpoint import Checkpointer, CheckpointRefused

    (tmp_path / "elsewhere" / "iter_000001").mkdir(parents=True)
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    ck = Checkpointer(tmp_path / "run", keep_last=1, rank=0)
    for pointer in ("../../elsewhere/iter_000001", str(tmp_path / "elsewhere" / "iter_000001")):
        (root / "latest").write_text(pointer)
        with pytest.raises(CheckpointRefused, match="not a checkpoint of this run"):
            ck.latest()
    (root / "iter_000001").symlink_to(tmp_path / "elsewhere" / "iter_000001")
    (root / "latest").write_text("iter_000001")
    with pytest.raises(CheckpointRefused, match="leads outside"):
        ck.latest()


# ---- one writer per run folder ----------------------------------------------------------------------------------

def test_a_normal_run_takes_over_a_dead_lock_and_leaves_none(trained):
    run, proc = trained
    notices = [line for line in proc.stderr.splitlines() if "taking over the lock" in line]
    assert len(notices) == 1 and str(run) in notices[0] and "no longer running" in notices[0]
    assert not (run / LOCK_NAME).exists()
    assert (run / "config.yaml").exists() and (run / "checkpoints" / "latest").exists()


def test_a_second_writer_is_refused_while_the_first_lives(assets, tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        run = tmp_path / "run"
        write_lock(run, holder.pid)
        before = (run / LOCK_NAME).read_text()
        rc, err, _ = train(run, assets, capsys)
        assert rc == 2 and err.count("\n") == 1, err
        assert f"run folder {run} is in use by pid {holder.pid} on {socket.gethostname()}" in err
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # nothing written, the lock untouched
        assert (run / LOCK_NAME).read_text() == before
    finally:
        holder.kill()
        holder.wait()
    lock = acquire_run_lock(run)  # the holder is gone: taken over
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run / LOCK_NAME).exists()


def test_a_lock_of_another_host_or_a_reused_pid(tmp_path, capsys):
    write_lock(tmp_path, os.getpid(), host="another-host.example")
    with pytest.raises(RunFolderBusy, match=f"locked by pid {os.getpid()} on another-host.example.*remove"):
        acquire_run_lock(tmp_path)
    if not Path("/proc/self/stat").exists():
        return  # the start-time check below needs Linux's /proc
    # this host, a live pid that started after the lock was written: not the holder (pids are reused)
    live = os.getppid()
    record = {"host": socket.gethostname(), "pid": live, "proc_start": -1, "token": "old"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))
    lock = acquire_run_lock(tmp_path)
    assert "taking over the lock" in capsys.readouterr().err
    lock.release()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_torchrun_worker_exits_when_its_launcher_is_killed(tmp_path):
    """``kill -9`` of the launcher (standing in for torchrun's agent) ends the worker, which armed
    :func:`~senseflow.trainer.run_lock.exit_with_launcher` as the trainer does at start."""
    worker = ("import sys, time; from senseflow.trainer.run_lock import exit_with_launcher; "
              "assert exit_with_launcher(); print('armed', flush=True); time.sleep(120)")
    launcher = ("import subprocess, sys; w = subprocess.Popen([sys.executable, '-c', sys.argv[1]]); "
                "print(w.pid, flush=True); w.wait()")
    env = dict(_env(None), LOCAL_RANK="0", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", launcher, worker], env=env, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    pid = int(proc.stdout.readline())
    assert proc.stdout.readline().strip() == "armed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _running(pid):
        time.sleep(0.1)
    alive = _running(pid)
    if alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, "the worker outlived its launcher"


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


# ---- torch.load -----------------------------------------------------------------------------------------------------

def test_every_torch_load_is_weights_only():
    calls = []
    for folder in ("senseflow", "tools", "tests", *(p.name for p in REPO.glob("scripts_*"))):
        for path in sorted((REPO / folder).rglob("*.py")):
            text = path.read_text()
            for m in re.finditer(r"\btorch\.load\(", text):
                depth, i = 1, m.end()
                while depth and i < len(text):
                    depth += {"(": 1, ")": -1}.get(text[i], 0)
                    i += 1
                calls.append((f"{path.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}", text[m.end():i]))
    assert len(calls) >= 5
    unsafe = [where for where, args in calls if not re.search(r"\bweights_only\s*=\s*True\b", args)]
    assert unsafe == []

"""The trainer's front door: every bad input to ``senseflow train`` is refused before any network loads.

Each row of :data:`CASES` prepares one bad input (config, data set, checkpoint, command-line flag or run folder) in
its own temporary folder and runs ``senseflow train`` (``senseflow config --check-paths`` for two rows) in this
process. Every row must end with

* exit code 2 and exactly one line on stderr, naming the file, key or flag at fault (the row's ``needles``);
* no network loaded: ``from_pretrained`` of every diffusers and transformers model raises ``AssertionError`` while
  the row runs, so a load fails the row (:func:`test_the_guard_catches_a_network_load` shows it would);
* nothing on disk changed: the paths, sizes, modes and modification times of the row's folder and of the shared
  assets are the same before and after (a refused re-run keeps its ``config.yaml``, a refused new run creates no
  folder).

A few rows go through the launcher scripts (``exp_*/train_*.sh``, i.e. tools/launch.sh), which must end in the
same single line and exit code 2 rather than torchrun's report. The unit-level cases of the modules behind the door
are in tests/test_config.py, tests/test_data_bad_inputs.py and tests/test_run_safety.py.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from safetensors.torch import load_file, save_file

from dist_runs import REPO, _env, asset_overrides, build_assets, config_path
from senseflow.cli import main as senseflow_main
from senseflow.trainer.run_lock import LOCK_NAME

TRAINER = "flux_senseflow"
CONFIG = config_path(TRAINER)
#: the trained run's settings, and every row's unless the row overrides them (a later override wins)
RUN = ("train.iterations=1", "train.save_interval=1", "train.preview_interval=0", "train.ema.enabled=false")
UMASK = 0o027
BOM = b"\xef\xbb\xbf"


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_assets(tmp_path_factory.getbasetemp() / "dist_assets", kinds=("flux",))


@pytest.fixture(scope="module")
def trained(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-iteration run of the tiny FLUX config without EMA, with one checkpoint (written under umask
    027, for :func:`test_a_run_writes_its_files_with_the_users_umask`)."""
    run = tmp_path_factory.mktemp("bad_inputs_trained") / "run"
    before = os.umask(UMASK)
    try:
        rc = senseflow_main(["train", "--trainer", TRAINER, "--config_path", str(CONFIG), "--save_path", str(run),
                             *asset_overrides(assets, TRAINER), *RUN])
    finally:
        os.umask(before)
    assert rc == 0 and (run / "checkpoints" / "latest").read_text() == "iter_000001"
    return run


# ---- the row machinery -----------------------------------------------------------------------------------------

@dataclass
class Ctx:
    """What a row builds its bad input from: its own folder, the shared assets, the trained run."""

    tmp: Path
    assets: Path
    trained: Path
    monkeypatch: pytest.MonkeyPatch
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    # paths
    @property
    def images(self) -> Path:
        return self.assets / "data" / "images"

    @property
    def teacher(self) -> Path:
        return self.assets / "flux"

    def run(self) -> Path:
        """A copy of the trained run (a re-run of the same command resumes it)."""
        run = self.tmp / "run"
        if not run.exists():
            shutil.copytree(self.trained, run)
        return run

    def ckpt(self) -> Path:
        return self.run() / "checkpoints" / "iter_000001"

    def fresh(self) -> Path:
        """A save folder that does not exist yet."""
        return self.tmp / "new_run"

    # commands
    def train(self, *overrides: str, save: Path | None = None, flags: tuple[str, ...] = ()) -> list[str]:
        save = self.fresh() if save is None else save
        return ["train", *flags, "--trainer", TRAINER, "--config_path", str(CONFIG), "--save_path", str(save),
                *asset_overrides(self.assets, TRAINER), *RUN, *overrides]

    def resume(self, *overrides: str) -> list[str]:
        return self.train(*overrides, save=self.run())

    # files
    def write(self, name: str, data: bytes | str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def records(self, n: int = 4) -> list[dict[str, str]]:
        files = sorted(self.images.glob("*.png"))[:n]
        return [{"key": f.stem, "image_path": str(f), "prompt": f"shape {i}"} for i, f in enumerate(files)]

    def json_set(self, name: str = "set.json", **replace: object) -> Path:
        recs = self.records()
        body: dict[str, object] = {"keys": [r["key"] for r in recs], "image_paths": [r["image_path"] for r in recs],
                                   "prompts": [r["prompt"] for r in recs]}
        body.update(replace)
        return self.write(name, json.dumps(body))

    def jsonl_set(self, lines: list[str] | None = None, name: str = "set.jsonl", raw: bytes | None = None) -> Path:
        if raw is not None:
            return self.write(name, raw)
        return self.write(name, "\n".join(lines if lines is not None else [json.dumps(r) for r in self.records()]))

    def yaml(self, body: str, name: str = "bad.yaml") -> Path:
        return self.write(name, f"defaults: {CONFIG}\n{body}")

    def unwritable(self, path: Path) -> Path:
        """Take away the write permission of ``path``; as root (who may write anyway) ``os.access`` also answers
        as it would for its owner, from the permission bits."""
        mode = stat.S_IMODE(path.stat().st_mode)
        path.chmod(mode & ~0o222)
        self.cleanups.append(lambda: path.chmod(mode))
        if os.geteuid() == 0:
            real = os.access

            def access(p: str | os.PathLike, how: int, *a: object, **kw: object) -> bool:
                if how & os.W_OK and Path(p).exists() and not Path(p).stat().st_mode & stat.S_IWUSR:
                    return False
                return real(p, how, *a, **kw)  # type: ignore[arg-type]

            self.monkeypatch.setattr(os, "access", access)
        return path

    def live_pid(self) -> int:
        holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        self.cleanups.append(lambda: (holder.kill(), holder.wait()))
        return holder.pid

    def lock(self, run: Path, pid: int, host: str | None = None) -> Path:
        """``run`` with a lock file of ``pid`` on ``host`` (default: this host)."""
        run.mkdir(parents=True, exist_ok=True)
        (run / LOCK_NAME).write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid,
                                                 "started": "2026-01-01T00:00:00", "token": "someone-else"}))
        return run

    def teacher_copy(self, skip: tuple[str, ...] = ()) -> Path:
        out = self.tmp / "teacher"
        shutil.copytree(self.teacher, out, ignore=lambda d, names: [n for n in names if Path(d, n) in
                                                                    {self.teacher / s for s in skip}])
        return out


Build = Callable[[Ctx], tuple[list[str], list[str]]]


@dataclass(frozen=True)
class Case:
    id: str
    build: Build


def case(id: str) -> Callable[[Build], Build]:
    def register(build: Build) -> Build:
        CASES.append(Case(id, build))
        return build
    return register


CASES: list[Case] = []


def simple(id: str, *overrides: str, needles: tuple[str, ...]) -> None:
    """A row that only adds ``key=value`` overrides to a new run's command."""
    CASES.append(Case(id, lambda c: (c.train(*overrides), list(needles))))


def resumed(id: str, *overrides: str, needles: tuple[str, ...]) -> None:
    """A row that re-runs the trained run's command with ``overrides``."""
    CASES.append(Case(id, lambda c: (c.resume(*overrides), [str(c.ckpt()), *needles])))


# ---- command-line flags ------------------------------------------------------------------------------------------

CASES += [
    Case("flags/nothing", lambda c: (["train"], ["--trainer", "--config_path"])),
    Case("flags/no-trainer", lambda c: ([a for a in c.train() if a not in ("--trainer", TRAINER)], ["--trainer"])),
    Case("flags/no-config", lambda c: (["train", "--trainer", TRAINER, "--save_path", str(c.fresh())],
                                       ["--config_path"])),
    Case("flags/no-save-path", lambda c: (["train", "--trainer", TRAINER, "--config_path", str(CONFIG),
                                           *asset_overrides(c.assets, TRAINER)], ["--save_path"])),
    Case("flags/no-save-path-preflight", lambda c: (["train", "--preflight", "--trainer", TRAINER, "--config_path",
                                                     str(CONFIG), *asset_overrides(c.assets, TRAINER)],
                                                    ["--save_path"])),
    Case("flags/unknown-flag", lambda c: (c.train(flags=("--savepath", "x")), ["--savepath"])),
    Case("flags/unknown-trainer", lambda c: ([a if a != TRAINER else "flux_sensflow" for a in c.train()],
                                             ["--trainer", "flux_sensflow"])),
    Case("flags/trainer-without-value", lambda c: (["train", "--config_path", str(CONFIG), "--trainer"],
                                                   ["--trainer"])),
    Case("flags/trainer-of-another-family", lambda c: ([a if a != TRAINER else "sdxl_senseflow" for a in c.train()],
                                                       ["--trainer sdxl_senseflow", "teacher.family"])),
    Case("flags/trainer-of-another-method", lambda c: (c.train("method.name=dmd2"), ["--trainer", "method.name"])),
    Case("flags/dry-run-and-preflight", lambda c: (c.train(flags=("--dry-run", "--preflight")),
                                                   ["--preflight", "--dry-run"])),
    Case("flags/override-without-equals", lambda c: (c.train("train.iterations"), ["train.iterations",
                                                                                   "key=value"])),
    Case("flags/config-not-found", lambda c: ([a if a != str(CONFIG) else str(c.tmp / "nope.yaml")
                                               for a in c.train()], ["nope.yaml"])),
    Case("flags/config-is-a-folder", lambda c: ([a if a != str(CONFIG) else str(c.tmp) for a in c.train()],
                                                [c.tmp.name])),
]

# ---- config: keys, types, values ---------------------------------------------------------------------------------

simple("config/unknown-key-train.lrr", "train.lrr=1e-5", needles=("train.lrr", "optimizer.lr_generator"))
simple("config/unknown-section", "tran.iterations=3", needles=("tran", "'train'"))
simple("config/mistyped-nested-key", "train.ema.enabeld=true", needles=("train.ema.enabeld", "train.ema.enabled"))
simple("config/key-of-another-section", "train.seed=1", needles=("train.seed", "experiment.seed"))
simple("config/value-is-a-section", "train.ema=true", needles=("train.ema",))
simple("config/key-below-a-value", "train.iterations.max=3", needles=("train.iterations",))
simple("config/int-type", "train.iterations=many", needles=("train.iterations", "integer"))
simple("config/bool-type", "train.ema.enabled=maybe", needles=("train.ema.enabled",))
simple("config/list-type", "discriminator.hooks=3", needles=("discriminator.hooks",))
simple("config/float-type", "method.ida.lam=high", needles=("method.ida.lam",))
simple("config/batch-size-zero", "train.batch_size=0", needles=("train.batch_size", ">= 1"))
simple("config/lam-above-one", "method.ida.lam=1.5", needles=("method.ida.lam", "[0, 1]"))
simple("config/one-beta", "optimizer.betas=[0.9]", needles=("optimizer.betas",))
simple("config/negative-seed", "experiment.seed=-1", needles=("experiment.seed",))
simple("config/negative-keep-last", "train.keep_last=-1", needles=("train.keep_last",))
simple("config/save-interval-zero", "train.save_interval=0", needles=("train.save_interval",))
simple("config/precision-typo", "train.mixed_precision=bf61", needles=("train.mixed_precision", "'bf16'"))
simple("config/data-kind-typo", "data.kind=lmbd", needles=("data.kind", "'lmdb'"))
simple("config/family-typo", "teacher.family=fluxx", needles=("teacher.family",))
simple("config/cfg-guidance-on-flux", "method.dmd.guidance.kind=cfg", needles=("method.dmd.guidance.kind",))
simple("config/data-resolution-mismatch", "data.resolution=128", needles=("data.resolution", "teacher.resolution"))
simple("config/anchors-increasing", "schedule.anchor_indices=[1,2]", needles=("schedule.anchor_indices",))
simple("config/hsdp-with-ddp", "dist.strategy=ddp", "dist.hsdp=true", needles=("dist.hsdp",))
simple("config/cosine-without-steps", "optimizer.decay=cosine", needles=("optimizer.decay",))
simple("config/dmd2-head-on-flux", "method.dmd2_cls.enabled=true", needles=("method.dmd2_cls.enabled",))
simple("config/empty-name", "experiment.name=' '", needles=("experiment.name",))
simple("config/even-kernel", "discriminator.kernel_size=2", needles=("discriminator.kernel_size",))
CASES += [
    Case("config/yaml-unknown-key", lambda c: ([a if a != str(CONFIG) else str(c.yaml("train:\n  iteratons: 3\n"))
                                                for a in c.train()], ["bad.yaml", "train.iteratons"])),
    Case("config/yaml-wrong-type", lambda c: ([a if a != str(CONFIG) else str(c.yaml("train:\n  batch_size: two\n"))
                                               for a in c.train()], ["bad.yaml", "train.batch_size"])),
    Case("config/yaml-unparseable", lambda c: ([a if a != str(CONFIG) else str(c.write("bad.yaml", "train: [1,\n"))
                                                for a in c.train()], ["bad.yaml", "YAML"])),
    Case("config/yaml-top-level-list", lambda c: ([a if a != str(CONFIG) else str(c.write("bad.yaml", "- 1\n"))
                                                   for a in c.train()], ["bad.yaml"])),
    Case("config/yaml-missing-defaults", lambda c: ([a if a != str(CONFIG) else
                                                     str(c.write("bad.yaml", "defaults: nowhere.yaml\n"))
                                                     for a in c.train()], ["bad.yaml", "nowhere.yaml"])),
]

# ---- config: paths -----------------------------------------------------------------------------------------------

CASES += [
    Case("paths/teacher-missing", lambda c: (c.train(f"teacher.path={c.tmp / 'no_teacher'}"), ["teacher.path",
                                                                                             "no_teacher"])),
    Case("paths/teacher-placeholder", lambda c: (c.train("teacher.path=/path/to/FLUX.1-dev"),
                                                 ["teacher.path", "placeholder"])),
    Case("paths/teacher-without-vae", lambda c: (c.train(f"teacher.path={c.teacher_copy(skip=('vae',))}"),
                                                 ["teacher.path", "vae/config.json"])),
    Case("paths/teacher-without-model-index", lambda c: (
        c.train(f"teacher.path={c.teacher_copy(skip=('model_index.json',))}"), ["teacher.path", "model_index.json"])),
    Case("paths/teacher-without-transformer", lambda c: (
        c.train(f"teacher.path={c.teacher_copy(skip=('transformer',))}"), ["teacher.path", "transformer/"])),
    Case("paths/student-path-missing", lambda c: (c.train(f"teacher.student_path={c.tmp / 'no_student'}"),
                                                  ["teacher.student_path"])),
    Case("paths/dino-null-with-gan", lambda c: (c.train("discriminator.dino_path=null"),
                                                ["discriminator.dino_path", "method.gan.enabled"])),
    Case("paths/clip-without-config", lambda c: (c.train(f"discriminator.clip_path={c.tmp}"),
                                                 ["discriminator.clip_path", "config.json"])),
    Case("paths/check-paths-teacher-without-vae", lambda c: (
        ["config", str(CONFIG), *asset_overrides(c.assets, TRAINER), f"teacher.path={c.teacher_copy(skip=('vae',))}",
         "--check-paths"], ["teacher.path", "vae/config.json"])),
    Case("paths/check-paths-data-missing", lambda c: (
        ["config", str(CONFIG), *asset_overrides(c.assets, TRAINER), f"data.path={c.tmp / 'none.json'}",
         "--check-paths"], ["data.path", "none.json"])),
]

# ---- data set ----------------------------------------------------------------------------------------------------


def data(id: str, make: Callable[[Ctx], Path], *extra: str, needles: tuple[str, ...] = ()) -> None:
    """A row whose ``data.path`` is the file ``make`` writes; the message names it and ``needles``."""
    def build(c: Ctx) -> tuple[list[str], list[str]]:
        path = make(c)
        return c.train(f"data.path={path}", *extra), [path.name, *needles]
    CASES.append(Case(id, build))


data("data/missing", lambda c: c.tmp / "absent.json", needles=("data.path",))
data("data/json-with-bom", lambda c: c.write("bom.json", BOM + c.json_set().read_bytes()), needles=("BOM",))
data("data/jsonl-with-bom", lambda c: c.jsonl_set(raw=BOM + c.jsonl_set().read_bytes()), needles=("BOM",))
data("data/empty-file", lambda c: c.write("empty.json", b""), needles=("empty",))
data("data/empty-set", lambda c: c.json_set(keys=[], image_paths=[], prompts=[]), needles=("no records",))
data("data/blank-jsonl", lambda c: c.jsonl_set(raw=b"\n\n\n"), needles=("empty",))
data("data/top-level-list", lambda c: c.write("list.json", json.dumps(c.records())), needles=(".jsonl",))
data("data/invalid-json", lambda c: c.write("broken.json", '{"keys": ['), needles=("invalid JSON",))
data("data/unequal-lists", lambda c: c.json_set(prompts=["one"]), needles=("equal length",))
data("data/missing-list", lambda c: c.write("nolist.json", json.dumps({"keys": ["a"], "image_paths": ["x.png"]})),
     needles=("prompts",))
data("data/prompt-not-a-string", lambda c: c.json_set(prompts=[1, 2, 3, 4]), needles=("prompt",))
data("data/first-image-missing", lambda c: c.json_set(image_paths=[str(c.tmp / "gone.png")] * 4),
     needles=("gone.png",))
data("data/image-not-an-image", lambda c: c.json_set(image_paths=[str(c.write("fake.png", b"not a png"))] * 4),
     needles=("fake.png", "unreadable"))
data("data/jsonl-bad-first-row", lambda c: c.jsonl_set(["{not json"] + [json.dumps(r) for r in c.records()]),
     needles=("line 1",))
data("data/jsonl-row-not-an-object", lambda c: c.jsonl_set(["[1, 2]"] + [json.dumps(r) for r in c.records()]),
     needles=("line 1",))
data("data/jsonl-row-missing-prompt", lambda c: c.jsonl_set(
    [json.dumps({"key": "a", "image_path": c.records()[0]["image_path"]})] + [json.dumps(r) for r in c.records()]),
     needles=("prompt",))
data("data/jsonl-last-row-not-utf8", lambda c: c.jsonl_set(raw=c.jsonl_set().read_bytes() + b'\n{"key": "z", '
                                                              b'"image_path": "\xe9.png", "prompt": "x"}'),
     needles=("UTF-8",))
data("data/lmdb-kind-for-a-json-file", lambda c: c.json_set(), "data.kind=lmdb", needles=("data.kind=auto",))
data("data/jsonl-kind-for-a-json-file", lambda c: c.write("pretty.json", json.dumps(
    json.loads(c.json_set().read_text()), indent=1)), "data.kind=jsonl", needles=("line 1",))
data("data/json-kind-for-a-jsonl-file", lambda c: c.jsonl_set(), "data.kind=json", needles=("JSON",))
data("data/folder-without-lmdb", lambda c: (c.tmp / "folder").mkdir() or c.tmp / "folder", needles=("data.mdb",))

# ---- checkpoints -------------------------------------------------------------------------------------------------


def latest(id: str, content: bytes | None, *needles: str) -> None:
    """A re-run whose ``checkpoints/latest`` holds ``content`` (None: it is a folder)."""
    def build(c: Ctx) -> tuple[list[str], list[str]]:
        pointer = c.run() / "checkpoints" / "latest"
        pointer.unlink()
        pointer.mkdir() if content is None else pointer.write_bytes(content)
        return c.resume(), [str(pointer) if content is None or content.strip() == b"" else "latest", *needles]
    CASES.append(Case(id, build))


latest("ckpt/latest-empty", b"", "empty", "iter_000001")
latest("ckpt/latest-blank", b"  \n", "empty")
latest("ckpt/latest-not-utf8", b"\xff\xfe\x00", "cannot read")
latest("ckpt/latest-names-missing", b"iter_000009", "iter_000009", "does not exist")
latest("ckpt/latest-names-outside", b"../../elsewhere", "not a checkpoint of this run")
latest("ckpt/latest-names-junk", b"best_model", "best_model")
latest("ckpt/latest-is-a-folder", None, "not a file")


def tamper(id: str, change: Callable[[Ctx], object], *needles: str) -> None:
    """A re-run after ``change`` altered the trained checkpoint or its digest record."""
    def build(c: Ctx) -> tuple[list[str], list[str]]:
        change(c)
        return c.resume(), [str(c.ckpt()), *needles]
    CASES.append(Case(id, build))


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _digest(c: Ctx) -> Path:
    return c.run() / "checkpoints" / "iter_000001.sha256.json"


def _incomplete(c: Ctx) -> tuple[list[str], list[str]]:
    (c.ckpt() / ".metadata").unlink()
    return c.resume(), ["latest", "iter_000001", "not a complete checkpoint (no .metadata)"]


CASES.append(Case("ckpt/incomplete-no-metadata", _incomplete))
tamper("ckpt/digest-missing", lambda c: _digest(c).unlink(), "no digest recorded")
tamper("ckpt/digest-not-json", lambda c: _digest(c).write_text("{oops"), "not a digest record")
tamper("ckpt/digest-of-another-checkpoint", lambda c: _digest(c).write_text(
    _digest(c).read_text().replace('"iter_000001"', '"iter_000002"')), "not a digest record")
tamper("ckpt/digest-hash-edited", lambda c: _digest(c).write_text(
    json.dumps({**json.loads(_digest(c).read_text()), "files": {
        **json.loads(_digest(c).read_text())["files"], "trainer_state.pt": "0" * 64}})), "trainer_state.pt differs")
tamper("ckpt/metadata-tampered", lambda c: _flip(c.ckpt() / ".metadata"), ".metadata differs")
tamper("ckpt/distcp-tampered", lambda c: _flip(next(c.ckpt().glob("*.distcp"))), ".distcp differs")
tamper("ckpt/config-edited", lambda c: (c.ckpt() / "config.yaml").write_text("train: {}\n"), "config.yaml differs")
tamper("ckpt/recorded-file-deleted", lambda c: (c.ckpt() / "student.safetensors").unlink(), "student.safetensors")
resumed("ckpt/ema-newly-enabled", "train.ema.enabled=true",
        needles=("train.ema.enabled=false", "EMA", "--save_path"))
resumed("ckpt/disc-heads-other-width", "discriminator.cmap_dim=32", needles=("discriminator.cmap_dim=64",))
resumed("ckpt/disc-hooks-changed", "discriminator.hooks=[0,3]", needles=("discriminator.hooks=[1,3]",))
resumed("ckpt/disc-downsample-changed", "discriminator.downsample=1", needles=("discriminator.downsample=",))
resumed("ckpt/ema-and-heads-changed", "train.ema.enabled=true", "discriminator.cmap_dim=32",
        needles=("train.ema.enabled=false discriminator.cmap_dim=64",))


def _wider_teacher(c: Ctx) -> Path:
    """A copy of the teacher whose ``proj_out`` has one output more: a network of another shape."""
    teacher = c.teacher_copy()
    for file in (teacher / "transformer").glob("*.safetensors"):
        weights = load_file(str(file))
        for key in [k for k in weights if k.startswith("proj_out.")]:
            t = weights[key]
            weights[key] = t.new_zeros((t.shape[0] + 1, *t.shape[1:]))
        save_file(weights, str(file))
    return teacher


CASES.append(Case("ckpt/generator-of-another-shape", lambda c: (
    c.resume(f"teacher.path={_wider_teacher(c)}"), [str(c.ckpt()), "proj_out.", "teacher.path"])))

# ---- run folders -------------------------------------------------------------------------------------------------

CASES += [
    Case("folder/save-path-is-a-file", lambda c: (c.train(save=c.write("file", "x")), ["--save_path", "file"])),
    Case("folder/parent-is-a-file", lambda c: (c.train(save=c.write("file", "x") / "run"), ["--save_path", "file"])),
    Case("folder/broken-symlink", lambda c: (c.train(save=_symlink(c.tmp / "link", c.tmp / "gone")),
                                             ["--save_path", "link"])),
    Case("folder/unwritable-save-folder", lambda c: (c.train(save=c.unwritable(c.run())),
                                                     ["--save_path", "not writable"])),
    Case("folder/unwritable-parent-of-a-new-run", lambda c: (
        c.train(save=c.unwritable(_mkdir(c.tmp / "ro")) / "run"), ["--save_path", "cannot be created"])),
    Case("folder/unwritable-checkpoints", lambda c: (c.train(save=c.unwritable(c.run() / "checkpoints").parent),
                                                     ["checkpoints", "not writable"])),
    Case("folder/checkpoints-is-a-file", lambda c: (c.train(save=_file_in(c.tmp / "run2", "checkpoints")),
                                                    ["checkpoints", "is a file"])),
    Case("folder/unwritable-previews", lambda c: (c.train(save=c.unwritable(_mkdir(c.run() / "previews")).parent),
                                                  ["previews", "not writable"])),
    Case("folder/unwritable-tensorboard", lambda c: (c.train(save=c.unwritable(c.run() / "tensorboard").parent),
                                                     ["tensorboard", "not writable"])),
    Case("folder/previews-is-a-file", lambda c: (c.train(save=_file_in(c.tmp / "run2", "previews")),
                                                 ["previews", "is a file"])),
    Case("folder/metrics-is-a-folder", lambda c: (c.train(save=_mkdir(c.tmp / "run2" / "metrics.jsonl").parent),
                                                  ["metrics.jsonl", "is a folder"])),
    Case("folder/unwritable-metrics", lambda c: (c.train(save=c.unwritable(c.run() / "metrics.jsonl").parent),
                                                 ["metrics.jsonl", "not writable"])),
    Case("folder/locked-by-a-live-process", lambda c: (c.train(save=c.lock(c.run(), c.live_pid())),
                                                       ["run", "in use by pid", "--save_path"])),
    Case("folder/new-run-locked-by-a-live-process", lambda c: (c.train(save=c.lock(c.tmp / "run2", c.live_pid())),
                                                               ["run2", "in use"])),
    Case("folder/locked-by-another-host", lambda c: (c.train(save=c.lock(c.run(), 1, host="another-host.example")),
                                                     ["another-host.example"])),
    Case("folder/lock-not-a-senseflow-lock", lambda c: (
        c.train(save=_file_in(c.run(), LOCK_NAME)), [LOCK_NAME, "not a senseflow lock"])),
]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _file_in(folder: Path, name: str, text: str = "x") -> Path:
    """``folder`` with a file ``name`` holding ``text``."""
    _mkdir(folder)
    (folder / name).write_text(text)
    return folder


def _symlink(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


# ---- the rows ----------------------------------------------------------------------------------------------------

def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under ``roots`` with its kind, size, mode and modification time."""
    out: dict[str, tuple] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [".", *dirnames, *filenames]:
                p = Path(dirpath) / name
                st = p.lstat()
                out[str(p)] = (stat.S_IFMT(st.st_mode), st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
                               stat.S_IMODE(st.st_mode), st.st_mtime_ns)
    return out


def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every diffusers and transformers model load raise AssertionError (which the CLI does not catch)."""
    import diffusers
    import transformers

    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"a network was loaded: {cls.__name__}.from_pretrained{args}")

    for owner in (diffusers.ModelMixin, diffusers.DiffusionPipeline, transformers.PreTrainedModel):
        monkeypatch.setattr(owner, "from_pretrained", classmethod(refuse))


@pytest.fixture
def ctx(assets: Path, trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    c = Ctx(tmp_path / "case", assets, trained, monkeypatch)
    c.tmp.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SENSEFLOW_PREFLIGHT_DONE", raising=False)
    yield c
    monkeypatch.undo()
    for undo in reversed(c.cleanups):
        undo()


def test_the_table_has_every_kind_of_bad_input():
    kinds = {c.id.split("/")[0] for c in CASES}
    assert kinds == {"flags", "config", "paths", "data", "ckpt", "folder"}
    assert len(CASES) >= 70 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("row", CASES, ids=[c.id for c in CASES])
def test_a_bad_input_is_one_line_exit_2_before_any_network_and_changes_nothing(row: Case, ctx: Ctx, capsys):
    argv, needles = row.build(ctx)
    assert argv, "the row built no command"
    before = snapshot(ctx.tmp.parent, ctx.assets)
    capsys.readouterr()
    _no_network(ctx.monkeypatch)
    rc = senseflow_main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    missing = [n for n in needles if n not in err]
    assert not missing, f"{missing} not in: {err}"
    assert snapshot(ctx.tmp.parent, ctx.assets) == before, "the refused command changed files"


# ---- what passes the door ----------------------------------------------------------------------------------------

def test_preflight_passes_a_good_new_run_and_a_good_resume_writing_nothing(ctx: Ctx, capsys):
    for argv, said in ((ctx.train(flags=("--preflight",)), f"starts fresh in {ctx.fresh()}"),
                       (ctx.train(save=ctx.run(), flags=("--preflight",)), f"resumes from {ctx.ckpt()}")):
        before = snapshot(ctx.tmp, ctx.assets)
        _no_network(ctx.monkeypatch)
        capsys.readouterr()
        assert senseflow_main(argv) == 0
        out = capsys.readouterr().out
        assert out.startswith("pre-flight passed:") and said in out, out
        assert snapshot(ctx.tmp, ctx.assets) == before
    assert not ctx.fresh().exists()


def test_the_guard_catches_a_network_load(ctx: Ctx):
    """The rows' guard is real: a good command gets past the pre-flight and its first network load fails."""
    _no_network(ctx.monkeypatch)
    with pytest.raises(AssertionError, match="a network was loaded"):
        senseflow_main(ctx.train())


def test_a_checkpoint_that_dcp_cannot_read_into_the_setup_is_one_line_too(ctx: Ctx, capsys, monkeypatch):
    """Past the pre-flight (as the torchrun workers are once tools/launch.sh ran it), a resume with EMA newly
    enabled fails inside DCP, whose ``CheckpointException`` is not an ``Exception``: still one line, exit 2, and the
    run's config.yaml is kept."""
    run = ctx.run()
    config_before = (run / "config.yaml").read_bytes()
    monkeypatch.setenv("SENSEFLOW_PREFLIGHT_DONE", "1")
    capsys.readouterr()
    assert senseflow_main(ctx.resume("train.ema.enabled=true")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Missing key in checkpoint state_dict: extra/ema." in err, err
    assert (run / "config.yaml").read_bytes() == config_before
    assert not (run / LOCK_NAME).exists()


def test_a_run_writes_its_files_with_the_users_umask(trained: Path):
    """Weights, configs, metrics and checkpoint files get 0666 minus the umask the run had (027 here)."""
    ckpt = trained / "checkpoints" / "iter_000001"
    files = [trained / "config.yaml", trained / "metrics.jsonl", trained / "checkpoints" / "latest",
             *sorted(p for p in ckpt.iterdir() if p.is_file())]
    assert ckpt / "student.safetensors" in files
    modes = {str(f.relative_to(trained)): oct(stat.S_IMODE(f.stat().st_mode)) for f in files}
    assert set(modes.values()) == {oct(0o666 & ~UMASK)}, modes


def test_the_readme_build_lmdb_example_parses():
    from senseflow.data.cli import build_parser

    line = next(ln for ln in (REPO / "README.md").read_text().splitlines() if "senseflow data build-lmdb" in ln)
    command = line[line.index("`senseflow data") + 1:].split("`")[0].split()
    args = build_parser().parse_args(command[2:])
    assert args.command == "build-lmdb" and args.batch_size > 0


# ---- through the launcher scripts --------------------------------------------------------------------------------

def _launch(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = _env({"PYTHON": sys.executable})
    env.pop("SENSEFLOW_PREFLIGHT_DONE", None)
    return subprocess.run(["sh", str(REPO / script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


LAUNCHED = {
    "usage": lambda c: (("exp_sdxl/train_sdxl_senseflow.sh", "1", "1"), ["usage"]),
    "unknown-key": lambda c: (("exp_sdxl/train_sdxl_senseflow.sh", "1", "1", str(config_path("sdxl_senseflow")),
                               str(c.fresh()), "train.lrr=1"), ["train.lrr"]),
    "ema-newly-enabled": lambda c: (("exp_flux/train_flux_senseflow.sh", "1", "1", str(CONFIG), str(c.run()),
                                     *asset_overrides(c.assets, TRAINER), *RUN, "train.ema.enabled=true"),
                                    ["train.ema.enabled=false"]),
}


@pytest.mark.parametrize("name", sorted(LAUNCHED))
def test_through_the_launcher_a_bad_input_is_one_line_exit_2(name: str, ctx: Ctx):
    args, needles = LAUNCHED[name](ctx)
    before = snapshot(ctx.tmp)
    proc = _launch(*args, cwd=ctx.tmp)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("\n") == 1 and all(n in proc.stderr for n in needles), proc.stderr[-3000:]
    assert "torchrun" not in proc.stderr and proc.stdout == ""
    assert snapshot(ctx.tmp) == before


def test_any_other_dcp_failure_in_the_trainer_is_one_line(ctx: Ctx, capsys, monkeypatch):
    """DCP's ``CheckpointException`` (a ``BaseException``) from anywhere in a run ends in one line and exit 2."""
    from torch.distributed.checkpoint.api import CheckpointException

    from senseflow.trainer import get_trainer

    def fail(self) -> None:
        raise CheckpointException("CheckpointException ranks:dict_keys([0])\nTraceback ...",
                                  {0: (OSError(28, "No space left on device"), None)})

    monkeypatch.setattr(get_trainer(TRAINER), "run", fail)
    capsys.readouterr()
    assert senseflow_main(ctx.train()) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--save_path {ctx.fresh()}" in err and "No space left on device" in err, err

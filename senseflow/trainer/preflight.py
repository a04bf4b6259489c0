"""Pre-flight of ``senseflow train``: every check that needs no network, before anything is loaded or written.

:func:`preflight` runs, in this order, and stops at the first problem with :class:`PreflightError` (a
``ValueError`` whose message is one line naming the file, key or flag, and what would proceed):

1. **config**: the trainer runs this config (``teacher.family``, ``method.name``), ``optimizer.name``'s package
   is installed and the guidance kinds fit the teacher folder
   (:func:`senseflow.models.families.check_guidance_kinds`, from its ``config.json``). The config itself is
   loaded, validated and its paths checked before (:func:`senseflow.config.load_config`,
   :func:`senseflow.config.validate_paths`);
2. **data set**: an LMDB's latent size against the teacher's VAE config
   (:func:`senseflow.data.lmdb_latents.check_latents_fit_teacher`) and the cheap start-up check the trainer runs too
   (:func:`senseflow.data.check.quick_check`: format, structure, record count and a few samples fully read); with
   ``data.text_cache``, the cache is complete and not stale for this config
   (:func:`senseflow.data.text_cache.check_text_cache`: its index and the caption list, no tensor);
3. **save folder**: ``--save_path`` is a folder that exists and is writable, or can be created (its nearest existing
   parent is a writable folder); the entries the run writes into (``checkpoints/``, ``previews/``, ``tensorboard/``,
   ``metrics.jsonl``) are writable where they exist; no live process holds the folder's lock
   (:func:`senseflow.trainer.run_lock.check_run_lock`, read-only);
4. **checkpoint**: when ``checkpoints/latest`` exists, it is readable and names a complete checkpoint of this run
   whose files match the digest the run recorded (the same check resume makes, in one process: every file is read
   once);
5. **compatibility**: the checkpoint fits the config. The setup it was written with is its own ``config.yaml``
   (recorded in the digest, read as plain YAML): the parts it holds (G's EMA with ``train.ema.enabled``, the
   discriminator heads with ``method.gan.enabled``) and the settings that shape its networks and optimiser state
   (:data:`SHAPE_KEYS`) must allow the config's; and every tensor of its generator (from its
   ``student.safetensors`` header, JSON) must have the shape the teacher (or ``teacher.student_path``) gives it. A
   mismatch names the keys that differ and the overrides that would resume, or says to use a new save folder.

Nothing is written and no network is loaded. DCP's ``.metadata`` (a pickle) is never opened here.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from senseflow.trainer.checkpoint import Checkpointer, CheckpointRefused

__all__ = ["PreflightError", "Preflight", "preflight", "SHAPE_KEYS", "PART_SWITCHES"]

#: config keys that shape a checkpoint's networks or optimiser state: a resume must keep them as they were. A key
#: under ``discriminator.`` matters only while the GAN is on (then and now).
SHAPE_KEYS = (
    "teacher.family",
    "method.name",
    "method.dmd2_cls.enabled",
    "model.lora.student.rank",  # a LoRA player's checkpoint parts hold its adapter only (docs/method.md §3.8)
    "model.lora.student.target_modules",
    "model.lora.fake.rank",
    "model.lora.fake.target_modules",
    "optimizer.name",
    "discriminator.hooks",
    "discriminator.hook_patch",
    "discriminator.cmap_dim",
    "discriminator.downsample",
    "discriminator.kernel_size",
)
#: switches that add a part to a checkpoint (a part's name in the DCP checkpoint: see
#: :func:`senseflow.trainer.checkpoint.player_parts`): switched on now, off when the checkpoint was written, the
#: checkpoint lacks the part. Switched off now, the part is simply not read.
PART_SWITCHES = {"train.ema.enabled": "EMA weights (part extra/ema)",
                 "method.gan.enabled": "discriminator heads (parts model/disc_heads, optim/disc_heads)"}
#: what the trainer writes into a run folder: folders, then files appended to in place
_RUN_FOLDERS = ("checkpoints", "previews", "tensorboard")
_RUN_FILES = ("metrics.jsonl",)
_NEW_FOLDER = "or start a new run with another --save_path"


class PreflightError(ValueError):
    """A problem found before anything is loaded; the message is one line."""


@dataclass(frozen=True)
class Preflight:
    """What the checks found: the data set's size and the checkpoint a run would resume from (None: a new run)."""

    records: int
    resume_from: Path | None

    def summary(self, save_path: str | os.PathLike) -> str:
        start = f"resumes from {self.resume_from}" if self.resume_from else f"starts fresh in {save_path}"
        return f"pre-flight passed: {self.records} data records; the run {start}"


def preflight(cfg: Any, save_path: str | os.PathLike, trainer: str | None = None) -> Preflight:
    """Run every network-free check of ``senseflow train`` (module docstring) for ``cfg`` (loaded, validated, paths
    checked) and ``save_path``; ``trainer``: the ``--trainer`` name (checked against the config when given)."""
    run_dir = Path(save_path)
    _check_config(cfg, trainer)
    records = _check_data(cfg)
    _check_text_cache(cfg)
    _check_folders(run_dir)
    checkpoint = _check_latest(cfg, run_dir)
    if checkpoint is not None:
        _check_compatible(cfg, checkpoint)
    return Preflight(records, checkpoint)


# ---- 1. config ---------------------------------------------------------------------------------------------------

def _check_config(cfg: Any, trainer: str | None) -> None:
    from senseflow.method.optim import require_optimizer_backend
    from senseflow.models.families import check_guidance_kinds
    from senseflow.trainer import get_trainer

    if trainer is not None:
        cls = get_trainer(trainer)
        family, method = getattr(cls, "family_name", None), getattr(cls, "method_name", None)
        if family is not None and cfg.teacher.family != family:
            raise PreflightError(f"--trainer {trainer} distils teacher.family={family}, the config has "
                                 f"teacher.family={cfg.teacher.family}: choose the trainer of that family")
        if method is not None and cfg.method.name != method:
            raise PreflightError(f"--trainer {trainer} runs method.name={method}, the config has method.name="
                                 f"{cfg.method.name}: choose the trainer of that method")
    require_optimizer_backend(str(cfg.optimizer.name))
    try:
        check_guidance_kinds(cfg)  # reads the teacher's denoiser config.json only
    except ValueError as err:
        raise PreflightError(_one_line(err)) from None


# ---- 2. data set -------------------------------------------------------------------------------------------------

def _check_data(cfg: Any) -> int:
    from senseflow.data.check import quick_check_section
    from senseflow.data.lmdb_latents import check_latents_fit_teacher, teacher_vae_factor

    try:
        check_latents_fit_teacher(cfg)  # an LMDB's latent size against the teacher's vae/config.json
        return quick_check_section(cfg.data, teacher_vae_factor(str(cfg.teacher.path)))
    except (FileNotFoundError, ValueError) as err:  # DataError, a bad data.kind
        line = _one_line(err)
        raise PreflightError(line if line.startswith("data.path") else f"data.path: {line}") from None


def _check_text_cache(cfg: Any) -> None:
    """``data.text_cache``, when set, is a complete cache of this config (its index only, docs/method.md §13.5)."""
    if cfg.data.text_cache is None:
        return
    from senseflow.data.text_cache import check_text_cache

    try:
        check_text_cache(cfg)
    except (FileNotFoundError, ValueError) as err:
        raise PreflightError(_one_line(err)) from None


# ---- 3. save folder ----------------------------------------------------------------------------------------------

def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def _check_folders(run_dir: Path) -> None:
    from senseflow.trainer.run_lock import check_run_lock

    flag = f"--save_path {run_dir}"
    if not run_dir.exists():
        if run_dir.is_symlink():
            raise PreflightError(f"{flag} is a broken symbolic link")
        parent = run_dir.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise PreflightError(f"{flag} cannot be created: {parent} is a file, not a folder")
        if not _writable(parent):
            raise PreflightError(f"{flag} cannot be created: {parent} is not writable")
        return
    if not run_dir.is_dir():
        raise PreflightError(f"{flag} is a file, not a folder: choose a folder for the run")
    if not _writable(run_dir):
        raise PreflightError(f"{flag} is not writable")
    for name in _RUN_FOLDERS:
        entry = run_dir / name
        if entry.exists() and not entry.is_dir():
            raise PreflightError(f"{entry} is a file; the run writes a folder there: move it away, {_NEW_FOLDER}")
        if entry.is_dir() and not _writable(entry):
            raise PreflightError(f"{entry} is not writable (the run writes into it)")
    for name in _RUN_FILES:
        entry = run_dir / name
        if entry.is_dir():
            raise PreflightError(f"{entry} is a folder; the run appends to a file there: move it away, {_NEW_FOLDER}")
        if entry.exists() and not os.access(entry, os.W_OK):
            raise PreflightError(f"{entry} is not writable (the run appends to it)")
    check_run_lock(run_dir)


# ---- 4. checkpoints/latest ---------------------------------------------------------------------------------------

def _complete_checkpoints(root: Path) -> list[str]:
    """Names of the checkpoints in ``root`` that have a digest record, oldest first."""
    from senseflow.trainer.checkpoint import digest_path

    try:
        return sorted(p.name for p in root.glob("iter_*") if p.is_dir() and digest_path(p).is_file())
    except OSError:
        return []


def _repair_hint(root: Path, refused: str | None = None) -> str:
    """What would proceed when ``latest`` cannot be used: name another checkpoint in it, or a new save folder."""
    others = [name for name in _complete_checkpoints(root) if name != refused]
    if others:
        return f"write {others[-1]} (the newest other checkpoint with a digest record) into {root / 'latest'}, " \
               f"{_NEW_FOLDER}"
    return f"start a new run with another --save_path (no other checkpoint with a digest record is in {root})"


def _check_latest(cfg: Any, run_dir: Path) -> Path | None:
    ck = Checkpointer(run_dir, int(cfg.train.keep_last), rank=0)
    pointer = ck.root / "latest"
    if not pointer.exists() and not pointer.is_symlink():
        return None
    if not pointer.is_file():
        raise PreflightError(f"{pointer} is not a file naming a checkpoint: {_repair_hint(ck.root)}")
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise PreflightError(f"cannot read {pointer} ({_one_line(err)}): {_repair_hint(ck.root)}") from None
    if not name:
        raise PreflightError(f"{pointer} is empty; it names the checkpoint to resume from: {_repair_hint(ck.root)}")
    if "/" not in name and name not in (".", "..") and not (ck.root / name).exists():
        raise PreflightError(f"{pointer} names {name}, which does not exist in {ck.root}: {_repair_hint(ck.root)}")
    try:
        path = ck.latest()
        if path is None:
            return None
        ck.verify(path)
    except CheckpointRefused as err:
        raise PreflightError(f"{_one_line(err)}; {_repair_hint(ck.root, refused=name)}") from None
    return path


# ---- 5. compatibility --------------------------------------------------------------------------------------------

def _get(tree: Any, key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else getattr(tree, part, None)
        if tree is None:
            return None
    return tree


def _yaml(value: Any) -> str:
    """A value as a ``key=value`` override writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_yaml(v) for v in value) + "]"
    return str(value)


def _checkpoint_config(checkpoint: Path) -> dict[str, Any] | None:
    """The resolved config the checkpoint was written with (plain YAML, verified with the digest), or None."""
    import yaml

    try:
        data = yaml.safe_load((checkpoint / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _setup_differences(cfg: Any, written: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, checkpoint's value, config's value)`` of every setting that keeps the checkpoint from this config."""
    out: list[tuple[str, Any, Any]] = []
    for key in PART_SWITCHES:
        had, has = bool(_get(written, key)), bool(_get(cfg, key))
        if has and not had:
            out.append((key, had, has))
    gan = bool(_get(written, "method.gan.enabled")) and bool(_get(cfg, "method.gan.enabled"))
    for key in SHAPE_KEYS:
        if key.startswith("discriminator.") and not gan:
            continue
        then, now = _get(written, key), _get(cfg, key)
        if isinstance(then, list) or isinstance(now, (list, tuple)):
            then, now = list(then or []), list(now or [])
        if then is not None and then != now:
            out.append((key, then, now))
    return out


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """``{tensor name: shape}`` from a safetensors file's JSON header (no tensor is read); {} when unreadable."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > path.stat().st_size:
                return {}
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError):
        return {}
    if not isinstance(header, dict):
        return {}
    return {k: list(v["shape"]) for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("shape"), list)}


def _source_shapes(cfg: Any) -> tuple[str, Path, dict[str, list[int]]]:
    """The key that sets G's initial weights, its folder and ``{name: shape}`` of its denoiser weights."""
    from senseflow.models.families import get_family

    sub = str(get_family(str(cfg.teacher.family)).denoiser_subfolder)
    if cfg.teacher.student_path is not None:
        key, root = "teacher.student_path", Path(str(cfg.teacher.student_path)).expanduser()
        folder = root / sub if (root / sub / "config.json").is_file() else root
    else:
        key, folder = "teacher.path", Path(str(cfg.teacher.path)) / sub
    shapes: dict[str, list[int]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        shapes.update(_safetensors_shapes(file))
    return key, folder, shapes


def _check_compatible(cfg: Any, checkpoint: Path) -> None:
    written = _checkpoint_config(checkpoint)
    if written is not None:
        diffs = _setup_differences(cfg, written)
        if diffs:
            said = ", ".join(f"{k}={_yaml(then)} (the config has {_yaml(now)})" for k, then, now in diffs)
            lacks = [PART_SWITCHES[k] for k, _, _ in diffs if k in PART_SWITCHES]
            holds = f"; it holds no {' and no '.join(lacks)}" if lacks else ""
            fix = " ".join(f"{k}={_yaml(then)}" for k, then, _ in diffs)
            raise PreflightError(f"checkpoint {checkpoint} was written with {said}{holds}: resume with {fix}, "
                                 f"{_NEW_FOLDER}")
    elif bool(cfg.train.ema.enabled) and not (checkpoint / "student_ema.safetensors").is_file():
        raise PreflightError(f"checkpoint {checkpoint} holds no {PART_SWITCHES['train.ema.enabled']} but "
                             f"train.ema.enabled=true: resume with train.ema.enabled=false, {_NEW_FOLDER}")
    saved = _safetensors_shapes(checkpoint / "student.safetensors")
    if not saved:
        return
    key, folder, source = _source_shapes(cfg)
    if not source:
        return
    missing = [k for k in saved if k not in source]
    differ = [k for k in saved if k in source and source[k] != saved[k]]
    if not missing and not differ:
        return
    shown = [f"{k} is {'x'.join(map(str, saved[k]))} in the checkpoint, {'x'.join(map(str, source[k]))} in {folder}"
             for k in differ[:2]]
    shown += [f"{k} is not in {folder}" for k in missing[: max(0, 2 - len(shown))]]
    more = len(missing) + len(differ) - len(shown)
    raise PreflightError(
        f"checkpoint {checkpoint} holds a generator of another shape than {key} gives: {'; '.join(shown)}"
        + (f" (and {more} more)" if more > 0 else "")
        + f"; resume with the {key} that started this run, {_NEW_FOLDER}"
    )


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__

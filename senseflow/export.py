"""Export a distilled student as a complete diffusers folder for the stock pipeline (docs/method.md §16, §20.6).

``senseflow export --teacher DIR --checkpoint CKPT --family {sdxl,sd3,flux} --out DIR [--steps 4]`` writes

* every component of the teacher folder (hard-linked where the file system allows, else copied), except
* the denoiser: the student G_θ in ``transformer/`` or ``unet/`` (``save_pretrained``, safetensors; FLUX with
  ``guidance_embeds=false``, decision 4),
* a scheduler with which the stock pipeline runs *our* Euler sampler x ← x + (τ_{k+1} − τ_k)·v on our anchors
  (the family's ``export_scheduler_config`` and ``export_pipeline_kwargs``; anchors from
  :mod:`senseflow.core.anchors`, as the inference scripts use them):

  - FLUX: the teacher's ``FlowMatchEulerDiscreteScheduler`` (dynamic shift) unchanged; ``FluxPipeline`` with
    ``num_inference_steps=N`` uses σ_k = shift_μ(1 − k/N), μ from the image-token count, our anchors; no guidance;
  - SD3.5: the teacher's ``FlowMatchEulerDiscreteScheduler`` (shift 3) unchanged; pass ``sigmas=[1 − k/N]``
    (shift 3 gives 1, .9, .75, .5 for N = 4), ``guidance_scale=1`` and ``max_sequence_length=77`` (the training T5
    length);
  - SDXL: an ``EulerDiscreteScheduler`` with the teacher's β (``timestep_spacing="leading"`` so that the initial
    latent is ε itself, as in training); pass ``timesteps=[999, 749, 499, 249]`` and ``guidance_scale=0``. Euler in
    σ-space on ε-predictions is the DDIM move of our sampler (ᾱ_{−1} := 1 at the end).

* ``README.md`` with the exact pipeline call and ``senseflow_export.json`` (family, steps, anchors, pipeline
  keyword arguments, source checkpoint).

The folder is written under a temporary name beside ``--out`` and renamed when complete; a non-empty ``--out`` is
refused (exit 2) unless ``--overwrite``.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from senseflow.checkpoint_io import (
    check_student_keys,
    checked_student_config,
    load_student,
    read_json,
    resolve_student_source,
)
from senseflow.core.dtypes import CLI_DTYPES as _DTYPES
from senseflow.inference import UsageError, UsageParser, check_teacher_folder
from senseflow.models.families import family_names, get_family
from senseflow.quiet import quiet_libraries

__all__ = ["pipeline_kwargs", "readme_text", "export", "main_export"]



def _family(family: str) -> Any:
    """The registered family ``family`` (its registry name; aliases are refused as before)."""
    if family not in family_names():
        raise ValueError(f"unknown family {family!r} (expected one of {', '.join(family_names())})")
    return get_family(family)


def pipeline_kwargs(family: str, steps: int) -> dict[str, Any]:
    """Keyword arguments with which the stock pipeline reproduces our N-step Euler sampler on the exported folder."""
    return _family(family).export_pipeline_kwargs(steps)


def readme_text(family: str, steps: int, out_name: str, source: str) -> str:
    """README.md of an exported folder: what it holds and the exact pipeline call."""
    fam = _family(family)
    pipe = fam.pipeline_class_name
    kwargs = pipeline_kwargs(family, steps)
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    notes = fam.export_readme_note
    return f"""# SenseFlow {steps}-step student ({family})

Exported by `senseflow export` from `{source}`. This folder is a complete diffusers pipeline: the teacher's text
encoders, tokenizers and VAE, and the distilled student in `{fam.denoiser_subfolder}/`.

```python
import torch
from diffusers import {pipe}

pipe = {pipe}.from_pretrained("{out_name}", torch_dtype=torch.bfloat16).to("cuda")
image = pipe("a photo of a red fox in the snow", {args}).images[0]
image.save("fox.png")
```

{notes}

This call runs the deterministic Euler sampler ("Ours (Euler)", SenseFlow's docs/method.md §16.3). The stochastic
sampler ("Ours") re-noises between steps: run the SenseFlow inference script with this folder as both the teacher
folder and `--checkpoint` (its default `--sampler` is `stochastic`).
"""


# ---- writing ------------------------------------------------------------------------------------------------

def _link_or_copy(src: Path, dst: Path, copy: bool) -> None:
    if not copy:
        try:
            os.link(src, dst)
            return
        except OSError:  # cross-device, unsupported file system, ...
            pass
    shutil.copy2(src, dst)


def _copy_tree(src: Path, dst: Path, skip: set[str], copy: bool) -> None:
    """Mirror ``src`` into ``dst`` (files hard-linked unless ``copy``), leaving out top-level names in ``skip``."""
    for root, dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        if rel == Path("."):
            dirs[:] = [d for d in dirs if d not in skip]
            files = [f for f in files if f not in skip]
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            _link_or_copy(Path(root) / f, dst / rel / f, copy)


def _publish_permissions(root: Path) -> None:
    """Give the finished folder the permissions of a normally created one (``mkdtemp`` makes it 0700, and some
    writers create 0600 files): folders 0777 and files 0666, minus the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(Path(dirpath) / d, 0o777 & ~umask)
        for f in filenames:
            path = Path(dirpath) / f
            if path.stat().st_nlink == 1:  # never change a hard-linked teacher file
                os.chmod(path, 0o666 & ~umask)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out`` (an existing ``out`` is moved aside first, then deleted)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export(
    teacher: Path | str,
    checkpoint: Path | str,
    family: str,
    out: Path | str,
    steps: int = 4,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    copy: bool = False,
) -> Path:
    """Write the exported folder (see the module docstring); returns ``out``. Inputs are checked before any
    weight is read; raises FileExistsError / FileNotFoundError / ValueError."""
    if family not in family_names():
        raise ValueError(f"--family {family!r} is unknown (expected one of: {', '.join(family_names())})")
    if steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    fam = get_family(family)
    call_kwargs = fam.export_pipeline_kwargs(steps)
    teacher, out = Path(teacher), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
    if out.resolve() == teacher.resolve():
        raise ValueError("--out must differ from --teacher")
    index = check_teacher_folder(teacher, fam.name)
    sub = fam.denoiser_subfolder
    cfg_path = teacher / sub / "config.json"
    config = checked_student_config(cfg_path, fam, f"--family {family} needs a {fam.denoiser_class_name}")
    teacher_sched = read_json(teacher / "scheduler" / "scheduler_config.json")
    sched = fam.export_scheduler_config(teacher_sched)
    source = resolve_student_source(checkpoint)
    check_student_keys(source, config, fam, f"the {family} student ({cfg_path})")

    quiet_libraries()
    student = load_student(source, config, dtype=dtype, ignore_prefixes=fam.student_ignore_prefixes,
                           fallback_class=fam.denoiser_class_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _copy_tree(teacher, tmp, skip={sub, "scheduler", "README.md", "senseflow_export.json"}, copy=copy)
        student.save_pretrained(tmp / sub, safe_serialization=True)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2, sort_keys=True) + "\n")
        if sched != teacher_sched:  # a replaced scheduler (SDXL): model_index.json names its class
            index = dict(index, scheduler=["diffusers", sched["_class_name"]])
            (tmp / "model_index.json").unlink(missing_ok=True)  # a hard link: never write through it
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        meta = {
            "family": family,
            "steps": steps,
            "pipeline": fam.pipeline_class_name,
            "pipeline_kwargs": call_kwargs,
            "checkpoint": str(checkpoint),
            "teacher": str(teacher),
        }
        (tmp / "senseflow_export.json").write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "README.md").write_text(readme_text(family, steps, str(out.resolve()), str(checkpoint)))
        _publish_permissions(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main_export(argv: Sequence[str] | None = None) -> int:
    """``senseflow export``: returns 0, or 2 with a one-line error on stderr for bad input."""
    p = UsageParser(prog="senseflow export", description="Write a distilled student as a complete diffusers folder "
                "(teacher components + student + a scheduler that reproduces the SenseFlow Euler sampler).")
    p.add_argument("--teacher", required=True, help="the teacher's local diffusers folder")
    p.add_argument("--checkpoint", required=True,
                   help="student: .pth, .safetensors, a training checkpoint folder (DCP) or a diffusers folder")
    p.add_argument("--family", required=True, help=f"one of {', '.join(family_names())}")
    p.add_argument("--out", required=True, help="output folder (must be empty or absent unless --overwrite)")
    p.add_argument("--steps", type=int, default=4,
                   help="number of sampling steps written into the README call (default 4)")
    p.add_argument("--dtype", default="auto",
                   help="weights of the exported student: auto (as stored), fp32, bf16, fp16")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--copy", action="store_true", help="copy the teacher's files instead of hard-linking them")
    try:
        args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
        if args.dtype not in _DTYPES:
            raise UsageError(f"--dtype {args.dtype!r} is not one of {', '.join(_DTYPES)}")
        out = export(args.teacher, args.checkpoint, args.family, args.out, steps=args.steps, overwrite=args.overwrite,
                     dtype=_DTYPES[args.dtype], copy=args.copy)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except (UsageError, FileExistsError, FileNotFoundError, ValueError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"senseflow export: error: {msg}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main_export())

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

With ``--lora-rank R`` the folder holds the student as a LoRA on the teacher instead of the full weights
(:mod:`senseflow.lora_export`: truncated SVD of W_student − W_teacher per linear and convolution layer):
``pytorch_lora_weights.safetensors`` for ``<Pipeline>.from_pretrained(teacher).load_lora_weights(folder)``,
``lora_report.json`` (relative error per layer and overall), the exported scheduler config when it differs from the
teacher's (SDXL), ``senseflow_export.json`` and a README with that call. Changed parameters that the family's LoRA
loader cannot take (e.g. normalisation weights of SDXL and SD3.5) are refused unless ``--lora-drop-rest``.

The folder is written under a temporary name beside ``--out`` and renamed when complete; a non-empty ``--out`` is
refused (exit 2) unless ``--overwrite``.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from senseflow.checkpoint_io import (
    StudentSource,
    check_keys,
    check_student_keys,
    checked_student_config,
    checkpoint_shapes,
    empty_model,
    load_student,
    read_json,
    read_state_dict,
    resolve_student_source,
)
from senseflow.core.dtypes import CLI_DTYPES as _DTYPES
from senseflow.inference import UsageError, UsageParser, check_teacher_folder
from senseflow.lora_export import (
    LORA_REPORT_NAME,
    LORA_WEIGHT_NAME,
    adapter_extraction,
    extra_full_keys,
    extract_lora,
    lora_state_dict,
    teacher_tensors,
    trained_adapter_file,
    unfusable_layers,
    write_lora,
)
from senseflow.models.families import family_names, get_family
from senseflow.quiet import quiet_libraries

__all__ = ["pipeline_kwargs", "readme_text", "lora_readme_text", "export", "main_export"]


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


def lora_readme_text(
    family: str,
    steps: int,
    out_name: str,
    source: str,
    teacher: str,
    overrides: dict[str, Any],
    scheduler_class: str | None,
    summary: str,
    unfusable: Sequence[str] = (),
) -> str:
    """README.md of a LoRA export: the stock call that loads the teacher and this LoRA.

    ``overrides``: config values of the student's denoiser that differ from the teacher's (FLUX.1-dev: no guidance
    embedding), which the call passes when it loads the teacher's denoiser; ``scheduler_class``: the class of the
    folder's ``scheduler/`` when the export replaces the teacher's scheduler (SDXL), else ``None``; ``unfusable``:
    layers whose LoRA carries a bias that their base lacks (``fuse_lora`` is then not possible)."""
    fam = _family(family)
    pipe, sub, denoiser = fam.pipeline_class_name, fam.denoiser_subfolder, fam.denoiser_class_name
    args = ", ".join(f"{k}={v!r}" for k, v in pipeline_kwargs(family, steps).items())
    imports = [pipe]
    lines = []
    if overrides:
        imports.append(denoiser)
        extra = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
        lines.append(f'{sub} = {denoiser}.from_pretrained(teacher, subfolder="{sub}", {extra}, '
                     "torch_dtype=torch.bfloat16)")
        lines.append(f"pipe = {pipe}.from_pretrained(teacher, {sub}={sub}, torch_dtype=torch.bfloat16).to(\"cuda\")")
    else:
        lines.append(f'pipe = {pipe}.from_pretrained(teacher, torch_dtype=torch.bfloat16).to("cuda")')
    lines.append(f'pipe.load_lora_weights("{out_name}")')
    if scheduler_class:
        imports.append(scheduler_class)
        lines.append(f'pipe.scheduler = {scheduler_class}.from_pretrained("{out_name}", subfolder="scheduler")')
    call = "\n".join(lines)
    why = ""
    if overrides:
        why += (f"\nThe student's `{sub}` differs from the teacher's config in {', '.join(sorted(overrides))}; "
                f"loading the teacher's `{sub}` with these values drops the weights the student does not have.\n")
    if scheduler_class:
        why += ("\n`scheduler/` holds the scheduler with which the pipeline runs the SenseFlow Euler sampler on the "
                "training anchors.\n")
    fuse = ""
    if unfusable:
        fuse = (f"\nThis LoRA stores bias changes as `lora_B` biases, and layers without a bias of their own "
                f"({len(unfusable)}, e.g. `{unfusable[0]}`) cannot take them into their weights: use it unfused "
                "(`pipe.fuse_lora()` is not possible).\n")
    return f"""# SenseFlow {steps}-step student ({family}) as a LoRA

Exported by `senseflow export --lora-rank` from `{source}`: the student's difference from the teacher
`{teacher}`, factorised by a truncated SVD per layer into `{LORA_WEIGHT_NAME}`
(diffusers format). `{LORA_REPORT_NAME}` lists the relative error of every layer:

    {summary}

```python
import torch
from diffusers import {", ".join(imports)}

teacher = "{teacher}"
{call}
image = pipe("a photo of a red fox in the snow", {args}).images[0]
image.save("fox.png")
```
{why}{fuse}
{fam.export_readme_note}
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


@contextlib.contextmanager
def _staged_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` to write the export into: on success its files get the user's umask and
    it replaces ``out`` (:func:`_replace_dir`); on any failure it is removed and ``out`` is untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _publish_permissions(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export(
    teacher: Path | str,
    checkpoint: Path | str,
    family: str,
    out: Path | str,
    steps: int = 4,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    copy: bool = False,
    lora_rank: int | None = None,
    lora_drop_rest: bool = False,
) -> Path:
    """Write the exported folder (see the module docstring); returns ``out``. With ``lora_rank`` the folder holds a
    LoRA of that rank instead of the full student (:func:`_write_lora_folder`). Inputs are checked before any
    weight is read (a LoRA export then refuses changed parameters its file cannot hold, before writing anything);
    raises FileExistsError / FileNotFoundError / ValueError."""
    if family not in family_names():
        raise ValueError(f"--family {family!r} is unknown (expected one of: {', '.join(family_names())})")
    if steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    if lora_rank is not None and lora_rank < 1:
        raise ValueError(f"--lora-rank must be a positive integer, got {lora_rank}")
    if lora_drop_rest and lora_rank is None:
        raise ValueError("--lora-drop-rest applies to a LoRA export only: pass --lora-rank too")
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
    if lora_rank is not None:
        teacher_keys = checkpoint_shapes(StudentSource("diffusers", teacher / sub))
        expected = {k: tuple(v.shape) for k, v in empty_model(config, fam.denoiser_class_name).state_dict().items()}
        check_keys(expected, teacher_keys, f"the {family} student ({cfg_path})", fam.student_ignore_prefixes)
        return _write_lora_folder(teacher, checkpoint, source, fam, config, teacher_sched, sched, out, steps, dtype,
                                  lora_rank, lora_drop_rest)

    quiet_libraries()
    student = load_student(source, config, dtype=dtype, ignore_prefixes=fam.student_ignore_prefixes,
                           fallback_class=fam.denoiser_class_name)
    with _staged_folder(out) as tmp:
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
    return out


def _write_lora_folder(
    teacher: Path,
    checkpoint: Path | str,
    source: StudentSource,
    fam: Any,
    config: dict[str, Any],
    teacher_sched: dict[str, Any],
    sched: dict[str, Any],
    out: Path,
    steps: int,
    dtype: torch.dtype | None,
    rank: int,
    drop_rest: bool,
) -> Path:
    """The LoRA export (module docstring): extract, refuse what cannot be stored unless ``drop_rest``, then write
    the folder atomically like the full export."""
    import diffusers

    quiet_libraries()
    pipeline_class = getattr(diffusers, fam.pipeline_class_name)
    sub = fam.denoiser_subfolder
    model = empty_model(config, fam.denoiser_class_name)
    adapter_file = trained_adapter_file(source.path) if source.kind == "safetensors" else None
    if adapter_file is not None:  # a LoRA-trained run (docs/method.md §3.8): its own adapter, exactly
        from safetensors.torch import load_file

        extraction = adapter_extraction(model, load_file(str(adapter_file)), rank, adapter_file, dtype)
    else:
        student = read_state_dict(source)
        with teacher_tensors(teacher / sub) as teacher_tensor:
            extraction = extract_lora(model, teacher_tensor, student, rank, extra_full_keys(pipeline_class), dtype)
        del student
    if not extraction.entries:
        raise ValueError(f"--checkpoint {checkpoint} equals the teacher's {sub}: there is no change to export as a "
                         "LoRA")
    if extraction.dropped and not drop_rest:
        names = [e.name for e in extraction.dropped]
        share = extraction.overall()["dropped_share"]
        plural = "s" if len(names) != 1 else ""
        listed = ", ".join(names[:2]) + (", …" if len(names) > 2 else "")
        raise ValueError(
            f"--lora-rank: {len(names)} changed parameter{plural} cannot be stored in a {fam.pipeline_class_name} "
            f"LoRA file ({listed}; {share:.3g} of the student's change by norm): "
            "pass --lora-drop-rest to leave them out, or export the full weights without --lora-rank"
        )
    state, metadata = lora_state_dict(model, extraction)
    teacher_config = read_json(teacher / sub / "config.json")
    overrides = {k: v for k, v in fam.student_overrides.items() if teacher_config.get(k) != v}
    unfusable = unfusable_layers(model)
    summary = extraction.summary()
    with _staged_folder(out) as tmp:
        write_lora(tmp, pipeline_class, sub, state, metadata)
        scheduler_class = None
        if sched != teacher_sched:
            (tmp / "scheduler").mkdir()
            (tmp / "scheduler" / "scheduler_config.json").write_text(
                json.dumps(sched, indent=2, sort_keys=True) + "\n")
            scheduler_class = str(sched["_class_name"])
        (tmp / LORA_REPORT_NAME).write_text(json.dumps(dict(extraction.report(), summary=summary), indent=2) + "\n")
        meta = {
            "family": fam.name,
            "steps": steps,
            "pipeline": fam.pipeline_class_name,
            "pipeline_kwargs": fam.export_pipeline_kwargs(steps),
            "checkpoint": str(checkpoint),
            "teacher": str(teacher),
            "lora": {"rank": rank, "weights": LORA_WEIGHT_NAME, "denoiser_overrides": overrides,
                     "scheduler": "scheduler" if scheduler_class else None, "fusable": not unfusable},
        }
        (tmp / "senseflow_export.json").write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "README.md").write_text(lora_readme_text(
            fam.name, steps, str(out.resolve()), str(checkpoint), str(teacher.resolve()), overrides, scheduler_class,
            summary, unfusable))
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
    p.add_argument("--lora-rank", type=int, default=None, metavar="R",
                   help="write the student as a rank-R LoRA on the teacher (truncated SVD of its difference from the "
                        "teacher; pytorch_lora_weights.safetensors for load_lora_weights) instead of full weights")
    p.add_argument("--lora-drop-rest", action="store_true",
                   help="with --lora-rank: leave out changed parameters the LoRA file cannot hold (e.g. norm weights; "
                        "listed in lora_report.json) instead of refusing")
    try:
        args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
        if args.dtype not in _DTYPES:
            raise UsageError(f"--dtype {args.dtype!r} is not one of {', '.join(_DTYPES)}")
        out = export(args.teacher, args.checkpoint, args.family, args.out, steps=args.steps, overwrite=args.overwrite,
                     dtype=_DTYPES[args.dtype], copy=args.copy, lora_rank=args.lora_rank,
                     lora_drop_rest=args.lora_drop_rest)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except (UsageError, FileExistsError, FileNotFoundError, ValueError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"senseflow export: error: {msg}", file=sys.stderr)
        return 2
    if args.lora_rank is not None:
        print(read_json(out / LORA_REPORT_NAME)["summary"])
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main_export())

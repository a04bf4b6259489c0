"""Few-step text-to-image inference with a distilled student (docs/method.md §16), shared by ``scripts_*/``.

Each script is a thin wrapper: it picks an :class:`InferenceSpec` (family, flag names, allowed step counts) and calls
:func:`main`. A run

1. checks every input before any weight is read: the teacher folder (``model_index.json`` and the components it
   lists), the student config, the student checkpoint's keys against that config (safetensors header or a
   memory-mapped ``torch.load``), the prompts file, the index range, the sampler, the step count and the image size;
2. loads the teacher family's text encoders and VAE and the student G_θ (never the teacher's denoiser);
3. generates one PNG per prompt, named by its global index in the prompts file (``00007.png``), with the sampler
   of §16.3 on the anchors τ₀ > … > τ_{N−1} of N steps:

   * ``stochastic`` ("Ours"): x ← ε; for k: x̂₀ ← x0_from(G(x, τ_k)); x ← renoise(x̂₀, ε_k, τ_{k+1}); output x̂₀;
   * ``euler`` ("Ours (Euler)"): x ← ε; for k: x ← step(x, G(x, τ_k), τ_k, τ_{k+1}) with τ_N the clean end point.

Prompt i is sampled with its own generator seeded ``seed + i`` (initial noise first, then the re-noising draws), so
an image depends on its prompt index and the seed only, not on the batch size or on ``--start_idx``.

Bad input prints one line ``<script>: error: <what is wrong>`` on stderr and returns exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from senseflow.checkpoint_io import (
    StudentSource,
    check_student_keys,
    checked_student_config,
    load_student,
    read_json,
    resolve_student_source,
)
from senseflow.core import rng
from senseflow.core.anchors import make_anchors
from senseflow.core.argparsing import RaisingParser
from senseflow.core.dtypes import SHORT_NAMES, parse_dtype
from senseflow.imageio import to_pil
from senseflow.method.sampling import SAMPLERS as _SAMPLERS
from senseflow.method.sampling import get_sampler
from senseflow.models.families import family_names, get_family
from senseflow.quiet import quiet_libraries

__all__ = [
    "InferenceSpec",
    "SPECS",
    "get_spec",
    "pipeline_classes",
    "SAMPLERS",
    "UsageError",
    "UsageParser",
    "build_parser",
    "read_prompts",
    "check_teacher_folder",
    "prepare",
    "prompt_generator",
    "initial_latents",
    "student_images",
    "load_runtime",
    "generate",
    "main",
]

#: the few-step samplers of docs/method.md §16.3 (:data:`senseflow.method.sampling.SAMPLERS`)
SAMPLERS: tuple[str, ...] = tuple(_SAMPLERS)
#: the prompts file shipped at the repository root (used when the default name is not in the working directory)
DEFAULT_PROMPTS = "senseflow_test_prompts.txt"


class UsageError(ValueError):
    """A command-line problem (argparse's own errors included); printed as one line, exit code 2."""


@dataclass(frozen=True)
class InferenceSpec:
    """What distinguishes one inference script from another; everything else is shared.

    ``teacher_flag`` / ``config_flag`` (empty: not given) default to the family's ``inference_flags`` (the authors'
    flag names, README: ``--flux_ckpt`` + ``--dit_config``, ``--sdxl_ckpt`` + ``--unet_config``, ``--sd35_ckpt`` +
    ``--transformer_config``). Every fact about the model (denoiser class and subfolder, student config overrides,
    checkpoint keys to drop, allowed image sizes) comes from the teacher family (:attr:`family_class`).
    """

    family: str
    preset: str
    title: str
    teacher_flag: str = ""
    config_flag: str = ""
    default_sampler: str = "stochastic"
    default_steps: int = 4
    min_steps: int = 4
    max_steps: int = 4

    def __post_init__(self) -> None:
        teacher_flag, config_flag = self.family_class.inference_flags
        object.__setattr__(self, "teacher_flag", self.teacher_flag or teacher_flag)
        object.__setattr__(self, "config_flag", self.config_flag or config_flag)

    @property
    def family_class(self) -> Any:
        """The registered teacher family (:func:`senseflow.models.families.get_family`)."""
        return get_family(self.family)


#: one spec per script of the authors' README (§16.1); any other registered family gets :func:`get_spec`'s default
SPECS: dict[str, InferenceSpec] = {
    "flux": InferenceSpec(family="flux", preset="flux", title="SenseFlow FLUX.1-dev student", min_steps=4, max_steps=8),
    "sdxl": InferenceSpec(family="sdxl", preset="sdxl", title="SenseFlow SDXL student"),
    "sdxl-dmd2": InferenceSpec(family="sdxl", preset="sdxl", title="DMD2 SDXL student"),
    "sd35-medium": InferenceSpec(family="sd3", preset="sd35-medium", title="SenseFlow SD3.5 Medium student"),
    "sd35-large": InferenceSpec(family="sd3", preset="sd35-large", title="SenseFlow SD3.5 Large student"),
}


def get_spec(name: str) -> InferenceSpec:
    """The spec of a script (:data:`SPECS`), else the default 4-step spec of the registered family ``name``."""
    if name in SPECS:
        return SPECS[name]
    if name in family_names():
        return InferenceSpec(family=name, preset=name, title=f"SenseFlow {name} student")
    raise ValueError(f"unknown inference spec {name!r} (expected one of: {', '.join([*SPECS, *family_names()])})")


def pipeline_classes() -> dict[str, str]:
    """The stock diffusers pipeline class of every registered family (``_class_name`` of its model_index.json)."""
    return {name: get_family(name).pipeline_class_name for name in family_names()}


# ---- command line ------------------------------------------------------------------------------------------

class UsageParser(RaisingParser):
    """argparse that raises :class:`UsageError` instead of printing usage and exiting."""

    error_type = UsageError


def build_parser(spec: InferenceSpec, prog: str | None = None) -> argparse.ArgumentParser:
    """The script's arguments (the authors' names and defaults, §16.1, plus sampler / steps / seed / size)."""
    p = UsageParser(prog=prog, description=f"Generate images with a {spec.title} (one PNG per prompt, named by index).")
    p.add_argument(f"--{spec.teacher_flag}", required=True, metavar="DIR",
                   help="the teacher's local diffusers folder (text encoders, VAE, scheduler and the student config)")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="student weights: .pth ({'model': state_dict} or a state dict), .safetensors, an exported "
                        "diffusers folder (transformer/ or unet/), or a training checkpoint folder")
    p.add_argument("--output_dir", default="./outputs", help="where the PNGs go (default: ./outputs)")
    p.add_argument("--prompts_file", default=DEFAULT_PROMPTS,
                   help=f"one prompt per line, blank lines skipped (default: {DEFAULT_PROMPTS}, the repository's "
                        "23 prompts)")
    p.add_argument("--start_idx", type=int, default=0, help="index of the first prompt (default: 0)")
    p.add_argument("--num_prompts", type=int, default=23,
                   help="number of prompts (default: 23; clipped at the file end)")
    p.add_argument("--batch_size", type=int, default=1, help="prompts per forward pass (default: 1)")
    fam = spec.family_class
    default_cfg = f"<{spec.teacher_flag}>/{fam.denoiser_subfolder}/config.json"
    if fam.student_overrides:
        default_cfg += " with " + ", ".join(f"{k}={json.dumps(v)}" for k, v in fam.student_overrides.items())
    p.add_argument(f"--{spec.config_flag}", default=None, metavar="JSON",
                   help=f"student config (default: {default_cfg})")
    p.add_argument("--sampler", default=spec.default_sampler,
                   help=f"one of {', '.join(SAMPLERS)} (default: {spec.default_sampler})")
    steps_help = f"{spec.min_steps}..{spec.max_steps}" if spec.max_steps > spec.min_steps else f"{spec.min_steps}"
    p.add_argument("--steps", type=int, default=spec.default_steps,
                   help=f"number of steps ({steps_help}; default {spec.default_steps})")
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i (default: 0)")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on cuda, fp32 on cpu), fp32, bf16 or fp16")
    return p


# ---- checks (no weights are read here) ----------------------------------------------------------------------

def read_prompts(path: Path | str) -> list[str]:
    """Non-empty, stripped lines of a UTF-8 prompts file (prompt indices count these lines); raises when the file
    is missing or holds none."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompts file not found: {path}")
    if not path.is_file():
        raise ValueError(f"prompts file {path} is not a regular file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"prompts file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} is empty (expected one prompt per line)")
    return prompts


def _prompts_path(name: str) -> Path:
    path = Path(name)
    if not path.exists() and name == DEFAULT_PROMPTS:
        shipped = Path(__file__).resolve().parent.parent / DEFAULT_PROMPTS
        if shipped.is_file():
            return shipped
    return path


def check_teacher_folder(folder: Path | str, family: str) -> dict[str, Any]:
    """Check a teacher's diffusers folder; return its ``model_index.json``.

    A folder of another family's pipeline is refused by name. Every component that ``model_index.json`` lists
    (non-null) and every component the family needs must be a subfolder; model and scheduler folders must hold their
    ``config.json`` / ``scheduler_config.json``.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"teacher folder not found: {folder}")
    if not folder.is_dir():
        raise ValueError(f"teacher path {folder} is not a folder (expected a local diffusers pipeline folder)")
    index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else None
    if index is None:
        raise FileNotFoundError(
            f"teacher folder {folder} has no model_index.json (expected a diffusers pipeline folder)"
        )
    name, own = index.get("_class_name"), get_family(family).pipeline_class_name
    other: dict[str, str] = {}
    for f, p in pipeline_classes().items():
        if p != own:
            other.setdefault(p, f)
    if name in other:
        raise ValueError(f"teacher folder {folder} holds a {name} ({other[name]}); a {family} teacher is a "
                         f"{own} folder")
    listed = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0] is not None]
    needed = list(dict.fromkeys([*get_family(family).required_subfolders(), *listed]))
    for comp in needed:
        sub = folder / comp
        if not sub.is_dir():
            raise FileNotFoundError(f"teacher folder {folder} is incomplete: missing {comp}/")
        if comp == "scheduler":
            if not (sub / "scheduler_config.json").is_file():
                raise FileNotFoundError(f"teacher folder {folder} is incomplete: missing {comp}/scheduler_config.json")
        elif not comp.startswith("tokenizer") and not (sub / "config.json").is_file():
            raise FileNotFoundError(f"teacher folder {folder} is incomplete: missing {comp}/config.json")
    return index


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device (expected auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` → bf16 on cuda, fp32 on cpu; else one of fp32, bf16, fp16 (UsageError, a ValueError, otherwise)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return parse_dtype(name, "--dtype")
    except ValueError:
        raise UsageError(f"--dtype {name!r} is not one of auto, {', '.join(SHORT_NAMES)}") from None


@dataclass
class Plan:
    """Everything a run needs, checked; no weights loaded yet."""

    spec: InferenceSpec
    teacher_dir: Path
    source: StudentSource
    config: dict[str, Any]
    items: list[tuple[int, str]]
    output_dir: Path
    sampler: str
    steps: int
    seed: int
    height: int
    width: int
    batch_size: int
    device: torch.device
    dtype: torch.dtype


def prepare(args: argparse.Namespace, spec: InferenceSpec) -> Plan:
    """Check every argument and file, cheapest first; raise UsageError / FileNotFoundError / ValueError."""
    if args.sampler not in SAMPLERS:
        raise UsageError(f"--sampler {args.sampler!r} is unknown (expected one of: {', '.join(SAMPLERS)})")
    if not spec.min_steps <= args.steps <= spec.max_steps:
        allowed = f"{spec.min_steps}..{spec.max_steps}" if spec.max_steps > spec.min_steps else str(spec.min_steps)
        raise UsageError(f"--steps {args.steps} is not supported by this student (allowed: {allowed})")
    if args.num_prompts < 1:
        raise UsageError(f"--num_prompts must be at least 1, got {args.num_prompts}")
    if args.start_idx < 0:
        raise UsageError(f"--start_idx must be >= 0, got {args.start_idx}")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.height < 1 or args.width < 1:
        raise UsageError(f"--height and --width must be positive, got {args.height}x{args.width}")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)

    prompts = read_prompts(_prompts_path(args.prompts_file))
    if args.start_idx >= len(prompts):
        raise UsageError(
            f"--start_idx {args.start_idx} is beyond the end of {args.prompts_file} ({len(prompts)} prompts)"
        )
    stop = min(len(prompts), args.start_idx + args.num_prompts)
    items = [(i, prompts[i]) for i in range(args.start_idx, stop)]

    fam = spec.family_class
    teacher_dir = Path(getattr(args, spec.teacher_flag))
    check_teacher_folder(teacher_dir, spec.family)
    source = resolve_student_source(args.checkpoint)
    explicit_cfg = getattr(args, spec.config_flag)
    if explicit_cfg is not None:
        cfg_path = Path(explicit_cfg)
    elif source.config_path is not None:
        cfg_path = source.config_path
    else:
        cfg_path = teacher_dir / fam.denoiser_subfolder / "config.json"
    config = checked_student_config(cfg_path, fam, f"this script needs a {fam.denoiser_class_name} config")

    vae_config = read_json(teacher_dir / "vae" / "config.json")
    multiple = fam.pixel_multiple(vae_config, config)
    for name, side in (("height", args.height), ("width", args.width)):
        if side % multiple:
            raise UsageError(f"--{name} {side} must be a multiple of {multiple} for this teacher")
    limit = fam.max_pixel_side(vae_config, config)
    if limit is not None and max(args.height, args.width) > limit:
        raise UsageError(f"--height/--width {args.height}x{args.width} exceed this model's maximum of {limit} px")

    # the checkpoint's keys against the architecture: from headers / mmap only, before any weight is loaded
    check_student_keys(source, config, fam, f"a {fam.denoiser_class_name} built from {cfg_path}")

    return Plan(spec=spec, teacher_dir=teacher_dir, source=source, config=config, items=items,
                output_dir=Path(args.output_dir), sampler=args.sampler, steps=args.steps, seed=args.seed,
                height=args.height, width=args.width, batch_size=args.batch_size, device=device, dtype=dtype)


# ---- generation ---------------------------------------------------------------------------------------------

def prompt_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of prompt ``index``: seeded ``seed + index`` (independent of batch and start index)."""
    return torch.Generator().manual_seed(int(seed) + int(index))


def to_uint8_images(pixels: Tensor) -> list:
    """Pixels in [−1, 1], (B, 3, H, W) → PIL RGB images (see :func:`senseflow.imageio.to_pil`)."""
    return to_pil(pixels)


def load_runtime(plan: Plan) -> tuple[Any, nn.Module]:
    """The teacher family (text encoders and VAE, loaded lazily; never the teacher denoiser) and the student G_θ.

    Text encoders run in the run's dtype, the VAE in fp32; SDXL's micro-conditioning target is (height, width).
    """
    from senseflow.models.families import build_family

    quiet_libraries()
    fam = plan.spec.family_class
    kwargs: dict[str, Any] = {"path": plan.teacher_dir, "denoiser_dtype": plan.dtype, "text_dtype": plan.dtype,
                              "vae_dtype": torch.float32, **fam.size_kwargs(plan.height, plan.width)}
    family = build_family(plan.spec.family, device=plan.device, **kwargs)
    student = load_student(plan.source, plan.config, dtype=plan.dtype, device=plan.device,
                           ignore_prefixes=fam.student_ignore_prefixes, fallback_class=fam.denoiser_class_name)
    return family, student


def initial_latents(shape: Sequence[int], generators: Sequence[torch.Generator], device: torch.device | str) -> Tensor:
    """ε of one sample per generator, stacked: (len(generators), *shape), fp32, drawn on the CPU then moved."""
    return rng.randn((len(generators), *shape), list(generators), device=device)


@torch.no_grad()
def student_images(plan: Plan, family: Any, student: nn.Module,
                   items: Sequence[tuple[int, str]]) -> Iterator[tuple[list[int], list]]:
    """The student's samples of ``items`` ((prompt index, text) pairs) with the plan's sampler, steps and size,
    ``plan.batch_size`` prompts per forward: yields (prompt indices, PIL images) batch by batch.

    Latents stay fp32 (the family casts the network's inputs to its dtype); prompt i's noise, initial and re-noising,
    comes from :func:`prompt_generator` (seed + i). Inference and evaluation (:mod:`senseflow.eval.generate`) both
    sample through this loop.
    """
    sample = get_sampler(plan.sampler)
    schedule = family.schedule(plan.height, plan.width)
    anchors = make_anchors(schedule, plan.steps).to(plan.device)
    shape = family.latent_shape(plan.height, plan.width)
    for start in range(0, len(items), plan.batch_size):
        batch = items[start:start + plan.batch_size]
        indices, texts = [i for i, _ in batch], [t for _, t in batch]
        cond = _encode(family, texts, plan.height, plan.width)
        gens = [prompt_generator(plan.seed, i) for i in indices]
        noise = initial_latents(shape, gens, plan.device)
        x0 = sample(family, student, cond, anchors, gens, latents=noise, schedule=schedule)
        yield indices, to_uint8_images(family.decode_latents(x0.float()))


@torch.no_grad()
def generate(plan: Plan, family: Any, student: nn.Module, progress: bool = True) -> list[Path]:
    """Sample every prompt of the plan (:func:`student_images`) and write ``<output_dir>/<index:05d>.png``; return
    the paths written."""
    from tqdm import tqdm

    plan.output_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    bar = tqdm(total=len(plan.items), unit="img", desc=plan.spec.title, disable=not progress, file=sys.stderr)
    for indices, images in student_images(plan, family, student, plan.items):
        for idx, img in zip(indices, images):
            path = plan.output_dir / f"{idx:05d}.png"
            img.save(path)
            written.append(path)
        bar.update(len(indices))
    bar.close()
    return written


def _encode(family: Any, texts: Sequence[str], height: int, width: int) -> Any:
    """Prompt conditions; SDXL's micro-conditioning uses original size = target size (H, W) and crop (0, 0)."""
    b = len(texts)
    sizes = torch.tensor([[height, width]] * b)
    crops = torch.zeros(b, 2, dtype=torch.long)
    return family.encode_prompts(list(texts), original_sizes=sizes, crop_coords=crops)


def _fail(prog: str, err: BaseException) -> int:
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, KeyError):
        msg = f"missing key {msg}"
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None, spec: InferenceSpec | str = "flux", prog: str | None = None) -> int:
    """Run one inference script; returns the exit code (0 success, 2 bad input)."""
    spec = get_spec(spec) if isinstance(spec, str) else spec
    prog = prog or Path(sys.argv[0]).name
    parser = build_parser(spec, prog=prog)
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        plan = prepare(args, spec)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except (UsageError, FileNotFoundError, NotADirectoryError, ValueError) as err:
        return _fail(prog, err)
    try:
        family, student = load_runtime(plan)
    except (FileNotFoundError, ValueError, OSError) as err:
        return _fail(prog, err)
    written = generate(plan, family, student)
    print(f"wrote {len(written)} images to {plan.output_dir}")
    return 0

"""The ``senseflow memory`` command line (also ``python -m senseflow.memory``)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

from senseflow.core.argparsing import RaisingParser
from senseflow.memory.arch import arch_names
from senseflow.memory.budget import DTYPE_BYTES, MemoryPlanError
from senseflow.memory.plan import plan_memory
from senseflow.memory.report import format_plan


class _ArgError(Exception):
    pass


def _key_values(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings of ``--denoiser-set`` → a dict, each value read as JSON (``false``, ``3072``) or else
    kept as a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MemoryPlanError(f"--denoiser-set {item!r}: expected KEY=VALUE, e.g. guidance_embeds=false")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


class _Parser(RaisingParser):
    error_type = _ArgError


def main_memory(argv: Sequence[str] | None = None) -> int:
    """``senseflow memory --config YAML --gpus N [--nodes M] [--gpu-gib 80] [--json] [key=value ...]``.

    Prints the per-GPU memory plan; exit code 2 on bad input; with ``--check`` 1 when the config does not fit.
    """
    p = _Parser(prog="senseflow memory", description="Per-GPU memory plan of a SenseFlow run (no weights needed).")
    p.add_argument("--config", required=True, help="YAML preset, e.g. configs/FLUX/flux_senseflow.yaml")
    p.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    p.add_argument("--reserve-frac", type=float, default=0.10, help="fraction kept free for fragmentation (0.10)")
    p.add_argument("--context-gib", type=float, default=1.5, help="CUDA context + NCCL buffers in GiB (1.5)")
    denoisers = ", ".join(n for n in arch_names() if "transformer" in n or "unet" in n)
    p.add_argument("--denoiser", default=None,
                   help=f"teacher architecture: a shipped name ({denoisers}) or a config.json / folder")
    p.add_argument("--denoiser-set", action="append", default=[], metavar="KEY=VALUE",
                   help="replace an entry of the teacher architecture's config (JSON value), e.g. "
                        "guidance_embeds=false for a de-distilled FLUX.1-dev; repeatable")
    p.add_argument("--max-batch", action="store_true",
                   help="also search the largest train.batch_size per GPU that fits, for every scenario")
    p.add_argument("--batch-limit", type=int, default=256, help="largest batch --max-batch tries (default 256)")
    p.add_argument("--teacher", choices=("shard", "replicate"), default="shard",
                   help="frozen teacher placement (default shard: FSDP like G and F)")
    p.add_argument("--disc-backbone-dtype", choices=tuple(DTYPE_BYTES), default="float32",
                   help="dtype of DINOv2 and D's CLIP text model (the trainer loads them in float32)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--check", action="store_true", help="exit with status 1 when the config's options do not fit")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.batch_size=2")
    try:
        args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    except _ArgError as exc:
        print(f"error: senseflow memory: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    from senseflow.config import ConfigError, load_config

    try:
        if args.gpus < 1 or args.nodes < 1:
            raise MemoryPlanError(f"--gpus and --nodes must be >= 1 (got --gpus {args.gpus} --nodes {args.nodes})")
        if not 0 <= args.reserve_frac < 1 or args.context_gib < 0:
            raise MemoryPlanError("--reserve-frac must be in [0, 1) and --context-gib >= 0")
        if not Path(args.config).is_file():
            raise FileNotFoundError(f"--config {args.config}: no such file")

        denoiser_set = _key_values(args.denoiser_set)
        cfg = load_config(args.config, list(args.overrides))
        plan = plan_memory(cfg, args.gpus, args.nodes, args.gpu_gib, config_path=args.config, denoiser=args.denoiser,
                           teacher_sharded=args.teacher == "shard", disc_backbone_dtype=args.disc_backbone_dtype,
                           reserve_frac=args.reserve_frac, context_gib=args.context_gib, denoiser_set=denoiser_set,
                           max_batch_limit=args.batch_limit if args.max_batch else None)
    except (ConfigError, MemoryPlanError, FileNotFoundError) as exc:
        print(f"error: senseflow memory: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(format_plan(plan))
    return 1 if args.check and not plan.fits else 0

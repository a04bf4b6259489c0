"""The ``senseflow`` console command: ``train``, ``tiny``, ``data``, ``export``, ``config``, ``memory``, ``eval``,
``demo``, ``teacher``.

Errors a user can fix (bad config, missing folder, bad dataset) print one line and exit with code 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn, Sequence

import senseflow.quiet  # noqa: F401  (installs the torchvision-notice filter before transformers loads)

#: set by tools/launch.sh for the torchrun workers once its own ``senseflow train --preflight`` has passed
PREFLIGHT_DONE_ENV = "SENSEFLOW_PREFLIGHT_DONE"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors (missing or unknown flags, bad choices) are one line, exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise UserError(message)


def main_train(argv: Sequence[str]) -> int:
    """``senseflow train --trainer NAME --config_path YAML --save_path DIR [--dry-run | --preflight] [key=value ...]``.

    Before any network loads, the config is loaded and validated, its paths checked and the pre-flight run
    (:mod:`senseflow.trainer.preflight`: data set, save folder, lock, ``checkpoints/latest`` and the checkpoint's fit
    with the config); ``--preflight`` stops there. In a torchrun worker the pre-flight runs on global rank 0 only,
    and not at all when tools/launch.sh ran it already.
    """
    import os

    from senseflow.config import load_config, resolved_yaml, validate_paths
    from senseflow.trainer import TRAINERS, get_trainer

    p = _Parser(prog="senseflow train", description="Distil a teacher with SenseFlow / DMD2.")
    p.add_argument("--trainer", required=True, choices=sorted(TRAINERS))
    p.add_argument("--config_path", "--config", dest="config_path", required=True, help="YAML preset")
    p.add_argument("--save_path", "--save", dest="save_path", help="run folder (checkpoints, logs, previews)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    mode.add_argument("--preflight", action="store_true",
                      help="run only the checks made before any network loads (config, paths, data set, save folder, "
                           "checkpoint) and exit: 0 when training would start")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method.gd=10 train.iterations=100")
    args = p.parse_args(argv)
    cfg = load_config(args.config_path, list(args.overrides))
    if args.dry_run:
        print(resolved_yaml(cfg), end="")
        return 0
    if not args.save_path:
        raise_user_error("--save_path is required unless --dry-run is given")
    validate_paths(cfg)
    rank = int(os.environ.get("RANK", "0") or 0)
    if args.preflight or (rank == 0 and os.environ.get(PREFLIGHT_DONE_ENV) != "1"):
        from senseflow.trainer.preflight import preflight

        report = preflight(cfg, args.save_path, args.trainer)
        if args.preflight:
            print(report.summary(args.save_path))
            return 0
    trainer_cls = get_trainer(args.trainer)
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        trainer_cls(cfg, args.save_path).run()
    except CheckpointException as err:  # a BaseException, raised by DCP where the trainer does not say more itself
        from senseflow.trainer.checkpoint import dcp_failure

        if rank != 0:
            return 2  # rank 0 says why
        raise UserError(f"--save_path {args.save_path}: a checkpoint could not be read or written "
                        f"({dcp_failure(err)})") from None
    return 0


def main_tiny(argv: Sequence[str]) -> int:
    from senseflow.tiny import main_tiny as run

    return run(list(argv))


def main_data(argv: Sequence[str]) -> int:
    from senseflow.data.cli import main_data as run

    return run(list(argv))


def main_export(argv: Sequence[str]) -> int:
    from senseflow.export import main_export as run

    return run(list(argv))


def main_memory(argv: Sequence[str]) -> int:
    from senseflow.memory import main_memory as run

    return run(list(argv))


def main_eval(argv: Sequence[str]) -> int:
    from senseflow.eval.cli import main_eval as run

    return run(list(argv))


def main_demo(argv: Sequence[str]) -> int:
    from senseflow.digits.demo import main_demo as run

    return run(list(argv))


def main_teacher(argv: Sequence[str]) -> int:
    from senseflow.teacher.cli import main_teacher as run

    return run(list(argv))


def main_config(argv: Sequence[str]) -> int:
    from senseflow.config import main_config_check as run

    return run(list(argv))


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "train": main_train,
    "tiny": main_tiny,
    "data": main_data,
    "export": main_export,
    "config": main_config,
    "memory": main_memory,
    "eval": main_eval,
    "demo": main_demo,
    "teacher": main_teacher,
}


class UserError(Exception):
    """An input problem the user can fix; printed as one line, exit code 2."""


def raise_user_error(message: str) -> None:
    raise UserError(message)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(f"usage: senseflow {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (UserError, FileNotFoundError, ValueError) as err:
        print(
            f"senseflow {argv[0]}: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())

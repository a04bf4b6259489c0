"""``senseflow config``: print the resolved training config (and optionally check its paths)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from senseflow.config.errors import ConfigError
from senseflow.config.loading import load_config
from senseflow.config.output import resolved_yaml
from senseflow.config.validation import validate_paths

__all__ = ["main_config_check"]


def main_config_check(argv: Sequence[str] | None = None) -> int:
    """``senseflow config <yaml> [key=value ...] [--check-paths]``: print the resolved config; 2 on a bad one."""
    parser = argparse.ArgumentParser(prog="senseflow config", description="Print the resolved training config.")
    parser.add_argument("config", help="YAML file, e.g. configs/SD35/sd35_senseflow.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method.gd=10")
    parser.add_argument("--check-paths", action="store_true", help="also check that every path exists")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.check_paths:
            validate_paths(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(resolved_yaml(cfg))
    return 0

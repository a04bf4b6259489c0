"""The one command-line parser behaviour of every ``senseflow`` command: a usage error is raised, not printed."""
from __future__ import annotations

import argparse
from typing import NoReturn

__all__ = ["RaisingParser"]


class RaisingParser(argparse.ArgumentParser):
    """argparse whose errors raise ``error_type(message)`` (the command prints it as one line and returns its exit
    code) instead of printing the usage and exiting. A command sets ``error_type`` in a subclass; subparsers made
    with ``parser_class=`` that subclass raise the same."""

    error_type: type[Exception] = ValueError

    def error(self, message: str) -> NoReturn:
        raise self.error_type(message)

"""The one exception of the config system."""
from __future__ import annotations

import re

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A bad configuration. The message is always one line (the CLI prints it and exits with status 2)."""

    def __init__(self, message: str) -> None:
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", str(message)).strip())

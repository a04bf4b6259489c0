"""Keep library chatter out of the console so that our progress bar and one-line errors stay readable.

* transformers logs, at import, that image processors fall back to PIL because torchvision is absent (the project
  never installs torchvision, docs/evaluation.md); that notice is not about the user's input and is dropped.
* :func:`quiet_libraries` turns off the per-file "Loading weights" / "Writing model shards" bars and lowers
  diffusers' and transformers' loggers to errors (warnings such as dtype-cast notes stay out of the run's log).
"""
from __future__ import annotations

import logging


class _NoTorchvisionNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionNotice())


def quiet_libraries() -> None:
    """Silence progress bars and warnings of diffusers and transformers (errors still show)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.disable_progress_bar()
        lib.set_verbosity_error()

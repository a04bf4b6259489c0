"""The one table of dtype names: configs spell them ``float32`` / ``bfloat16`` / ``float16``, command lines also
``fp32`` / ``bf16`` / ``fp16``; every parser, argparse choice and error message derives from it."""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, Sequence

import torch

__all__ = ["DTYPES", "DTYPE_NAMES", "SHORT_NAMES", "CLI_DTYPES", "parse_dtype"]

#: the config names (canonical) → torch dtype
DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
)
#: the config names, for choices (``teacher.dtype``, ``senseflow data build-lmdb --dtype``)
DTYPE_NAMES: tuple[str, ...] = tuple(DTYPES)
#: the short command-line spellings → config name
SHORT_NAMES: Mapping[str, str] = MappingProxyType({"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"})
#: ``--dtype`` of the inference and export commands: ``auto`` (None: the command decides) or a short name
CLI_DTYPES: Mapping[str, torch.dtype | None] = MappingProxyType(
    {"auto": None, **{short: DTYPES[name] for short, name in SHORT_NAMES.items()}}
)


def parse_dtype(value: str | torch.dtype, what: str = "dtype", names: Sequence[str] | None = None) -> torch.dtype:
    """The torch dtype of a config or command-line name (a ``torch.dtype`` passes through).

    ``names`` limits the accepted spellings (default: every config name and short name, interleaved as
    ``float32, fp32, …``); anything else raises ``ValueError("<what>: <value> is not one of …")``.
    """
    if isinstance(value, torch.dtype):
        return value
    if names is None:
        names = [n for name in DTYPE_NAMES for n in (name, *(s for s, c in SHORT_NAMES.items() if c == name))]
    name = str(value)
    if name not in names:
        raise ValueError(f"{what}: {value!r} is not one of {', '.join(names)}")
    return DTYPES[SHORT_NAMES.get(name, name)]

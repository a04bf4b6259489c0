"""Trainers: one shared DistillationTrainer and thin per-teacher shims (names from the authors' README).

A shim is a module ``trainer_<name>.py`` of this package that defines one ``DistillationTrainer`` subclass (with its
``family_name`` and ``method_name``); ``senseflow train --trainer <name>`` finds it by the module name alone
(lower case: ``trainer_sdxl_DMD2.py`` is ``sdxl_dmd2``), so adding a trainer is adding its module.
"""
from __future__ import annotations

import inspect
import pkgutil
from importlib import import_module

__all__ = ["TRAINERS", "get_trainer"]

_PREFIX = "trainer_"

#: trainer name (as given to ``senseflow train --trainer``) -> its module, one per ``trainer_*.py`` of this package
TRAINERS: dict[str, str] = {
    info.name[len(_PREFIX):].lower(): f"{__name__}.{info.name}"
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name)
    if info.name.startswith(_PREFIX)
}


def get_trainer(name: str) -> type:
    """The trainer class registered under ``name``: the ``DistillationTrainer`` subclass its module defines."""
    from senseflow.trainer.base import DistillationTrainer

    if name not in TRAINERS:
        raise ValueError(f"unknown trainer {name!r}; expected one of {', '.join(TRAINERS)}")
    module = import_module(TRAINERS[name])
    found = [c for c in vars(module).values() if inspect.isclass(c) and issubclass(c, DistillationTrainer)
             and c.__module__ == module.__name__]
    if len(found) != 1:
        raise ValueError(f"{module.__name__} defines {len(found)} DistillationTrainer subclasses, expected one")
    return found[0]

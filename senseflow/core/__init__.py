"""The core layer: the ideas every other layer shares, importing nothing else from senseflow (checked by the
import-linter contracts in pyproject.toml: trainer > method > models > core).

One idea per module: :mod:`~senseflow.core.schedules` (noise schedules), :mod:`~senseflow.core.rng` (random
streams and draws), :mod:`~senseflow.core.condition` (:class:`Condition`), :mod:`~senseflow.core.family` (the
teacher-family protocol the models implement), :mod:`~senseflow.core.anchors` (generator anchors),
:mod:`~senseflow.core.dtypes` (the dtype table), :mod:`~senseflow.core.io` (the atomic file write),
:mod:`~senseflow.core.modules` (``unwrap``), :mod:`~senseflow.core.checks` (``need``: an optional value a
step must have set) and :mod:`~senseflow.core.argparsing` (the raising argument parser of every command).
"""

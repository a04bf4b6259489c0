"""Evaluation suite (docs/method.md §19, docs/evaluation.md): prompt sets, resumable generation of student samples and
teacher references, FID-T / patch FID-T / CLIP / HPSv2 / PickScore / ImageReward / digits metrics from local models,
and a report laid out like the paper's Table 1. The command is :func:`main_eval` (``senseflow eval``)."""
from __future__ import annotations

from senseflow.eval.cli import main_eval, run_eval

__all__ = ["main_eval", "run_eval"]

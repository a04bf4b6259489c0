"""Console progress bar, TensorBoard scalars and metrics.jsonl (written by rank 0; losses averaged over the ranks)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

from senseflow import dist as sfdist
from senseflow.core.io import atomic_write_text


class RunLogger:
    """tqdm bar with it/s and ETA, plus TensorBoard scalars under ``<run_dir>/tensorboard``; silent off rank 0.
    ``device``: where the ranks' losses are averaged (the process group's device: CUDA under NCCL)."""

    def __init__(self, run_dir: Path, total: int, start: int, enabled: bool,
                 device: torch.device | str = "cpu") -> None:
        self.enabled = enabled
        self.device = torch.device(device)
        self.metrics_path = run_dir / "metrics.jsonl"
        self.writer = None
        self.bar = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: points an earlier attempt logged after the checkpoint this run starts from (all of them when
            # it starts at iteration 0) are dropped, not doubled
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start + 1)
            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, smoothing=0.1)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """TensorBoard scalars plus one JSON line per call in ``<run_dir>/metrics.jsonl`` (for scripts and tests).

        The losses (keys ``loss/...``) logged are their mean over the ranks (one ``all_reduce``; in a single process
        the values as given), so every rank calls this at the same steps with the same loss keys; the other values
        are rank 0's own."""
        losses = {k: v for k, v in values.items() if k.startswith("loss/")}
        if losses:
            values = {**values, **sfdist.mean_over_ranks(losses, self.device)}
        if self.writer is None:
            return
        for k, v in values.items():
            if v is not None and math.isfinite(v):
                self.writer.add_scalar(k, v, step)
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"iteration": step, **{k: float(v) for k, v in values.items()}}) + "\n")

    def progress(self, step: int, summary: dict[str, float] | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if summary:
                self.bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in summary.items()}, refresh=False)

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def rewind_metrics(path: Path, iteration: int) -> None:
    """Drop the rows of ``metrics.jsonl`` logged after ``iteration``, the iteration a run resumes from (0: a run
    killed before its first checkpoint): those iterations run again and are logged again, so the iterations of the
    file stay strictly increasing. A row cut short by a kill is dropped too."""
    if not path.exists():
        return

    def logged_at(line: str) -> int | None:
        try:
            return int(json.loads(line)["iteration"])
        except (ValueError, KeyError, TypeError):
            return None  # a line cut short by the kill

    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [ln for ln in lines if (logged_at(ln) or iteration + 1) <= iteration]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(ln + "\n" for ln in kept))

"""Console progress bar, TensorBoard scalars and preview image grids (rank 0 only)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [−1, 1], (B, 3, H, W) → uint8 (B, H, W, 3)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Tile a batch of [−1, 1] images into one PNG (rows of ``nrow``, default √B)."""
    arr = to_uint8(images)
    b, h, w, c = arr.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(b))))
    ncol = int(math.ceil(b / nrow))
    grid = np.zeros((ncol * h, nrow * w, c), dtype=np.uint8)
    for i in range(b):
        r, q = divmod(i, nrow)
        grid[r * h : (r + 1) * h, q * w : (q + 1) * w] = arr[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


class RunLogger:
    """tqdm bar with it/s and ETA, plus TensorBoard scalars under ``<run_dir>/tensorboard``; silent off rank 0."""

    def __init__(self, run_dir: Path, total: int, start: int, enabled: bool) -> None:
        self.enabled = enabled
        self.metrics_path = run_dir / "metrics.jsonl"
        self.writer = None
        self.bar = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, smoothing=0.1)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """TensorBoard scalars plus one JSON line per call in ``<run_dir>/metrics.jsonl`` (for scripts and tests)."""
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

"""A small CNN digit classifier, trained by the project on the digits' training split; the feature network of the
digit metrics (:mod:`senseflow.digits.metrics`).

Input: (B, 3, R, R) pixels in [−1, 1] (R = ``resolution``, 32 by default). Architecture:
``[conv3×3 → ReLU → maxpool2]`` × len(channels) → flatten → Linear → ReLU → **features f(x)** (``feature_dim``)
→ Linear → 10 logits. Training: cross-entropy with AdamW; augmentation = random translations of up to
``max_shift`` pixels (background value −1 fills in). Saved as one safetensors file whose metadata hold the config.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from senseflow.metric_files import metric_model_metadata, read_metric_model, save_metric_model

__all__ = [
    "ClassifierConfig",
    "DigitClassifier",
    "default_classifier_path",
    "train_classifier",
    "accuracy",
    "save_classifier",
    "load_classifier",
]

_FORMAT = "senseflow-digits-classifier"
_BACKGROUND = -1.0


def default_classifier_path() -> Path:
    """The classifier shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "assets" / "digits_classifier.safetensors"


@dataclass(frozen=True)
class ClassifierConfig:
    """Network and training settings (documented defaults of the schema)."""

    resolution: int = 32
    channels: tuple[int, ...] = (16, 32, 32)
    feature_dim: int = 64
    num_classes: int = 10
    epochs: int = 15
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    max_shift: int = 2

    def __post_init__(self) -> None:
        if self.resolution % 2 ** len(self.channels):
            raise ValueError(
                f"ClassifierConfig.resolution {self.resolution} must be divisible by "
                f"2^len(channels) = {2 ** len(self.channels)}"
            )


class DigitClassifier(nn.Module):
    """f(x) = ReLU(W₁·flatten(conv(x)) + b₁) ∈ ℝ^feature_dim;  logits = W₂·f(x) + b₂."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        c_in = 3
        for c in config.channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.conv = nn.Sequential(*layers)
        side = config.resolution // 2 ** len(config.channels)
        self.fc = nn.Linear(c_in * side * side, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def _check(self, x: Tensor) -> None:
        r = self.config.resolution
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, r, r):
            raise ValueError(
                f"DigitClassifier expects images of shape (B, 3, {r}, {r}) in [-1, 1], got {tuple(x.shape)}"
            )

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features f(x), shape (B, feature_dim)."""
        self._check(x)
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 512) -> Tensor:
        """Arg-max class of every image."""
        return torch.cat([self(x[i : i + batch_size]).argmax(-1) for i in range(0, x.shape[0], batch_size)])


def _translate(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Shift each image by (dy, dx) ∈ {−s..s}² drawn from ``generator``, filling with the background value."""
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=_BACKGROUND)
    d = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator)
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(d.tolist())])


def train_classifier(
    images: Tensor,
    labels: Tensor,
    config: ClassifierConfig,
    seed: int,
    log: Callable[[str], None] = print,
) -> DigitClassifier:
    """Cross-entropy training on (images, labels) with shuffling, augmentation and init all fixed by ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = DigitClassifier(config)
    gen = torch.Generator().manual_seed(int(seed) + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = -(-images.shape[0] // config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch)
    model.train()
    for epoch in range(config.epochs):
        perm = torch.randperm(images.shape[0], generator=gen)
        total = 0.0
        for i in range(0, images.shape[0], config.batch_size):
            idx = perm[i : i + config.batch_size]
            x = _translate(images[idx], config.max_shift, gen)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * idx.numel()
        log(f"classifier epoch {epoch:3d}  loss {total / images.shape[0]:.4f}")
    return model.eval()


def accuracy(model: DigitClassifier, images: Tensor, labels: Tensor) -> float:
    """Share of ``images`` classified as ``labels``."""
    return float((model.predict(images) == labels.to(torch.long)).double().mean())


def save_classifier(model: DigitClassifier, path: str | Path, extra: dict | None = None) -> Path:
    """One safetensors file; metadata ``config`` (JSON of :class:`ClassifierConfig`) plus ``extra`` entries."""
    return save_metric_model(model, model.config, path, _FORMAT, extra)


def load_classifier(path: str | Path | None = None) -> DigitClassifier:
    """Load a classifier written by :func:`save_classifier` (default: the shipped one), in eval mode."""
    path = Path(path) if path is not None else default_classifier_path()
    state, cfg = read_metric_model(path, _FORMAT, "digits classifier",
                                   "python tools/train_digits_teacher.py --classifier-out PATH")
    cfg["channels"] = tuple(cfg["channels"])
    model = DigitClassifier(ClassifierConfig(**cfg))
    model.load_state_dict(state, strict=True)
    return model.eval()


def classifier_metadata(path: str | Path | None = None) -> dict:
    """The JSON-decoded metadata of a saved classifier (config, held-out accuracy, ...)."""
    return metric_model_metadata(Path(path) if path is not None else default_classifier_path())

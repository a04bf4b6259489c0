"""A small CNN that reads shape scenes back, the compositional-accuracy metric built on it, and Fréchet distances of
its penultimate features.

**Reader.** For a fixed list of K = |colours|·|shapes| (colour, shape) pairs (colour-major, ``ShapesConfig.pairs``)
the network predicts, from a (B, 3, R, R) image in [−1, 1], whether each pair is present and where its centre is.
It is a small fully convolutional detector (one output slot per pair; scenes hold each pair at most once, so "the
red circle" of a caption is one slot):

    x ⊕ (u, v) → [conv3×3 → BN → ReLU → conv3×3 → BN → ReLU (→ maxpool2)] × len(channels)   (no pool after the last)
      → h = ReLU(conv1×1) (``head_dim`` channels on a G×G grid of cells, stride t = 2^(len(channels)−1))
      → conv1×1 → per pair k and cell s: heat ℓ_k(s) and offset logits o_k(s) ∈ ℝ²
    presence logit   z_k = log Σ_s exp ℓ_k(s) − log G² + β_k          (a smooth max over cells; p_k = σ(z_k))
    centre           ĉ_k = Σ_s softmax_s(ℓ_k)(s) · (g_s + t·tanh o_k(s))  (soft-argmax; g_s = cell centre, pixels)

(u, v) ∈ [−1, 1]² are two coordinate channels appended to the input (CoordConv). The heat maps share one detector
over all positions, which learns from far fewer scenes than a fully connected position regressor. The
**features** f(x) = [mean_s h(s), max_s h(s)] (2·``head_dim`` numbers) are the input of the Fréchet distances.

**Training** on seeded generated scenes (:func:`senseflow.shapes.scenes.generate_scenes`, training stream):

    L = mean_k BCE(z_k, y_k) + mean_{k: y_k = 1} [λ · Huber_β=1(ĉ_k − c_k) + μ · CE(softmax_s ℓ_k, s(c_k))]

(y_k = 1 when pair k is present, c_k its centre, s(c_k) the cell holding it) with λ = ``centre_weight`` and
μ = ``cell_weight``: the cell term teaches the heat map where to peak directly, the Huber term refines the centre
through the soft-argmax. AdamW and a one-cycle learning rate; augmentation = horizontal flips (x → R − x; an
upward triangle stays one). Saved as one safetensors file whose metadata hold the config.

**Compositional accuracy** of images with stated content (a caption, or a scene's ground truth): a sample is
correct when every stated object is read as present (p_k ≥ ``threshold``) and every stated relation holds between
the read centres by at least ``tolerance`` pixels (e.g. "A left of B" ⇔ ĉ_B,x − ĉ_A,x ≥ tolerance); the metric is
the share of correct samples. Extra, unstated objects are not penalised. Captions are read with
:func:`senseflow.shapes.scenes.parse_caption`. The data state relations only at a centre offset of at least
``ShapesConfig.relation_margin`` (4 px by default), so the default ``tolerance`` of 1 px leaves 3 px for the
reader's centre error on real scenes while still refusing near ties in generated ones.

**Fréchet distance** between Gaussians fitted to reader features f(x):
FD = ‖μ₁ − μ₂‖² + tr(Σ₁) + tr(Σ₂) − 2·tr((Σ₁Σ₂)^{1/2}), by the project's one implementation
(:func:`senseflow.digits.metrics.frechet_distance`, i.e. :func:`senseflow.eval.frechet.frechet_distance`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from senseflow.digits.metrics import frechet_distance  # the project's one Fréchet distance
from senseflow.metric_files import metric_model_metadata, read_metric_model, save_metric_model
from senseflow.shapes.scenes import (
    HELDOUT_STREAM,
    TRAIN_STREAM,
    ParsedCaption,
    Scene,
    ShapesConfig,
    ShapesData,
    generate_scenes,
    parse_caption,
    relation_holds,
)

__all__ = [
    "ReaderConfig",
    "ShapesReader",
    "Readout",
    "GroundTruthReader",
    "default_reader_path",
    "scene_targets",
    "train_reader",
    "save_reader",
    "load_reader",
    "reader_metadata",
    "sample_correct",
    "object_errors",
    "compositional_report",
    "compositional_accuracy",
    "feature_stats",
    "fd_between",
    "real_feature_stats",
    "fd_to_real",
    "frechet_distance",
]

_FORMAT = "senseflow-shapes-reader"
_DEFAULT_DATA = ShapesConfig()


def default_reader_path() -> Path:
    """The reader shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "assets" / "shapes_reader.safetensors"


@dataclass(frozen=True)
class ReaderConfig:
    """Network and training settings (documented defaults of the schema).

    * ``resolution``: image side R; ``colours`` / ``shapes``: the vocabulary (output slot k = colour-major pair k,
      as ``ShapesConfig.pairs``);
    * ``channels``: output channels of each [conv → conv (→ pool)] block (no pool after the last);
      ``head_dim``: channels of the hidden 1×1 layer h (the features f(x) have 2·head_dim entries);
    * ``num_train_scenes``: generated training scenes (training stream of the data config's seed);
    * ``epochs``, ``batch_size``, ``lr`` (peak of the one-cycle schedule), ``weight_decay``: AdamW training;
    * ``centre_weight``: λ of the centre loss; ``cell_weight``: μ of the cell loss; ``batch_norm``: BatchNorm after
      every convolution of the backbone; ``flip``: horizontal-flip augmentation;
    * ``seed``: initialisation, shuffling and augmentation.
    """

    resolution: int = 32
    colours: tuple[str, ...] = _DEFAULT_DATA.colour_names
    shapes: tuple[str, ...] = _DEFAULT_DATA.shapes
    channels: tuple[int, ...] = (16, 32, 64)
    head_dim: int = 64
    num_train_scenes: int = 20000
    epochs: int = 12
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    centre_weight: float = 0.5
    cell_weight: float = 0.5
    batch_norm: bool = True
    flip: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.channels or self.resolution % 2 ** (len(self.channels) - 1):
            raise ValueError(
                f"ReaderConfig.resolution {self.resolution} must be divisible by the stride 2^(len(channels) - 1) = "
                f"{2 ** (len(self.channels) - 1)}"
            )
        if not self.colours or not self.shapes:
            raise ValueError("ReaderConfig.colours and shapes must be non-empty")

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        return tuple((c, s) for c in self.colours for s in self.shapes)

    @classmethod
    def for_data(cls, data: ShapesConfig, **kw: Any) -> "ReaderConfig":
        """A reader config with the vocabulary and resolution of ``data``."""
        return cls(resolution=data.resolution, colours=data.colour_names, shapes=data.shapes, **kw)


class ShapesReader(nn.Module):
    """Backbone maps, a hidden 1×1 layer h, per-pair heat maps ℓ_k and offsets δ_k; presence from a smooth max of ℓ_k,
    centre = the soft-argmax of ℓ_k moved by δ_k (see the module doc)."""

    coords: Tensor  # (1, 2, r, r) pixel coordinates in [−1, 1], a buffer
    cells: Tensor  # (2, G²) cell centres in pixels, a buffer

    def __init__(self, config: ReaderConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        c_in = 5  # RGB + two coordinate channels
        norm = (lambda c: nn.BatchNorm2d(c)) if config.batch_norm else (lambda c: nn.Identity())
        for i, c in enumerate(config.channels):
            layers += [
                nn.Conv2d(c_in, c, 3, padding=1),
                norm(c),
                nn.ReLU(),
                nn.Conv2d(c, c, 3, padding=1),
                norm(c),
                nn.ReLU(),
            ]
            if i < len(config.channels) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        self.conv = nn.Sequential(*layers)
        self.hidden = nn.Conv2d(c_in, config.head_dim, 1)
        k = len(config.pairs)
        self.head = nn.Conv2d(config.head_dim, 3 * k, 1)
        self.presence_bias = nn.Parameter(torch.zeros(k))
        r = config.resolution
        self.stride = 2 ** (len(config.channels) - 1)
        t = (torch.arange(r, dtype=torch.float32) + 0.5) / r * 2 - 1
        self.register_buffer(
            "coords", torch.stack([t[None, :].expand(r, r), t[:, None].expand(r, r)])[None], persistent=False
        )
        g = (torch.arange(r // self.stride, dtype=torch.float32) + 0.5) * self.stride  # cell centres in pixels
        self.register_buffer(
            "cells",
            torch.stack([g[None, :].expand(len(g), -1), g[:, None].expand(-1, len(g))]).flatten(1),
            persistent=False,
        )

    def _check(self, x: Tensor) -> None:
        r = self.config.resolution
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, r, r):
            raise ValueError(f"ShapesReader expects images of shape (B, 3, {r}, {r}) in [-1, 1], got {tuple(x.shape)}")

    def _hidden(self, x: Tensor) -> Tensor:
        self._check(x)
        x = torch.cat([x, self.coords.expand(x.shape[0], -1, -1, -1)], dim=1)
        return F.relu(self.hidden(self.conv(x)))

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features f(x) = [mean over cells of h, max over cells of h], shape (B, 2·head_dim)."""
        h = self._hidden(x).flatten(2)
        return torch.cat([h.mean(-1), h.amax(-1)], dim=1)

    def forward(self, x: Tensor, with_heat: bool = False) -> tuple[Tensor, ...]:
        """(presence logits (B, K), centres (B, K, 2) in pixels), plus the heat maps (B, K, G²) with ``with_heat``."""
        out = self.head(self._hidden(x)).flatten(2)  # (B, 3K, S)
        b, k, s = x.shape[0], len(self.config.pairs), out.shape[-1]
        out = out.view(b, k, 3, s)
        heat = out[:, :, 0]
        presence = torch.logsumexp(heat, -1) - math.log(s) + self.presence_bias
        w = torch.softmax(heat, -1)  # (B, K, S)
        pos = self.cells[None, None] + self.stride * torch.tanh(out[:, :, 1:])  # (B, K, 2, S)
        centres = (pos * w[:, :, None]).sum(-1)
        return (presence, centres, heat) if with_heat else (presence, centres)

    @torch.no_grad()
    def read(self, images: Tensor, batch_size: int = 512) -> "Readout":
        """Presence probabilities and centres (pixels) of every pair in every image."""
        was = self.training
        self.eval()
        outs = [self(images[i : i + batch_size].float()) for i in range(0, images.shape[0], batch_size)]
        self.train(was)
        return Readout(
            torch.sigmoid(torch.cat([o[0] for o in outs])), torch.cat([o[1] for o in outs]), self.config.pairs
        )


@dataclass
class Readout:
    """What a reader saw: ``presence`` (N, K) probabilities and ``centres`` (N, K, 2) = (x, y) in pixels of the K
    ``pairs``."""

    presence: Tensor
    centres: Tensor
    pairs: tuple[tuple[str, str], ...]

    def index(self, pair: tuple[str, str]) -> int:
        try:
            return self.pairs.index(tuple(pair))
        except ValueError:
            raise ValueError(
                f"{' '.join(pair)!r} is not in the reader's vocabulary {[' '.join(p) for p in self.pairs]}"
            ) from None


class SceneReader(Protocol):
    """Anything with ``read(images) -> Readout`` (a :class:`ShapesReader`, a :class:`GroundTruthReader`, ...)."""

    def read(self, images: Tensor) -> Readout: ...


class GroundTruthReader:
    """An oracle that "reads" image i as ``scenes[i]``'s ground truth (presence 1 and the exact centres of its
    objects, 0 elsewhere); for checking the metric itself."""

    def __init__(self, scenes: Sequence[Scene], pairs: Sequence[tuple[str, str]] = _DEFAULT_DATA.pairs) -> None:
        self.scenes = list(scenes)
        self.pairs = tuple((a, b) for a, b in pairs)

    def read(self, images: Tensor) -> Readout:
        if images.shape[0] != len(self.scenes):
            raise ValueError(f"GroundTruthReader holds {len(self.scenes)} scenes but got {images.shape[0]} images")
        presence, centres = scene_targets(self.scenes, self.pairs)
        return Readout(presence, centres, self.pairs)


def scene_targets(scenes: Sequence[Scene], pairs: Sequence[tuple[str, str]]) -> tuple[Tensor, Tensor]:
    """(N, K) presence in {0, 1} and (N, K, 2) centres in pixels (0 where absent) of every scene's objects."""
    slot = {tuple(p): k for k, p in enumerate(pairs)}
    presence = torch.zeros(len(scenes), len(slot))
    centres = torch.zeros(len(scenes), len(slot), 2)
    for i, s in enumerate(scenes):
        for o in s.objects:
            k = slot[o.pair]
            presence[i, k] = 1.0
            centres[i, k] = torch.tensor([o.cx, o.cy])
    return presence, centres


# ---- training ---------------------------------------------------------------------------------------------------
def _loss(model: ShapesReader, x: Tensor, presence: Tensor, centres: Tensor) -> Tensor:
    logits, pred, heat = model(x, with_heat=True)
    bce = F.binary_cross_entropy_with_logits(logits, presence)
    mask = presence.bool()
    if not mask.any():
        return bce
    huber = F.smooth_l1_loss(pred[mask], centres[mask], beta=1.0)
    g = model.config.resolution // model.stride
    cell = (centres[mask] / model.stride).long().clamp(0, g - 1)
    ce = F.cross_entropy(heat[mask], cell[:, 1] * g + cell[:, 0])
    return bce + model.config.centre_weight * huber + model.config.cell_weight * ce


def train_reader(
    config: ReaderConfig | None = None,
    data_config: ShapesConfig | None = None,
    heldout: ShapesData | None = None,
    log: Callable[[str], None] = print,
) -> ShapesReader:
    """Train a reader on ``config.num_train_scenes`` scenes of ``data_config``'s training stream (init, shuffling and
    flips fixed by ``config.seed``). With ``heldout`` given, each epoch logs its compositional accuracy."""
    config = config or ReaderConfig()
    data_config = data_config or ShapesConfig(resolution=config.resolution)
    if (
        data_config.colour_names != config.colours
        or data_config.shapes != config.shapes
        or data_config.resolution != config.resolution
    ):
        raise ValueError(
            "train_reader: the data config's colours, shapes and resolution must match the reader config's"
        )
    data = generate_scenes(config.num_train_scenes, data_config, TRAIN_STREAM)
    pixels = ((data.images + 1.0) * 127.5).round().to(torch.uint8)  # 4× less memory than float
    presence, centres = scene_targets(data.scenes, config.pairs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(config.seed))
        model = ShapesReader(config)
    gen = torch.Generator().manual_seed(int(config.seed) + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    n = len(data)
    steps_per_epoch = -(-n // config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch)
    r = float(config.resolution)
    model.train()
    for epoch in range(config.epochs):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, config.batch_size):
            idx = perm[i : i + config.batch_size]
            x = pixels[idx].float() / 127.5 - 1.0
            p, c = presence[idx], centres[idx].clone()
            if config.flip:
                f = torch.rand(idx.numel(), generator=gen) < 0.5
                x[f] = x[f].flip(-1)
                c[f, :, 0] = torch.where(p[f].bool(), r - c[f, :, 0], c[f, :, 0])
            loss = _loss(model, x, p, c)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * idx.numel()
        msg = f"reader epoch {epoch:3d}  loss {total / n:.4f}"
        if heldout is not None:
            msg += (
                f"  held-out compositional accuracy {compositional_accuracy(heldout.images, heldout.scenes, model):.4f}"
            )
        log(msg)
    return model.eval()


# ---- save / load ------------------------------------------------------------------------------------------------
def save_reader(model: ShapesReader, path: str | Path, extra: dict | None = None) -> Path:
    """One safetensors file; metadata ``config`` (JSON of :class:`ReaderConfig`) plus ``extra`` entries (JSON)."""
    return save_metric_model(model, model.config, path, _FORMAT, extra)


def load_reader(path: str | Path | None = None) -> ShapesReader:
    """Load a reader written by :func:`save_reader` (default: the shipped one), in eval mode."""
    path = Path(path) if path is not None else default_reader_path()
    state, cfg = read_metric_model(path, _FORMAT, "shapes reader", "python tools/train_shapes_reader.py --out PATH")
    for k in ("channels", "colours", "shapes"):
        cfg[k] = tuple(cfg[k])
    model = ShapesReader(ReaderConfig(**cfg))
    model.load_state_dict(state, strict=True)
    return model.eval()


def reader_metadata(path: str | Path | None = None) -> dict:
    """The JSON-decoded metadata of a saved reader (config, held-out accuracy, ...)."""
    return metric_model_metadata(Path(path) if path is not None else default_reader_path())


_default_reader: ShapesReader | None = None


def _reader(reader: SceneReader | None) -> SceneReader:
    global _default_reader
    if reader is not None:
        return reader
    if _default_reader is None:
        _default_reader = load_reader()
    return _default_reader


# ---- compositional accuracy -------------------------------------------------------------------------------------
Statement = Union[Scene, ParsedCaption, str, dict]


def _statement(item: Statement, data_config: ShapesConfig | None) -> ParsedCaption:
    if isinstance(item, ParsedCaption):
        return item
    if isinstance(item, str):
        return parse_caption(item, data_config)
    if isinstance(item, dict):
        item = Scene.from_dict(item)
    if isinstance(item, Scene):
        return ParsedCaption(item.stated_pairs(), item.stated_relations())
    raise TypeError(f"expected a Scene, a scenes.json record, a ParsedCaption or a caption, got {type(item).__name__}")


def sample_correct(
    readout: Readout, i: int, stated: ParsedCaption, tolerance: float = 1.0, threshold: float = 0.5
) -> tuple[bool, int, int, int, int]:
    """(correct, objects read, objects stated, relations read, relations stated) of sample ``i``.

    Objects are read when p_k ≥ ``threshold``; a relation is read when both its objects are and it holds between
    the read centres by ≥ ``tolerance`` pixels."""
    present = {tuple(p): bool(readout.presence[i, readout.index(p)] >= threshold) for p in stated.objects}
    for a, _, b in stated.relations:
        for p in (a, b):
            present.setdefault(tuple(p), bool(readout.presence[i, readout.index(p)] >= threshold))

    def centre(p: tuple[str, str]) -> tuple[float, float]:
        x, y = readout.centres[i, readout.index(p)]
        return float(x), float(y)

    rel_ok = [
        present[tuple(a)] and present[tuple(b)] and relation_holds(centre(a), r, centre(b), tolerance)
        for a, r, b in stated.relations
    ]
    obj_ok = [present[tuple(p)] for p in stated.objects]
    return all(obj_ok) and all(rel_ok), sum(obj_ok), len(obj_ok), sum(rel_ok), len(rel_ok)


def object_errors(
    readout: Readout, i: int, stated: ParsedCaption, threshold: float = 0.5
) -> tuple[int, int, int]:
    """How sample ``i``'s stated objects that are not read went wrong: (wrong colour, wrong shape, missing).

    A stated object (c, s) with p_(c,s) < ``threshold`` counts as *wrong colour* when its shape is read in a colour
    the caption does not state for that shape (some p_(c′,s) ≥ ``threshold``, c′ ≠ c, (c′, s) unstated), else as
    *wrong shape* when its colour is read on an unstated shape (p_(c,s′) ≥ ``threshold``), else as *missing*. A
    colour bound to the wrong object, or two colours blended within one, lands in the first class."""
    stated_set = {tuple(p) for p in stated.objects}
    wrong_colour = wrong_shape = missing = 0
    for colour, shape in stated.objects:
        if readout.presence[i, readout.index((colour, shape))] >= threshold:
            continue

        def read(pair: tuple[str, str]) -> bool:
            return pair not in stated_set and bool(readout.presence[i, readout.index(pair)] >= threshold)

        if any(read((c, s)) for c, s in readout.pairs if s == shape and c != colour):
            wrong_colour += 1
        elif any(read((c, s)) for c, s in readout.pairs if c == colour and s != shape):
            wrong_shape += 1
        else:
            missing += 1
    return wrong_colour, wrong_shape, missing


def compositional_report(
    images: Tensor,
    scenes_or_captions: Sequence[Statement],
    reader: SceneReader | None = None,
    *,
    data_config: ShapesConfig | None = None,
    tolerance: float = 1.0,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Compositional accuracy with its parts: ``compositional_accuracy`` (share of samples with every stated
    object and relation read), ``object_accuracy`` (share of stated objects read as present), ``relation_accuracy``
    (share of stated relations read), the stated objects not read split by :func:`object_errors` into
    ``object_wrong_colour``, ``object_wrong_shape`` and ``object_missing`` (shares of stated objects; the four
    object shares sum to 1) and ``correct`` (per-sample booleans). ``scenes_or_captions[i]`` states what
    image i should show: a :class:`Scene`, a scenes.json record, a :class:`ParsedCaption` or a caption (parsed with
    ``data_config``'s phrasings, default :class:`ShapesConfig`). ``reader`` defaults to the shipped one."""
    if images.ndim != 4 or images.shape[0] != len(scenes_or_captions):
        raise ValueError(
            f"compositional accuracy: {tuple(images.shape)} images but {len(scenes_or_captions)} scenes or captions"
        )
    readout = _reader(reader).read(images)
    statements = [_statement(s, data_config) for s in scenes_or_captions]
    rows = [sample_correct(readout, i, stated, tolerance, threshold) for i, stated in enumerate(statements)]
    errors = [object_errors(readout, i, stated, threshold) for i, stated in enumerate(statements)]
    n = max(len(rows), 1)
    objs, n_objs = sum(r[1] for r in rows), sum(r[2] for r in rows)
    rels, n_rels = sum(r[3] for r in rows), sum(r[4] for r in rows)
    per_object = max(n_objs, 1)
    return {
        "compositional_accuracy": sum(r[0] for r in rows) / n,
        "object_accuracy": objs / per_object,
        "relation_accuracy": rels / max(n_rels, 1),
        "object_wrong_colour": sum(e[0] for e in errors) / per_object,
        "object_wrong_shape": sum(e[1] for e in errors) / per_object,
        "object_missing": sum(e[2] for e in errors) / per_object,
        "correct": [r[0] for r in rows],
    }


def compositional_accuracy(
    images: Tensor,
    scenes_or_captions: Sequence[Statement],
    reader: SceneReader | None = None,
    *,
    data_config: ShapesConfig | None = None,
    tolerance: float = 1.0,
    threshold: float = 0.5,
) -> float:
    """Share of ``images`` whose every stated object (colour + shape) and every stated relation is read back
    (see :func:`compositional_report` for the arguments)."""
    return compositional_report(
        images, scenes_or_captions, reader, data_config=data_config, tolerance=tolerance, threshold=threshold
    )["compositional_accuracy"]


# ---- Fréchet distance -------------------------------------------------------------------------------------------
def _feature_model(reader: ShapesReader | None) -> ShapesReader:
    model = _reader(reader)
    if not isinstance(model, ShapesReader):
        raise TypeError(f"Fréchet distances need a ShapesReader's features, got {type(model).__name__}")
    return model


@torch.no_grad()
def feature_stats(
    images: Tensor, reader: ShapesReader | None = None, batch_size: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) in float64 of the reader's penultimate features of ``images`` ((N, 3, R, R) in [−1, 1], N ≥ 2); Σ is the
    unbiased sample covariance. ``reader`` defaults to the shipped one."""
    if images.ndim != 4 or images.shape[0] < 2:
        raise ValueError(
            f"feature_stats needs a batch of at least 2 images (N, 3, R, R), got shape {tuple(images.shape)}"
        )
    model = _feature_model(reader)
    was = model.training
    model.eval()
    feats = torch.cat(
        [model.features(images[i : i + batch_size].float()) for i in range(0, images.shape[0], batch_size)]
    )
    model.train(was)
    f = feats.double().cpu().numpy()
    return f.mean(axis=0), np.cov(f, rowvar=False)


def fd_between(images: Tensor, reference: Tensor, reader: ShapesReader | None = None) -> float:
    """FD between the reader features of two image sets (FD-T when ``reference`` holds teacher samples)."""
    model = _feature_model(reader)
    return frechet_distance(*feature_stats(images, model), *feature_stats(reference, model))


def real_feature_stats(
    count: int = 2000,
    reader: ShapesReader | None = None,
    data_config: ShapesConfig | None = None,
    stream: int = HELDOUT_STREAM,
) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) of ``count`` real scenes of ``stream`` (held-out by default) of ``data_config``."""
    model = _feature_model(reader)
    data = generate_scenes(count, data_config or ShapesConfig(resolution=model.config.resolution), stream)
    return feature_stats(data.images, model)


def fd_to_real(
    images: Tensor,
    reader: ShapesReader | None = None,
    count: int = 2000,
    data_config: ShapesConfig | None = None,
    stream: int = HELDOUT_STREAM,
) -> float:
    """FD between the reader features of ``images`` and of ``count`` real scenes (see :func:`real_feature_stats`)."""
    model = _feature_model(reader)
    return frechet_distance(*feature_stats(images, model), *real_feature_stats(count, model, data_config, stream))

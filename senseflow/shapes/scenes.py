"""The shapes data set: procedural, seeded 32×32 RGB scenes of coloured shapes with compositional captions.

A scene holds ``min_objects``..``max_objects`` objects (three by default). Each object is a distinct
(colour, shape) pair — shape ∈ {circle, square, triangle}, colour ∈ {red, green, blue, yellow, white, magenta} —
with centre (cx, cy) and size s drawn uniformly, painted on a dark background with mild seeded texture.

**Geometry.** Image coordinates are continuous: x grows to the right, y grows downwards, pixel (row i, column j)
covers [j, j+1) × [i, i+1). ``size`` s is half the side of an object's bounding box, whose centre is the object's
centre (cx, cy); every shape fills its box [cx − s, cx + s] × [cy − s, cy + s]:

* circle:   (x − cx)² + (y − cy)² ≤ s²
* square:   max(|x − cx|, |y − cy|) ≤ s
* triangle (pointing up): y ≤ cy + s and |x − cx| ≤ (y − cy + s) / 2   (apex (cx, cy − s), base at y = cy + s)

Objects lie wholly inside the image with ``edge_margin`` to spare. Coverage α ∈ [0, 1] of each pixel is the share of
its ``supersample``² sub-pixel points inside the shape (anti-aliased edges). Objects are painted in drawing order,
``pixel ← (1 − α)·pixel + α·colour``. **Overlap** of two objects is Σ min(α_A, α_B) / min(Σα_A, Σα_B) (the share of
the smaller object that the other one covers); a placement whose overlap with an earlier object exceeds
``max_overlap`` is rejected and redrawn, so every object stays readable.

**Relations** come from the centres with a margin m = ``relation_margin`` (pixels):

* A *left of* B  ⇔  cx_B − cx_A ≥ m          A *right of* B ⇔  cx_A − cx_B ≥ m
* A *above* B    ⇔  cy_B − cy_A ≥ m          A *below* B    ⇔  cy_A − cy_B ≥ m

so a stated relation is never a near tie. **Captions** (grammar): objects are named in a random order O₁, O₂, ...;
with ``a(O)`` = "a <colour> <shape>" and ``the(O)`` = "the <colour> <shape>",

    caption  = prefix + clause₂ + joiner + clause₃ + ...        (one object: prefix + a(O₁))
    clause₂  = a(O₁) <rel(O₁, O₂)> a(O₂)                         e.g. "a red circle to the left of a blue square"
    clause_k = a(O_k) <rel(O_k, ref)> ref   (k ≥ 3)              ref = the(O_j) for one j < k, or
                                                                 "them" / "both of them" / "both" = every O_j, j < k

e.g. ``"a red circle to the left of a blue square, a white triangle above them"``. Each relation is picked at
random among those that hold with the margin (a layout where a clause has none is redrawn); the phrase for each
relation, the prefix and the joiner are chosen at random from the config's phrasings. :func:`parse_caption` reads a
caption back into its objects and stated relations.

**Determinism.** Scene ``index`` of stream ``stream`` (0: training, 1: held-out, any int for more) under ``seed``
is drawn from ``numpy.random.default_rng(SeedSequence([seed, stream, index]))``: the same seed gives the same image
and caption, independently of how many scenes are made. :func:`export_json_dataset` writes the JSON image–caption
format of docs/method.md §13.1 (as :func:`senseflow.digits.data.export_json_dataset`) plus ``scenes.json``, the
ground truth of every record.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = [
    "SHAPES",
    "RELATIONS",
    "DEFAULT_COLOURS",
    "TRAIN_STREAM",
    "HELDOUT_STREAM",
    "ShapesConfig",
    "SceneObject",
    "Relation",
    "Scene",
    "ShapesData",
    "ParsedCaption",
    "relation_holds",
    "make_scene",
    "generate_scenes",
    "parse_caption",
    "to_uint8",
    "to_tensor",
    "export_json_dataset",
    "load_scenes_json",
]

#: Shapes the renderer can draw.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Spatial relations, read "subject <relation> object".
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")

#: Colour names and their RGB values (0..255) before per-object jitter.
DEFAULT_COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (225, 40, 40)),
    ("green", (40, 200, 60)),
    ("blue", (50, 95, 240)),
    ("yellow", (235, 220, 45)),
    ("white", (235, 235, 235)),
    ("magenta", (220, 50, 220)),
)

#: Phrasings of each relation ("subject <phrase> object").
DEFAULT_RELATION_PHRASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("left", ("to the left of", "left of", "on the left of")),
    ("right", ("to the right of", "right of", "on the right of")),
    ("above", ("above", "over")),
    ("below", ("below", "under", "beneath")),
)

#: Scene streams: the training scenes and the held-out scenes of a seed never coincide.
TRAIN_STREAM = 0
HELDOUT_STREAM = 1

_FORMAT = "senseflow-shapes-scenes"


@dataclass(frozen=True)
class ShapesConfig:
    """How scenes are drawn, rendered and captioned (documented defaults of the schema). Lengths are in pixels,
    colour values in 0..255.

    * ``resolution``: image side R;
    * ``min_objects`` / ``max_objects``: the object count is uniform in [min, max] (at most one object per
      (colour, shape) pair);
    * ``shapes``: shapes drawn (a subset of :data:`SHAPES`); ``colours``: (name, (r, g, b)) pairs;
    * ``min_size`` / ``max_size``: range of the half-side s of an object's bounding box (uniform);
    * ``edge_margin``: free space between an object's box and the image border;
    * ``max_overlap``: largest share of the smaller of two objects that the other may cover (see module doc);
    * ``relation_margin``: m, the centre offset from which a relation holds (and may be stated);
    * ``placement_tries``: placements tried per object before the whole scene is redrawn;
      ``scene_tries``: scene redraws before giving up (ValueError: the settings leave no room);
    * ``background``: background RGB; ``texture_grid`` / ``texture_std``: a ``texture_grid``² grid of per-channel
      Gaussian offsets (std ``texture_std``), bilinearly upsampled and added to the background (low-frequency
      mottling); ``noise_std``: per-pixel Gaussian noise over the whole image;
    * ``colour_jitter``: each object's colour is its RGB plus a per-channel offset uniform in ±``colour_jitter``;
    * ``supersample``: sub-pixel points per pixel side for anti-aliasing;
    * ``prefixes`` / ``joiners``: caption openings and clause separators (one of each per caption);
      ``relation_phrases``: (relation, phrasings) for each of :data:`RELATIONS`;
      ``them_phrases``: references to every earlier object; ``both_phrases``: the same, used only for exactly two;
      ``p_them``: probability of referring to every earlier object when a relation to all of them holds;
    * ``num_scenes``: scenes written by :func:`export_json_dataset`; ``seed``: seeds every scene.
    """

    resolution: int = 32
    min_objects: int = 3
    max_objects: int = 3
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[tuple[str, tuple[int, int, int]], ...] = DEFAULT_COLOURS
    min_size: float = 4.0
    max_size: float = 6.5
    edge_margin: float = 1.0
    max_overlap: float = 0.1
    relation_margin: float = 4.0
    placement_tries: int = 50
    scene_tries: int = 100
    background: tuple[int, int, int] = (18, 18, 28)
    texture_grid: int = 4
    texture_std: float = 6.0
    noise_std: float = 3.0
    colour_jitter: float = 12.0
    supersample: int = 4
    prefixes: tuple[str, ...] = ("", "a picture of ", "a dark image with ")
    joiners: tuple[str, ...] = (", ", " and ", "; ")
    relation_phrases: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_RELATION_PHRASES
    them_phrases: tuple[str, ...] = ("them",)
    both_phrases: tuple[str, ...] = ("both of them", "both")
    p_them: float = 0.5
    num_scenes: int = 5000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.resolution < 8:
            raise ValueError(f"ShapesConfig.resolution must be >= 8, got {self.resolution}")
        if not self.shapes or any(s not in SHAPES for s in self.shapes) or len(set(self.shapes)) != len(self.shapes):
            raise ValueError(f"ShapesConfig.shapes must be distinct names from {SHAPES}, got {self.shapes}")
        names = [c[0] for c in self.colours]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"ShapesConfig.colours must hold distinctly named colours, got {names}")
        for name, rgb in self.colours:
            if not re.fullmatch(r"[a-z]+", name) or len(rgb) != 3 or any(not 0 <= int(v) <= 255 for v in rgb):
                raise ValueError(
                    f"ShapesConfig.colours: {name!r} must be a lower-case word with an RGB in 0..255, got {rgb}"
                )
        if not 1 <= self.min_objects <= self.max_objects <= len(self.shapes) * len(self.colours):
            raise ValueError(
                f"ShapesConfig needs 1 <= min_objects <= max_objects <= {len(self.shapes) * len(self.colours)} "
                f"(distinct colour-shape pairs), got {self.min_objects}..{self.max_objects}"
            )
        if not 0 < self.min_size <= self.max_size or 2 * (self.max_size + self.edge_margin) > self.resolution:
            raise ValueError(
                "ShapesConfig sizes must satisfy 0 < min_size <= max_size and "
                "2·(max_size + edge_margin) <= resolution, got "
                f"{self.min_size}, {self.max_size}, {self.edge_margin}, {self.resolution}"
            )
        if not 0.0 <= self.max_overlap <= 1.0:
            raise ValueError(f"ShapesConfig.max_overlap must be in [0, 1], got {self.max_overlap}")
        if self.relation_margin <= 0:
            raise ValueError(f"ShapesConfig.relation_margin must be > 0, got {self.relation_margin}")
        if sorted(r for r, _ in self.relation_phrases) != sorted(RELATIONS) or any(
            not p for _, p in self.relation_phrases
        ):
            raise ValueError(f"ShapesConfig.relation_phrases must give phrasings for each of {RELATIONS}")
        if not self.prefixes or not self.joiners or not self.them_phrases:
            raise ValueError("ShapesConfig.prefixes, joiners and them_phrases must each hold at least one phrasing")
        if not 0.0 <= self.p_them <= 1.0:
            raise ValueError(f"ShapesConfig.p_them must be in [0, 1], got {self.p_them}")
        if self.supersample < 1 or self.texture_grid < 1 or self.placement_tries < 1 or self.scene_tries < 1:
            raise ValueError("ShapesConfig.supersample, texture_grid, placement_tries and scene_tries must be >= 1")

    @property
    def colour_names(self) -> tuple[str, ...]:
        return tuple(c[0] for c in self.colours)

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        """Every (colour, shape) pair, colour-major: the reader's output order."""
        return tuple((c, s) for c in self.colour_names for s in self.shapes)

    def phrases(self, relation: str) -> tuple[str, ...]:
        return dict(self.relation_phrases)[relation]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShapesConfig":
        """Inverse of :meth:`to_dict` (JSON turns tuples into lists; they are turned back)."""
        d = dict(d)
        d["colours"] = tuple((n, tuple(int(v) for v in rgb)) for n, rgb in d.get("colours", DEFAULT_COLOURS))
        d["relation_phrases"] = tuple((r, tuple(p)) for r, p in d.get("relation_phrases", DEFAULT_RELATION_PHRASES))
        for k in ("shapes", "background", "prefixes", "joiners", "them_phrases", "both_phrases"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


@dataclass(frozen=True)
class SceneObject:
    """One object: its shape and colour name, centre (cx, cy) and half-side ``size`` in pixels, and the RGB it was
    painted with (after jitter)."""

    shape: str
    colour: str
    cx: float
    cy: float
    size: float
    rgb: tuple[int, int, int] = (0, 0, 0)

    @property
    def pair(self) -> tuple[str, str]:
        return (self.colour, self.shape)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Relation:
    """A stated relation "objects[subject] <relation> objects[object]" (indices into :attr:`Scene.objects`)."""

    subject: int
    relation: str
    object: int


@dataclass
class Scene:
    """Ground truth of one image: objects in the caption's order of mention, the relations the caption states, the
    caption, and the objects' drawing order (indices into ``objects``, back to front)."""

    objects: list[SceneObject]
    relations: list[Relation]
    caption: str
    draw_order: list[int] = field(default_factory=list)

    def stated_pairs(self) -> list[tuple[str, str]]:
        return [o.pair for o in self.objects]

    def stated_relations(self) -> list[tuple[tuple[str, str], str, tuple[str, str]]]:
        """Stated relations as ((colour, shape), relation, (colour, shape)) triples."""
        return [(self.objects[r.subject].pair, r.relation, self.objects[r.object].pair) for r in self.relations]

    def to_dict(self) -> dict[str, Any]:
        return {
            "caption": self.caption,
            "objects": [asdict(o) for o in self.objects],
            "relations": [[r.subject, r.relation, r.object] for r in self.relations],
            "draw_order": list(self.draw_order),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scene":
        objects = [SceneObject(**{**o, "rgb": tuple(o.get("rgb", (0, 0, 0)))}) for o in d["objects"]]
        relations = [Relation(int(s), str(r), int(o)) for s, r, o in d["relations"]]
        return cls(objects, relations, d["caption"], list(d.get("draw_order", range(len(objects)))))


@dataclass
class ShapesData:
    """A set of scenes: ``images`` (N, 3, R, R) float32 in [−1, 1] (exactly the uint8 pixels, x = u/127.5 − 1),
    the ground truth ``scenes`` and the ``captions``."""

    images: Tensor
    scenes: list[Scene]
    config: ShapesConfig

    def __len__(self) -> int:
        return len(self.scenes)

    @property
    def captions(self) -> list[str]:
        return [s.caption for s in self.scenes]


@dataclass
class ParsedCaption:
    """What a caption states: its objects as (colour, shape) pairs in order of first mention, and its relations as
    ((colour, shape), relation, (colour, shape)) triples."""

    objects: list[tuple[str, str]]
    relations: list[tuple[tuple[str, str], str, tuple[str, str]]]


# ---- geometry ---------------------------------------------------------------------------------------------------
def relation_holds(subject: tuple[float, float], relation: str, obj: tuple[float, float], margin: float) -> bool:
    """Whether centre ``subject`` = (x, y) is ``relation`` (left / right / above / below) of centre ``obj`` by at
    least ``margin`` pixels (y grows downwards)."""
    (xs, ys), (xo, yo) = subject, obj
    if relation == "left":
        return xo - xs >= margin
    if relation == "right":
        return xs - xo >= margin
    if relation == "above":
        return yo - ys >= margin
    if relation == "below":
        return ys - yo >= margin
    raise ValueError(f"relation {relation!r} is not one of {RELATIONS}")


def _holding(a: SceneObject, b: SceneObject, margin: float) -> list[str]:
    return [r for r in RELATIONS if relation_holds((a.cx, a.cy), r, (b.cx, b.cy), margin)]


def _coverage(shape: str, cx: float, cy: float, s: float, resolution: int, supersample: int) -> np.ndarray:
    """(R, R) float32 coverage α of the shape: the share of each pixel's supersample² sub-pixel points inside it."""
    n = resolution * supersample
    t = (np.arange(n, dtype=np.float64) + 0.5) / supersample
    x, y = t[None, :], t[:, None]
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= s * s
    elif shape == "square":
        inside = (np.abs(x - cx) <= s) & (np.abs(y - cy) <= s)
    elif shape == "triangle":
        inside = (y <= cy + s) & (np.abs(x - cx) <= (y - cy + s) / 2.0)
    else:
        raise ValueError(f"shape {shape!r} is not one of {SHAPES}")
    return inside.reshape(resolution, supersample, resolution, supersample).mean(axis=(1, 3)).astype(np.float32)


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Σ min(α_A, α_B) / min(Σα_A, Σα_B)."""
    return float(np.minimum(a, b).sum() / max(min(a.sum(), b.sum()), 1e-6))


def _upsample_bilinear(grid: np.ndarray, size: int) -> np.ndarray:
    """(g, g, C) → (size, size, C), bilinear with half-pixel centres (align_corners=False), edges clamped."""
    g = grid.shape[0]
    pos = np.clip((np.arange(size) + 0.5) * g / size - 0.5, 0.0, g - 1.0)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, g - 1)
    w = pos - lo
    m = np.zeros((size, g))
    m[np.arange(size), lo] += 1.0 - w
    m[np.arange(size), hi] += w
    return np.einsum("ia,abc,jb->ijc", m, grid, m)


# ---- one scene --------------------------------------------------------------------------------------------------
def _scene_rng(config: ShapesConfig, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(config.seed), int(stream), int(index)]))


def _draw_layout(config: ShapesConfig, rng: np.random.Generator) -> tuple[list[SceneObject], list[np.ndarray]] | None:
    """Objects in drawing order with their coverages, or None when some object found no place."""
    r = config.resolution
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    pairs = config.pairs
    chosen = rng.choice(len(pairs), size=n, replace=False)
    rgb_of = dict(config.colours)
    objects: list[SceneObject] = []
    masks: list[np.ndarray] = []
    for k in chosen:
        colour, shape = pairs[int(k)]
        for _ in range(config.placement_tries):
            s = float(rng.uniform(config.min_size, config.max_size))
            lo, hi = s + config.edge_margin, r - s - config.edge_margin
            cx, cy = (float(v) for v in rng.uniform(lo, hi, size=2))
            mask = _coverage(shape, cx, cy, s, r, config.supersample)
            if all(_overlap(mask, m) <= config.max_overlap for m in masks):
                break
        else:
            return None
        jitter = rng.uniform(-config.colour_jitter, config.colour_jitter, size=3)
        red, green, blue = (int(v) for v in np.clip(np.round(np.asarray(rgb_of[colour]) + jitter), 0, 255))
        objects.append(SceneObject(shape, colour, round(cx, 4), round(cy, 4), round(s, 4), (red, green, blue)))
        masks.append(mask)
    return objects, masks


def _a(o: SceneObject) -> str:
    return f"{'an' if o.colour[0] in 'aeiou' else 'a'} {o.name}"


def _caption(
    objects: list[SceneObject], config: ShapesConfig, rng: np.random.Generator
) -> tuple[str, list[Relation]] | None:
    """Caption and stated relations of ``objects`` (already in order of mention), or None when some clause has no
    relation that holds with the margin."""
    m = config.relation_margin
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    prefix = pick(config.prefixes)
    if len(objects) == 1:
        return prefix + _a(objects[0]), []
    rels = _holding(objects[0], objects[1], m)
    if not rels:
        return None
    rel = pick(rels)
    clauses = [f"{_a(objects[0])} {pick(config.phrases(rel))} {_a(objects[1])}"]
    relations = [Relation(0, rel, 1)]
    for k in range(2, len(objects)):
        o = objects[k]
        to_all = [r for r in RELATIONS if all(relation_holds((o.cx, o.cy), r, (p.cx, p.cy), m) for p in objects[:k])]
        singles = [(j, r) for j in range(k) for r in _holding(o, objects[j], m)]
        if not singles:
            return None
        if to_all and rng.random() < config.p_them:
            rel = pick(to_all)
            refs = config.them_phrases + (config.both_phrases if k == 2 else ())
            clauses.append(f"{_a(o)} {pick(config.phrases(rel))} {pick(refs)}")
            relations += [Relation(k, rel, j) for j in range(k)]
        else:
            j, rel = pick(singles)
            clauses.append(f"{_a(o)} {pick(config.phrases(rel))} the {objects[j].name}")
            relations.append(Relation(k, rel, j))
    return prefix + pick(config.joiners).join(clauses), relations


def _render(
    objects: list[SceneObject], masks: list[np.ndarray], config: ShapesConfig, rng: np.random.Generator
) -> np.ndarray:
    r = config.resolution
    img = np.broadcast_to(np.asarray(config.background, np.float64), (r, r, 3)).copy()
    if config.texture_std > 0:
        img += _upsample_bilinear(rng.normal(0.0, config.texture_std, (config.texture_grid, config.texture_grid, 3)), r)
    for o, a in zip(objects, masks):
        img = img * (1.0 - a[..., None]) + np.asarray(o.rgb, np.float64) * a[..., None]
    if config.noise_std > 0:
        img += rng.normal(0.0, config.noise_std, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def make_scene(index: int, config: ShapesConfig | None = None, stream: int = TRAIN_STREAM) -> tuple[np.ndarray, Scene]:
    """Scene ``index`` of ``stream``: its (R, R, 3) uint8 image and its ground truth. Deterministic in
    (config, stream, index)."""
    config = config or ShapesConfig()
    rng = _scene_rng(config, index, stream)
    for _ in range(config.scene_tries):
        layout = _draw_layout(config, rng)
        if layout is None:
            continue
        drawn, masks = layout
        order = [int(i) for i in rng.permutation(len(drawn))]  # order of mention
        objects = [drawn[i] for i in order]
        cap = _caption(objects, config, rng)
        if cap is None:
            continue
        text, relations = cap
        draw_order = [order.index(i) for i in range(len(drawn))]
        return _render(drawn, masks, config, rng), Scene(objects, relations, text, draw_order)
    raise ValueError(
        f"no scene found in {config.scene_tries} tries (index {index}, stream {stream}): the sizes, max_overlap and "
        "relation_margin leave no room for the object count"
    )


def to_tensor(pixels: np.ndarray) -> Tensor:
    """(N, H, W, 3) uint8 → (N, 3, H, W) float32 in [−1, 1], x = u/127.5 − 1 (inverse of :func:`to_uint8`)."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, 3, H, W) pixels in [−1, 1] → (N, H, W, 3) uint8 with u = round((x + 1)/2 · 255)."""
    u = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return u.permute(0, 2, 3, 1).cpu().numpy()


def generate_scenes(
    count: int, config: ShapesConfig | None = None, stream: int = TRAIN_STREAM, start: int = 0
) -> ShapesData:
    """Scenes ``start`` .. ``start + count − 1`` of ``stream`` as images and ground truth."""
    config = config or ShapesConfig()
    pixels = np.empty((count, config.resolution, config.resolution, 3), np.uint8)
    scenes: list[Scene] = []
    for i in range(count):
        pixels[i], scene = make_scene(start + i, config, stream)
        scenes.append(scene)
    return ShapesData(to_tensor(pixels), scenes, config)


# ---- captions back to statements ------------------------------------------------------------------------------
def _alternation(words: Sequence[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))


def parse_caption(caption: str, config: ShapesConfig | None = None) -> ParsedCaption:
    """Read a caption of the grammar in the module doc back into objects and stated relations.

    Tokens, in order: mentions "<colour> <shape>", relation phrases, and references to every earlier object
    ("them", "both of them", "both"). A relation's subject is the mention just before it; its object is the mention
    just after it, or — for a reference — every object first mentioned before the subject. Raises ValueError when a
    relation phrase lacks a subject or an object.
    """
    config = config or ShapesConfig()
    rel_of = {p: r for r, ps in config.relation_phrases for p in ps}
    pattern = re.compile(
        rf"\b(?:(?P<colour>{_alternation(config.colour_names)}) (?P<shape>{_alternation(config.shapes)})"
        rf"|(?P<rel>{_alternation(list(rel_of))})"
        rf"|(?P<them>{_alternation(config.them_phrases + config.both_phrases)}))\b"
    )
    tokens: list[tuple[str, Any]] = []
    for m in pattern.finditer(caption.lower()):
        if m.group("colour"):
            tokens.append(("obj", (m.group("colour"), m.group("shape"))))
        elif m.group("rel"):
            tokens.append(("rel", rel_of[m.group("rel")]))
        else:
            tokens.append(("them", None))
    objects: list[tuple[str, str]] = []
    for kind, v in tokens:
        if kind == "obj" and v not in objects:
            objects.append(v)
    relations: list[tuple[tuple[str, str], str, tuple[str, str]]] = []
    for i, (kind, rel) in enumerate(tokens):
        if kind != "rel":
            continue
        if i == 0 or tokens[i - 1][0] != "obj" or i + 1 >= len(tokens) or tokens[i + 1][0] == "rel":
            raise ValueError(f"caption {caption!r}: relation {rel!r} needs an object mention before and after it")
        subject = tokens[i - 1][1]
        if tokens[i + 1][0] == "obj":
            relations.append((subject, rel, tokens[i + 1][1]))
        else:
            earlier = objects[: objects.index(subject)]
            if not earlier:
                raise ValueError(f"caption {caption!r}: 'them' after {subject} refers to no earlier object")
            relations += [(subject, rel, o) for o in earlier]
    return ParsedCaption(objects, relations)


# ---- export -----------------------------------------------------------------------------------------------------
def export_json_dataset(
    folder: str | Path,
    config: ShapesConfig | None = None,
    json_name: str = "dataset.json",
    image_dir: str = "images",
    scenes_name: str = "scenes.json",
    stream: int = TRAIN_STREAM,
) -> Path:
    """Write ``config.num_scenes`` scenes of ``stream`` as ``<folder>/<image_dir>/<key>.png`` and
    ``<folder>/<json_name>`` holding ``{"keys": [...], "image_paths": [...], "prompts": [...]}`` (docs/method.md
    §13.1; image paths relative to the JSON's folder), plus ``<folder>/<scenes_name>`` = ``{"format", "config",
    "stream", "keys", "scenes"}`` with the ground truth of every record (:meth:`Scene.to_dict`). Returns the JSON
    path."""
    config = config or ShapesConfig()
    folder = Path(folder)
    (folder / image_dir).mkdir(parents=True, exist_ok=True)
    keys, paths, prompts, truth = [], [], [], []
    for i in range(config.num_scenes):
        pixels, scene = make_scene(i, config, stream)
        key = f"{i:08d}"
        rel = f"{image_dir}/{key}.png"
        Image.fromarray(pixels).save(folder / rel)
        keys.append(key)
        paths.append(rel)
        prompts.append(scene.caption)
        truth.append(scene.to_dict())
    record = {"format": _FORMAT, "config": config.to_dict(), "stream": int(stream), "keys": keys, "scenes": truth}
    (folder / scenes_name).write_text(json.dumps(record, indent=1))
    out = folder / json_name
    out.write_text(json.dumps({"keys": keys, "image_paths": paths, "prompts": prompts}, indent=1))
    return out


def load_scenes_json(path: str | Path) -> tuple[ShapesConfig, list[Scene]]:
    """The config and ground-truth scenes of a ``scenes.json`` written by :func:`export_json_dataset`."""
    blob = json.loads(Path(path).read_text())
    if blob.get("format") != _FORMAT:
        raise ValueError(f"{path}: format is {blob.get('format')!r}, expected {_FORMAT!r} (a shapes scenes.json)")
    return ShapesConfig.from_dict(blob["config"]), [Scene.from_dict(s) for s in blob["scenes"]]

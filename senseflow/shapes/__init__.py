"""The shapes benchmark: procedural scenes of coloured shapes with compositional captions, and a reader to score them.

* :mod:`.scenes` — seeded 32×32 RGB scenes (one to three objects: circle / square / triangle in six colours, on a
  dark textured background), captions naming every object's colour and shape and their spatial relations, the
  ground truth of every scene, and a JSON image-caption export (docs/method.md §13.1) with a ``scenes.json``.
* :mod:`.reader` — a small CNN trained by the project that reads each (colour, shape) pair's presence and centre;
  **compositional accuracy** (every stated object and relation read back) and Fréchet distances of its features.

Training the reader: ``python tools/train_shapes_reader.py --out FILE [--seed S]``.
"""

from senseflow.shapes.reader import (
    GroundTruthReader,
    ReaderConfig,
    ShapesReader,
    compositional_accuracy,
    compositional_report,
    default_reader_path,
    fd_between,
    fd_to_real,
    load_reader,
    save_reader,
    train_reader,
)
from senseflow.shapes.scenes import (
    HELDOUT_STREAM,
    TRAIN_STREAM,
    Scene,
    ShapesConfig,
    export_json_dataset,
    generate_scenes,
    make_scene,
    parse_caption,
)

__all__ = [
    "HELDOUT_STREAM",
    "TRAIN_STREAM",
    "GroundTruthReader",
    "ReaderConfig",
    "Scene",
    "ShapesConfig",
    "ShapesReader",
    "compositional_accuracy",
    "compositional_report",
    "default_reader_path",
    "export_json_dataset",
    "fd_between",
    "fd_to_real",
    "generate_scenes",
    "load_reader",
    "make_scene",
    "parse_caption",
    "save_reader",
    "train_reader",
]

#!/usr/bin/env python
"""Train the shapes reader (the feature network of the shapes metrics) and report its held-out compositional accuracy.

  python tools/train_shapes_reader.py --out /tmp/shapes_reader.safetensors --seed 0
  python tools/train_shapes_reader.py --out senseflow/assets/shapes_reader.safetensors

The reader (:mod:`senseflow.shapes.reader`, default :class:`ReaderConfig`) is trained on generated scenes of the
training stream of ``ShapesConfig(seed=S)``; ``--heldout`` scenes of the held-out stream of the same seed (never seen
in training) are read back and scored: compositional accuracy (every stated object and relation read back), and
its parts. The safetensors file's metadata record the config, the seed, the scores and the wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="safetensors file to write the reader to")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenes and of the training (default 0)")
    p.add_argument("--heldout", type=int, default=2000, help="held-out scenes scored (default 2000)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared 2-core machine)")
    p.add_argument("--scenes", type=int, help="training scenes (default: ReaderConfig.num_train_scenes)")
    p.add_argument("--epochs", type=int, help="epochs (default: ReaderConfig.epochs)")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from senseflow.shapes.reader import ReaderConfig, compositional_report, save_reader, train_reader
    from senseflow.shapes.scenes import HELDOUT_STREAM, ShapesConfig, generate_scenes

    data_config = ShapesConfig(seed=args.seed)
    overrides = {k: v for k, v in (("num_train_scenes", args.scenes), ("epochs", args.epochs)) if v is not None}
    config = ReaderConfig.for_data(data_config, seed=args.seed, **overrides)
    t0 = time.perf_counter()
    reader = train_reader(config, data_config)
    train_s = time.perf_counter() - t0
    held = generate_scenes(args.heldout, data_config, HELDOUT_STREAM)
    report = compositional_report(held.images, held.scenes, reader)
    caption_acc = compositional_report(held.images, held.captions, reader, data_config=data_config)[
        "compositional_accuracy"
    ]
    scores = {k: v for k, v in report.items() if k != "correct"}
    extra = {
        "heldout_compositional_accuracy": scores["compositional_accuracy"],
        "heldout_object_accuracy": scores["object_accuracy"],
        "heldout_relation_accuracy": scores["relation_accuracy"],
        "heldout_caption_compositional_accuracy": caption_acc,
        "heldout_scenes": args.heldout,
        "seed": args.seed,
        "data_config": data_config.to_dict(),
        "wall_time_s": train_s,
        "threads": args.threads,
    }
    save_reader(reader, args.out, extra=extra)
    print(
        f"reader: held-out compositional accuracy {scores['compositional_accuracy']:.4f} "
        f"(from captions {caption_acc:.4f}; objects {scores['object_accuracy']:.4f}, "
        f"relations {scores['relation_accuracy']:.4f}; {args.heldout} scenes), "
        f"training {train_s:.0f}s on {args.threads} thread(s) -> {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)"
    )
    print(json.dumps({k: v for k, v in extra.items() if k != "data_config"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

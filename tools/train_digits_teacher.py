#!/usr/bin/env python
"""Train a digits teacher of any family with ``senseflow teacher train`` and score it, and/or the digit classifier.

  python tools/train_digits_teacher.py --family sd3 --out digits_teachers/sd3 [key=value ...]
  python tools/train_digits_teacher.py --classifier-out senseflow/assets/digits_classifier.safetensors --seed 0

The teacher: the digits set is written as a JSON image-caption set (``--data``, kept if present), the command
trains on it with ``configs/teacher/<family>.yaml`` (plus the ``key=value`` overrides; re-running continues an
interrupted run), then the stock pipeline's Euler samples at ``--steps`` (28 and 4) with the teacher's guidance
scale are scored with the classifier (``--classifier``, default the one just trained, else the shipped one):
prompt accuracy and FD to real digits, written to ``<out>/digits_evaluation.json`` and printed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=("sdxl", "sd3", "flux"), help="teacher family to train")
    p.add_argument("--out", type=Path, help="the teacher's diffusers folder")
    p.add_argument("--data", type=Path, default=Path("digits_work/data"), help="where the digits set is written")
    p.add_argument("--classifier-out", type=Path, help="safetensors file to write the classifier to")
    p.add_argument("--classifier", type=Path, help="classifier used to evaluate the teacher (default: shipped)")
    p.add_argument("--seed", type=int, default=0, help="seed of the classifier (the teacher's is the key 'seed')")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared 2-core machine)")
    p.add_argument("--per-digit", type=int, default=10, help="evaluation samples per digit (default 10)")
    p.add_argument("--steps", type=int, nargs="+", default=[28, 4], help="Euler step counts scored (default 28 4)")
    p.add_argument("--no-eval", action="store_true", help="skip the sample evaluation after teacher training")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="teacher config overrides")
    args = p.parse_args(argv)
    if args.out is None and args.classifier_out is None:
        p.error("give --family and --out (teacher) and/or --classifier-out (classifier)")
    if args.out is not None and args.family is None:
        p.error("--out needs --family")

    import torch

    torch.set_num_threads(args.threads)
    from senseflow.digits.classifier import (
        ClassifierConfig,
        accuracy,
        load_classifier,
        save_classifier,
        train_classifier,
    )
    from senseflow.digits.data import DigitsDataConfig, export_json_dataset, load_digits_data

    classifier = None
    if args.classifier_out is not None:
        t0 = time.perf_counter()
        data = load_digits_data(DigitsDataConfig(seed=args.seed))
        classifier = train_classifier(*data.subset("train"), ClassifierConfig(), seed=args.seed)
        acc = accuracy(classifier, *data.subset("heldout"))
        wall = time.perf_counter() - t0
        save_classifier(
            classifier, args.classifier_out, extra={"heldout_accuracy": acc, "seed": args.seed, "wall_time_s": wall}
        )
        print(
            f"classifier: held-out accuracy {acc:.4f} ({len(data.heldout_index)} images), {wall:.0f}s "
            f"-> {args.classifier_out}"
        )

    if args.out is not None:
        from senseflow.digits.teacher import evaluate_teacher, load_teacher
        from senseflow.teacher.cli import main_teacher
        from senseflow.teacher.train import CARD

        dataset = args.data / "dataset.json"
        if not dataset.is_file():
            export_json_dataset(args.data)
        main_teacher(
            ["train", "--family", args.family, "--data", str(dataset), "--out", str(args.out), *args.overrides]
        )
        if args.no_eval:
            return 0
        card = json.loads((args.out / CARD).read_text())
        gen = card["generation"]
        if args.classifier is not None or classifier is None:
            classifier = load_classifier(args.classifier)
        t0 = time.perf_counter()
        result = evaluate_teacher(load_teacher(args.out), classifier, per_digit=args.per_digit,
                                  guidance_scale=gen["guidance_scale"], steps=tuple(args.steps),
                                  max_sequence_length=gen["max_sequence_length"], resolution=gen["height"])
        result["wall_time_s"] = time.perf_counter() - t0
        result["teacher_training_s"] = card["wall_time_s"]
        (args.out / "digits_evaluation.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

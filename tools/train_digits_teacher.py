#!/usr/bin/env python
"""Train the embedded digits teacher (a tiny SD3 diffusers folder) and/or the digit classifier, from a seed.

  python tools/train_digits_teacher.py --out senseflow/assets/digits_teacher --seed 0
  python tools/train_digits_teacher.py --classifier-out senseflow/assets/digits_classifier.safetensors --seed 0

With both, the classifier is trained first and then used to evaluate the teacher. After training a teacher,
its 28- and 4-step Euler samples are scored (prompt accuracy, FD to real digits) with the classifier given by
``--classifier`` (default: the one just trained, else the shipped one) and the numbers go into the teacher's
training record. Hyperparameters are the defaults of the config dataclasses in senseflow.digits.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="diffusers folder to write the teacher to")
    p.add_argument("--classifier-out", type=Path, help="safetensors file to write the classifier to")
    p.add_argument("--classifier", type=Path, help="classifier used to evaluate the teacher (default: shipped)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1: fastest on a shared 2-core machine, and the setting the shipped artefacts were trained with)")
    p.add_argument("--flow-steps", type=int, help="override FlowTrainConfig.steps (quick runs)")
    p.add_argument("--vae-steps", type=int, help="override VAEConfig.steps (quick runs)")
    p.add_argument("--no-eval", action="store_true", help="skip the sample evaluation after teacher training")
    args = p.parse_args(argv)
    if args.out is None and args.classifier_out is None:
        p.error("give --out (teacher) and/or --classifier-out (classifier)")

    import torch

    torch.set_num_threads(args.threads)
    from senseflow.digits.classifier import ClassifierConfig, accuracy, load_classifier, save_classifier, train_classifier
    from senseflow.digits.data import DigitsDataConfig, load_digits_data
    from senseflow.digits.teacher import DigitsTeacherConfig, evaluate_teacher, save_teacher, train_teacher

    classifier = None
    if args.classifier_out is not None:
        t0 = time.perf_counter()
        data = load_digits_data(DigitsDataConfig(seed=args.seed))
        cfg = ClassifierConfig()
        classifier = train_classifier(*data.subset("train"), cfg, seed=args.seed)
        acc = accuracy(classifier, *data.subset("heldout"))
        wall = time.perf_counter() - t0
        save_classifier(classifier, args.classifier_out, extra={"heldout_accuracy": acc, "seed": args.seed, "wall_time_s": wall})
        print(f"classifier: held-out accuracy {acc:.4f} ({len(data.heldout_index)} images), {wall:.0f}s -> {args.classifier_out}")

    if args.out is not None:
        config = DigitsTeacherConfig(seed=args.seed, data=DigitsDataConfig(seed=args.seed))
        if args.flow_steps is not None:
            config = replace(config, flow=replace(config.flow, steps=args.flow_steps))
        if args.vae_steps is not None:
            config = replace(config, vae=replace(config.vae, steps=args.vae_steps))
        pipe, record = train_teacher(config)
        pipe.set_progress_bar_config(disable=True)
        if not args.no_eval:
            if args.classifier is not None or classifier is None:
                classifier = load_classifier(args.classifier)
            t0 = time.perf_counter()
            record["evaluation"] = evaluate_teacher(pipe, classifier, seed=args.seed)
            record["evaluation"]["wall_time_s"] = time.perf_counter() - t0
            print(json.dumps(record["evaluation"], indent=1))
        save_teacher(pipe, args.out, record)
        size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
        print(f"teacher: {record['wall_time_s']['total']:.0f}s training, {size / 2**20:.2f} MiB -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

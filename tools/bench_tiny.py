"""Measurements on the tiny teachers (CPU), all in one run so that ratios are comparable:

1. one 4-step generation (batch 1, 64 px, stochastic sampler) per family: median over ``--repeats`` runs;
2. one training iteration of each tiny trainer: median of the per-iteration times of a 2·GD run;
3. network passes per generator iteration (forward / backward of G, F, T, VAE encode/decode, D heads, DINOv2),
   counted with module hooks on one generator iteration and one non-generator iteration.

Usage: python tools/bench_tiny.py --out docs/bench_tiny.json [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from senseflow.config import load_config
from senseflow.core.anchors import make_anchors
from senseflow.method.sampling import sample_stochastic
from senseflow.models.families import build_family
from senseflow.quiet import quiet_libraries
from senseflow.tiny import build_tiny_assets
from senseflow.trainer import TRAINERS, get_trainer

REPO = Path(__file__).resolve().parents[1]
FAMILY_OF = {"sdxl": "sdxl", "sd35-medium": "sd3", "sd35-large": "sd3", "flux": "flux"}


def time_generation(assets: Path, repeats: int) -> dict[str, float]:
    out = {}
    for kind, fam_name in FAMILY_OF.items():
        family = build_family(fam_name, path=assets / kind)
        teacher = family.load_denoiser()
        student = family.build_student(teacher).eval()
        cond = family.encode_prompts(["a red circle on a white background"])
        anchors = make_anchors(family.schedule(64, 64), 4)
        shape = (1, *family.latent_shape(64, 64))
        times = []
        for r in range(repeats + 1):
            t0 = time.perf_counter()
            with torch.no_grad():
                x0 = sample_stochastic(family, student, cond, anchors, torch.Generator().manual_seed(r), shape)
                family.decode_latents(x0)
            times.append(time.perf_counter() - t0)
        out[kind] = statistics.median(times[1:])  # the first run warms up
    return out


def overrides(assets: Path, name: str) -> list[str]:
    kind = {"sdxl": "sdxl", "sd35_large": "sd35-large", "sd35": "sd35-medium", "flux": "flux"}
    teacher = next(v for k, v in kind.items() if name.startswith(k))
    data = "sdxl_latents.lmdb" if teacher == "sdxl" else "dataset.json"
    return [f"teacher.path={assets / teacher}", f"data.path={assets / 'data' / data}",
            f"discriminator.dino_path={assets / 'backbones' / 'dinov2'}",
            f"discriminator.clip_path={assets / 'backbones' / 'clip_text'}"]


class PassCounter:
    """Counts forward calls and backward passes (gradients w.r.t. module inputs) of named modules."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.counts: Counter[str] = Counter()
        self.handles = []
        for name, m in modules.items():
            self.handles.append(m.register_forward_hook(lambda *_, n=name: self.counts.update([f"{n} fwd"])))
            self.handles.append(m.register_full_backward_hook(lambda *_, n=name: self.counts.update([f"{n} bwd"])))

    def take(self) -> dict[str, int]:
        out, self.counts = dict(self.counts), Counter()
        return out


def trainer_measurements(assets: Path, run_root: Path) -> tuple[dict[str, float], dict[str, dict]]:
    times, passes = {}, {}
    for name in sorted(TRAINERS):
        cfg = load_config(REPO / "configs" / "tiny" / f"{name}.yaml", overrides(assets, name))
        trainer = get_trainer(name)(cfg, run_root / name)
        trainer.setup()
        fam = trainer.family
        modules = {"G": trainer.generator, "F": trainer.fake, "T": trainer.teacher,
                   "VAE decoder": fam.vae.decoder, "VAE encoder": fam.vae.encoder}
        if trainer.discriminator is not None:
            # one head stands for all (each runs once per D call); DINOv2's patch embedding is called with a
            # positional tensor, so its backward hook sees gradients flowing to the judged pixels
            modules["D head (each)"] = trainer.discriminator.heads[0]
            modules["DINOv2"] = trainer.discriminator.dino.embeddings.patch_embeddings
        counter = PassCounter(modules)
        per_iter, records = [], {}
        gd = int(cfg.method.gd)
        for it in range(1, int(cfg.train.iterations) + 1):
            t0 = time.perf_counter()
            trainer.train_iteration(it)
            per_iter.append(time.perf_counter() - t0)
            trainer.iteration = it
            counts = counter.take()
            if it == gd:
                records["generator iteration"] = counts
            elif it == gd + 1:
                records["other iteration"] = counts
        times[name] = statistics.median(per_iter[1:])
        passes[name] = records
    return times, passes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    quiet_libraries()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        assets = build_tiny_assets(Path(tmp) / "tiny")
        generation = time_generation(assets, args.repeats)
        iteration, passes = trainer_measurements(assets, Path(tmp) / "runs")
    result = {"threads": 1, "generation_4step_median_s": generation, "iteration_median_s": iteration, "passes": passes}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

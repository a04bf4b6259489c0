"""Probe a distributed run from the inside; launched by tests/test_dist.py under ``torchrun``.

Modes:

``trainer``  build a trainer exactly as ``senseflow train`` does, record what every rank sees while it trains and
             write ``<out>/rank<r>.json``:

    * ``full_copies``: how many times this rank read the teacher's weights / copied them into a student (FSDP2:
      rank 0 only);
    * ``params``: for G, F, T and the discriminator heads, per parameter: type (DTensor / Tensor), placements,
      local and global shape — before and after training;
    * ``decisions``: the shared decisions of every iteration (must agree across ranks);
    * ``noise``: per iteration, a hash of the next draws of this rank's per-sample noise streams (must differ);
    * ``keys``: the data keys each rank read per iteration (disjoint across ranks);
    * ``generator_hash``: a hash of G's full (gathered) weights after training (must agree across ranks);
    * ``replica_hash``: a hash of the discriminator heads (replicated; must agree across ranks);
    * ``mismatch_detected``: whether :func:`senseflow.dist.assert_same_on_all_ranks` rejects rank-dependent values.

``toy``      the placement rules on a small block model: ``fsdp`` (meta-device build on ranks > 0),
             ``fsdp_plain`` (no config: built everywhere, rank 0's weights broadcast), ``hsdp`` (2-D mesh, one rank per
             "node") and ``ddp`` each train a few AdamW steps with clipping on rank-specific data; writes
             ``rank<r>.json`` with the final full weights' hash and max difference to a single-process run on the
             union of the data.

``logger``   the trainer's :class:`~senseflow.trainer.logger.RunLogger` on every rank: each logs rank-dependent losses
             and other values (its own key order) at two steps; rank 0 writes ``RUN_DIR/metrics.jsonl`` and
             ``RUN_DIR/tensorboard``; every rank writes the values it passed to ``<out>/rank<r>.json``.

usage: torchrun --nproc_per_node 2 tools/dist_probe.py trainer TRAINER CONFIG RUN_DIR OUT_DIR [key=value ...]
       torchrun --nproc_per_node 2 tools/dist_probe.py toy OUT_DIR
       torchrun --nproc_per_node 2 tools/dist_probe.py logger RUN_DIR OUT_DIR
(positional arguments only: torchrun would take options such as ``--run`` for abbreviations of its own)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

torch.set_num_threads(1)


def _digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _describe(module: nn.Module | None) -> dict[str, dict[str, Any]]:
    from torch.distributed.tensor import DTensor

    if module is None:
        return {}
    out = {}
    for name, p in module.named_parameters():
        if isinstance(p, DTensor):
            out[name] = {"type": "DTensor", "placements": [str(pl) for pl in p.placements],
                         "local_shape": list(p.to_local().shape), "global_shape": list(p.shape)}
        else:
            out[name] = {"type": "Tensor", "placements": [],
                         "local_shape": list(p.shape), "global_shape": list(p.shape)}
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def probe_trainer(args: argparse.Namespace) -> None:
    from senseflow import dist as sfdist
    from senseflow.config import load_config
    from senseflow.models.families.loading import DiffusersFamily
    from senseflow.trainer import get_trainer

    full_copies = {"teacher_loads": 0, "student_copies": 0}  # full networks materialised on this rank

    def counting(method, key):
        def wrapped(*a, **k):
            full_copies[key] += 1
            return method(*a, **k)
        return wrapped

    DiffusersFamily.load_denoiser = counting(DiffusersFamily.load_denoiser, "teacher_loads")
    DiffusersFamily._teacher_fp32 = counting(DiffusersFamily._teacher_fp32, "student_copies")
    cfg = load_config(args.config, list(args.overrides))
    trainer = get_trainer(args.trainer)(cfg, args.run)
    trainer.setup()
    rank = trainer.info.rank
    nets = {"generator": trainer.generator, "fake": trainer.fake, "teacher": trainer.teacher,
            "disc_heads": trainer.discriminator.heads if trainer.discriminator is not None else None}
    record: dict[str, Any] = {"rank": rank, "world_size": trainer.info.world_size,
                              "strategy": trainer.shard_opts.strategy,
                              "params_before": {k: _describe(m) for k, m in nets.items()},
                              "full_copies": dict(full_copies), "decisions": [], "noise": [], "keys": []}

    draw = trainer.distiller.draw_decisions

    def recording_draw(rng):
        d = draw(rng)
        mid = None if d.isg_mid is None else [float(v) for v in torch.as_tensor(d.isg_mid).reshape(-1)]
        record["decisions"].append([bool(d.backsim), int(d.k), float(d.dmd_guidance), float(d.isg_guidance), mid])
        gens = trainer.rng.noise(0, trainer.samples_per_iteration)
        peek = []
        for g in gens:  # the next draws of each per-sample stream, without consuming them
            clone = torch.Generator().manual_seed(0)
            clone.set_state(g.get_state())
            peek.append(torch.randn(16, generator=clone))
        record["noise"].append(_digest(peek))
        return d

    trainer.distiller.draw_decisions = recording_draw
    nxt = trainer.data.next

    def recording_next():
        batch = nxt()
        record["keys"].append([str(k) for k in batch["key"]])
        return batch

    trainer.data.next = recording_next
    trainer.train()
    for m in nets.values():  # at rest: a root gathered by a forward without backward holds full tensors until then
        if m is not None:
            sfdist.reshard(m)
    record["params_after"] = {k: _describe(m) for k, m in nets.items()}
    record["generator_hash"] = _digest([_full(p) for _, p in sorted(trainer.generator.named_parameters())])
    record["fake_hash"] = _digest([_full(p) for _, p in sorted(trainer.fake.named_parameters())])
    heads = nets["disc_heads"]
    record["replica_hash"] = _digest([p for _, p in sorted(heads.named_parameters())]) if heads is not None else None
    try:
        sfdist.assert_same_on_all_ranks(rank, "probe: the rank itself")
        record["mismatch_detected"] = False
    except RuntimeError:
        record["mismatch_detected"] = True
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(record, indent=1))
    sfdist.barrier()
    sfdist.cleanup()


# ---- toy ------------------------------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.lin(x))


class _PlainToy(nn.Module):
    """A block model without a config: every rank builds it, rank 0's weights are broadcast before sharding."""

    def __init__(self, width: int = 12, depth: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.blocks = nn.ModuleList(_Block(width) for _ in range(depth))
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.out(h)


class _Toy(_PlainToy):
    """The same model with a diffusers-like ``config`` / ``from_config``: non-zero ranks build it on the meta device."""

    def __init__(self, width: int = 12, depth: int = 3) -> None:
        super().__init__(width, depth)
        self.config = {"width": width, "depth": depth}

    @classmethod
    def from_config(cls, config: dict) -> "_Toy":
        return cls(**config)


def _toy_data(step: int, rank: int, per_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(per_rank, 4, generator=g), torch.randn(per_rank, 1, generator=g)


def _toy_train(model: nn.Module, steps: int, ranks: list[int], per_rank: int, params=None) -> None:
    from senseflow import dist as sfdist

    params = list(model.parameters()) if params is None else params
    opt = torch.optim.AdamW(params, lr=1e-2)
    for step in range(steps):
        for r in ranks:  # one process emulating several ranks accumulates their mean loss
            x, y = _toy_data(step, r, per_rank)
            (((model(x) - y) ** 2).mean() / len(ranks)).backward()
        sfdist.sync_replicated_grads(params)
        sfdist.clip_grad_norm(params, 0.05)
        opt.step()
        opt.zero_grad(set_to_none=True)


def probe_toy(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from senseflow import dist as sfdist

    info = sfdist.init_distributed("cpu")
    steps, per_rank = 4, 3
    torch.manual_seed(0)
    reference = _Toy()
    init = {k: v.clone() for k, v in reference.state_dict().items()}
    _toy_train(reference, steps, list(range(info.world_size)), per_rank)
    ref = {k: v.detach() for k, v in reference.state_dict().items()}
    results: dict[str, Any] = {}
    for mode in ("fsdp", "fsdp_plain", "hsdp", "ddp"):
        torch.manual_seed(100 + info.rank)  # every rank initialises differently: placement must fix that
        model = _PlainToy() if mode == "fsdp_plain" else _Toy()
        if info.is_main:
            model.load_state_dict(init)
        build_info = sfdist.DistInfo(info.rank, info.world_size, info.local_rank, info.device,
                                     local_world_size=1 if mode == "hsdp" else info.world_size)
        opts = sfdist.ShardOptions(strategy="ddp" if mode == "ddp" else "fsdp", hsdp=mode == "hsdp",
                                   activation_checkpointing=True, block_types=(_Block,))
        model = sfdist.build_sharded(lambda: model, build_info, opts, trainable=True)
        placements = sorted({str(tuple(str(p) for p in getattr(q, "placements", ()))) for q in model.parameters()})
        _toy_train(model, steps, [info.rank], per_rank)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        diff = max(float((_full(full[k]).cpu() - ref[k]).abs().max()) for k in ref)
        results[mode] = {"placements": placements, "max_diff_to_single_process": diff,
                         "hash": _digest([_full(full[k]) for k in sorted(full)])}
        dist.barrier()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{info.rank}.json").write_text(json.dumps(results, indent=1))
    sfdist.cleanup()


# ---- logger ---------------------------------------------------------------------------------------------------


def probe_logger(args: argparse.Namespace) -> None:
    from senseflow import dist as sfdist
    from senseflow.trainer.logger import RunLogger

    info = sfdist.init_distributed("cpu")
    r = info.rank
    Path(args.run).mkdir(parents=True, exist_ok=True)
    logger = RunLogger(Path(args.run), total=2, start=0, enabled=info.is_main, device=info.device)
    passed = []
    for step in (1, 2):
        values = {"loss/generator": step / 3 + 0.7 * r, "loss/fake": 0.1 * step * (r + 1) ** 2,
                  "lr/generator": 1e-4 * (r + 1), "time/iteration_s": 0.5 + r}
        if r % 2:  # the loss keys in another order than rank 0's
            values = dict(reversed(list(values.items())))
        logger.scalars(step, values)
        passed.append(values)
    logger.close()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{r}.json").write_text(json.dumps(passed, indent=1))
    sfdist.barrier()
    sfdist.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("trainer")
    t.add_argument("trainer")
    t.add_argument("config")
    t.add_argument("run")
    t.add_argument("out")
    t.add_argument("overrides", nargs="*")
    y = sub.add_parser("toy")
    y.add_argument("out")
    lg = sub.add_parser("logger")
    lg.add_argument("run")
    lg.add_argument("out")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.mode == "trainer":
        probe_trainer(args)
    elif args.mode == "logger":
        probe_logger(args)
    else:
        probe_toy(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

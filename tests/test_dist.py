"""Training at scale on the CPU: two processes (torchrun, gloo) under FSDP2 and the DDP-style placement.

* The FLUX and SD3.5 tiny trainers run 2·GD iterations (GD overridden to 2) on two processes under FSDP2: G, F and
  the teacher are ``DTensor`` shards (``Shard(0)``), the discriminator heads are replicas kept equal; the ranks read
  disjoint data and draw different noise but identical shared decisions (recorded by tools/dist_probe.py and also
  gathered and compared inside the trainer at every iteration, ``SENSEFLOW_DEBUG_CHECK_DECISIONS=1``).
* ``dist.strategy=ddp`` on the SDXL DMD2 trainer keeps every replica (G, F + DMD2 head) equal across ranks.
* A two-node launch with ``dist.hsdp=true`` replicates across nodes and shards inside a node.
* The placement rules themselves (FSDP2 with a meta-device build on rank 1, FSDP2 of a module without a config,
  HSDP on a 2-D mesh, DDP-style replicas with averaged gradients, per-block activation checkpointing, global-norm
  clipping over sharded gradients) give the weights of a single process training on the union of the ranks' data.
* The losses logged (TensorBoard and metrics.jsonl) are their mean over the ranks; in one process, the values given.
* Single-process helpers: the clipping of :func:`senseflow.dist.clip_grad_norm` equals torch's, strategy resolution.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_runs import REPO, build_assets, config_path, tail, torchrun
from senseflow import dist as sfdist


@pytest.fixture(scope="session")
def dist_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_assets(tmp_path_factory.getbasetemp() / "dist_assets")


def run_probe(trainer: str, assets: Path, tmp_path: Path, *overrides: str) -> list[dict]:
    from dist_runs import asset_overrides

    out = tmp_path / "probe"
    proc = torchrun(2, [str(REPO / "tools" / "dist_probe.py"), "trainer", trainer, str(config_path(trainer)),
                        str(tmp_path / "run"), str(out), *asset_overrides(assets, trainer), *overrides],
                    cwd=tmp_path, env={"SENSEFLOW_DEBUG_CHECK_DECISIONS": "1"})
    assert proc.returncode == 0, tail(proc)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("trainer", ["flux_senseflow", "sd35_senseflow"])
def test_two_processes_fsdp2_shard_the_denoisers_and_share_only_the_decisions(trainer, dist_assets, tmp_path):
    gd = 2
    ranks = run_probe(trainer, dist_assets, tmp_path, f"method.gd={gd}", f"train.iterations={2 * gd}")
    r0, r1 = ranks
    assert r0["world_size"] == 2 and r0["strategy"] == "fsdp"
    # only rank 0 reads the teacher and copies it into G and F; rank 1 builds meta copies and receives its shards
    assert r0["full_copies"] == {"teacher_loads": 1, "student_copies": 2}
    assert r1["full_copies"] == {"teacher_loads": 0, "student_copies": 0}

    # G, F and T are sharded DTensors (dim-0 shards over the 2 ranks), before and after training
    for when in ("params_before", "params_after"):
        for net in ("generator", "fake", "teacher"):
            params = r0[when][net]
            assert params, net
            assert {(p["type"], tuple(p["placements"])) for p in params.values()} == {("DTensor", ("S(0)",))}, net
            big = [p for p in params.values() if p["global_shape"][0] >= 2]
            assert big and all(p["local_shape"][0] < p["global_shape"][0] for p in big), net
        assert {p["type"] for p in r0[when]["disc_heads"].values()} == {"Tensor"}  # replicas

    # shared decisions identical, noise different, data disjoint, replicas and gathered weights equal
    assert len(r0["decisions"]) == 2 * gd and r0["decisions"] == r1["decisions"]
    assert len({tuple(map(str, d)) for d in r0["decisions"]}) > 1  # they are random, not constant
    assert len(r0["noise"]) == 2 * gd and all(a != b for a, b in zip(r0["noise"], r1["noise"]))
    assert len(set(r0["noise"])) == 2 * gd  # each iteration draws new noise
    for k0, k1 in zip(r0["keys"], r1["keys"]):
        assert not set(k0) & set(k1)
    assert r0["generator_hash"] == r1["generator_hash"] and r0["fake_hash"] == r1["fake_hash"]
    assert r0["replica_hash"] == r1["replica_hash"]
    # the trainer's own cross-rank check rejects values that differ
    assert r0["mismatch_detected"] and r1["mismatch_detected"]

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, 2 * gd + 1))
    assert sum(r["step/generator"] for r in rows) == 2
    assert all(
        torch.isfinite(torch.tensor(v)) for r in rows for k, v in r.items() if k.startswith(("loss/", "grad_norm/"))
    )
    latest = tmp_path / "run" / "checkpoints" / (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert latest.name == f"iter_{2 * gd:06d}" and (latest / "student.safetensors").exists()
    assert {p.name for p in latest.glob("rank*_state.pt")} == {"rank0_state.pt", "rank1_state.pt"}


def test_two_processes_ddp_style_sdxl_dmd2_keeps_every_replica_equal(tmp_path_factory, tmp_path):
    """``dist.strategy=ddp`` (the SDXL option): full replicas on both ranks, gradients averaged before each step —
    G, F with DMD2's classifier head, and the teacher stay plain tensors and end equal on both ranks."""
    assets = build_assets(tmp_path_factory.getbasetemp() / "dist_assets", kinds=("flux", "sd35-medium", "sdxl"))
    r0, r1 = run_probe("sdxl_dmd2", assets, tmp_path, "method.gd=2", "train.iterations=4", "dist.strategy=ddp")
    assert r0["strategy"] == "ddp"
    assert r0["full_copies"] == r1["full_copies"] == {"teacher_loads": 1, "student_copies": 2}  # every rank loads
    for net in ("generator", "fake", "teacher"):
        assert {p["type"] for p in r0["params_after"][net].values()} == {"Tensor"}, net
    assert r0["decisions"] == r1["decisions"] and all(a != b for a, b in zip(r0["noise"], r1["noise"]))
    assert r0["generator_hash"] == r1["generator_hash"] and r0["fake_hash"] == r1["fake_hash"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(
        torch.isfinite(torch.tensor(v)) for r in rows for k, v in r.items() if k.startswith("loss/")
    )


def test_two_nodes_hsdp_replicates_across_nodes_and_shards_inside_one(dist_assets, tmp_path):
    """A two-node launch (two torchrun agents of one process each, as on two machines) with ``dist.hsdp=true``:
    the mesh is (replicate=2 nodes) × (shard=1 rank per node); G, F and T are (Replicate, Shard(0)) DTensors."""
    from dist_runs import asset_overrides, torchrun_nodes

    out = tmp_path / "probe"
    procs = torchrun_nodes(2, [str(REPO / "tools" / "dist_probe.py"), "trainer", "flux_senseflow",
                               str(config_path("flux_senseflow")), str(tmp_path / "run"), str(out),
                               *asset_overrides(dist_assets, "flux_senseflow"), "method.gd=2", "train.iterations=4",
                               "dist.hsdp=true"], cwd=tmp_path)
    for proc in procs:
        assert proc.returncode == 0, tail(proc)
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(2))
    for net in ("generator", "fake", "teacher"):
        assert {(p["type"], tuple(p["placements"])) for p in r0["params_after"][net].values()} == {
            ("DTensor", ("R", "S(0)"))
        }
    assert r0["full_copies"]["teacher_loads"] == 1 and r1["full_copies"]["teacher_loads"] == 0
    assert r0["decisions"] == r1["decisions"] and all(a != b for a, b in zip(r0["noise"], r1["noise"]))
    assert r0["generator_hash"] == r1["generator_hash"] and r0["fake_hash"] == r1["fake_hash"]


def test_placements_train_like_one_process_on_the_union_of_the_data(tmp_path):
    """tools/dist_probe.py toy: 4 AdamW steps with clipping on a 3-block model, each rank on its own data."""
    out = tmp_path / "toy"
    proc = torchrun(2, [str(REPO / "tools" / "dist_probe.py"), "toy", str(out)], cwd=tmp_path)
    assert proc.returncode == 0, tail(proc)
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["fsdp"]["placements"] == r0["fsdp_plain"]["placements"] == ["('S(0)',)"]
    assert r0["hsdp"]["placements"] == ["('R', 'S(0)')"]  # replicate across "nodes", shard inside one
    assert r0["ddp"]["placements"] == ["()"]
    for mode in ("fsdp", "fsdp_plain", "hsdp", "ddp"):
        assert r0[mode]["hash"] == r1[mode]["hash"], mode  # every rank ends with the same full weights
        assert r0[mode]["max_diff_to_single_process"] < 1e-6, mode


def test_logged_losses_are_the_mean_over_the_ranks(tmp_path):
    """tools/dist_probe.py logger: the trainer's RunLogger on two processes (gloo), each passing its own values (and
    its own key order); TensorBoard and metrics.jsonl get every loss averaged over the ranks, the rest is rank 0's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, out = tmp_path / "run", tmp_path / "out"
    proc = torchrun(2, [str(REPO / "tools" / "dist_probe.py"), "logger", str(run), str(out)], cwd=tmp_path)
    assert proc.returncode == 0, tail(proc)
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(2))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [row["iteration"] for row in rows] == [1, 2]
    for i, (row, v0, v1) in enumerate(zip(rows, r0, r1)):
        assert list(row) == ["iteration", *v0]  # rank 0's keys, in rank 0's order
        for key, value in v0.items():
            assert value != v1[key], key  # every value differs across the ranks
            expected = (value + v1[key]) / 2 if key.startswith("loss/") else value
            assert row[key] == expected, key  # two ranks: one float64 sum, halved: exact
            scalar = events.Scalars(key)[i]
            assert scalar.step == i + 1 and scalar.value == pytest.approx(expected, rel=1e-6), key  # float32


def test_one_process_logs_the_values_as_given(tmp_path):
    from senseflow.trainer.logger import RunLogger

    values = {"loss/generator": 0.1 + 0.2, "lr/generator": 1e-4, "loss/fake": 1 / 3, "time/iteration_s": 0.7}
    assert sfdist.mean_over_ranks(values, torch.device("cpu")) == values  # no process group: nothing to average
    logger = RunLogger(tmp_path, total=1, start=0, enabled=True)
    logger.scalars(1, values)
    logger.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row == {"iteration": 1, **values} and list(row) == ["iteration", *values]


def test_clip_grad_norm_matches_torch_in_one_process():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn(5, 3) * 10
        q.grad = p.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(b, 1.0)
    norm = sfdist.clip_grad_norm(a, 1.0)
    assert norm == pytest.approx(float(expected), rel=1e-6)
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-7)
    before = [p.grad.clone() for p in a]
    assert sfdist.clip_grad_norm(a, None) == pytest.approx(1.0, rel=1e-5)  # measured only
    assert all(torch.equal(p.grad, g) for p, g in zip(a, before))


def test_strategy_resolution():
    one = sfdist.DistInfo(0, 1, 0, torch.device("cpu"))
    two = sfdist.DistInfo(0, 2, 0, torch.device("cpu"), local_world_size=2)
    assert sfdist.resolve_strategy("auto", one) == "none" and sfdist.resolve_strategy("fsdp", one) == "none"
    assert sfdist.resolve_strategy("auto", two) == "fsdp" and sfdist.resolve_strategy("ddp", two) == "ddp"
    with pytest.raises(ValueError, match="dist.strategy"):
        sfdist.resolve_strategy("zero3", two)

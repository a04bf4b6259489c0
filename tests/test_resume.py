"""Kill and resume: a two-process FSDP2 run (tiny FLUX, GD = 2, 6 iterations, a checkpoint every 2) killed with
SIGKILL and started again with the same command ends bit-identical to an uninterrupted run; a checkpoint being
written when the kill comes never becomes ``latest``; a two-process checkpoint resumes on one process.

Kills use the test-only hooks documented in :mod:`senseflow.trainer.checkpoint`:
``SENSEFLOW_TEST_KILL_AT=<it>`` (every rank SIGKILLs itself right after iteration ``it``'s updates, before its
logging and checkpoint) and ``SENSEFLOW_TEST_KILL_IN_SAVE=<it>`` (inside the save of iteration ``it``, after every
file is written into the temporary folder, before the rename). torchrun then tears the whole run down.

"Bit-identical" covers everything the final checkpoint holds: student.safetensors and student_ema.safetensors, every
DCP entry (G, F, D heads, their AdamW states, G's EMA), the trainer state (iteration, data position, shared RNG stream,
LR schedulers), each rank's noise streams, and the logged metrics of every iteration. (Not torch's global RNG state:
see assert_bit_identical.)
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_runs import build_assets, dcp_contents, differing, flatten, tail, torchrun, train_args

TRAINER = "flux_senseflow"
GD, ITERATIONS, SAVE_EVERY = 2, 6, 2
RUN_OVERRIDES = (f"method.gd={GD}", f"train.iterations={ITERATIONS}", f"train.save_interval={SAVE_EVERY}",
                 "train.keep_last=2", "train.ema.enabled=true", "train.ema.warmup=10")
#: the kill iteration is drawn once from this seed (1 .. ITERATIONS-1; any value must resume identically)
KILL_SEED = 20261121


@pytest.fixture(scope="session")
def dist_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_assets(tmp_path_factory.getbasetemp() / "dist_assets")


def launch(run_dir: Path, assets: Path, env: dict[str, str] | None = None, nproc: int = 2, *extra: str):
    return torchrun(nproc, train_args(TRAINER, run_dir, assets, *RUN_OVERRIDES, *extra), cwd=run_dir.parent, env=env)


@pytest.fixture(scope="module")
def reference(dist_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted two-process run."""
    run = tmp_path_factory.mktemp("reference") / "run"
    proc = launch(run, dist_assets)
    assert proc.returncode == 0, tail(proc)
    return run


def checkpoint(run: Path, name: str | None = None) -> Path:
    root = run / "checkpoints"
    return root / (name or (root / "latest").read_text().strip())


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_bit_identical(run: Path, ref: Path, scratch: Path) -> None:
    a, b = checkpoint(run), checkpoint(ref)
    assert a.name == b.name == f"iter_{ITERATIONS:06d}"
    for weights in ("student.safetensors", "student_ema.safetensors"):
        sa, sb = load_file(a / weights), load_file(b / weights)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), weights
    da, db = dcp_contents(a, scratch), dcp_contents(b, scratch)
    for part in ("model/generator", "model/fake", "model/disc_heads", "optim/generator", "optim/fake",
                 "optim/disc_heads", "extra/ema"):
        assert any(k.startswith(part) for k in da), part
    assert differing(da, db) == []
    for f in ["trainer_state.pt", "rank0_state.pt", "rank1_state.pt"]:
        ta, tb = torch.load(a / f, weights_only=True), torch.load(b / f, weights_only=True)
        # torch's global RNG is not one of the run's streams: nothing of the method draws from it, but torch's
        # DataLoader takes a base seed from it whenever an iterator starts (each epoch and once after a resume)
        ta.pop("torch_rng", None), tb.pop("torch_rng", None)
        assert differing(flatten(ta), flatten(tb)) == [], f
    ma, mb = metrics(run), metrics(ref)
    assert [m["iteration"] for m in ma] == list(range(1, ITERATIONS + 1))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert strip(ma) == strip(mb)


def test_kill9_at_a_random_iteration_then_the_same_command_resumes_bit_identically(reference, dist_assets, tmp_path):
    kill_at = random.Random(KILL_SEED).randint(1, ITERATIONS - 1)
    run = tmp_path / "run"
    proc = launch(run, dist_assets, {"SENSEFLOW_TEST_KILL_AT": str(kill_at)})
    assert proc.returncode != 0, "the run should have been killed"
    last_saved = (kill_at - 1) // SAVE_EVERY * SAVE_EVERY  # the kill comes before iteration kill_at's own save
    pointer = run / "checkpoints" / "latest"
    assert (pointer.read_text().strip() if pointer.exists() else None) == (
        f"iter_{last_saved:06d}" if last_saved else None
    )

    proc = launch(run, dist_assets)  # the same command again
    assert proc.returncode == 0, tail(proc)
    if last_saved:
        assert (
            f"resumed from {checkpoint(run, f'iter_{last_saved:06d}')} at iteration {last_saved}"
            in proc.stdout + proc.stderr
        )
    assert_bit_identical(run, reference, tmp_path)


def test_a_kill_while_saving_leaves_latest_on_the_previous_checkpoint(reference, dist_assets, tmp_path):
    run = tmp_path / "run"
    proc = launch(run, dist_assets, {"SENSEFLOW_TEST_KILL_IN_SAVE": "4"})
    assert proc.returncode != 0, "the run should have been killed"
    root = run / "checkpoints"
    assert (root / "latest").read_text().strip() == "iter_000002"
    half = root / ".tmp-iter_000004"
    assert (half / ".metadata").exists() and (half / "student.safetensors").exists()  # written, never published
    assert not (root / "iter_000004").exists()

    proc = launch(run, dist_assets)
    assert proc.returncode == 0, tail(proc)
    assert "at iteration 2" in proc.stdout + proc.stderr
    assert sorted(p.name for p in root.iterdir()) == [  # keep_last=2, no tmp; each with the digest this run recorded
        "iter_000004", "iter_000004.sha256.json", "iter_000006", "iter_000006.sha256.json", "latest"]
    assert_bit_identical(run, reference, tmp_path)


def test_a_two_process_checkpoint_resumes_on_one_process_and_trains_on(reference, dist_assets, tmp_path):
    """In this process (no process group): every network, optimiser, scheduler and the data position come back
    from the 2-rank checkpoint; rank 0 keeps its noise streams, rank 1's are dropped; training continues."""
    from dist_runs import asset_overrides, config_path
    from senseflow.config import load_config
    from senseflow.trainer import get_trainer

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    saved = checkpoint(run)
    more = ITERATIONS + GD
    cfg = load_config(config_path(TRAINER), asset_overrides(dist_assets, TRAINER)
                      + [*RUN_OVERRIDES[:1], f"train.iterations={more}", *RUN_OVERRIDES[2:]])
    trainer = get_trainer(TRAINER)(cfg, run)
    trainer.setup()
    assert trainer.info.world_size == 1 and trainer.iteration == ITERATIONS
    student = load_file(saved / "student.safetensors")
    weights = trainer.generator.state_dict()
    assert student.keys() == weights.keys() and all(torch.equal(student[k], weights[k]) for k in student)
    stored = dcp_contents(saved, tmp_path)
    fake = {k: v for k, v in trainer.fake.state_dict().items()}
    assert all(torch.equal(stored[f"model/fake.{k}"], v) for k, v in fake.items())
    assert trainer.ema.shadow and all(torch.equal(stored[f"extra/ema.{k}"], v) for k, v in trainer.ema.shadow.items())
    assert trainer.ema.num_updates == ITERATIONS // GD  # the warm-up of the EMA decay continues where it was
    ema_file = load_file(saved / "student_ema.safetensors")  # the gathered EMA, what inference takes by default
    assert ema_file.keys() == student.keys()
    assert all(torch.equal(ema_file[k], v.to(ema_file[k].dtype)) for k, v in trainer.ema.shadow.items())
    assert any(not torch.equal(ema_file[k], student[k]) for k in trainer.ema.shadow)
    players = {p.name: p for p in trainer.method.players}
    steps = {int(s["step"]) for s in players["generator"].optimizer.state.values()}
    assert steps == {ITERATIONS // GD}
    assert {int(s["step"]) for s in players["fake"].optimizer.state.values()} == {ITERATIONS}
    assert all(p.scheduler.last_epoch == ITERATIONS for p in players.values())
    state = torch.load(saved / "trainer_state.pt", weights_only=True)
    assert trainer.data.state_dict()["position"] == state["data"]["position"]
    assert torch.equal(trainer.rng.shared.get_state(), state["rng_shared"])
    rank0 = torch.load(saved / "rank0_state.pt", weights_only=True)
    assert torch.equal(trainer.rng.noise_slots[0].get_state(), rank0["rng"]["noise_0"])

    trainer.train()
    assert trainer.iteration == more
    assert checkpoint(run).name == f"iter_{more:06d}"
    after = load_file(checkpoint(run) / "student.safetensors")
    assert any(not torch.equal(after[k], student[k]) for k in student)  # G stepped once more
    rows = metrics(run)
    assert [r["iteration"] for r in rows] == list(range(1, more + 1))
    assert all(
        torch.isfinite(torch.tensor(v)) for r in rows[ITERATIONS:] for k, v in r.items() if k.startswith("loss/")
    )


# ---- single-process checks of the checkpoint machinery ---------------------------------------------------------


def test_init_optimizer_state_is_exactly_the_state_a_first_step_would_create():
    """DCP needs optimiser state to exist before a save; creating it must not change the next update (Adam's step
    counter and bias correction stay at 0, the weights untouched)."""
    from senseflow.trainer.checkpoint import init_optimizer_state

    torch.manual_seed(0)
    a = torch.nn.Linear(4, 3)
    b = torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.1)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1)
    init_optimizer_state(opt_b)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert {float(s["step"]) for s in opt_b.state.values()} == {0.0} and opt_b.param_groups[0]["lr"] == 1e-2
    x = torch.randn(5, 4)
    for model, opt in ((a, opt_a), (b, opt_b)):
        model(x).square().sum().backward()
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_saving_every_iteration_does_not_change_training(dist_assets, tmp_path):
    """One process, tiny FLUX, 4 iterations: a checkpoint after every iteration (G's optimiser saved before its
    first step) ends with the same weights as a run that saves only at the end."""
    from dist_runs import asset_overrides, config_path
    from senseflow.config import load_config
    from senseflow.trainer import get_trainer

    finals = []
    for every in (1, 1000):
        cfg = load_config(config_path(TRAINER), asset_overrides(dist_assets, TRAINER)
                          + ["method.gd=2", "train.iterations=4", f"train.save_interval={every}", "train.keep_last=0"])
        trainer = get_trainer(TRAINER)(cfg, tmp_path / f"every{every}")
        trainer.setup()
        trainer.train()
        finals.append(load_file(checkpoint(tmp_path / f"every{every}") / "student.safetensors"))
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    kept = sorted(p.name for p in (tmp_path / "every1" / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["iter_000001", "iter_000002", "iter_000003", "iter_000004"]  # keep_last=0: all


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_keep_last_prunes_only_after_the_new_checkpoint_is_complete(tmp_path):
    from senseflow.trainer.checkpoint import (
        Checkpointer,
        CheckpointRefused,
        ModelState,
        OptimizerState,
        init_optimizer_state,
    )

    net = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(net.parameters())
    init_optimizer_state(opt)
    parts = {"model/net": ModelState(net), "optim/net": OptimizerState(net, opt)}
    ck = Checkpointer(tmp_path, keep_last=2, rank=0, config_yaml="x: 1\n")
    assert ck.latest() is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".tmp-iter_000009").mkdir()  # debris of a killed save
    for it in (1, 2, 3):
        ck.save(it, parts, {"iteration": it}, {}, lambda: {"student.safetensors": net.state_dict()})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "iter_000002", "iter_000002.sha256.json", "iter_000003", "iter_000003.sha256.json", "latest"]
    assert ck.latest().name == "iter_000003"
    assert (ck.latest() / "student.safetensors").exists() and (ck.latest() / "config.yaml").read_text() == "x: 1\n"
    state, mine = ck.load(ck.latest(), parts)
    assert state == {"iteration": 3} and mine == {}
    (tmp_path / "checkpoints" / "latest").write_text("iter_000007")
    with pytest.raises(CheckpointRefused, match="not a complete checkpoint"):
        ck.latest()
    with pytest.raises(ValueError, match="keep_last"):
        Checkpointer(tmp_path, keep_last=-1, rank=0)

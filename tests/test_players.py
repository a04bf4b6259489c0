"""The trainer steps what the method declares: a toy method with two players (one every 2nd iteration with a
post-step hook and the other frozen during its backward, one every iteration) run by the real training loop; and
the trainer module names no player, loss or hook of SenseFlow / DMD2."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from senseflow.core.rng import RunRNG
from senseflow.dist import DistInfo
from senseflow.method.players import Player
from senseflow.trainer.base import DistillationTrainer

ACCUM = 2
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")  # a's scheduler, by design


class ToyMethod:
    """Players ``a`` (every 2, hook, ``b`` frozen in its backward) and ``b`` (every iteration)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(3, 1), nn.Linear(3, 1)
        self.calls: list[tuple] = []

        def player(name: str, module: nn.Module, loss, **kw) -> Player:
            opt = torch.optim.SGD(module.parameters(), lr=0.1)
            return Player(name, module, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda n: 0.5 ** n), loss, **kw)

        self.players = [
            player("a", self.a, self.loss_a, every=2, frozen=(self.b,), post_step=[self.hook_a]),
            player("b", self.b, self.loss_b),
        ]

    def draw(self, rng: RunRNG) -> SimpleNamespace:
        return SimpleNamespace(values=lambda: (1,), logs=lambda: {"decision/x": 1.0})

    def micro_batches(self, d, rng: RunRNG, next_batch) -> list[torch.Tensor]:
        return [next_batch() for _ in range(ACCUM)]

    def loss_a(self, x: torch.Tensor, due: bool):
        self.calls.append(("a", due, self.b.weight.requires_grad))
        if not due:
            return None, {}
        loss = (self.a(x) * self.b(x)).mean()  # b takes part in a's loss but is frozen: no gradient reaches it
        return loss, {"loss/a": float(loss.detach())}

    def hook_a(self) -> None:
        self.calls.append(("hook a", self.b.weight.grad is None, self.a.weight.grad is None))

    def loss_b(self, x: torch.Tensor, due: bool):
        self.calls.append(("b", due, self.b.weight.requires_grad))
        loss = self.b(x).square().mean()
        return loss, {"loss/b": float(loss.detach())}


def toy_trainer() -> DistillationTrainer:
    trainer = DistillationTrainer.__new__(DistillationTrainer)  # the loop only; no networks, data or checkpoints
    trainer.cfg = SimpleNamespace(train=SimpleNamespace(grad_accum=ACCUM), optimizer=SimpleNamespace(grad_clip=None))
    trainer.info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    trainer.rng, trainer._decisions_checked = RunRNG(0, 0), False
    batches = iter(torch.randn(100, 4, 3))
    trainer.data = SimpleNamespace(next=lambda: next(batches))
    trainer.method = ToyMethod()
    trainer.players = trainer.method.players
    return trainer


def test_the_loop_steps_each_player_when_due_runs_its_hooks_and_freezes_what_it_names():
    trainer = toy_trainer()
    m = trainer.method
    a0, b0 = m.a.weight.detach().clone(), m.b.weight.detach().clone()
    logs = [trainer.train_iteration(it) for it in (1, 2, 3, 4)]

    per_iteration = [("a", False, True)] * ACCUM + [("b", True, True)] * ACCUM
    due_iteration = [("a", True, False)] * ACCUM + [("hook a", True, True)] + [("b", True, True)] * ACCUM
    assert m.calls == per_iteration + due_iteration + per_iteration + due_iteration
    assert m.b.weight.requires_grad  # unfrozen after a's backward
    a, b = trainer.players
    assert a.scheduler.last_epoch == b.scheduler.last_epoch == 4  # every scheduler steps every iteration
    assert [row["step/a"] for row in logs] == [0.0, 1.0, 0.0, 1.0] and all(row["step/b"] == 1.0 for row in logs)
    assert ["grad_norm/a" in row for row in logs] == [False, True, False, True]
    assert all("grad_norm/b" in row and row["decision/x"] == 1.0 for row in logs)
    assert logs[1]["lr/a"] == 0.1 * 0.5 ** 2 and "loss/a" not in logs[0]
    assert not torch.equal(m.a.weight, a0) and not torch.equal(m.b.weight, b0)


def test_a_player_not_due_is_not_stepped():
    trainer = toy_trainer()
    a0 = trainer.method.a.weight.detach().clone()
    trainer.train_iteration(1)
    assert torch.equal(trainer.method.a.weight, a0)  # a steps on even iterations only
    trainer.train_iteration(2)
    assert not torch.equal(trainer.method.a.weight, a0)


def test_the_accumulated_gradient_is_the_mean_over_micro_batches():
    """b's step with 2 micro-batches of 4 equals plain SGD on the mean of the two micro-batch losses."""
    trainer = toy_trainer()
    ref = nn.Linear(3, 1)
    ref.load_state_dict(trainer.method.b.state_dict())
    xs = torch.randn(100, 4, 3)
    batches = iter(xs)
    trainer.data = SimpleNamespace(next=lambda: next(batches))
    trainer.train_iteration(1)
    loss = sum(ref(x).square().mean() for x in xs[:ACCUM]) / ACCUM
    loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.1 * p.grad
    torch.testing.assert_close(trainer.method.b.weight, ref.weight, rtol=0, atol=1e-7)


def test_the_trainer_module_stays_small():
    """The trainer is a generic player loop (under 300 lines); that it imports no player loss (DMD, GAN, IDA, ISG) is
    an import-linter contract of pyproject.toml (``lint-imports``)."""
    source = Path(DistillationTrainer.__module__.replace(".", "/") + ".py")
    text = (Path(__file__).resolve().parents[1] / source).read_text()
    assert len(text.splitlines()) < 300

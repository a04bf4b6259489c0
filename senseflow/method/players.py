"""Players: what a method trains, declared as records the generic trainer steps (docs/method.md §1.2-§1.3).

A method names each network it trains — for SenseFlow the generator G_θ, the fake score F_φ and the heads of the
discriminator D_ψ — as one :class:`Player`: the module, its optimiser and LR scheduler, its update period, its loss
and what runs after each of its steps (IDA φ ← λ·φ + (1 − λ)·θ and the EMA θ̄ after G's). The trainer knows no
player by name; per iteration ``it`` it visits the players in the order the method declares them::

    for each player P:
        due ← (it mod P.every = 0)
        if due: clear P's gradients
        for each micro-batch m of the iteration (M of them):
            L, logs ← P.loss(m, due)                      runs even when not due (G's forward feeds F and D)
            if due: back-propagate L / M                  with P.frozen held at requires_grad = False
        if due: average replicated gradients over ranks, clip ‖∇P‖, step, clear; run P.post_step in order
        step P's LR scheduler                             once per iteration, due or not (§3.7)

and checkpoints every player's module and optimiser under ``model/<name>`` and ``optim/<name>`` plus the method's
:meth:`Method.extra_state` (see :mod:`senseflow.trainer.checkpoint`).

Why here and not under ``senseflow/trainer/``: the record is the contract a *method* fulfils (what it trains, how
often, on which loss, with which hooks); it depends on nothing of the trainer, so a method module imports it without
importing the training loop, and the loop, which already depends on the method package, reads it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Protocol, Sequence

import torch
from torch import Tensor, nn

from senseflow.core.rng import RunRNG
from senseflow.dist import DistInfo, ShardOptions

__all__ = ["Player", "Method", "Runtime", "Stateful", "frozen"]

#: ``loss(micro_batch, due) -> (loss, logs)``: the loss to back-propagate (``None`` when not due) and python floats
LossFn = Callable[[Any, bool], "tuple[Tensor | None, dict[str, float]]"]


@dataclass
class Player:
    """One trained network of a method: what the trainer steps, and when."""

    name: str  #: checkpoint key: ``model/<name>``, ``optim/<name>``, ``schedulers[<name>]``
    module: nn.Module  #: what is trained, checkpointed, clipped and resharded (several networks: an ``nn.ModuleDict``)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss: LossFn  #: called once per micro-batch every iteration; runs its own autocast
    every: int = 1  #: steps on iterations ``it`` with ``it mod every = 0`` (G: GD, F and D: 1)
    frozen: Sequence[nn.Module] = ()  #: held without gradient during this player's backward
    #: run in order right after each step (IDA, EMA); a hook may return values to log (IDA's truncation error)
    post_step: Sequence[Callable[[], dict[str, float] | None]] = ()
    label: str | None = None  #: name in the logs (``grad_norm/<label>``, ``lr/<label>``); default ``name``

    def __post_init__(self) -> None:
        if int(self.every) < 1:
            raise ValueError(f"player {self.name!r}: update period must be >= 1, got {self.every}")
        self.label = self.label or self.name

    def due(self, iteration: int) -> bool:
        """Whether this player steps on ``iteration`` (counting from 1)."""
        return iteration % int(self.every) == 0

    def parameters(self) -> list[nn.Parameter]:
        """The parameters whose gradients are averaged, clipped and stepped (those of ``module``)."""
        return list(self.module.parameters())


@dataclass
class Runtime:
    """What the trainer gives a method to build and run its networks on."""

    info: DistInfo  #: rank, world size, device
    shard: ShardOptions  #: placement of the large networks (FSDP2, DDP or none)
    autocast: Callable[[], ContextManager[Any]]  #: the run's mixed-precision context (a null context in fp32)


class Stateful(Protocol):
    """Anything with ``state_dict`` / ``load_state_dict`` (torch's checkpoint protocol)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Method(Protocol):
    """What the generic trainer asks of a method (:class:`senseflow.method.distillation.Distillation` is one)."""

    players: list[Player]

    def draw(self, rng: RunRNG) -> Any:
        """The iteration's shared decisions, from ``rng.shared`` only; must have ``values()`` (a tuple every rank
        must agree on) and ``logs()`` (floats)."""

    def micro_batches(self, decisions: Any, rng: RunRNG, next_batch: Callable[[], dict[str, Any]]) -> list[Any]:
        """The iteration's micro-batches (``train.grad_accum`` of them), each given to every player's ``loss``."""

    def extra_state(self) -> dict[str, Stateful]:
        """Sharded state beyond the players' modules and optimisers, saved through DCP as ``extra/<key>``."""

    def host_state(self) -> dict[str, Any]:
        """Small global values for the trainer state (rank 0)."""

    def load_host_state(self, state: dict[str, Any]) -> None: ...

    def exports(self) -> dict[str, dict[str, Tensor]]:
        """Consolidated weights by file name (a collective; only rank 0's are written)."""

    def preview(self, prompts: list[str], seed: int) -> Tensor | None:
        """Images in [-1, 1] of a full sample of ``prompts`` (None off rank 0)."""


@contextlib.contextmanager
def frozen(modules: Sequence[nn.Module]) -> Iterator[None]:
    """``requires_grad_(False)`` on ``modules`` for the duration, ``True`` afterwards (trained modules only)."""
    for m in modules:
        m.requires_grad_(False)
    try:
        yield
    finally:
        for m in modules:
            m.requires_grad_(True)

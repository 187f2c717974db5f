"""The one episode loop: meta-training, validation and meta-testing all draw their tasks from it.

``episodes`` yields the meta-batches of a split from a generator, forever (training) or until
a number of tasks is covered (an evaluation); what is done with each batch stays with the
caller. Training does one ``OuterStep`` per batch: backward of the algorithm's objective, the
combination of gradients across processes, the optimizer and the scheduler, all owned here.
An evaluation is described once (``Evaluation``: split, seed, tasks, batch size, inner steps)
and run by ``evaluate``, the same for validation, the final test and ``mamlrun test``/``adapt``.

The algorithm comes bound (``Algorithm.bind``): the task type and the batching are fixed for
the whole run, so nothing here passes or checks them again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mamlrun.algorithms.base import Algorithm, Part
from mamlrun.data.tasks import TaskBatch, TaskSource
from mamlrun.training.distributed import SINGLE, Context


@dataclass
class OuterStep:
    """Everything one outer update touches, in one place; it owns the optimizer and the
    scheduler (the checkpoint reads their state from here, ``trainer.TrainState``)."""

    algorithm: Algorithm  # bound to the run's task type and batching
    optimizer: torch.optim.Optimizer
    scheduler: Any = None  # a torch LR scheduler, stepped once per iteration
    distributed: Context = SINGLE
    #: Whether the meta-batch is shared across processes: decided once, here, so that a
    #: single process never calls into ``distributed`` from the loop.
    shared: bool = field(init=False)

    def __post_init__(self) -> None:
        self.shared = self.distributed.enabled

    def __call__(
        self, model: nn.Module, batch: TaskBatch, iteration: int
    ) -> dict[str, torch.Tensor]:
        """One update on ``batch`` at training iteration ``iteration`` (from 0; the caller's
        step counter, the only one): the mean query ``loss`` and ``metric``, detached."""
        local = self.distributed.shard(batch) if self.shared else batch
        self.optimizer.zero_grad(set_to_none=True)
        loss, metric = backward(self.algorithm.meta_objective(model, local, iteration))
        if self.shared:
            loss, metric = self.distributed.average_gradients(
                model, loss, metric, local.num_tasks, batch.num_tasks
            )
        self.optimizer.step()
        if self.shared:
            self.distributed.average_buffers(model)
        if self.scheduler is not None:
            self.scheduler.step()
        return {"loss": loss, "metric": metric}


def backward(parts: Iterable[Part]) -> tuple[torch.Tensor, torch.Tensor]:
    """Backpropagate each part as it comes (freeing its graph before the next is built) and
    return the mean loss and metric over all their tasks, detached."""
    tasks, loss, metric = 0, 0.0, 0.0
    for part in parts:
        part.objective.backward()
        tasks += part.tasks
        loss = loss + part.loss.detach() * part.tasks
        metric = metric + part.metric.detach() * part.tasks
    return loss / tasks, metric / tasks


def episodes(
    source: TaskSource,
    split: str,
    generator: torch.Generator,
    batch_size: int,
    num_tasks: int | None = None,
) -> Iterator[TaskBatch]:
    """Meta-batches of ``batch_size`` tasks of ``split``, drawn with ``generator``: forever
    (``num_tasks=None``, training), or until exactly ``num_tasks`` tasks are covered, the
    last batch holding the remainder (an evaluation)."""
    remaining = num_tasks
    while remaining is None or remaining > 0:
        size = batch_size if remaining is None else min(batch_size, remaining)
        yield source.sample(split, size, generator)
        if remaining is not None:
            remaining -= size


@dataclass(frozen=True)
class Evaluation:
    """What an evaluation is: adapt to ``tasks`` tasks of ``split``, fixed by ``seed``, in
    batches of ``batch_size``, and score the query set after 0…``steps`` inner steps."""

    split: str
    seed: int
    tasks: int
    batch_size: int
    steps: int


def evaluate(
    algorithm: Algorithm,
    model: nn.Module,
    source: TaskSource,
    evaluation: Evaluation,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """The ``[tasks, steps + 1]`` query ``loss`` and ``metric`` curves of ``evaluation``.

    The generator is created here from the seed every time, so validation after step 1,000 and
    after step 50,000 sees exactly the same tasks. ``on_batch(tasks)`` is told the size of
    each finished batch (a progress display).
    """
    e = evaluation
    generator = torch.Generator(device=source.device).manual_seed(e.seed)
    results = []
    for batch in episodes(source, e.split, generator, e.batch_size, e.tasks):
        results.append(algorithm.evaluate(model, batch, e.steps))
        if on_batch is not None:
            on_batch(batch.num_tasks)
    return {
        key: torch.cat([r[i] for r in results]).cpu() for i, key in enumerate(("loss", "metric"))
    }

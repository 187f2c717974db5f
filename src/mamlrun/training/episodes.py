"""The one episode loop: meta-training, validation and meta-testing all run through it.

It is a generator that yields one result per meta-batch, so the caller (with its progress
display, logging, checkpoints and stopping rule) stays outside and the loop stays short. In
training it owns the whole outer step (``OuterStep``): backward of the algorithm's objective,
the combination of gradients across processes, the optimizer and the scheduler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mamlrun.algorithms.base import Algorithm, Part
from mamlrun.data.tasks import TaskBatch, TaskSource
from mamlrun.training.distributed import SINGLE, Context


@dataclass
class OuterStep:
    """Everything one outer update touches, in one place."""

    optimizer: torch.optim.Optimizer
    scheduler: Any = None  # a torch LR scheduler, stepped once per iteration
    distributed: Context = SINGLE

    def __call__(
        self, algorithm: Algorithm, model: nn.Module, batch: TaskBatch, task_type: str,
        batching: str, iteration: int,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        local = self.distributed.shard(batch)
        self.optimizer.zero_grad(set_to_none=True)
        parts = algorithm.meta_objective(model, local, task_type, batching, iteration)
        loss, metric = backward(parts)
        loss, metric = self.distributed.average_gradients(
            model, loss, metric, local.num_tasks, batch.num_tasks
        )
        self.optimizer.step()
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
    algorithm: Algorithm,
    model: nn.Module,
    source: TaskSource,
    *,
    split: str,
    generator: torch.Generator,
    batch_size: int,
    batching: str,
    num_tasks: int | None = None,
    update: OuterStep | None = None,
    steps: int | None = None,
    first_step: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield per-meta-batch results until ``num_tasks`` tasks are done (forever if None).

    With an ``update`` this trains: each meta-batch ends with an outer step and yields the
    mean query ``loss`` and ``metric``. The algorithm is told the training iteration
    (``first_step``, ``first_step + 1``, …; a resumed run starts where it stopped), for the
    settings that change over training. Without one it evaluates: each yields ``[tasks,
    steps+1]`` query ``loss`` and ``metric`` after 0…``steps`` inner steps.
    """
    remaining = num_tasks
    iteration = first_step
    while remaining is None or remaining > 0:
        size = batch_size if remaining is None else min(batch_size, remaining)
        batch = source.sample(split, size, generator)
        if update is not None:
            yield update(algorithm, model, batch, source.task_type, batching, iteration)
            iteration += 1
        else:
            loss, metric = algorithm.evaluate(model, batch, source.task_type, steps, batching)
            yield {"loss": loss, "metric": metric}
        if remaining is not None:
            remaining -= size


def evaluate(
    algorithm: Algorithm,
    model: nn.Module,
    source: TaskSource,
    *,
    split: str,
    seed: int,
    num_tasks: int,
    batch_size: int,
    steps: int,
    batching: str,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Adapt to a fixed set of ``num_tasks`` tasks (fixed by ``seed``) and collect the curves.

    The generator is created here from ``seed`` every time, so validation after step 1,000 and
    after step 50,000 sees exactly the same tasks. ``on_batch(tasks)`` is told the size of
    each finished batch (a progress display).
    """
    generator = torch.Generator(device=source.device).manual_seed(seed)
    results = []
    for result in episodes(
        algorithm,
        model,
        source,
        split=split,
        generator=generator,
        batch_size=batch_size,
        batching=batching,
        num_tasks=num_tasks,
        steps=steps,
    ):
        results.append(result)
        if on_batch is not None:
            on_batch(len(result["metric"]))
    return {key: torch.cat([r[key] for r in results]).cpu() for key in ("loss", "metric")}

"""The one episode loop: meta-training, validation and meta-testing all run through it.

It is a generator that yields one result per meta-batch, so the caller (with its tqdm bar,
logging, checkpoints and stopping rule) stays outside and the loop stays short.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from mamlrun.data.tasks import TaskSource
from mamlrun.distributed import SINGLE, Context


def episodes(
    algorithm: Any,
    model: nn.Module,
    source: TaskSource,
    *,
    split: str,
    generator: torch.Generator,
    batch_size: int,
    batching: str,
    num_tasks: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    steps: int | None = None,
    first_step: int = 0,
    distributed: Context = SINGLE,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield per-meta-batch results until ``num_tasks`` tasks are done (forever if None).

    With an ``optimizer`` this trains: each meta-batch ends with an outer step and yields the
    mean query ``loss`` and ``metric``. The algorithm is told the training iteration
    (``first_step``, ``first_step + 1``, …; a resumed run starts where it stopped), for the
    settings that change over training. Without an optimizer it evaluates: each yields
    ``[tasks, steps+1]`` query ``loss`` and ``metric`` after 0…``steps`` inner steps.

    Under ``torchrun`` (``distributed``), each rank trains on its share of every meta-batch
    and the meta-gradient is averaged over all of them before the outer step.
    """
    remaining = num_tasks
    iteration = first_step
    while remaining is None or remaining > 0:
        size = batch_size if remaining is None else min(batch_size, remaining)
        batch = source.sample(split, size, generator)
        if optimizer is not None:
            local = distributed.shard(batch)
            optimizer.zero_grad(set_to_none=True)
            loss, metric = algorithm.meta_gradient(
                model, local, source.kind, batching, step=iteration
            )
            loss, metric = distributed.average_gradients(
                model, loss, metric, local.num_tasks, batch.num_tasks
            )
            optimizer.step()
            distributed.average_buffers(model)
            iteration += 1
        else:
            loss, metric = algorithm.evaluate(model, batch, source.kind, steps, batching)
        yield {"loss": loss, "metric": metric}
        if remaining is not None:
            remaining -= size


def evaluate(
    algorithm: Any,
    model: nn.Module,
    source: TaskSource,
    *,
    split: str,
    seed: int,
    num_tasks: int,
    batch_size: int,
    steps: int,
    batching: str,
) -> dict[str, torch.Tensor]:
    """Adapt to a fixed set of ``num_tasks`` tasks (fixed by ``seed``) and collect the curves.

    The generator is created here from ``seed`` every time, so validation after step 1,000 and
    after step 50,000 sees exactly the same tasks.
    """
    generator = torch.Generator(device=source.device).manual_seed(seed)
    results = list(
        episodes(
            algorithm,
            model,
            source,
            split=split,
            generator=generator,
            batch_size=batch_size,
            batching=batching,
            num_tasks=num_tasks,
            steps=steps,
        )
    )
    return {key: torch.cat([r[key] for r in results]).cpu() for key in ("loss", "metric")}

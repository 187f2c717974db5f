"""The MAML paper's "pretrained" baseline: one network fitted to all training tasks at once.

It answers "does meta-learning beat ordinary transfer?": the same architecture, trained by
plain regression on every training task's points, then fine-tuned on a new task's support
set with the same inner steps as MAML.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mamlrun.algorithms.losses import loss_fn
from mamlrun.data.tasks import TaskSource


def pretrain_jointly(
    model: nn.Module,
    source: TaskSource,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    on_step: Callable[[], None] | None = None,
) -> nn.Module:
    """Fit ``model`` (in place) with Adam to the support and query points of training tasks."""
    generator = torch.Generator(device=source.device).manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss = loss_fn(source.task_type)
    for _ in range(steps):
        batch = source.sample("train", batch_size, generator)
        x = torch.cat([batch.x_support, batch.x_query], dim=1)
        y = torch.cat([batch.y_support, batch.y_query], dim=1)
        optimizer.zero_grad(set_to_none=True)
        loss(model(x.flatten(0, 1)), y.flatten(0, 1)).backward()
        optimizer.step()
        if on_step is not None:
            on_step()
    return model

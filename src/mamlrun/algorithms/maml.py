"""MAML (Finn et al. 2017) and first-order MAML as one set of settings with two entry points.

``meta_gradient`` is the training step: adapt on each task's support set, take the loss on its
query set, and accumulate the gradient of the mean over tasks into the meta-parameters'
``.grad``. ``evaluate`` adapts without building a meta-graph and reports the query loss and
metric after every inner step. Both run the tasks of a batch either one at a time
(``loop``) or together under ``torch.func.vmap`` (``vmap``); which is faster depends on the
model and the device, so the runner can also measure both (``auto``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mamlrun.algorithms.inner import (
    Params,
    adapt,
    autograd_grad,
    forward_fn,
    functional_grad,
)
from mamlrun.data.tasks import TaskBatch
from mamlrun.errors import MamlrunError
from mamlrun.metrics import LOSS_NORMALIZATION, loss_fn, metric_fn

TASK_BATCHING = ("auto", "loop", "vmap")


@dataclass
class MAML:
    """Inner-loop settings of (first-order) MAML.

    Attributes:
        inner_lr: step size α of the inner SGD steps.
        inner_steps: inner steps while meta-training.
        inner_steps_test: inner steps at validation and test time (the paper uses more).
        first_order: drop the second-order term (FOMAML): cheaper, usually slightly worse.
        task_batching: ``loop``, ``vmap`` or ``auto`` (measure both at start-up).
        loss_normalization: ``mean`` or ``tf_maml`` (see ``metrics.loss_fn``): what the inner
            learning rate is relative to.
    """

    inner_lr: float = 0.01
    inner_steps: int = 1
    inner_steps_test: int = 10
    first_order: bool = False
    task_batching: str = "auto"
    loss_normalization: str = "mean"

    def __post_init__(self) -> None:
        if self.inner_lr <= 0:
            raise MamlrunError(f"meta_optimizer.inner_lr must be positive, got {self.inner_lr}")
        if self.inner_steps < 1 or self.inner_steps_test < 0:
            raise MamlrunError(
                "meta_optimizer.inner_steps must be >= 1 and inner_steps_test >= 0, got "
                f"{self.inner_steps} and {self.inner_steps_test}"
            )
        if self.loss_normalization not in LOSS_NORMALIZATION:
            raise MamlrunError(
                "meta_optimizer.loss_normalization must be one of "
                f"{', '.join(LOSS_NORMALIZATION)}, got {self.loss_normalization!r}"
            )
        if self.task_batching not in TASK_BATCHING:
            raise MamlrunError(
                f"meta_optimizer.task_batching must be one of {', '.join(TASK_BATCHING)}, "
                f"got {self.task_batching!r}"
            )

    def meta_gradient(
        self, model: nn.Module, batch: TaskBatch, kind: str, batching: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulate ∇θ of the mean query loss into ``model``'s ``.grad``.

        Returns the mean query loss and metric after adaptation (detached tensors, so the
        caller decides when to synchronise with the device).
        """
        params = dict(model.named_parameters())
        forward, loss, metric = (
            forward_fn(model),
            loss_fn(kind, self.loss_normalization),
            metric_fn(kind),
        )
        n = batch.num_tasks

        if batching == "vmap":
            grad = functional_grad(self.first_order)

            def task(p: Params, xs, ys, xq, yq):
                adapted = adapt(
                    forward, loss, p, xs, ys, lr=self.inner_lr, steps=self.inner_steps, grad=grad
                )[-1]
                out = forward(adapted, xq)
                return loss(out, yq), metric(out, yq)

            losses, metrics = torch.func.vmap(task, in_dims=(None, 0, 0, 0, 0))(params, *batch)
            losses.mean().backward()
            return losses.detach().mean(), metrics.detach().mean()

        # Per task, backward right away: each task's graph is freed before the next is built,
        # so memory does not grow with the meta-batch.
        grad = autograd_grad(create_graph=not self.first_order)
        losses, metrics = [], []
        for xs, ys, xq, yq in zip(*batch, strict=True):
            adapted = adapt(
                forward, loss, params, xs, ys, lr=self.inner_lr, steps=self.inner_steps, grad=grad
            )[-1]
            out = forward(adapted, xq)
            task_loss = loss(out, yq)
            (task_loss / n).backward()
            losses.append(task_loss.detach())
            metrics.append(metric(out.detach(), yq))
        return torch.stack(losses).mean(), torch.stack(metrics).mean()

    def evaluate(
        self, model: nn.Module, batch: TaskBatch, kind: str, steps: int, batching: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Query loss and metric of every task after 0…``steps`` inner steps.

        Returns two ``[tasks, steps + 1]`` tensors. The meta-parameters are not touched.
        """
        params = {k: p.detach() for k, p in model.named_parameters()}
        forward, loss, metric = (
            forward_fn(model),
            loss_fn(kind, self.loss_normalization),
            metric_fn(kind),
        )

        if batching == "vmap":
            grad = functional_grad(first_order=True)

            def task(p: Params, xs, ys, xq, yq):
                trajectory = adapt(
                    forward, loss, p, xs, ys, lr=self.inner_lr, steps=steps, grad=grad
                )
                outs = [forward(q, xq) for q in trajectory]
                return (
                    torch.stack([loss(o, yq) for o in outs]),
                    torch.stack([metric(o, yq) for o in outs]),
                )

            with torch.no_grad():
                return torch.func.vmap(task, in_dims=(None, 0, 0, 0, 0))(params, *batch)

        grad = autograd_grad(create_graph=False)
        losses, metrics = [], []
        for xs, ys, xq, yq in zip(*batch, strict=True):
            start = {k: p.requires_grad_() for k, p in ((k, p.clone()) for k, p in params.items())}
            with torch.enable_grad():
                trajectory = adapt(
                    forward, loss, start, xs, ys, lr=self.inner_lr, steps=steps, grad=grad
                )
            with torch.no_grad():
                outs = [forward(q, xq) for q in trajectory]
                losses.append(torch.stack([loss(o, yq) for o in outs]))
                metrics.append(torch.stack([metric(o, yq) for o in outs]))
        return torch.stack(losses), torch.stack(metrics)

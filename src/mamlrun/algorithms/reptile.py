"""Reptile (Nichol et al. 2018): move the initialisation toward the weights each task ends at.

For each task, take ``inner_steps`` steps of SGD or Adam on all its examples (support and
query together, as Reptile trains on the whole task) from θ and call the result φ_i. The
meta-gradient is ``θ − mean_i φ_i``, so an outer SGD step with learning rate ε is Reptile's
update ``θ ← θ + ε (mean_i φ_i − θ)``; the paper's linearly annealed ε is an outer-SGD
schedule in the config. It needs no second derivatives and no meta-graph.

Reptile is MAML's inner loop (``MAML.inner_loop``, first order) with another outer update, so
evaluation, the batching choice, batch-norm mode and everything else are MAML's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mamlrun.algorithms.inner import autograd_grad, functional_grad
from mamlrun.algorithms.maml import MAML
from mamlrun.algorithms.meta_parameters import split
from mamlrun.data.tasks import TaskBatch
from mamlrun.metrics import loss_fn, metric_fn


@dataclass
class Reptile:
    """Inner-loop settings of Reptile.

    Attributes:
        inner_lr: the inner optimizer's learning rate.
        inner_steps: inner steps per task while meta-training (full batch: all the task's
            examples each step; the paper draws mini-batches).
        inner_steps_test: inner steps on the support set at validation and test time.
        inner_optimizer: ``adam`` (the paper's, with β1 = 0) or ``sgd``. Adam's state starts
            afresh for every task (the original code carries it over from task to task).
        adam_betas: Adam's (β1, β2).
        task_batching: ``loop``, ``vmap`` or ``auto``.
        loss_normalization: ``mean`` or ``tf_maml`` (see ``metrics.loss_fn``).
        bn_mode: ``transductive`` or ``per_step`` (see ``maml.BN_MODES``).
    """

    inner_lr: float = 0.001
    inner_steps: int = 3
    inner_steps_test: int = 5
    inner_optimizer: str = "adam"
    adam_betas: tuple[float, float] = (0.0, 0.999)
    task_batching: str = "auto"
    loss_normalization: str = "mean"
    bn_mode: str = "transductive"
    inner: MAML = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.inner = MAML(
            inner_lr=self.inner_lr,
            inner_steps=self.inner_steps,
            inner_steps_test=self.inner_steps_test,
            first_order=True,
            task_batching=self.task_batching,
            loss_normalization=self.loss_normalization,
            bn_mode=self.bn_mode,
            inner_optimizer=self.inner_optimizer,
            adam_betas=self.adam_betas,
        )

    @property
    def batching_modes(self) -> tuple[str, ...]:
        return self.inner.batching_modes

    def meta_model(self, backbone: nn.Module) -> nn.Module:
        return self.inner.meta_model(backbone)

    def evaluate(
        self, model: nn.Module, batch: TaskBatch, kind: str, steps: int, batching: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapt on each support set as in training, report the query curves (see MAML)."""
        return self.inner.evaluate(model, batch, kind, steps, batching)

    def meta_gradient(
        self,
        model: nn.Module,
        batch: TaskBatch,
        kind: str,
        batching: str,
        step: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulate ``θ − mean_i φ_i`` into the ``.grad`` of ``model``'s parameters.

        Returns the mean loss and metric of φ_i on task i's query examples, which φ_i was
        trained on: a measure of fit, not of generalisation. ``step`` is accepted for the
        runner's sake; Reptile has no schedule of its own.
        """
        self.inner._check_batching(batching)
        theta = dict(split(model)[0].named_parameters())
        meta = {"theta": {k: p.detach() for k, p in theta.items()}}
        x = torch.cat([batch.x_support, batch.x_query], dim=1)
        y = torch.cat([batch.y_support, batch.y_query], dim=1)
        loss, metric = loss_fn(kind, self.loss_normalization), metric_fn(kind)

        if batching == "vmap":
            inner = self.inner.inner_loop(model, kind, self.inner_steps, functional_grad(True))

            def task(meta, x, y, xq, yq):
                trajectory, forwards = inner(meta, x, y)
                out = forwards[-1](trajectory[-1], xq)
                return trajectory[-1], loss(out, yq), metric(out, yq)

            with torch.no_grad():
                phis, losses, metrics = torch.func.vmap(task, in_dims=(None, 0, 0, 0, 0))(
                    meta, x, y, batch.x_query, batch.y_query
                )
            mean_phi = {k: v.mean(0) for k, v in phis.items()}
        else:
            inner = self.inner.inner_loop(model, kind, self.inner_steps, autograd_grad(False))
            total = {k: torch.zeros_like(t) for k, t in meta["theta"].items()}
            losses, metrics = [], []
            for xi, yi, xq, yq in zip(x, y, batch.x_query, batch.y_query, strict=True):
                start = {"theta": {k: t.clone().requires_grad_() for k, t in meta["theta"].items()}}
                trajectory, forwards = inner(start, xi, yi)
                with torch.no_grad():
                    for k, t in trajectory[-1].items():
                        total[k] += t
                    out = forwards[-1](trajectory[-1], xq)
                    losses.append(loss(out, yq))
                    metrics.append(metric(out, yq))
            mean_phi = {k: t / batch.num_tasks for k, t in total.items()}
            losses, metrics = torch.stack(losses), torch.stack(metrics)

        for name, p in theta.items():
            g = p.detach() - mean_phi[name]
            p.grad = g if p.grad is None else p.grad + g
        return losses.detach().mean(), metrics.detach().mean()

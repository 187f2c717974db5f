"""Reptile (Nichol et al. 2018): move the initialisation toward the weights each task ends at.

For each task, take ``inner_steps`` steps of SGD or Adam on all its examples (support and
query together, as Reptile trains on the whole task) from θ and call the result φ_i. The
meta-gradient is ``θ − mean_i φ_i``, so an outer SGD step with learning rate ε is Reptile's
update ``θ ← θ + ε (mean_i φ_i − θ)``; the paper's linearly annealed ε is an outer-SGD
schedule in the config. It needs no second derivatives and no meta-graph.

Reptile is the shared inner loop (``GradientLearner``, always first order) with another outer
update, so evaluation, the batching choice and batch-norm handling are the same as MAML's.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from mamlrun.algorithms.base import Part
from mamlrun.algorithms.batching import map_tasks
from mamlrun.algorithms.functional import autograd_grad, functional_grad
from mamlrun.algorithms.learner import GradientLearner, configured
from mamlrun.data.tasks import TaskBatch
from mamlrun.models.layers import tell_training_step


@configured("reptile")
class Reptile(GradientLearner):
    """``GradientLearner``'s settings and nothing more, used first order (Reptile never
    differentiates through the inner loop); Reptile's outer update. ``Reptile()`` takes its
    settings from ``conf/meta_optimizer/reptile.yaml`` (``configured``).

    Adaptation Adam (``inner_optimizer=adam``, the paper's, with β1 = 0) starts afresh for every
    task (the original code carries its state over from task to task). Each inner step uses
    all the task's examples (the paper draws mini-batches).
    """

    def meta_objective(
        self, model: nn.Module, batch: TaskBatch, step: int | None = None
    ) -> Iterator[Part]:
        """One part whose gradient is ``θ − mean_i φ_i``: ``Σ θ·(θ − φ̄)`` with the second
        factor held constant. Its logged loss and metric are φ_i's on task i's query
        examples, which φ_i was trained on: a measure of fit, not of generalisation.
        Reptile has no schedule of its own; ``step`` goes to the backbone's layers that
        change over training (DropBlock)."""
        task_type, batching = self.bound()
        plan = self.plan(model)
        if plan.changes_over_training:
            tell_training_step(model, step)
        theta = dict(plan.backbone.named_parameters())
        meta = {"theta": {k: p.detach() for k, p in theta.items()}}
        x = torch.cat([batch.x_support, batch.x_query], dim=1)
        y = torch.cat([batch.y_support, batch.y_query], dim=1)
        per_task = self.mode != "vmap"
        grad = autograd_grad(False) if per_task else functional_grad(True)
        tasks = TaskBatch(x, y, batch.x_query, batch.y_query)
        phis, losses, metrics = map_tasks(
            lambda m: self._task(m, task_type, grad, per_task), model, meta, tasks, batching
        )
        with torch.no_grad():
            directions = {k: p.detach() - phis[k].mean(0) for k, p in theta.items()}
        objective = sum((p * directions[k]).sum() for k, p in theta.items())
        yield Part(objective, losses.mean(), metrics.mean(), batch.num_tasks)

    def _task(self, model: nn.Module, task_type: str, grad, per_task: bool):
        inner = self.adaptation(model, task_type, self.inner_steps, grad)
        loss, metric, per_output = self.losses_of(task_type)

        def task(meta, x, y, xq, yq):
            if per_task:  # fresh leaves: autograd's inner gradients need θ to require grad
                meta = {"theta": {k: t.clone().requires_grad_() for k, t in meta["theta"].items()}}
            trajectory, forwards = inner(meta, x, y)
            with torch.no_grad():
                phi = {k: t.detach() for k, t in trajectory[-1].items()}
                out = forwards[-1](phi, xq)
                scale = out.shape[-1] if per_output else 1  # losses.scales_with_outputs
                return phi, loss(out, yq) / scale, metric(out, yq)

        return task

"""Reptile (Nichol et al. 2018): move the initialisation toward the weights each task ends at.

For each task, take ``inner_steps`` steps of SGD or Adam on all its examples (support and
query together, as Reptile trains on the whole task) from θ and call the result φ_i. The
meta-gradient is ``θ − mean_i φ_i``, so an outer SGD step with learning rate ε is Reptile's
update ``θ ← θ + ε (mean_i φ_i − θ)``; the paper's linearly annealed ε is an outer-SGD
schedule in the config. It needs no second derivatives and no meta-graph.

Reptile is the shared inner loop (``GradientLearner``, always first order) with another outer
update, so evaluation, the batching choice and batch-norm handling are the same as MAML's.
Per task (``loop``, ``threads``) the inner loop runs in place with torch's own Adam kernels
(``functional.adapt_in_place``): φ_i is all Reptile keeps of it, so no graph through the
steps is needed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from mamlrun.algorithms.base import Part
from mamlrun.algorithms.batching import map_tasks
from mamlrun.algorithms.functional import Record, autograd_grad, functional_grad
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
        factor held constant. Its logged loss and metric are those of the last inner step's
        own forward pass, so they cost no pass of their own: the loss and metric at
        θ_{K−1}, the parameters before the last step's update (θ itself when K = 1), on all
        of task i's examples (support and query, the batch that step trains on). A measure
        of fit on the training batch, not of generalisation, one step behind φ_i. Reptile
        has no schedule of its own; ``step`` goes to the backbone's layers that change over
        training (DropBlock)."""
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
        phis, (losses, metrics) = map_tasks(
            lambda m: self._task(m, task_type, grad, per_task), model, meta, tasks, batching
        )
        with torch.no_grad():
            directions = {k: p.detach() - phis[k].mean(0) for k, p in theta.items()}
        objective = sum((p * directions[k]).sum() for k, p in theta.items())
        yield Part(objective, losses.mean(), metrics.mean(), batch.num_tasks)

    def _task(self, model: nn.Module, task_type: str, grad, per_task: bool):
        """Per task: φ (in place with torch's Adam where tasks run one by one; ``vmap``
        keeps the functional loop) and the last step's loss and metric (``Record``)."""
        inner = self.adaptation(
            model, task_type, self.inner_steps, grad, whole=False, in_place=per_task
        )
        loss, metric, per_output = self.losses_of(task_type)

        def measure(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            scale = out.shape[-1] if per_output else 1  # losses.scales_with_outputs
            return loss(out, y) / scale, metric(out, y)

        def task(meta, x, y, xq, yq):
            record = Record(measure)
            trajectory, _ = inner(meta, x, y, record=record)
            return {k: t.detach() for k, t in trajectory[-1].items()}, record.value

        return task

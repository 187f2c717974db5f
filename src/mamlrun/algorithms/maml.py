"""MAML (Finn et al. 2017): the outer objective is the query loss after adaptation.

The inner loop and evaluation are ``InnerLoop``'s; MAML adds the outer objective: adapt on
each task's support set, take the loss on its query set, average over tasks. Its family is
flags: first order (``first_order``), ANIL (``adapt_params=head``), Meta-SGD and MAML++'s
rates (``learned_inner_lr``), MAML++'s per-step batch norm, and the two MAML++ settings that
change over training, defined here: the multi-step loss and derivative-order annealing
(``schedules``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from mamlrun.algorithms import schedules
from mamlrun.algorithms.base import Part
from mamlrun.algorithms.batching import map_tasks
from mamlrun.algorithms.inner import autograd_grad, functional_grad
from mamlrun.algorithms.inner_loop import InnerLoop, scored
from mamlrun.data.tasks import TaskBatch
from mamlrun.errors import MamlrunError
from mamlrun.models.layers import tell_training_step


@dataclass
class MAML(InnerLoop):
    """``InnerLoop``'s settings plus MAML++'s training schedules.

    Attributes:
        multi_step_loss: MAML++'s MSL: outer loss over the query losses after every inner
            step, weights annealed to the last step over the first ``msl_iterations``.
        msl_iterations: training iterations over which the MSL weights anneal.
        first_order_until: MAML++'s derivative-order annealing: first order for training
            iterations before this one, second order after (0: off).
    """

    multi_step_loss: bool
    msl_iterations: int
    first_order_until: int

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.multi_step_loss and self.msl_iterations < 1:
            raise MamlrunError("meta_optimizer.multi_step_loss needs msl_iterations >= 1")

    def meta_objective(
        self,
        model: nn.Module,
        batch: TaskBatch,
        kind: str,
        batching: str,
        step: int | None = None,
    ) -> Iterator[Part]:
        """The mean over tasks of the (weighted) query losses after adaptation.

        ``step`` is the training iteration (from 0), which the multi-step loss and
        derivative-order annealing depend on; without it the settings of the end of training
        apply. Under ``vmap`` the whole meta-batch is one part; one task at a time, each task
        is a part, so the loop can free a task's graph before the next one is built. The
        backbone's layers that change over training (DropBlock) are told ``step`` too.
        """
        self.check_batching(batching)
        tell_training_step(model, step)
        first_order = schedules.first_order_at(step, self.first_order, self.first_order_until)
        weights = (
            schedules.msl_weights(step, self.inner_steps, self.msl_iterations)
            if self.multi_step_loss
            else [0.0] * (self.inner_steps - 1) + [1.0]
        )
        scored_steps = [(s + 1, w) for s, w in enumerate(weights) if w != 0]
        steps = [s for s, _ in scored_steps]
        meta = self.meta_tensors(model)
        n = batch.num_tasks

        if batching == "vmap":
            inner = self.inner_loop(model, kind, self.inner_steps, functional_grad(first_order))
            task = scored(inner, kind, self.loss_normalization, steps)
            objectives, losses, metrics = map_tasks(task, meta, batch, "vmap")
            w = objectives.new_tensor([w for _, w in scored_steps])
            yield Part((objectives @ w).mean(), losses[:, -1].mean(), metrics[:, -1].mean(), n)
            return

        checkpoint = self.checkpoint_inner and not first_order
        inner = self.inner_loop(
            model, kind, self.inner_steps, autograd_grad(not first_order), checkpoint
        )
        task = scored(inner, kind, self.loss_normalization, steps, fused_query=True)
        for xs, ys, xq, yq in zip(*batch, strict=True):
            objectives, losses, metrics = task(meta, xs, ys, xq, yq)
            weighted = sum(w * o for (_, w), o in zip(scored_steps, objectives, strict=True))
            yield Part(weighted / n, losses[-1], metrics[-1].detach(), 1)

"""MAML (Finn et al. 2017): the outer objective is the query loss after adaptation.

The inner loop and evaluation are ``GradientLearner``'s; MAML adds the outer objective: adapt on
each task's support set, take the loss on its query set, average over tasks. Its family is
flags: first order (``first_order``), ANIL (``adapt_params=head``), Meta-SGD and MAML++'s
rates (``learned_inner_lr``), MAML++'s per-step batch norm, and the two MAML++ settings that
change over training, defined here: the multi-step loss and derivative-order annealing
(``schedules``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from mamlrun.algorithms import schedules
from mamlrun.algorithms.base import Part
from mamlrun.algorithms.batching import chunks, in_threads, map_tasks
from mamlrun.algorithms.functional import autograd_grad, functional_grad
from mamlrun.algorithms.learner import GradientLearner, configured, scored
from mamlrun.data.tasks import TaskBatch
from mamlrun.models.layers import tell_training_step


@configured("maml")
class MAML(GradientLearner):
    """``GradientLearner``'s settings plus MAML's own: its flags (the family's variants) and
    MAML++'s training schedules. ``MAML(inner_lr=0.4)`` takes the rest from
    ``conf/meta_optimizer/maml.yaml`` (``configured``).

    Attributes:
        first_order: drop the second-order term (FOMAML): cheaper, usually slightly worse.
        learned_inner_lr: ``none``, ``per_element`` (Meta-SGD) or ``per_layer_per_step``
            (MAML++'s LSLR): inner rates meta-learned with the initialisation.
        per_step_bn_weights: MAML++'s BNWB: batch-norm gamma/beta per inner step, meta-learned
            and not adapted.
        checkpoint_inner: for second-order training, keep only the parameters after each
            inner step and recompute a step's graph during the outer backward pass: memory
            no longer grows with the steps' graphs, for about one more forward and backward
            of every step. Same meta-gradient. ``loop`` batching only, not with
            ``bn_mode=per_step`` (the recomputation would update the statistics twice).
        multi_step_loss: MAML++'s MSL: outer loss over the query losses after every inner
            step, weights annealed to the last step over the first ``msl_iterations``.
        msl_iterations: training iterations over which the MSL weights anneal.
        first_order_until: MAML++'s derivative-order annealing: first order for training
            iterations before this one, second order after (0: off).
    """

    first_order: bool
    learned_inner_lr: str
    per_step_bn_weights: bool
    checkpoint_inner: bool
    multi_step_loss: bool
    msl_iterations: int
    first_order_until: int

    # What the shared inner loop asks of a member (``GradientLearner``), from MAML's flags.
    @property
    def learned_rates(self) -> str:
        return self.learned_inner_lr

    @property
    def per_step_weights(self) -> bool:
        return self.per_step_bn_weights

    @property
    def recomputes_steps(self) -> bool:
        return self.checkpoint_inner

    def meta_objective(
        self, model: nn.Module, batch: TaskBatch, step: int | None = None
    ) -> Iterator[Part]:
        """The mean over tasks of the (weighted) query losses after adaptation.

        ``step`` is the training iteration (from 0), which the multi-step loss and
        derivative-order annealing depend on; without it the settings of the end of training
        apply. Under ``vmap`` the whole meta-batch is one part; one task at a time, each task
        is a part, so the loop can free a task's graph before the next one is built. The
        backbone's layers that change over training (DropBlock) are told ``step`` too.
        """
        task_type, _ = self.bound()
        plan = self.plan(model)
        if plan.changes_over_training:
            tell_training_step(model, step)
        first_order = self.first_order
        if self.first_order_until > 0 and not first_order:  # derivative-order annealing
            first_order = schedules.first_order_at(step, first_order, self.first_order_until)
        weights = (
            schedules.msl_weights(step, self.inner_steps, self.msl_iterations)
            if self.multi_step_loss
            else [0.0] * (self.inner_steps - 1) + [1.0]
        )
        scored_steps = [(s + 1, w) for s, w in enumerate(weights) if w != 0]
        if self.mode == "vmap":
            yield from self._batched(model, batch, task_type, first_order, scored_steps)
        elif self.mode == "threads":
            yield self._threaded(model, batch, task_type, first_order, scored_steps)
        else:
            yield from self._looped(model, batch, task_type, first_order, scored_steps)

    def _batched(self, model, batch, task_type, first_order, scored_steps) -> Iterator[Part]:
        """Under ``vmap``, one part per chunk of tasks (the whole meta-batch without one)."""
        meta, n = self.meta_tensors(model), batch.num_tasks
        steps = [s for s, _ in scored_steps]

        def task(m: nn.Module):
            inner = self.adaptation(m, task_type, self.inner_steps, functional_grad(first_order))
            return scored(inner, self.losses_of(task_type), steps)

        for part in chunks(batch, self.chunk):
            objectives, losses, metrics = map_tasks(task, model, meta, part, "vmap")
            w = objectives.new_tensor([w for _, w in scored_steps])
            share = part.num_tasks / n
            yield Part(
                (objectives @ w).mean() * share, losses[:, -1].mean(), metrics[:, -1].mean(),
                part.num_tasks,
            )  # fmt: skip

    def _task(self, model, task_type, first_order, scored_steps):
        """One task's weighted objective, its last query loss and metric (per-task paths)."""
        checkpoint = self.checkpoint_inner and not first_order
        inner = self.adaptation(
            model, task_type, self.inner_steps, autograd_grad(not first_order), checkpoint
        )
        steps = [s for s, _ in scored_steps]
        fused = self.plan(model).has_bn  # without batch norm the fused kernel changes nothing
        task = scored(inner, self.losses_of(task_type), steps, fused_query=fused)

        def weighted(meta, xs, ys, xq, yq):
            objectives, losses, metrics = task(meta, xs, ys, xq, yq)
            total = sum(w * o for (_, w), o in zip(scored_steps, objectives, strict=True))
            return total, losses[-1], metrics[-1].detach()

        return weighted

    def _looped(self, model, batch, task_type, first_order, scored_steps) -> Iterator[Part]:
        """One part per task, so the loop can free a task's graph before the next is built."""
        meta, n = self.meta_tensors(model), batch.num_tasks
        task = self._task(model, task_type, first_order, scored_steps)
        for xs, ys, xq, yq in zip(*batch, strict=True):
            objective, loss, metric = task(meta, xs, ys, xq, yq)
            yield Part(objective / n, loss, metric, 1)

    def _threaded(self, model, batch, task_type, first_order, scored_steps) -> Part:
        """Tasks on worker threads, each returning its meta-gradient (``autograd.grad``: no
        shared ``.grad`` is touched from two threads); summed in task order as they come (the
        loop's order of accumulation, so one intra-op thread gives the loop's bits), they come
        back as one part whose objective ``Σ θ·g`` (g held constant) has exactly that gradient."""
        meta, n = self.meta_tensors(model), batch.num_tasks
        leaves = [t for group in meta.values() for t in group.values()]

        def task(m: nn.Module):
            weighted = self._task(m, task_type, first_order, scored_steps)

            def gradient(meta, xs, ys, xq, yq):
                objective, loss, metric = weighted(meta, xs, ys, xq, yq)
                grads = torch.autograd.grad(objective / n, leaves, allow_unused=True)
                pairs = zip(leaves, grads, strict=True)
                return (
                    [torch.zeros_like(t) if g is None else g for t, g in pairs],
                    loss.detach(),
                    metric,
                )

            return gradient

        total, losses, metrics = None, [], []
        for grads, loss, metric in in_threads(task, model, meta, batch):
            total = (
                grads if total is None else [t.add_(g) for t, g in zip(total, grads, strict=True)]
            )
            losses.append(loss), metrics.append(metric)
        objective = sum((t * g).sum() for t, g in zip(leaves, total, strict=True))
        return Part(objective, torch.stack(losses).mean(), torch.stack(metrics).mean(), n)

"""MAML (Finn et al. 2017) and its family as one set of settings with two entry points.

``meta_gradient`` is the training step: adapt on each task's support set, take the loss on its
query set, and accumulate the gradient of the mean over tasks into the meta-parameters'
``.grad``. ``evaluate`` adapts without building a meta-graph and reports the query loss and
metric after every inner step. Both run the tasks of a batch either one at a time
(``loop``) or together under ``torch.func.vmap`` (``vmap``); which is faster depends on the
model and the device, so the runner can also measure both (``auto``).

The family is flags on these settings, each implemented by a small function elsewhere:
first-order MAML (``first_order``), ANIL (``adapt_params``, in ``anil``), Meta-SGD and
MAML++'s per-step rates (``learned_inner_lr``, in ``learned_lr``), and MAML++'s multi-step
loss, derivative-order annealing and per-step batch norm (in ``mamlpp``). Reptile
(``reptile``) reuses this inner loop with another outer update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from mamlrun.algorithms import anil, learned_lr, mamlpp
from mamlrun.algorithms.inner import (
    Forward,
    GradFn,
    Params,
    adapt,
    at_step,
    autograd_grad,
    checkpointed_adapt,
    functional_grad,
)
from mamlrun.algorithms.meta_parameters import MetaModel, per_name, split
from mamlrun.data.tasks import TaskBatch
from mamlrun.errors import MamlrunError
from mamlrun.metrics import LOSS_NORMALIZATION, loss_fn, metric_fn
from mamlrun.models.conv4 import fused_batch_norm

TASK_BATCHING = ("auto", "loop", "vmap")
#: ``transductive``: every forward pass normalises with the statistics of the batch it sees
#: (the task's support or query set), as the original MAML. ``per_step``: running statistics
#: per inner step, collected while meta-training and used at evaluation (MAML++'s BNRS).
BN_MODES = ("transductive", "per_step")
INNER_OPTIMIZERS = ("sgd", "adam")

#: The meta-parameters as the inner loop takes them: the backbone's (``theta``) and the
#: algorithm's extras (``inner_lr``, ``bn_weights``), each a ``{backbone name: tensor}`` dict.
Meta = dict[str, Params]
#: One task's inner loop: ``(meta, x, y) -> (trajectory θ_0…θ_S, forward to use with each θ_s)``.
InnerLoop = Callable[[Meta, torch.Tensor, torch.Tensor], tuple[list[Params], list[Forward]]]


@dataclass
class MAML:
    """Inner-loop settings of MAML and the variants that are flags on it.

    Attributes:
        inner_lr: step size α of the inner SGD steps (initial value when learned).
        inner_steps: inner steps while meta-training.
        inner_steps_test: inner steps at validation and test time (the paper uses more).
        first_order: drop the second-order term (FOMAML): cheaper, usually slightly worse.
        task_batching: ``loop``, ``vmap`` or ``auto`` (measure both at start-up).
        loss_normalization: ``mean`` or ``tf_maml`` (see ``metrics.loss_fn``): what the inner
            learning rate is relative to.
        adapt_params: ``all``, ``head`` (ANIL) or a list of parameter-name prefixes: which
            parameters the inner loop updates. The others are meta-learned in the outer loop.
        learned_inner_lr: ``none``, ``per_element`` (Meta-SGD) or ``per_layer_per_step``
            (MAML++'s LSLR): inner rates meta-learned with the initialisation.
        multi_step_loss: MAML++'s MSL: outer loss over the query losses after every inner
            step, weights annealed to the last step over the first ``msl_iterations``.
        msl_iterations: training iterations over which the MSL weights anneal.
        first_order_until: MAML++'s derivative-order annealing: first order for training
            iterations before this one, second order after (0: off).
        per_step_bn_weights: MAML++'s BNWB: batch-norm gamma/beta per inner step, meta-learned
            and not adapted.
        bn_mode: ``transductive`` or ``per_step`` (MAML++'s BNRS), see ``BN_MODES``. Only
            ``loop`` batching supports ``per_step`` (statistics are updated in place).
        inner_optimizer: ``sgd``, or ``adam`` (with ``adam_betas``, fresh state per task;
            first order only, as Adam's square root has no second derivative at a zero gradient).
        adam_betas: Adam's (β1, β2) when ``inner_optimizer=adam``.
        checkpoint_inner: inner-loop gradient checkpointing for second-order training: keep
            only the parameters after each inner step and recompute a step's graph during the
            outer backward pass. Trades roughly one more forward and backward pass of every
            inner step for memory that no longer grows with the steps' graphs (worth it with
            many inner steps). Same meta-gradient. ``loop`` batching only, not with
            ``bn_mode=per_step`` (the recomputation would update the statistics twice); no
            effect on first-order iterations, which keep no such graph.
    """

    inner_lr: float = 0.01
    inner_steps: int = 1
    inner_steps_test: int = 10
    first_order: bool = False
    task_batching: str = "auto"
    loss_normalization: str = "mean"
    adapt_params: str | list[str] = "all"
    learned_inner_lr: str = "none"
    multi_step_loss: bool = False
    msl_iterations: int = 0
    first_order_until: int = 0
    per_step_bn_weights: bool = False
    bn_mode: str = "transductive"
    inner_optimizer: str = "sgd"
    adam_betas: tuple[float, float] = (0.9, 0.999)
    checkpoint_inner: bool = False

    def __post_init__(self) -> None:
        if self.inner_lr <= 0:
            raise MamlrunError(f"meta_optimizer.inner_lr must be positive, got {self.inner_lr}")
        if self.inner_steps < 1 or self.inner_steps_test < 0:
            raise MamlrunError(
                "meta_optimizer.inner_steps must be >= 1 and inner_steps_test >= 0, got "
                f"{self.inner_steps} and {self.inner_steps_test}"
            )
        for name, choices in (
            ("loss_normalization", LOSS_NORMALIZATION),
            ("task_batching", TASK_BATCHING),
            ("learned_inner_lr", learned_lr.LEARNED_LR),
            ("bn_mode", BN_MODES),
            ("inner_optimizer", INNER_OPTIMIZERS),
        ):
            if getattr(self, name) not in choices:
                raise MamlrunError(
                    f"meta_optimizer.{name} must be one of {', '.join(choices)}, "
                    f"got {getattr(self, name)!r}"
                )
        if self.multi_step_loss and self.msl_iterations < 1:
            raise MamlrunError("meta_optimizer.multi_step_loss needs msl_iterations >= 1")
        if self.inner_optimizer == "adam" and not self.first_order:
            raise MamlrunError(
                "meta_optimizer.inner_optimizer=adam needs first_order=true (Adam's square root "
                "has no second derivative where a gradient is zero)"
            )
        if self.checkpoint_inner and self.bn_mode == "per_step":
            raise MamlrunError(
                "meta_optimizer.checkpoint_inner=true is not possible with bn_mode=per_step: "
                "recomputing an inner step would update its running statistics a second time"
            )
        if self.task_batching not in ("auto", *self.batching_modes):
            raise MamlrunError(self._no_vmap_message())
        self.adam_betas = tuple(self.adam_betas)

    # ------------------------------------------------------------------ what the runner asks
    @property
    def batching_modes(self) -> tuple[str, ...]:
        """The ways of running tasks this configuration supports (``auto`` picks among them)."""
        loop_only = self.bn_mode == "per_step" or self.checkpoint_inner
        return ("loop",) if loop_only else ("loop", "vmap")

    def meta_model(self, backbone: nn.Module) -> nn.Module:
        """The module whose parameters are meta-learned: the backbone plus this algorithm's
        extra meta-parameters (learned rates, per-step batch norm), or the bare backbone when
        there are none. The runner builds the outer optimizer and checkpoints from it.
        """
        theta = dict(backbone.named_parameters())
        adapted = {n: theta[n] for n in self._adapted_names(backbone)}  # fails early if none
        layers = mamlpp.batch_norm_layers(backbone)
        extras: dict[str, nn.Module] = {}
        for name in self._extra_names(backbone):
            if name == "inner_lr":
                extras[name] = learned_lr.init(
                    self.learned_inner_lr, adapted, self.inner_lr, self.inner_steps
                )
            elif name == "bn_weights":
                extras[name] = mamlpp.PerStepBatchNormWeights(layers, self.inner_steps)
            else:
                extras[name] = mamlpp.PerStepStatistics(layers, self.inner_steps)
        return MetaModel(backbone, extras) if extras else backbone

    # ------------------------------------------------------------------ training
    def meta_gradient(
        self,
        model: nn.Module,
        batch: TaskBatch,
        kind: str,
        batching: str,
        step: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulate ∇ of the mean query loss into the ``.grad`` of ``model``'s parameters.

        ``step`` is the training iteration (from 0), which multi-step loss and derivative-order
        annealing depend on; without it the settings of the end of training apply.
        Returns the mean query loss and metric after adaptation (detached tensors, so the
        caller decides when to synchronise with the device).
        """
        self._check_batching(batching)
        first_order = mamlpp.first_order_at(step, self.first_order, self.first_order_until)
        weights = (
            mamlpp.msl_weights(step, self.inner_steps, self.msl_iterations)
            if self.multi_step_loss
            else [0.0] * (self.inner_steps - 1) + [1.0]
        )
        scored = [(s + 1, w) for s, w in enumerate(weights) if w != 0]
        meta = self.meta_tensors(model)
        n = batch.num_tasks

        if batching == "vmap":
            inner = self.inner_loop(model, kind, self.inner_steps, functional_grad(first_order))
            task = _scored(inner, kind, self.loss_normalization, [s for s, _ in scored])
            losses, metrics = torch.func.vmap(task, in_dims=(None, 0, 0, 0, 0))(meta, *batch)
            w = losses.new_tensor([w for _, w in scored])
            (losses @ w).mean().backward()
            return losses[:, -1].detach().mean(), metrics[:, -1].detach().mean()

        # Per task, backward right away: each task's graph is freed before the next is built,
        # so memory does not grow with the meta-batch.
        grad = autograd_grad(create_graph=not first_order)
        checkpoint = self.checkpoint_inner and not first_order
        task = _scored(
            self.inner_loop(model, kind, self.inner_steps, grad, checkpoint),
            kind,
            self.loss_normalization,
            [s for s, _ in scored],
            fused_query=True,
        )
        last_losses, last_metrics = [], []
        for xs, ys, xq, yq in zip(*batch, strict=True):
            losses, metrics = task(meta, xs, ys, xq, yq)
            (sum(w * loss for (_, w), loss in zip(scored, losses, strict=True)) / n).backward()
            last_losses.append(losses[-1].detach())
            last_metrics.append(metrics[-1].detach())
        return torch.stack(last_losses).mean(), torch.stack(last_metrics).mean()

    # ------------------------------------------------------------------ evaluation
    def evaluate(
        self, model: nn.Module, batch: TaskBatch, kind: str, steps: int, batching: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Query loss and metric of every task after 0…``steps`` inner steps.

        Returns two ``[tasks, steps + 1]`` tensors. The meta-parameters are not touched.
        """
        self._check_batching(batching)
        meta = {
            group: {k: t.detach() for k, t in ts.items()}
            for group, ts in self.meta_tensors(model).items()
        }
        all_steps = list(range(steps + 1))
        with self._evaluation_mode(model):
            if batching == "vmap":
                inner = self.inner_loop(model, kind, steps, functional_grad(first_order=True))
                task = _scored(inner, kind, self.loss_normalization, all_steps)
                with torch.no_grad():
                    return torch.func.vmap(task, in_dims=(None, 0, 0, 0, 0))(meta, *batch)

            inner = self.inner_loop(model, kind, steps, autograd_grad(create_graph=False))

            def adapted(meta: Meta, x: torch.Tensor, y: torch.Tensor):
                """Gradients for the inner steps only; the query passes need no graph."""
                start = {k: t.clone().requires_grad_() for k, t in meta["theta"].items()}
                with torch.enable_grad():
                    trajectory, forwards = inner({**meta, "theta": start}, x, y)
                return [{k: t.detach() for k, t in p.items()} for p in trajectory], forwards

            task = _scored(adapted, kind, self.loss_normalization, all_steps)
            with torch.no_grad():
                curves = [task(meta, *one_task) for one_task in zip(*batch, strict=True)]
            return tuple(torch.stack(c) for c in zip(*curves, strict=True))

    # ------------------------------------------------------------------ the inner loop
    def meta_tensors(self, model: nn.Module) -> Meta:
        """The meta-parameters of ``model`` (built by ``meta_model``) as the inner loop takes
        them; live tensors, so the outer gradient reaches them.
        """
        backbone, extras = split(model)
        wanted = self._extra_names(backbone)
        if sorted(extras) != sorted(wanted):
            raise MamlrunError(
                f"these settings meta-learn {', '.join(wanted) or 'nothing'} besides the "
                f"backbone, the model has {', '.join(extras) or 'nothing'}: build it with "
                "algorithm.meta_model(backbone)"
            )
        meta: Meta = {"theta": dict(backbone.named_parameters())}
        for name in ("inner_lr", "bn_weights"):
            if name in extras:
                meta[name] = per_name(extras[name])
        return meta

    def inner_loop(
        self, model: nn.Module, kind: str, steps: int, grad: GradFn, checkpoint: bool = False
    ) -> InnerLoop:
        """One task's inner loop of ``steps`` steps with these settings.

        The returned function maps ``(meta, x, y)`` to the trajectory of the adapted
        parameters θ_0…θ_steps (only those that adapt) and the forward to use with each: the
        backbone with the parameters that do not adapt, and per-step batch-norm weights and
        statistics of that step, filled in. ``checkpoint`` recomputes the (second-order,
        SGD) steps during the outer backward pass instead of keeping their graphs (see
        ``inner.checkpointed_adapt``); ``grad`` is then unused.
        """
        backbone, extras = split(model)
        adapted = self._adapted_names(backbone)
        stats = per_name(extras["bn_stats"]) if "bn_stats" in extras else {}
        loss = loss_fn(kind, self.loss_normalization)
        adam = self.adam_betas if self.inner_optimizer == "adam" else None

        def forward_at(meta: Meta, s: int) -> Forward:
            """The backbone at inner step ``s``: the parameters that do not adapt and the
            per-step batch-norm weights and statistics filled in from ``meta``."""
            fixed = {k: t for k, t in meta["theta"].items() if k not in adapted}
            params = {**fixed, **mamlpp.at_inner_step(meta.get("bn_weights", {}), s, first=1)}
            buffers = mamlpp.at_inner_step(stats, s)

            def forward(p: Params, inputs: torch.Tensor) -> torch.Tensor:
                return functional_call(backbone, ({**params, **p}, buffers), (inputs,))

            return forward

        def rates(meta: Meta) -> float | Params | list[Params]:
            return learned_lr.rates(self.learned_inner_lr, self.inner_lr, meta.get("inner_lr"))

        def run(meta: Meta, x: torch.Tensor, y: torch.Tensor):
            forwards = [forward_at(meta, s) for s in range(steps + 1)]
            start = {k: meta["theta"][k] for k in adapted}
            if checkpoint:
                trajectory = checkpointed_adapt(
                    forward_at,
                    lambda meta, s: at_step(rates(meta), s),
                    loss,
                    meta,
                    start,
                    x,
                    y,
                    steps=steps,
                )
            else:
                lr = rates(meta)
                trajectory = adapt(
                    forwards, loss, start, x, y, lr=lr, steps=steps, grad=grad, adam=adam
                )
            return trajectory, forwards

        return run

    def _extra_names(self, backbone: nn.Module) -> list[str]:
        """Which extra meta-parameters these settings learn for this backbone."""
        has_bn = bool(mamlpp.batch_norm_layers(backbone))
        wanted = {
            "inner_lr": self.learned_inner_lr != "none",
            "bn_weights": self.per_step_bn_weights and has_bn,
            "bn_stats": self.bn_mode == "per_step" and has_bn,
        }
        return [name for name, on in wanted.items() if on]

    def _adapted_names(self, backbone: nn.Module) -> list[str]:
        bn = mamlpp.batch_norm_layers(backbone) if self.per_step_bn_weights else {}
        owned = {f"{layer}.{n}" for layer, m in bn.items() for n, _ in m.named_parameters()}
        return anil.adapted_names(backbone, self.adapt_params, exclude=owned)

    def _check_batching(self, batching: str) -> None:
        if batching not in self.batching_modes:
            raise MamlrunError(
                self._no_vmap_message()
                if batching == "vmap"
                else f"unknown task batching {batching!r}"
            )

    def _no_vmap_message(self) -> str:
        if self.checkpoint_inner:
            return (
                "meta_optimizer.task_batching=vmap is not possible with checkpoint_inner=true: "
                "the recomputed inner step is a custom autograd function that vmap cannot "
                "batch; use loop or auto"
            )
        return (
            "meta_optimizer.task_batching=vmap is not possible with bn_mode=per_step: its "
            "running statistics are updated in place, which vmap cannot batch; use loop or auto"
        )

    @contextmanager
    def _evaluation_mode(self, model: nn.Module) -> Iterator[None]:
        """Evaluate with the running statistics when there are any (``bn_mode=per_step``)."""
        was_training = model.training
        if self.bn_mode == "per_step":
            model.train(False)
        try:
            yield
        finally:
            model.train(was_training)


def _scored(
    inner: InnerLoop,
    kind: str,
    normalization: str,
    steps: Sequence[int],
    fused_query: bool = False,
) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """A task function ``(meta, xs, ys, xq, yq) -> (losses, metrics)``: the query loss and
    metric of the parameters after each of ``steps`` inner steps.

    ``fused_query`` runs the query passes with the fused batch-norm kernel: the outer backward
    differentiates them only once, so its untrustworthy second derivative is never used, and
    its first is leaner and faster than the plain-op one (``conv4.fused_batch_norm``).
    """
    loss, metric = loss_fn(kind, normalization), metric_fn(kind)

    def task(meta: Meta, xs, ys, xq, yq):
        trajectory, forwards = inner(meta, xs, ys)
        with fused_batch_norm() if fused_query else nullcontext():
            outs = [forwards[s](trajectory[s], xq) for s in steps]
        return (
            torch.stack([loss(o, yq) for o in outs]),
            torch.stack([metric(o, yq) for o in outs]),
        )

    return task

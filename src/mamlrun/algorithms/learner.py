"""The inner loop every algorithm of the family shares: its settings, and evaluation.

``GradientLearner`` holds how a task is adapted to (step size, steps, which parameters,
batch-norm handling, the inner optimizer) and builds the per-task function that does it.
MAML (``maml.MAML``) and Reptile (``reptile.Reptile``) extend it with their own settings
(``configured``) and outer update, so neither copies the other's fields, and evaluation
(adapt on the support set, score the query set after every step) is written once, here.

The variants are flags, each implemented by a small function elsewhere: which parameters
adapt (``selection``, ANIL), learned rates (``learned_lr``, Meta-SGD and MAML++'s LSLR),
per-step batch-norm weights and statistics (``per_step``, MAML++). The inner loop reads a
member's own flags through the hooks ``learned_rates``, ``per_step_weights`` and
``recomputes_steps``, the loss its steps take through ``inner_objective``, and a member that
meta-learns more (Meta-Curvature's curvature) adds it through ``own_meta_parameters`` and
turns the inner gradient into its step through ``inner_direction``.
"""

from __future__ import annotations

import copy
import difflib
import functools
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any, TypeVar

import torch
from torch import nn
from torch.func import functional_call

from mamlrun import config
from mamlrun.algorithms import learned_lr, per_step, selection
from mamlrun.algorithms.batching import map_tasks
from mamlrun.algorithms.functional import (
    Direction,
    Forward,
    GradFn,
    Objective,
    Params,
    Record,
    adapt,
    adapt_in_place,
    at_step,
    autograd_grad,
    checkpointed_adapt,
    functional_grad,
)
from mamlrun.algorithms.losses import METRIC, Losses, losses_for
from mamlrun.algorithms.meta_parameters import MetaModel, per_name, split
from mamlrun.config import ranges
from mamlrun.data.tasks import TaskBatch
from mamlrun.errors import MamlrunError
from mamlrun.models.layers import batch_norm_layers, changes_over_training, fused_batch_norm
from mamlrun.models.precision import FP32, Precision

#: The meta-parameters as the inner loop takes them: the backbone's (``theta``) and the
#: algorithm's extras (``inner_lr``, ``bn_weights``), each a ``{backbone name: tensor}`` dict.
Meta = dict[str, Params]
#: One task's inner loop: ``(meta, x, y) -> (trajectory θ_0…θ_S, forward to use with each θ_s)``.
Adaptation = Callable[[Meta, torch.Tensor, torch.Tensor], tuple[list[Params], list[Forward]]]


@dataclass(frozen=True)
class ModelPlan:
    """What these settings make of one model, the same on every call: worked out on the first
    call for a model (``GradientLearner.plan``) and reused while it is the same model object
    with the same parameter names under the same settings, so that an iteration only runs
    what varies (issue 21: bind constants once). It holds modules and names, never tensors:
    those are read live on every call, so loading a checkpoint or moving the model is seen.

    Attributes:
        model: a weak reference to the model planned for (identity, not equality).
        names: the model's parameter names when planned.
        settings: the settings the plan depends on, when planned.
        backbone, extras: ``meta_parameters.split(model)``.
        adapted: the names the inner loop updates (``selection.adapted_names``), in order.
        own: the groups of the member's own meta-parameters (``own_meta_parameters``).
        per_step_bn: per-step batch-norm weights or statistics to pick a row of at each step.
        has_bn: the backbone has batch-norm layers (a fused query pass can make a difference).
        changes_over_training: the model has layers told the training iteration (DropBlock).
    """

    model: weakref.ref
    names: tuple[str, ...]
    settings: tuple
    backbone: nn.Module
    extras: dict[str, nn.Module]
    adapted: tuple[str, ...]
    own: tuple[str, ...]
    per_step_bn: bool
    has_bn: bool
    changes_over_training: bool

    def fits(self, model: nn.Module, names: tuple[str, ...], settings: tuple) -> bool:
        return self.model() is model and self.names == names and self.settings == settings


@dataclass(kw_only=True)
class GradientLearner:
    """What every gradient-based member of the family shares: how a task is adapted to by
    gradient steps on its support set, and evaluation. The values live in
    ``conf/meta_optimizer/base/learner.yaml``, which each member's YAML extends (build one with
    its defaults from Python: ``MAML(inner_lr=0.4)``, see ``configured``); here are the types
    and what they mean.

    The base holds a setting when the shared inner loop or evaluation reads it for every
    member: the step size, the steps at training and at test time, the loss the steps take
    (its normalisation), how batch norm sees a task, how the tasks of a meta-batch run,
    which parameters adapt, and the inner optimizer with its betas (Reptile's paper adapts
    with Adam; evaluation runs the same steps as training). A setting that only one member's
    outer objective reads, or that adds meta-parameters, is that member's own: MAML's first
    order, learned rates, per-step batch-norm weights, recomputed steps and schedules are
    ``maml.MAML``'s. The shared inner loop asks a member for those through ``learned_rates``,
    ``per_step_weights`` and ``recomputes_steps`` (all off here), and for the loss an inner
    step differentiates through ``inner_objective`` (the task loss here).

    Attributes:
        inner_lr: step size α of the inner steps (the initial value when learned).
        inner_steps: inner steps while meta-training.
        inner_steps_test: inner steps at validation and test time (the paper uses more).
        task_batching: ``loop``, ``threads``, ``vmap``, ``vmap:C`` (chunks of C tasks) or
            ``auto`` (measure them at start-up), see ``batching``.
        loss_normalization: ``mean`` or ``tf_maml`` (see ``losses.loss_fn``): what the inner
            learning rate is relative to.
        adapt_params: ``all``, ``head`` (ANIL) or a list of parameter-name prefixes: which
            parameters the inner loop updates. The others are meta-learned in the outer loop.
        bn_mode: ``transductive`` or ``per_step`` (MAML++'s BNRS), see
            ``config.ranges.BN_MODES``. Only ``loop`` batching supports ``per_step``
            (statistics are updated in place).
        inner_optimizer: ``sgd``, or ``adam`` (with ``adam_betas``, fresh state per task;
            first order only, as Adam's square root has no second derivative at a zero gradient).
        adam_betas: Adam's (β1, β2) when ``inner_optimizer=adam``.
        precision: how the network's forward passes run (``precision.Precision``); not a
            setting of ``meta_optimizer`` but the run's top-level ``precision``, handed over
            by the runner through ``with_precision``.
        task_type, batching: the run's task type and the one mode its tasks run in, fixed
            for the whole run and set by ``bind`` (None until then).
    """

    inner_lr: float
    inner_steps: int
    inner_steps_test: int
    task_batching: str
    loss_normalization: str
    adapt_params: str | list[str]
    bn_mode: str
    inner_optimizer: str
    adam_betas: tuple[float, float]
    precision: Precision = field(default=FP32, init=False)
    task_type: str | None = field(default=None, init=False)
    batching: str | None = field(default=None, init=False)
    # What ``bind`` works out once from the two above: the batching parsed (``mode``, and
    # ``chunk`` for ``vmap:C``) and the task type's loss, metric and scale.
    mode: str | None = field(default=None, init=False, repr=False, compare=False)
    chunk: int | None = field(default=None, init=False, repr=False, compare=False)
    losses: Losses | None = field(default=None, init=False, repr=False, compare=False)
    _plan: ModelPlan | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The ranges of these settings are checked with the config, before anything is built
        # (``config.ranges``); here only the YAML's list becomes the tuple the type says.
        self.adam_betas = tuple(self.adam_betas)

    # ------------------------------------------------------------------ what a member adds
    # The shared inner loop reads a member's own settings only through these; off here.
    @property
    def learned_rates(self) -> str:
        """``none``, or how the inner rates are meta-learned (``learned_lr``)."""
        return "none"

    @property
    def per_step_weights(self) -> bool:
        """Batch-norm weights per inner step, meta-learned and not adapted (``per_step``)."""
        return False

    @property
    def recomputes_steps(self) -> bool:
        """Inner steps recomputed in the outer backward (``functional.checkpointed_adapt``),
        which limits the batching modes."""
        return False

    def inner_objective(
        self, task_loss: torch.Tensor, params: Params, start: Params
    ) -> torch.Tensor:
        """The loss an inner step differentiates, given the task's loss on the support set
        at ``params`` (the adapting parameters at this step) and ``start`` (the same
        parameters before the first step, the meta-parameters they start from).

        The task loss itself here; a member whose inner problem adds a term (iMAML's
        proximal λ/2·‖φ − θ‖²) overrides this, and the inner loop, evaluation and recomputed
        steps all take it from here, differentiated through ``start`` as through the rest.
        """
        return task_loss

    def own_meta_parameters(self, backbone: nn.Module, adapted: Params) -> dict[str, nn.Module]:
        """Meta-parameters a member learns besides the backbone and the shared extras, by
        group name (a Meta-Curvature curvature per ``adapted`` parameter, say); none here.

        They sit next to the backbone in ``meta_parameters.MetaModel``, so the outer optimizer
        updates them and checkpoints hold them with no change to the runner, and the inner
        loop hands them back as ``meta[group]`` (``{parameter name: tensor}``, their own
        names) to ``inner_direction``. Called with the backbone's live tensors; build fresh
        ones from them.
        """
        return {}

    def inner_direction(self, meta: Meta) -> Direction | None:
        """How an inner step turns its gradient (Adam's direction, with Adam) into the
        direction it steps along, given the meta-parameters (``own_meta_parameters``'
        groups included); None, the gradient itself, here. Differentiated through like the
        rest of the inner loop, so whatever it reads is meta-learned."""
        return None

    # ------------------------------------------------------------------ what the runner asks
    @property
    def batching_modes(self) -> tuple[str, ...]:
        return ranges.batching_modes(self.bn_mode, self.recomputes_steps)

    def describe(self) -> dict[str, Any]:
        return {
            "algorithm": type(self).__name__,
            "bn_mode": self.bn_mode,
            "inner_steps_test": self.inner_steps_test,
        }

    def with_precision(self, precision: Precision) -> GradientLearner:
        """A copy whose forward passes run in ``precision`` (``base.SupportsPrecision``).

        Every forward pass of the family goes through ``inner_loop``'s ``forward`` (inner
        steps, query passes, evaluation, their recomputation under ``recomputes_steps``),
        so that is the one place it is applied.
        """
        changed = copy.copy(self)
        changed.precision = precision
        return changed

    def meta_model(self, backbone: nn.Module) -> nn.Module:
        """The backbone plus these settings' extra meta-parameters (learned rates, per-step
        batch norm), or the bare backbone when there are none; planned here (``plan``), so
        that not even the first iteration works out what is constant."""
        theta = dict(backbone.named_parameters())
        adapted = {n: theta[n] for n in self._adapted_names(backbone)}  # fails early if none
        layers = batch_norm_layers(backbone)
        extras: dict[str, nn.Module] = dict(self.own_meta_parameters(backbone, adapted))
        for name in self._shared_extra_names(backbone):
            if name == "inner_lr":
                extras[name] = learned_lr.init(
                    self.learned_rates, adapted, self.inner_lr, self.inner_steps
                )
            elif name == "bn_weights":
                extras[name] = per_step.PerStepBatchNormWeights(layers, self.inner_steps)
            else:
                extras[name] = per_step.PerStepStatistics(layers, self.inner_steps)
        model = MetaModel(backbone, extras) if extras else backbone
        self.plan(model)
        return model

    def bind(self, task_type: str, batching: str) -> GradientLearner:
        """A copy for a run on ``task_type`` data with its tasks run as ``batching``
        (``base.Algorithm.bind``); the one place the batching is checked."""
        if task_type not in METRIC:
            raise MamlrunError(
                f"task type {task_type!r} is not one of {', '.join(METRIC)}: the dataset "
                "decides it (TaskSource.task_type)"
            )
        self.check_batching(batching)
        bound = copy.copy(self)
        bound.task_type, bound.batching = task_type, batching
        bound.mode, bound.chunk = ranges.parse_batching(batching)
        bound.losses = losses_for(task_type, self.loss_normalization)
        return bound

    def bound(self) -> tuple[str, str]:
        """The task type and batching ``bind`` fixed; an unbound algorithm cannot compute."""
        if self.task_type is None or self.batching is None:
            raise MamlrunError(
                f"{type(self).__name__} is not bound to a run: call "
                "bind(task_type, batching) once before meta_objective or evaluate"
            )
        return self.task_type, self.batching

    def evaluate(
        self, model: nn.Module, batch: TaskBatch, steps: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Query loss and metric of every task after 0…``steps`` inner steps (``[tasks,
        steps + 1]`` each); the meta-parameters are not touched."""
        task_type, batching = self.bound()
        meta = {
            g: {k: t.detach() for k, t in ts.items()} for g, ts in self.meta_tensors(model).items()
        }
        batched = self.mode == "vmap"

        def task(m: nn.Module):
            if batched:
                adapted = self.adaptation(m, task_type, steps, functional_grad(first_order=True))
            else:
                adapted = _without_outer_graph(
                    self.adaptation(m, task_type, steps, autograd_grad(False))
                )
            return scored(adapted, self.losses_of(task_type), range(steps + 1))

        with self._evaluation_mode(model), torch.no_grad():
            _, losses, metrics = map_tasks(task, model, meta, batch, batching)
        return losses, metrics

    def check_batching(self, batching: str) -> None:
        ranges.check_batching(batching, self.batching_modes, self.bn_mode, self.recomputes_steps)

    # ------------------------------------------------------------------ the inner loop
    def meta_tensors(self, model: nn.Module) -> Meta:
        """The meta-parameters of ``model`` (built by ``meta_model``) as the inner loop takes
        them; live tensors, so the outer gradient reaches them."""
        plan = self.plan(model)
        meta: Meta = {"theta": dict(plan.backbone.named_parameters())}
        for name in ("inner_lr", "bn_weights"):
            if name in plan.extras:
                meta[name] = per_name(plan.extras[name])
        for name in plan.own:
            meta[name] = dict(plan.extras[name].named_parameters())
        return meta

    def plan(self, model: nn.Module) -> ModelPlan:
        """``model``'s ``ModelPlan``: the last one if it still fits (same model object, same
        parameter names, same settings), else a new one. One is kept, not one per model: the
        copies ``threads`` makes of the model each iteration are planned afresh (as often as
        before) and none is kept alive by the plan."""
        names = tuple(dict(model.named_parameters()))
        settings = (
            self.adapt_params, self.per_step_weights, self.learned_rates, self.bn_mode
        )  # fmt: skip
        plan = self._plan
        if plan is None or not plan.fits(model, names, settings):
            plan = self._plan = self._make_plan(model, names, settings)
        return plan

    def _make_plan(self, model: nn.Module, names: tuple[str, ...], settings: tuple) -> ModelPlan:
        backbone, extras = split(model)
        wanted = self._extra_names(backbone)
        if sorted(extras) != sorted(wanted):
            raise MamlrunError(
                f"these settings meta-learn {', '.join(wanted) or 'nothing'} besides the "
                f"backbone, the model has {', '.join(extras) or 'nothing'}: build it with "
                "algorithm.meta_model(backbone)"
            )
        adapted = tuple(self._adapted_names(backbone))
        return ModelPlan(
            weakref.ref(model), names, settings, backbone, extras, adapted=adapted,
            own=tuple(self._own_names(backbone, adapted)),
            per_step_bn="bn_weights" in extras or "bn_stats" in extras,
            has_bn=bool(batch_norm_layers(backbone)),
            changes_over_training=changes_over_training(model),
        )  # fmt: skip

    def losses_of(self, task_type: str) -> Losses:
        """The loss, metric and scale of ``task_type``: those ``bind`` chose for the run's
        task type, else (an unbound call, from a test say) chosen now."""
        if task_type == self.task_type and self.losses is not None:
            return self.losses
        return losses_for(task_type, self.loss_normalization)

    def adaptation(
        self, model: nn.Module, task_type: str, steps: int, grad: GradFn, checkpoint: bool = False,
        whole: bool = True, in_place: bool = False,
    ) -> Adaptation:  # fmt: skip
        """One task's inner loop of ``steps`` steps with these settings: a function of ``(meta,
        x, y)`` giving the trajectory of the adapted parameters θ_0…θ_steps (only those that
        adapt; θ_steps alone with ``whole=False``, see ``functional.adapt``) and the forward to
        use with each: the backbone with the parameters that do not adapt, and per-step
        batch-norm weights and statistics of that step, filled in. ``checkpoint`` recomputes
        the (second-order, SGD) steps during the outer backward pass instead of keeping their
        graphs (``functional.checkpointed_adapt``); ``in_place`` gives θ_steps by
        ``functional.adapt_in_place`` (first order, fixed rates: Reptile per task).
        """
        plan = self.plan(model)
        backbone, adapted, per_step_bn = plan.backbone, plan.adapted, plan.per_step_bn
        adapting = set(adapted)
        stats = per_name(plan.extras["bn_stats"]) if "bn_stats" in plan.extras else {}
        loss, learned, inner_lr = self.losses_of(task_type).loss, self.learned_rates, self.inner_lr
        adam = self.adam_betas if self.inner_optimizer == "adam" else None
        objective_at, direction_at = self._objective_at(adapted), self.inner_direction
        fp32 = self.precision.name == "fp32"  # the plain call, no precision wrapper per pass
        call = functional_call if fp32 else partial(self.precision.forward, functional_call)

        def forward_at(meta: Meta, s: int) -> Forward:
            params = {k: t for k, t in meta["theta"].items() if k not in adapting}
            buffers: Params = {}
            if per_step_bn:
                params.update(per_step.at_inner_step(meta.get("bn_weights", {}), s, first=1))
                buffers = per_step.at_inner_step(stats, s)

            def forward(p: Params, inputs: torch.Tensor) -> torch.Tensor:
                return call(backbone, ({**params, **p}, buffers), (inputs,))

            return forward

        def rates(meta: Meta) -> float | Params | list[Params]:
            if learned == "none":
                return inner_lr
            return learned_lr.rates(learned, inner_lr, meta.get("inner_lr"))

        def run(meta: Meta, x: torch.Tensor, y: torch.Tensor, record: Record | None = None):
            forwards = [forward_at(meta, s) for s in range(steps + 1)]
            start = {k: meta["theta"][k] for k in adapted}
            if in_place and learned == "none":
                trajectory = adapt_in_place(forwards, loss, start, x, y, lr=inner_lr,
                                            steps=steps, adam=adam, record=record)  # fmt: skip
            elif checkpoint:
                trajectory = checkpointed_adapt(
                    forward_at, lambda m, s: at_step(rates(m), s), loss, meta, start, x, y,
                    steps=steps, objective_at=objective_at, direction_at=direction_at,
                )  # fmt: skip
            else:
                trajectory = adapt(
                    forwards, loss, start, x, y, lr=rates(meta), steps=steps, grad=grad,
                    adam=adam, objective=objective_at(meta), direction=direction_at(meta),
                    whole=whole, record=record,
                )  # fmt: skip
            return trajectory, forwards

        return run

    def _objective_at(self, adapted: Sequence[str]) -> Callable[[Meta], Objective]:
        """``inner_objective`` with its ``start`` read from the meta-parameters it is given
        (a recomputed step gives its own copies, whose gradients must come back)."""

        def at(meta: Meta) -> Objective:
            start = {k: meta["theta"][k] for k in adapted}
            return lambda task_loss, p: self.inner_objective(task_loss, p, start)

        return at

    def _extra_names(self, backbone: nn.Module) -> list[str]:
        """Which extra meta-parameters these settings learn for this backbone: the member's
        own and the shared ones."""
        adapted = self._adapted_names(backbone)
        return self._own_names(backbone, adapted) + self._shared_extra_names(backbone)

    def _own_names(self, backbone: nn.Module, adapted: Sequence[str]) -> list[str]:
        theta = dict(backbone.named_parameters())
        with torch.no_grad():
            return list(self.own_meta_parameters(backbone, {n: theta[n] for n in adapted}))

    def _shared_extra_names(self, backbone: nn.Module) -> list[str]:
        has_bn = bool(batch_norm_layers(backbone))
        wanted = {
            "inner_lr": self.learned_rates != "none",
            "bn_weights": self.per_step_weights and has_bn,
            "bn_stats": self.bn_mode == "per_step" and has_bn,
        }
        return [name for name, on in wanted.items() if on]

    def _adapted_names(self, backbone: nn.Module) -> list[str]:
        bn = batch_norm_layers(backbone) if self.per_step_weights else {}
        owned = {f"{layer}.{n}" for layer, m in bn.items() for n, _ in m.named_parameters()}
        return selection.adapted_names(backbone, self.adapt_params, exclude=owned)

    @contextmanager
    def _evaluation_mode(self, model: nn.Module) -> Iterator[None]:
        """Evaluate in ``model.eval()`` mode: with the running statistics when there are any
        (``bn_mode=per_step``; without them batch norm uses the batch's either way) and
        without training-only noise (DropBlock)."""
        was_training = model.training
        model.train(False)
        try:
            yield
        finally:
            model.train(was_training)


L = TypeVar("L", bound=GradientLearner)


def configured(choice: str) -> Callable[[type[L]], type[L]]:
    """A member of the family: a keyword-only dataclass configured by
    ``conf/meta_optimizer/<choice>.yaml``, so that ``MAML(inner_lr=0.4)`` is MAML with that
    YAML's other settings (its base's included) and a Python caller gets the defaults the
    command line gets, read from the one place they are written. The signature keeps no
    defaults (``tests/test_defaults.py``; ``config`` checks a YAML against it), and the
    values are range-checked as the config's are. An unknown setting is one line with a
    did-you-mean. ``config.algorithm(choice, **settings)`` still builds any YAML's choice.
    """

    def wrap(cls: type[L]) -> type[L]:
        cls = dataclass(kw_only=True)(cls)
        init, names = cls.__init__, [f.name for f in fields(cls) if f.init]

        @functools.wraps(init)
        def __init__(self, **settings: Any) -> None:
            for key in settings:
                if key not in names:
                    raise MamlrunError(_unknown_setting(cls, key, names))
            missing = [n for n in names if n not in settings]
            if missing:
                defaults = config.settings("meta_optimizer", choice)
                absent = [n for n in missing if n not in defaults]
                if absent:
                    raise MamlrunError(
                        f"{cls.__name__} needs {', '.join(absent)}, which "
                        f"conf/meta_optimizer/{choice}.yaml does not set"
                    )
                settings = {**{n: defaults[n] for n in missing}, **settings}
            ranges.check_meta_optimizer(settings)
            init(self, **settings)

        cls.__init__ = __init__
        cls.configured_by = choice
        return cls

    return wrap


def _unknown_setting(cls: type, key: str, names: list[str]) -> str:
    guess = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {guess[0]}?)" if guess else ""
    return f"{cls.__name__} has no setting {key}{hint}; its settings: {', '.join(names)}"


def _without_outer_graph(inner: Adaptation) -> Adaptation:
    """Per-task evaluation: gradients for the inner steps only (from fresh leaves), none
    for the query passes or back to the meta-parameters."""

    def adapted(meta: Meta, x: torch.Tensor, y: torch.Tensor):
        start = {k: t.clone().requires_grad_() for k, t in meta["theta"].items()}
        with torch.enable_grad():
            trajectory, forwards = inner({**meta, "theta": start}, x, y)
        return [{k: t.detach() for k, t in p.items()} for p in trajectory], forwards

    return adapted


def scored(
    inner: Adaptation, losses: Losses, steps: Sequence[int], fused_query: bool = False
) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A task function ``(meta, xs, ys, xq, yq) -> (objectives, losses, metrics)``: for the
    parameters after each of ``steps`` inner steps, the query loss as the inner loop defines
    it (the objective), the plain mean loss (what is logged) and the metric.

    ``fused_query`` runs the query passes with the fused batch-norm kernel: the outer backward
    differentiates them only once, so its untrustworthy second derivative is never used, and
    its first is faster than the task batch norm's own Function (``layers.fused_batch_norm``).
    """
    loss, metric, per_output = losses

    def task(meta: Meta, xs, ys, xq, yq):
        trajectory, forwards = inner(meta, xs, ys)
        with fused_batch_norm() if fused_query else nullcontext():
            outs = [forwards[s](trajectory[s], xq) for s in steps]
        objectives = torch.stack([loss(o, yq) for o in outs])
        scale = outs[0].shape[-1] if per_output else 1  # losses.scales_with_outputs
        return objectives, objectives.detach() / scale, torch.stack([metric(o, yq) for o in outs])

    return task

"""What the runner may ask of a meta-learning algorithm, and nothing more.

An algorithm computes; the outer step (``training.episodes.OuterStep``) owns the optimisation
step. The split is ``meta_objective``: the algorithm yields the outer objective of a
meta-batch in parts (one per task when tasks run one at a time, so each task's graph is freed
before the next is built), and the outer step backpropagates each part, combines the
gradients across processes and steps the optimizer and the scheduler. Gradient scaling
would then touch the outer step only.
Mixed precision acts on the forward passes, which only the algorithm runs, so an algorithm
that offers it declares ``SupportsPrecision`` and the runner hands it the run's ``Precision``.

What is fixed for a whole run (the task type of the data, how the tasks of a meta-batch run)
is given once, by ``bind``, which checks it and returns the settings with it bound; the
per-call methods then take only what changes from call to call.

A new algorithm is a class with these members, named by ``_target_`` in a
``conf/meta_optimizer/*.yaml``; the runner never reads anything else off it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

from mamlrun.data.tasks import TaskBatch
from mamlrun.models.precision import Precision


class Part(NamedTuple):
    """A share of a meta-batch's outer objective.

    ``objective`` is the scalar to backpropagate, already weighted by its share of the
    meta-batch (the parts' gradients add up to the meta-gradient). ``loss`` and ``metric``
    are the detached means over its ``tasks`` tasks, for logging: ``loss`` is always the
    plain mean loss (mean cross-entropy or MSE), whatever scaling the objective uses.
    """

    objective: torch.Tensor
    loss: torch.Tensor
    metric: torch.Tensor
    tasks: int


#: The members of ``Algorithm``, for a message that names what a class lacks.
MEMBERS = (
    "task_batching",
    "inner_steps_test",
    "batching_modes",
    "meta_model",
    "bind",
    "meta_objective",
    "evaluate",
    "describe",
)


@runtime_checkable
class Algorithm(Protocol):
    #: ``auto``, or one of ``batching_modes``: how the tasks of a meta-batch run.
    task_batching: str
    #: Adaptation steps at validation and test time when the command does not say.
    inner_steps_test: int

    @property
    def batching_modes(self) -> tuple[str, ...]:
        """The ways of running tasks these settings support (``auto`` measures among them)."""
        ...

    def meta_model(self, backbone: nn.Module) -> nn.Module:
        """The module whose parameters are meta-learned (the backbone, plus any extras such
        as learned rates); the optimizer and the checkpoints cover exactly its state."""
        ...

    def bind(self, task_type: str, batching: str) -> Algorithm:
        """These settings for a run on ``task_type`` data (``classification`` or
        ``regression``) with its tasks run as ``batching`` (one of ``batching_modes``, never
        ``auto``): checked here, once, and used by every later call. Returns a copy; the
        unbound original stays usable (``auto`` binds one copy per mode it measures)."""
        ...

    def meta_objective(
        self, model: nn.Module, batch: TaskBatch, step: int | None
    ) -> Iterator[Part]:
        """The outer objective of one meta-batch at training iteration ``step``, in parts."""
        ...

    def evaluate(
        self, model: nn.Module, batch: TaskBatch, steps: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Query loss and metric of every task after 0…``steps`` inner steps, as two
        ``[tasks, steps + 1]`` tensors; the meta-parameters are not changed."""
        ...

    def describe(self) -> dict[str, Any]:
        """Settings worth recording with every result (``results.json``, HParams)."""
        ...


@runtime_checkable
class SupportsPrecision(Protocol):
    """An algorithm that can run its forward passes in another precision (``precision=bf16``).

    Optional: an algorithm without it runs ``fp32`` and ``tf32`` (TF32 is a switch of the
    process, not of the algorithm), and the runner refuses ``bf16`` for it in one line.
    """

    def with_precision(self, precision: Precision) -> SupportsPrecision:
        """These settings with every forward pass of the network run in ``precision``
        (``Precision.forward``), and everything else (parameters, inner-loop gradients and
        updates, losses, the meta-gradient) float32."""
        ...

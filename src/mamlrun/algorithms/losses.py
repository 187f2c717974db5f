"""Losses and metrics per task type: what the inner and outer loops optimise and score."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mamlrun.config.ranges import LOSS_NORMALIZATION

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: The metric reported for each task type, and whether larger is better.
METRIC = {"regression": ("mse", False), "classification": ("accuracy", True)}


def loss_fn(task_type: str, normalization: str = "mean") -> LossFn:
    """One task's loss: MSE for regression, cross-entropy for classification.

    ``mean`` averages over the task's examples. ``tf_maml`` reproduces the original
    TensorFlow MAML code, whose classification loss is the per-example cross-entropy divided
    by K and then *summed* by ``tf.gradients`` over the N·K support images: N × the mean.
    The paper's inner learning rates (0.4 for 5-way, 0.1 for 20-way Omniglot) were tuned with
    that loss, so presets that quote them use ``tf_maml`` (0.4 on N × mean is 2.0 on the mean).
    Its regression loss was already a mean, so both settings agree there.
    """
    if normalization not in LOSS_NORMALIZATION:
        raise ValueError(f"unknown loss normalization {normalization!r}")
    if task_type == "regression":
        return F.mse_loss
    if task_type == "classification":
        if normalization == "tf_maml":
            return lambda logits, y: F.cross_entropy(logits, y) * logits.shape[-1]
        return F.cross_entropy
    raise ValueError(f"unknown task type {task_type!r}")


def scales_with_outputs(task_type: str, normalization: str) -> bool:
    """Whether ``loss_fn`` returns N mean losses for a model with N outputs (the ways, under
    ``tf_maml`` classification) rather than one. What is logged is always the plain mean (the
    objective divided by N), so curves from presets and default runs compare."""
    return task_type == "classification" and normalization == "tf_maml"


class Losses(NamedTuple):
    """The loss, the metric and the loss scale of one task type, chosen once for a run
    (``GradientLearner.bind``) rather than on every call: ``loss`` and ``metric`` are the
    functions ``loss_fn`` and ``metric_fn`` return, and ``per_output`` whether the plain mean
    loss is the objective divided by the model's number of outputs (``scales_with_outputs``)."""

    loss: LossFn
    metric: LossFn
    per_output: bool


def losses_for(task_type: str, normalization: str) -> Losses:
    return Losses(
        loss_fn(task_type, normalization),
        metric_fn(task_type),
        scales_with_outputs(task_type, normalization),
    )


def metric_fn(task_type: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Per-task metric, written with tensor ops only so it also runs under ``vmap``."""
    if task_type == "regression":
        return F.mse_loss
    if task_type == "classification":
        return lambda logits, y: (logits.argmax(-1) == y).to(logits.dtype).mean()
    raise ValueError(f"unknown task type {task_type!r}")


def better(task_type: str, new: float, best: float | None) -> bool:
    """Whether ``new`` improves on ``best`` for this task_type's metric."""
    if best is None:
        return True
    return new > best if METRIC[task_type][1] else new < best

"""Losses and metrics per kind of task, and the mean ± 95% CI that papers report."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: The metric reported for each kind of task, and whether larger is better.
METRIC = {"regression": ("mse", False), "classification": ("accuracy", True)}


#: How a task's loss is normalised; it decides what a given inner learning rate means.
LOSS_NORMALIZATION = ("mean", "tf_maml")


def loss_fn(kind: str, normalization: str = "mean") -> LossFn:
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
    if kind == "regression":
        return F.mse_loss
    if kind == "classification":
        if normalization == "tf_maml":
            return lambda logits, y: F.cross_entropy(logits, y) * logits.shape[-1]
        return F.cross_entropy
    raise ValueError(f"unknown task kind {kind!r}")


def metric_fn(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Per-task metric, written with tensor ops only so it also runs under ``vmap``."""
    if kind == "regression":
        return F.mse_loss
    if kind == "classification":
        return lambda logits, y: (logits.argmax(-1) == y).to(logits.dtype).mean()
    raise ValueError(f"unknown task kind {kind!r}")


def mean_ci95(values: Sequence[float] | torch.Tensor) -> tuple[float, float]:
    """Mean and half-width of the normal 95% interval, ``1.96·std/√N`` as in the papers.

    Uses the sample standard deviation (``N-1``); a single value has no spread, so its
    interval is reported as 0 rather than NaN.
    """
    t = torch.as_tensor(values, dtype=torch.float64).flatten()
    if t.numel() == 0:
        raise ValueError("mean_ci95 needs at least one value")
    if t.numel() == 1:
        return float(t[0]), 0.0
    return float(t.mean()), float(1.96 * t.std(unbiased=True) / math.sqrt(t.numel()))


def better(kind: str, new: float, best: float | None) -> bool:
    """Whether ``new`` improves on ``best`` for this kind's metric."""
    if best is None:
        return True
    return new > best if METRIC[kind][1] else new < best

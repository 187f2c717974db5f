"""Losses and metrics per kind of task, and the mean ± 95% CI that papers report."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: The metric reported for each kind of task, and whether larger is better.
METRIC = {"regression": ("mse", False), "classification": ("accuracy", True)}


def loss_fn(kind: str) -> LossFn:
    """Mean loss over one task's examples (MSE for regression, cross-entropy otherwise)."""
    if kind == "regression":
        return F.mse_loss
    if kind == "classification":
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

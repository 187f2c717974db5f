"""Layers that meta-learning needs to behave differently from ``torch.nn``'s: batch norm that
normalises with the statistics of the task it sees, with a second derivative autograd can be
trusted with, and the switch to the fused kernel for passes that are differentiated only once.

Every backbone builds its batch norm from ``TaskBatchNorm2d``, so the algorithms' per-step
batch-norm weights and statistics (``algorithms.per_step``) find it in any backbone through
``batch_norm_layers``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn
from torch.nn import functional as F


class TaskBatchNorm2d(nn.Module):
    """Batch norm over the batch it is given, written with plain tensor operations.

    Same result as ``nn.BatchNorm2d(track_running_stats=False)``, but its second derivative is
    built by autograd from these operations: under ``torch.func.vmap`` + ``torch.func.grad``
    the fused kernel's double backward gave a meta-gradient that disagreed with finite
    differences (relative error ~2e-2, torch 2.13), while this one agrees on both paths.

    The layer owns no running statistics (``running_mean``/``running_var`` are registered as
    None, so checkpoints and ``buffers()`` hold none). An algorithm that keeps statistics
    (MAML++'s per-step statistics, ``bn_mode=per_step``) passes them in as buffers through
    ``functional_call``: in training mode they are then updated in place from the batch's
    statistics (momentum ``momentum``, unbiased variance, as ``nn.BatchNorm2d``), and in
    evaluation mode they replace the batch's statistics, so no example is normalised with
    statistics of the others.
    """

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", None)
        self.register_buffer("running_var", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.running_mean is None and _FUSED.get():
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        dims = (0, 2, 3)
        if self.running_mean is not None and not self.training:
            mean = self.running_mean[:, None, None]
            var = self.running_var[:, None, None]
        else:
            mean = x.mean(dim=dims, keepdim=True)
            var = (x - mean).square().mean(dim=dims, keepdim=True)
            if self.running_mean is not None:
                n = x.numel() // x.shape[1]
                with torch.no_grad():
                    self.running_mean.lerp_(mean.flatten(), self.momentum)
                    self.running_var.lerp_(var.flatten() * n / max(n - 1, 1), self.momentum)
        scale = self.weight[:, None, None] * torch.rsqrt(var + self.eps)
        return (x - mean) * scale + self.bias[:, None, None]


_FUSED: ContextVar[bool] = ContextVar("fused_batch_norm", default=False)


@contextmanager
def fused_batch_norm() -> Iterator[None]:
    """Within this block ``TaskBatchNorm2d`` (without running statistics) uses the fused
    kernel: same values, a leaner and faster first derivative, but a second derivative that
    cannot be trusted (see the class). Only for passes that are differentiated at most once,
    such as MAML's query passes, and not under ``vmap``.
    """
    token = _FUSED.set(True)
    try:
        yield
    finally:
        _FUSED.reset(token)


def batch_norm_layers(backbone: nn.Module) -> dict[str, TaskBatchNorm2d]:
    """The backbone's batch-norm layers, by module name (what per-step weights apply to)."""
    return {n: m for n, m in backbone.named_modules() if isinstance(m, TaskBatchNorm2d)}

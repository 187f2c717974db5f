"""Plain forward passes of the three backbones, written out with ``torch.nn.functional`` ops
from the papers' descriptions, and MAML's objective on top of them.

They share nothing with ``mamlrun.models`` or the algorithms but the parameter names, so a
finite-difference check against them catches a bug in the engine's own forward pass (which a
check whose objective is that same forward would differentiate faithfully and miss).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from mamlrun.data.tasks import TaskBatch

Params = Mapping[str, torch.Tensor]
Forward = Callable[[Params, torch.Tensor], torch.Tensor]


def batch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Normalised with the batch's own mean and biased variance per channel (eps 1e-5)."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def mlp(p: Params, x: torch.Tensor) -> torch.Tensor:
    """Linear layers ``0, 2, 4, …`` with ReLU between them (``nn.Sequential`` numbering)."""
    layers = sorted({int(name.split(".")[0]) for name in p})
    for i in layers:
        x = F.linear(x, p[f"{i}.weight"], p[f"{i}.bias"])
        if i != layers[-1]:
            x = torch.relu(x)
    return x


def conv4(
    p: Params, x: torch.Tensor, downsample: str = "stride", head: str = "mean"
) -> torch.Tensor:
    """4 × [3×3 conv (stride 2, or 1 then 2×2 max-pool), batch norm, ReLU], then the mean over
    space (or every position, ``head="flatten"``) into a linear layer."""
    layer = 0
    for _ in range(4):
        stride = 2 if downsample == "stride" else 1
        x = F.conv2d(x, p[f"{layer}.weight"], p[f"{layer}.bias"], stride=stride, padding=1)
        x = torch.relu(batch_norm(x, p[f"{layer + 1}.weight"], p[f"{layer + 1}.bias"]))
        if downsample == "max_pool":
            x = F.max_pool2d(x, 2)
        layer += 4 if downsample == "max_pool" else 3
    features = x.mean(dim=(2, 3)) if head == "mean" else x.flatten(1)
    last = max(int(name.split(".")[0]) for name in p)
    return F.linear(features, p[f"{last}.weight"], p[f"{last}.bias"])


def resnet12(p: Params, x: torch.Tensor) -> torch.Tensor:
    """4 residual blocks (MetaOptNet): 3 × [3×3 conv, batch norm] with LeakyReLU(0.1) between,
    a 1×1 conv and batch norm on the shortcut, LeakyReLU of the sum, 2×2 max-pool; then the
    mean over space and a linear head."""
    for b in range(4):
        q = {
            name[len(f"blocks.{b}.") :]: t
            for name, t in p.items()
            if name.startswith(f"blocks.{b}.")
        }
        out = x
        for i in (1, 2, 3):
            out = F.conv2d(out, q[f"conv{i}.weight"], padding=1)
            out = batch_norm(out, q[f"bn{i}.weight"], q[f"bn{i}.bias"])
            if i < 3:
                out = F.leaky_relu(out, 0.1)
        shortcut = F.conv2d(x, q["shortcut.0.weight"])
        shortcut = batch_norm(shortcut, q["shortcut.1.weight"], q["shortcut.1.bias"])
        x = F.max_pool2d(F.leaky_relu(out + shortcut, 0.1), 2)
    return F.linear(x.mean(dim=(2, 3)), p["head.weight"], p["head.bias"])


def maml_objective(
    forward: Forward,
    p: Params,
    batch: TaskBatch,
    loss,
    inner_lr: float,
    steps: int = 1,
    create_graph: bool = False,
) -> torch.Tensor:
    """The mean over tasks of the query loss after ``steps`` plain SGD steps on the support
    set: its value (for finite differences), or with ``create_graph`` differentiable in ``p``
    to second order."""
    total = 0.0
    for xs, ys, xq, yq in zip(*batch, strict=True):
        adapted = dict(p)
        for _ in range(steps):
            grads = torch.autograd.grad(
                loss(forward(adapted, xs), ys), list(adapted.values()), create_graph=create_graph
            )
            adapted = {
                n: t - inner_lr * g for (n, t), g in zip(adapted.items(), grads, strict=True)
            }
        total = total + loss(forward(adapted, xq), yq)
    return total / batch.num_tasks

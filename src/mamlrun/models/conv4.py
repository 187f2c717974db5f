"""The four-block convolutional network of the MAML paper (and of most few-shot papers since)."""

from __future__ import annotations

from torch import nn

from mamlrun.errors import MamlrunError
from mamlrun.models.layers import TaskBatchNorm2d, TaskConv2d


def conv4(
    in_shape: tuple[int, ...],
    out_features: int,
    *,
    filters: int,
    downsample: str,
    head: str,
) -> nn.Module:
    """4 × [3×3 conv, batch norm, ReLU], then a linear layer to ``out_features`` classes.

    ``downsample="stride"`` is the paper's Omniglot network (stride-2 convolutions, ~3.6× fewer
    FLOPs than pooling); ``"max_pool"`` the miniImageNet one (stride 1 then 2×2 max-pool, with
    e.g. 32 filters). ``head="mean"`` averages the last feature map over space before the
    linear layer, as the original code does for Omniglot; ``"flatten"`` keeps every position,
    as it does for miniImageNet.

    Batch norm keeps no running statistics: every forward pass normalises with the statistics
    of the batch it sees, i.e. of the current task, in training and evaluation alike, as the
    original MAML did. Nothing can leak from one task into another through it.
    """
    if len(in_shape) != 3:
        raise MamlrunError(f"conv4 needs image inputs (C, H, W), got shape {tuple(in_shape)}")
    channels, height, width = in_shape
    layers: list[nn.Module] = []
    for _ in range(4):
        stride = 2 if downsample == "stride" else 1
        layers += [
            TaskConv2d(channels, filters, 3, stride=stride, padding=1),
            TaskBatchNorm2d(filters),
            nn.ReLU(),
        ]
        if downsample == "max_pool":
            layers.append(nn.MaxPool2d(2))
        channels = filters
        height, width = _shrink(height, downsample), _shrink(width, downsample)
    if head == "mean":
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(start_dim=-3)]
        features = filters
    else:
        layers.append(nn.Flatten(start_dim=-3))
        features = filters * height * width
    if features < 1:
        raise MamlrunError(f"input {tuple(in_shape)} is too small for four downsampling blocks")
    layers.append(nn.Linear(features, out_features))
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)  # as the original code's conv initializer
            nn.init.zeros_(m.bias)
    return model


def _shrink(size: int, downsample: str) -> int:
    return (size + 1) // 2 if downsample == "stride" else size // 2

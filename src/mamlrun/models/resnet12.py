"""ResNet-12, the backbone of modern few-shot results (TADAM 2018, MetaOptNet 2019,
UNICORN-MAML 2022): four residual blocks, each followed by 2×2 max-pooling.

Built as MetaOptNet's ``ResNet12_embedding.py`` (github.com/kjunelee/MetaOptNet), with a
global-average-pool and linear head on top (as UNICORN-MAML's ``res12_maml.py``), so that
MAML has an output layer to adapt and ANIL (``adapt_params=head``) finds it as ``head``.
"""

from __future__ import annotations

import torch
from torch import nn

from mamlrun.errors import MamlrunError
from mamlrun.models.layers import DropBlock, TaskBatchNorm2d

#: Four 2×2 poolings: inputs smaller than this leave no pixel for the head.
MIN_SIZE = 16


def resnet12(
    in_shape: tuple[int, ...],
    out_features: int,
    *,
    widths: tuple[int, ...],
    drop_block: bool,
    keep_prob: float,
    drop_block_size: int,
    drop_block_ramp: int,
) -> nn.Module:
    """ResNet-12 for ``(C, H, W)`` images (84×84 miniImageNet, 32×32 CIFAR-FS, 28×28 Omniglot).

    ``widths`` are the channels of the four blocks: MetaOptNet's 64-160-320-640 in the YAML,
    TADAM's 64-128-256-512 as an alternative. ``drop_block`` adds DropBlock after the last
    two blocks while meta-training (``keep_prob`` reached after ``drop_block_ramp``
    iterations, squares of ``drop_block_size``; see ``layers.DropBlock``).

    Every batch norm is ``TaskBatchNorm2d`` (task statistics, as conv4), so per-step batch-norm
    weights and statistics (MAML++) reach all sixteen of them.
    """
    if len(in_shape) != 3:
        raise MamlrunError(f"resnet12 needs image inputs (C, H, W), got shape {tuple(in_shape)}")
    channels, height, width = in_shape
    if min(height, width) < MIN_SIZE:
        raise MamlrunError(
            f"resnet12 pools four times: inputs must be at least {MIN_SIZE}x{MIN_SIZE}, "
            f"got {height}x{width}"
        )
    widths = list(widths)
    if out_features < 1:  # the widths and DropBlock's settings: checked with the config
        raise MamlrunError(f"resnet12 needs at least one output, got {out_features}")
    drops = [
        DropBlock(drop_block_size, keep_prob, drop_block_ramp) if drop_block and i >= 2 else None
        for i in range(4)
    ]
    return ResNet12(channels, out_features, widths, drops)


class ResNet12(nn.Module):
    """``blocks`` (four ``ResidualBlock``) → mean over space → ``head`` (linear)."""

    def __init__(
        self,
        in_channels: int,
        out_features: int,
        widths: list[int],
        drops: list[DropBlock | None],
    ) -> None:
        super().__init__()
        ins = [in_channels, *widths[:-1]]
        self.blocks = nn.Sequential(
            *(ResidualBlock(i, o, d) for i, o, d in zip(ins, widths, drops, strict=True))
        )
        self.head = nn.Linear(widths[-1], out_features)
        for m in self.blocks.modules():
            if isinstance(m, nn.Conv2d):
                # MetaOptNet's initialisation; TaskBatchNorm2d starts at weight 1, bias 0.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean(dim=(-2, -1)))


class ResidualBlock(nn.Module):
    """3 × [3×3 conv, batch norm] with LeakyReLU(0.1) between them, plus a 1×1 conv and batch
    norm on the shortcut; LeakyReLU of the sum, 2×2 max-pool, then DropBlock if given."""

    def __init__(self, in_channels: int, out_channels: int, drop: DropBlock | None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels)
        self.bn1 = TaskBatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = TaskBatchNorm2d(out_channels)
        self.conv3 = _conv3x3(out_channels, out_channels)
        self.bn3 = TaskBatchNorm2d(out_channels)
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), TaskBatchNorm2d(out_channels)
        )
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)
        self.drop = drop if drop is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.drop(self.pool(self.act(out + self.shortcut(x))))


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)

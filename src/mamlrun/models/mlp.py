"""The fully connected regressor of the MAML paper's sinusoid experiment."""

from __future__ import annotations

import logging
import math

from torch import nn

log = logging.getLogger("mamlrun")


def mlp(
    in_shape: tuple[int, ...],
    out_features: int,
    *,
    hidden: tuple[int, ...],
) -> nn.Module:
    """ReLU MLP ``in → hidden… → out`` (the paper uses 1→40→40→1).

    ``in_shape`` and ``out_features`` come from the task source, so the same config serves
    any input size.
    """
    if len(in_shape) == 3:
        log.warning(
            f"backbone=mlp on {tuple(in_shape)} images flattens them and ignores their spatial "
            "structure; backbone=conv4 is the usual choice for images"
        )
    in_features = math.prod(in_shape)
    if in_features < 1 or out_features < 1:  # hidden: checked with the config
        raise ValueError("mlp layer sizes must be positive")
    layers: list[nn.Module] = [nn.Flatten(start_dim=-len(in_shape))] if len(in_shape) > 1 else []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)

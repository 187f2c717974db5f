"""Meta-parameters that are not the backbone's: learned inner rates, per-step batch norm.

An algorithm that meta-learns more than the initialisation (Meta-SGD's rates, MAML++'s
per-step rates and batch-norm weights and statistics) keeps those tensors in a small wrapper
next to the backbone. ``model.parameters()`` and ``model.state_dict()`` then include them, so
the outer optimizer updates them and checkpoints save and restore them with no special case in
the runner, while ``functional_call`` only ever runs the backbone with backbone parameters.
Plain MAML adds nothing and keeps the bare backbone, so its checkpoints are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


class MetaModel(nn.Module):
    """A backbone and the algorithm's extra meta-parameters, grouped by purpose in ``extras``."""

    def __init__(self, backbone: nn.Module, extras: dict[str, nn.Module]) -> None:
        super().__init__()
        self.backbone = backbone
        self.extras = nn.ModuleDict(extras)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain calls (the pretrained baseline, say) see the backbone with its own parameters."""
        return self.backbone(x)


def split(model: nn.Module) -> tuple[nn.Module, dict[str, nn.Module]]:
    """The backbone and the extras (none for a bare backbone)."""
    if isinstance(model, MetaModel):
        return model.backbone, dict(model.extras)
    return model, {}


def key(name: str) -> str:
    """A parameter name as a key of a ``ParameterDict`` (where dots are not allowed)."""
    return name.replace(".", ":")


def per_name(module: nn.Module) -> dict[str, torch.Tensor]:
    """A ``ParameterDict``'s (or buffer holder's) tensors under the backbone names they shadow."""
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    return {name.replace(":", "."): t for name, t in tensors.items()}

"""Learned inner learning rates: Meta-SGD's per element, MAML++'s per layer and per step.

Meta-SGD (Li et al. 2017) learns a rate for every element of every adapted parameter, and
MAML++ (Antoniou et al. 2019, "LSLR") one rate per parameter tensor and per inner step. Both
are meta-parameters updated by the outer optimizer along with the initialisation; both start
at ``inner_lr`` here (the Meta-SGD paper draws its initial rates at random instead).
"""

from __future__ import annotations

import torch
from torch import nn

from mamlrun.algorithms.functional import Params
from mamlrun.algorithms.meta_parameters import key


def init(mode: str, adapted: Params, inner_lr: float, steps: int) -> nn.ParameterDict:
    """The learned rates for the ``adapted`` parameters, all equal to ``inner_lr``."""

    def shape(p: torch.Tensor) -> tuple[int, ...]:
        return tuple(p.shape) if mode == "per_element" else (steps,)

    return nn.ParameterDict(
        {
            key(name): nn.Parameter(torch.full(shape(p), inner_lr, dtype=p.dtype, device=p.device))
            for name, p in adapted.items()
        }
    )


def rates(mode: str, inner_lr: float, learned: Params | None) -> float | Params | list[Params]:
    """What ``functional.adapt`` takes as ``lr``: a scalar, a per-parameter dict, or one per
    step."""
    if mode == "none":
        return inner_lr
    assert learned is not None
    if mode == "per_element":
        return learned
    steps = next(iter(learned.values())).shape[0]
    return [{name: lr[s] for name, lr in learned.items()} for s in range(steps)]

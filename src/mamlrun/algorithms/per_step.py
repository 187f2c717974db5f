"""Meta-parameters that differ per inner step: batch-norm weights and statistics.

MAML++ (Antoniou et al. 2019) introduced both: BNWB, one gamma/beta per inner step, meta-learned
and not adapted (``PerStepBatchNormWeights``), and BNRS, running statistics per inner step,
collected while meta-training and used to normalise at evaluation (``PerStepStatistics``,
``bn_mode=per_step``). Any backbone built from ``models.layers.TaskBatchNorm2d`` gets them.

The network with parameters θ_s (after ``s`` inner updates) uses the weights and statistics
of index ``s``, for the support set it adapts on and for the query set it is scored on
(``at_inner_step``).
"""

from __future__ import annotations

from torch import nn

from mamlrun.algorithms.functional import Params
from mamlrun.algorithms.meta_parameters import key
from mamlrun.models.layers import TaskBatchNorm2d


class PerStepBatchNormWeights(nn.ParameterDict):
    """Gamma and beta of every batch-norm layer for inner steps 1…S, as ``[S, C]`` tensors.

    Step 0 uses the backbone's own batch-norm parameters, so no parameter goes unused; the
    others start as copies of them.
    """

    def __init__(self, layers: dict[str, TaskBatchNorm2d], steps: int) -> None:
        super().__init__(
            {
                key(f"{layer}.{name}"): nn.Parameter(p.detach().expand(steps, -1).clone())
                for layer, module in layers.items()
                for name, p in module.named_parameters()
            }
        )


class PerStepStatistics(nn.Module):
    """Running mean and variance of every batch-norm layer for inner steps 0…S (``[S+1, C]``).

    Buffers, so they are saved and restored with the model but not optimised.
    """

    def __init__(self, layers: dict[str, TaskBatchNorm2d], steps: int) -> None:
        super().__init__()
        for layer, module in layers.items():
            like = module.weight.detach()
            self.register_buffer(key(f"{layer}.running_mean"), like.new_zeros(steps + 1, len(like)))
            self.register_buffer(key(f"{layer}.running_var"), like.new_ones(steps + 1, len(like)))


def at_inner_step(per_step: Params, step: int, first: int = 0) -> Params:
    """Each ``[n, C]`` tensor's row for inner step ``step`` (rows start at step ``first``).

    Steps past the last row reuse it, so evaluation can take more steps than training did; a
    step before ``first`` gets nothing (the backbone's own tensors apply).
    """
    if step < first:
        return {}
    return {name: t[min(step - first, t.shape[0] - 1)] for name, t in per_step.items()}

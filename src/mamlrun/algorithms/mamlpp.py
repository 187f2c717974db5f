"""The MAML++ tricks (Antoniou et al. 2019, "How to train your MAML"), each a small function.

The learned per-layer per-step rates (LSLR) live in ``learned_lr``; cosine annealing of the
outer learning rate is a scheduler in the config (``meta_optimizer.scheduler``). Here:

* MSL, multi-step loss: the outer loss is a weighted sum of the query losses after every inner
  step, with weights annealed towards the last step (``msl_weights``).
* DA, derivative-order annealing: first order for the first iterations, then second order
  (``first_order_at``).
* BNWB, per-step batch-norm weights: one gamma/beta per inner step, meta-learned and not
  adapted (``PerStepBatchNormWeights``).
* BNRS, per-step batch-norm running statistics, collected while meta-training and used to
  normalise at evaluation time (``PerStepStatistics``; ``bn_mode=per_step``).

"Step" has two meanings here: the *iteration* of meta-training (MSL and DA depend on it) and
the *inner step* ``s``: the network with parameters θ_s (after ``s`` inner updates) uses the
batch-norm weights and statistics of index ``s``, for the support set it adapts on and for
the query set it is scored on.
"""

from __future__ import annotations

from torch import nn

from mamlrun.algorithms.inner import Params
from mamlrun.algorithms.meta_parameters import key
from mamlrun.models.conv4 import TaskBatchNorm2d

#: MAML++'s floor for the weight of a non-final step, as a fraction of 1/steps.
MSL_FLOOR = 0.03


def msl_weights(iteration: int | None, steps: int, anneal_iterations: int) -> list[float]:
    """Weights of the query losses after inner steps 1…``steps`` at this training iteration.

    MAML++'s ``get_per_step_loss_importance_vector`` with its epoch counter replaced by the
    fraction ``iteration / anneal_iterations`` (the original's weights move once per epoch of
    500 iterations; these move every iteration along the same line). Uniform at iteration 0;
    non-final weights then shrink linearly to a floor of ``0.03 / steps`` and the final weight
    grows to take up the rest. From ``anneal_iterations`` on (and when no iteration is given),
    only the final step counts, as in the original code.
    """
    if iteration is None or iteration >= anneal_iterations:
        return [0.0] * (steps - 1) + [1.0]
    shift = iteration / anneal_iterations / steps
    floor = MSL_FLOOR / steps
    early = [max(1.0 / steps - shift, floor)] * (steps - 1)
    final = min(1.0 / steps + (steps - 1) * shift, 1.0 - (steps - 1) * floor)
    return early + [final]


def first_order_at(iteration: int | None, first_order: bool, first_order_until: int) -> bool:
    """Derivative-order annealing: first order before iteration ``first_order_until``.

    Without an iteration (a one-off call, the batching probe) the settings of the bulk of
    training apply: second order unless ``first_order``.
    """
    if first_order:
        return True
    return iteration is not None and iteration < first_order_until


def batch_norm_layers(backbone: nn.Module) -> dict[str, TaskBatchNorm2d]:
    """The backbone's batch-norm layers that per-step weights and statistics apply to."""
    return {n: m for n, m in backbone.named_modules() if isinstance(m, TaskBatchNorm2d)}


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

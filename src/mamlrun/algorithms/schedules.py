"""Settings that change over meta-training, as functions of the training iteration.

Both come from MAML++ (Antoniou et al. 2019, "How to train your MAML"):

* MSL, the multi-step loss: the outer loss is a weighted sum of the query losses after every
  inner step, with weights annealed towards the last step (``msl_weights``).
* DA, derivative-order annealing: first order for the first iterations, then second order
  (``first_order_at``).

The iteration is the *training* step; a one-off call without one (the batching probe, say)
gets the settings of the bulk of training.
"""

from __future__ import annotations

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
    """Derivative-order annealing: first order before iteration ``first_order_until``."""
    if first_order:
        return True
    return iteration is not None and iteration < first_order_until

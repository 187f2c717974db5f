"""The functional inner loop shared by every algorithm of the MAML family.

Parameters are plain ``{name: tensor}`` dicts passed to ``torch.func.functional_call``, so an
adapted copy is just another dict: nothing rewrites module internals, and the same code runs
per task (``torch.autograd.grad``) or batched over tasks (``torch.func.grad`` under ``vmap``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

Params = dict[str, torch.Tensor]
Forward = Callable[[Params, torch.Tensor], torch.Tensor]
#: Gradient of a scalar function of the parameters, as a dict like the parameters.
GradFn = Callable[[Callable[[Params], torch.Tensor], Params], Params]


def autograd_grad(create_graph: bool) -> GradFn:
    """Per-task gradients with ``torch.autograd.grad``.

    ``create_graph=True`` keeps the inner step differentiable (second-order MAML); without it
    the gradient is a constant and the outer gradient flows only through the identity path of
    ``θ - α·g`` (first-order MAML).
    """

    def grad(f: Callable[[Params], torch.Tensor], params: Params) -> Params:
        grads = torch.autograd.grad(
            f(params), tuple(params.values()), create_graph=create_graph, allow_unused=True
        )
        return {
            k: torch.zeros_like(p) if g is None else g
            for (k, p), g in zip(params.items(), grads, strict=True)
        }

    return grad


def functional_grad(first_order: bool) -> GradFn:
    """Gradients with ``torch.func.grad``, which composes with ``vmap`` over tasks.

    ``torch.func.grad`` is itself differentiable by an outer backward pass (second order);
    detaching its result gives first order.
    """

    def grad(f: Callable[[Params], torch.Tensor], params: Params) -> Params:
        grads = torch.func.grad(f)(params)
        return {k: g.detach() for k, g in grads.items()} if first_order else grads

    return grad


def sgd_step(params: Params, grads: Params, lr: float | Params) -> Params:
    """One inner step ``θ - α·g``; ``lr`` is a scalar or a dict of per-parameter rates."""
    if isinstance(lr, dict):
        return {k: p - lr[k] * grads[k] for k, p in params.items()}
    return {k: p - lr * grads[k] for k, p in params.items()}


def adam_direction(
    grads: Params, moments: tuple[Params, Params] | None, t: int, betas: tuple[float, float]
) -> tuple[Params, tuple[Params, Params]]:
    """Adam's step direction ``m̂ / (√v̂ + ε)`` at step ``t`` (from 1), and the new moments.

    Written as a direction for ``sgd_step`` so that Adam is "SGD along another direction" and
    learned rates compose with it. ``moments=None`` starts from zero, i.e. every task gets a
    fresh optimizer state.
    """
    beta1, beta2 = betas
    m, v = moments if moments is not None else ({k: 0.0 for k in grads}, {k: 0.0 for k in grads})
    m = {k: beta1 * m[k] + (1 - beta1) * g for k, g in grads.items()}
    v = {k: beta2 * v[k] + (1 - beta2) * g * g for k, g in grads.items()}
    c1, c2 = 1 - beta1**t, 1 - beta2**t
    direction = {k: (m[k] / c1) / ((v[k] / c2).sqrt() + 1e-8) for k in grads}
    return direction, (m, v)


T = TypeVar("T")


def at_step(value: T | Sequence[T], step: int) -> T:
    """``value`` itself, or its entry for ``step`` if it is a per-step list (last one reused)."""
    if isinstance(value, list | tuple):
        return value[min(step, len(value) - 1)]
    return value


def adapt(
    forward: Forward | Sequence[Forward],
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float | Params | Sequence[float | Params],
    steps: int,
    grad: GradFn,
    adam: tuple[float, float] | None = None,
) -> list[Params]:
    """Run ``steps`` inner steps on one task's support set.

    Returns the whole trajectory ``[θ₀, θ₁, …, θ_steps]`` (the dicts share tensors, so keeping
    it costs nothing extra in the graph) so that evaluation can report the metric after each
    step and training can use the last one (or all of them, for MAML++'s multi-step loss).

    ``forward`` and ``lr`` may be lists with one entry per step, for variants whose network or
    rates change with the step (MAML++'s per-step batch norm and learned rates); past the end
    of a list its last entry is reused, so evaluation can take more steps than training did.
    ``adam=(β1, β2)`` steps along Adam's direction instead of the gradient (Reptile).
    """
    trajectory = [params]
    moments = None
    for step in range(steps):
        f = at_step(forward, step)
        grads = grad(lambda p, f=f: loss(f(p, x), y), params)
        if adam is not None:
            grads, moments = adam_direction(grads, moments, step + 1, adam)
        params = sgd_step(params, grads, at_step(lr, step))
        trajectory.append(params)
    return trajectory

"""The functional inner loop shared by every algorithm of the MAML family.

Parameters are plain ``{name: tensor}`` dicts passed to ``torch.func.functional_call``, so an
adapted copy is just another dict: nothing rewrites module internals, and the same code runs
per task (``torch.autograd.grad``) or batched over tasks (``torch.func.grad`` under ``vmap``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

Params = dict[str, torch.Tensor]
Forward = Callable[[Params, torch.Tensor], torch.Tensor]
#: Gradient of a scalar function of the parameters, as a dict like the parameters.
GradFn = Callable[[Callable[[Params], torch.Tensor], Params], Params]


def forward_fn(model: nn.Module) -> Forward:
    """``forward(params, x)`` through ``model`` with the given parameters."""
    buffers = dict(model.named_buffers())

    def forward(params: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, (params, buffers), (x,))

    return forward


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


def adapt(
    forward: Forward,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float | Params,
    steps: int,
    grad: GradFn,
) -> list[Params]:
    """Run ``steps`` inner SGD steps on one task's support set.

    Returns the whole trajectory ``[θ₀, θ₁, …, θ_steps]`` (the dicts share tensors, so keeping
    it costs nothing extra in the graph) so that evaluation can report the metric after each
    step and training can use the last one.
    """
    trajectory = [params]
    for _ in range(steps):
        params = sgd_step(params, grad(lambda p: loss(forward(p, x), y), params), lr)
        trajectory.append(params)
    return trajectory

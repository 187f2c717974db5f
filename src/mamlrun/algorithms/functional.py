"""The functional inner loop shared by every algorithm of the MAML family.

Parameters are plain ``{name: tensor}`` dicts passed to ``torch.func.functional_call``, so an
adapted copy is just another dict: nothing rewrites module internals, and the same code runs
per task (``torch.autograd.grad``) or batched over tasks (``torch.func.grad`` under ``vmap``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch.autograd.function import once_differentiable
from torch.optim.adam import adam as torch_adam
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

Params = dict[str, torch.Tensor]
Forward = Callable[[Params, torch.Tensor], torch.Tensor]
#: Gradient of a scalar function of the parameters, as a dict like the parameters. With
#: ``has_aux=True`` the function returns ``(scalar, aux)`` and the gradient function
#: ``(gradients, aux)``, ``aux`` holding no graph (``torch.func.grad``'s convention).
GradFn = Callable[..., Any]


def autograd_grad(create_graph: bool) -> GradFn:
    """Per-task gradients with ``torch.autograd.grad``.

    ``create_graph=True`` keeps the inner step differentiable (second-order MAML); without it
    the gradient is a constant and the outer gradient flows only through the identity path of
    ``θ - α·g`` (first-order MAML).
    """

    def grad(f: Callable[[Params], Any], params: Params, has_aux: bool = False) -> Any:
        value, aux = f(params) if has_aux else (f(params), None)
        grads = _dense(
            params,
            torch.autograd.grad(
                value, tuple(params.values()), create_graph=create_graph, allow_unused=True
            ),
        )
        return (grads, tree_map(torch.Tensor.detach, aux)) if has_aux else grads

    return grad


def _dense(params: Params, grads: Sequence[torch.Tensor | None]) -> Params:
    """``autograd.grad``'s gradients as a dict, zeros for the parameters the loss skips."""
    return {
        k: torch.zeros_like(p) if g is None else g
        for (k, p), g in zip(params.items(), grads, strict=True)
    }


def functional_grad(first_order: bool) -> GradFn:
    """Gradients with ``torch.func.grad``, which composes with ``vmap`` over tasks.

    ``torch.func.grad`` is itself differentiable by an outer backward pass (second order);
    detaching its result gives first order.
    """

    def grad(f: Callable[[Params], Any], params: Params, has_aux: bool = False) -> Any:
        out = torch.func.grad(f, has_aux=has_aux)(params)
        grads, aux = out if has_aux else (out, None)
        grads = {k: g.detach() for k, g in grads.items()} if first_order else grads
        return (grads, aux) if has_aux else grads

    return grad


@dataclass
class Record:
    """The last inner step's forward pass, measured: ``measure(outputs, targets)`` (outputs
    detached) is called on it inside the step and its result kept in ``value``, so that a
    caller reporting how well the adaptation fits needs no forward pass of its own
    (Reptile's logged loss and metric)."""

    measure: Callable[[torch.Tensor, torch.Tensor], Any]
    value: Any = None


def _step_loss(
    f: Forward, loss: Callable, x: torch.Tensor, y: torch.Tensor,
    objective: Objective | None, measure: Callable | None,
) -> Callable[[Params], Any]:  # fmt: skip
    """The function of the parameters one inner step differentiates; with ``measure``, it
    also returns what ``measure`` makes of the same forward's outputs (``has_aux``)."""

    def value(p: Params) -> Any:
        out = f(p, x)
        step_loss = inner_loss(loss(out, y), p, objective)
        return step_loss if measure is None else (step_loss, measure(out.detach(), y))

    return value


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

#: ``(task loss at params, params) -> the loss an inner step differentiates``: the task loss
#: plus whatever the algorithm's inner problem adds (``GradientLearner.inner_objective``).
Objective = Callable[[torch.Tensor, Params], torch.Tensor]
#: ``(gradients, step) -> the direction the step takes``: the gradient transformed by what the
#: algorithm meta-learns (Meta-Curvature's curvature, ``GradientLearner.inner_direction``).
Direction = Callable[[Params, int], Params]


def inner_loss(
    task_loss: torch.Tensor, params: Params, objective: Objective | None
) -> torch.Tensor:
    """The loss an inner step differentiates: the task loss, or ``objective``'s of it."""
    return task_loss if objective is None else objective(task_loss, params)


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
    objective: Objective | None = None,
    direction: Direction | None = None,
    whole: bool = True,
    record: Record | None = None,
) -> list[Params]:
    """Run ``steps`` inner steps on one task's support set.

    Returns the whole trajectory ``[θ₀, θ₁, …, θ_steps]`` (the dicts share tensors, so keeping
    it costs nothing extra in the graph) so that evaluation can report the metric after each
    step and training can use the last one (or all of them, for MAML++'s multi-step loss).
    ``whole=False`` returns ``[θ_steps]`` alone: with no graph through the steps (first order)
    the parameters of the steps before are then freed as it goes, so that what a caller that
    needs only where the loop ends holds does not grow with the steps.

    ``forward`` and ``lr`` may be lists with one entry per step, for variants whose network or
    rates change with the step (MAML++'s per-step batch norm and learned rates); past the end
    of a list its last entry is reused, so evaluation can take more steps than training did.
    ``adam=(β1, β2)`` steps along Adam's direction instead of the gradient (Reptile).
    ``objective`` turns the task loss into the loss the steps differentiate (``Objective``),
    ``direction`` the gradient (or Adam's direction) into the one the step takes (``Direction``).
    ``record`` measures the last step's forward pass (``Record``).
    """
    trajectory = [params]
    moments = None
    for step in range(steps):
        f = at_step(forward, step)
        if record is not None and step == steps - 1:
            value = _step_loss(f, loss, x, y, objective, record.measure)
            grads, record.value = grad(value, params, has_aux=True)
        else:
            grads = grad(_step_loss(f, loss, x, y, objective, None), params)
        if adam is not None:
            grads, moments = adam_direction(grads, moments, step + 1, adam)
        if direction is not None:
            grads = direction(grads, step)
        params = sgd_step(params, grads, at_step(lr, step))
        if whole:
            trajectory.append(params)
        else:
            trajectory = [params]
    return trajectory


def adapt_in_place(
    forward: Forward | Sequence[Forward],
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float | Sequence[float],
    steps: int,
    adam: tuple[float, float] | None = None,
    record: Record | None = None,
) -> list[Params]:
    """``adapt``'s first-order loop for a caller that needs only where it ends, θ_steps,
    detached (Reptile's φ): the parameters are updated in place by torch's own optimizer
    kernels, as ``torch.optim`` updates a model, with no graph through the steps.

    Adam is ``torch.optim.Adam``'s functional form (fused where the device has the kernel,
    CPU and CUDA; else foreach), a fresh state per call, so the trajectory is the one
    ``torch.optim.Adam`` takes on these gradients: a handful of kernels per step for all the
    parameters instead of a dozen element-wise ops per parameter. It equals ``adapt``'s
    ``adam_direction`` up to rounding (ε added to ``√v/√(1−β2ᵗ)`` rather than to
    ``√(v/(1−β2ᵗ))``). SGD is one ``_foreach_add_``. ``lr`` is a number per step, never a
    learned rate; ``record`` as in ``adapt``.
    """
    names = list(params)
    leaves = [params[k].detach().clone().requires_grad_() for k in names]
    state = _AdamState(leaves) if adam is not None else None
    for step in range(steps):
        measure = record.measure if record is not None and step == steps - 1 else None
        value = _step_loss(at_step(forward, step), loss, x, y, None, measure)
        with torch.enable_grad():
            out = value(dict(zip(names, leaves, strict=True)))
            step_loss, aux = out if measure is not None else (out, None)
            found = torch.autograd.grad(step_loss, leaves, allow_unused=True)
        grads = list(_dense(params, found).values())
        with torch.no_grad():
            if state is not None:
                state.step(leaves, grads, at_step(lr, step), adam)
            else:
                torch._foreach_add_(leaves, grads, alpha=-at_step(lr, step))
        if measure is not None:
            record.value = tree_map(torch.Tensor.detach, aux)
    return [{k: t.detach() for k, t in zip(names, leaves, strict=True)}]


class _AdamState:
    """A fresh ``torch.optim.Adam`` state for ``params`` and its step, through torch's
    functional ``adam`` (ε = 1e-8, as ``adam_direction``'s)."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.fused = all(p.device.type in ("cpu", "cuda") for p in params)
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        # the step counts as Adam keeps them: float32 on the device for the fused kernel
        device = (lambda p: p.device) if self.fused else (lambda p: torch.device("cpu"))
        self.steps = [torch.zeros((), dtype=torch.float32, device=device(p)) for p in params]

    def step(self, params: list[torch.Tensor], grads: list[torch.Tensor], lr: float,
             betas: tuple[float, float]) -> None:  # fmt: skip
        torch_adam(
            params, grads, self.m, self.v, [], self.steps,
            foreach=not self.fused, fused=self.fused, amsgrad=False, beta1=betas[0],
            beta2=betas[1], lr=lr, weight_decay=0.0, eps=1e-8, maximize=False,
        )  # fmt: skip


#: Where an inner step's network and rate come from, given the meta-parameters (any tree of
#: tensors) and the step index: the meta-parameters are passed in rather than captured, so
#: that a recomputation can swap in its own copies and see their gradients.
ForwardAt = Callable[[Any, int], Forward]
RateAt = Callable[[Any, int], float | Params]


def checkpointed_adapt(
    forward_at: ForwardAt,
    lr_at: RateAt,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    meta: Any,
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    objective_at: Callable[[Any], Objective] | None = None,
    direction_at: Callable[[Any], Direction | None] | None = None,
) -> list[Params]:
    """Second-order SGD inner loop that keeps only θ₀…θ_steps, not the steps' graphs.

    A differentiable inner step holds the support activations and the graph of its own
    gradient until the outer backward pass, and with many steps that is most of second-order
    MAML's memory. Here each step runs without that graph; the outer backward recomputes one
    step at a time (``create_graph=True``) and backpropagates through it, so at most one
    step's graph exists at once, at the cost of running every step's forward and backward
    twice. ``torch.utils.checkpoint`` cannot do this: its non-reentrant form recomputes the
    region as soon as the ``autograd.grad`` inside it unpacks a saved tensor, i.e. already
    during the forward pass, which costs time and saves nothing.

    The meta-gradient is the one ``adapt`` gives with ``autograd_grad(create_graph=True)``;
    only ``backward`` (not a higher derivative) may be taken through the result.
    ``objective_at(meta)`` and ``direction_at(meta)`` are ``adapt``'s ``objective`` and
    ``direction`` for these meta-parameters (read from the recomputation's own copies, so that
    their gradients reach them too).
    """

    def step(tree: tuple[Any, Params], s: int, create_graph: bool) -> Params:
        meta, params = tree
        f = forward_at(meta, s)
        objective = objective_at(meta) if objective_at is not None else None
        grads = autograd_grad(create_graph)(
            lambda p: inner_loss(loss(f(p, x), y), p, objective), params
        )
        direction = direction_at(meta) if direction_at is not None else None
        if direction is not None:
            grads = direction(grads, s)
        return sgd_step(params, grads, lr_at(meta, s))

    trajectory = [params]
    for s in range(steps):
        flat, spec = tree_flatten((meta, params))
        out = _RecomputedStep.apply(step, s, spec, *flat)
        params = dict(zip(params, out, strict=True))
        trajectory.append(params)
    return trajectory


class _RecomputedStep(torch.autograd.Function):
    """One inner step whose graph is rebuilt in ``backward`` instead of kept from ``forward``.

    Every tensor the step depends on is an explicit input (flattened meta-parameters and
    θ_s), so the recomputation differentiates its own detached copies and the gradients of
    all of them come back through this node, none through captured tensors. Random numbers
    the step draws (DropBlock's masks) are drawn again from the generator states of the
    forward pass, as ``torch.utils.checkpoint`` does, so the recomputed step is the same
    step; the generators then continue as if nothing had been recomputed.
    """

    @staticmethod
    def forward(ctx, step, s, spec, *tensors):
        ctx.step, ctx.s, ctx.spec = step, s, spec
        ctx.rng = _rng_states(tensors)
        ctx.save_for_backward(*tensors)
        with torch.enable_grad():
            out = step(tree_unflatten(_fresh(tensors), spec), s, False)
        return tuple(t.detach() for t in out.values())

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_out):
        inputs = _fresh(ctx.saved_tensors)
        with _replayed(ctx.rng), torch.enable_grad():
            out = ctx.step(tree_unflatten(inputs, ctx.spec), ctx.s, True)
        needs = ctx.needs_input_grad[3:]
        wanted = [t for t, need in zip(inputs, needs, strict=True) if need]
        grads = iter(torch.autograd.grad(tuple(out.values()), wanted, grad_out, allow_unused=True))
        return None, None, None, *(next(grads) if need else None for need in needs)


def _fresh(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Leaves sharing the tensors' storage: the inner gradient needs θ to require grad."""
    return [t.detach().requires_grad_(t.is_floating_point()) for t in tensors]


RngStates = tuple[list[int], torch.Tensor, list[torch.Tensor]]


def _rng_states(tensors: Sequence[torch.Tensor]) -> RngStates:
    """The CPU generator's state and those of the CUDA devices the tensors live on."""
    devices = sorted({t.device.index for t in tensors if t.is_cuda})
    return devices, torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


@contextmanager
def _replayed(states: RngStates) -> Iterator[None]:
    """Within this block the generators start from ``states``; afterwards they are back where
    they were before it."""
    devices, cpu, cuda = states
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(cpu)
        for device, state in zip(devices, cuda, strict=True):
            torch.cuda.set_rng_state(state, device)
        yield

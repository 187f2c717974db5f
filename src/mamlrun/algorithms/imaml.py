"""iMAML (Rajeswaran et al. 2019): the meta-gradient by implicit differentiation.

The inner problem is proximally regularised: from φ = θ, ``inner_steps`` steps of gradient
descent on ``L_support(φ) + λ/2·‖φ − θ‖²`` (``inner_objective``) approximate its minimiser
φ*(θ). At a minimiser ∇L_support(φ*) + λ(φ* − θ) = 0, so dφ*/dθ = (I + H/λ)⁻¹ with H the
Hessian of the support loss at φ*, and the task's meta-gradient is v = (I + H/λ)⁻¹·g with
g = ∇L_query(φ*). It depends only on where the inner loop ends, not on the path: the inner
steps run without a graph (first order), and v is solved for by conjugate gradient with
Hessian-vector products at φ (``cg_steps`` of them). What a task holds at once is one
support forward and its double backward, whatever the number of inner steps: the inner loop
keeps neither a graph nor the parameters of the steps before the last (``whole=False``).

The shared inner loop and evaluation are ``GradientLearner``'s; the proximal term reaches
both through ``inner_objective``, so evaluation adapts to the same regularised problem
(the authors' measure_accuracy.py evaluates with --lam 0.0 instead).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext

import torch
from torch import nn

from mamlrun.algorithms.base import Part
from mamlrun.algorithms.batching import map_tasks
from mamlrun.algorithms.functional import Params, functional_grad
from mamlrun.algorithms.learner import GradientLearner, configured
from mamlrun.data.tasks import TaskBatch
from mamlrun.errors import MamlrunError
from mamlrun.models.layers import fused_batch_norm, tell_training_step


@configured("imaml")
class IMAML(GradientLearner):
    """``GradientLearner``'s settings plus iMAML's own; ``IMAML(lam=1.0)`` takes the rest from
    ``conf/meta_optimizer/imaml.yaml`` (``configured``).

    Attributes:
        lam: λ, the strength of the proximal term λ/2·‖φ − θ‖² of the inner problem.
        cg_steps: conjugate-gradient steps (one Hessian-vector product each) for v.
        cg_damping: δ ≥ 0 added to the identity of the system, ((1 + δ)·I + H/λ)·v = g: 0 is
            the paper's equation; more keeps CG stable where H has eigenvalues below −λ.
    """

    lam: float
    cg_steps: int
    cg_damping: float

    def __post_init__(self) -> None:
        super().__post_init__()
        refusal = _refusal(self)
        if refusal:
            raise MamlrunError(f"meta_optimizer.{refusal}")

    def inner_objective(
        self, task_loss: torch.Tensor, params: Params, start: Params
    ) -> torch.Tensor:
        """The proximal inner problem: the task loss plus λ/2·‖φ − θ‖²."""
        distance = sum(((params[k] - start[k]) ** 2).sum() for k in params)
        return task_loss + self.lam / 2 * distance

    def describe(self) -> dict:
        return {**super().describe(), "lam": self.lam, "cg_steps": self.cg_steps}

    def meta_objective(
        self, model: nn.Module, batch: TaskBatch, step: int | None = None
    ) -> Iterator[Part]:
        """One part whose gradient is the mean over tasks of v_i = (I + H_i/λ)⁻¹·g_i:
        ``Σ θ·v̄`` with v̄ held constant, as every batching mode computes all v_i before the
        outer backward. Its logged loss and metric are the query loss and metric after
        adaptation. ``step`` goes to the backbone's layers that change over training."""
        task_type, batching = self.bound()
        plan = self.plan(model)
        if plan.changes_over_training:
            tell_training_step(model, step)
        theta = dict(plan.backbone.named_parameters())
        meta = {"theta": {k: p.detach() for k, p in theta.items()}}
        vs, losses, metrics = map_tasks(
            lambda m: self._task(m, task_type), model, meta, batch, batching
        )
        objective = sum((p * vs[k].mean(0)).sum() for k, p in theta.items())
        yield Part(objective, losses.mean(), metrics.mean(), batch.num_tasks)

    def _task(self, model: nn.Module, task_type: str):
        """One task's ``(v, query loss, query metric)`` from detached meta-parameters, in
        ``torch.func`` so that the same function runs per task and under ``vmap``."""
        inner = self.adaptation(
            model, task_type, self.inner_steps, functional_grad(True), whole=False
        )
        loss, metric, per_output = self.losses_of(task_type)
        lam, steps, damping = self.lam, self.cg_steps, self.cg_damping
        # The query pass is differentiated once: the fused batch-norm kernel's leaner first
        # derivative serves (layers.fused_batch_norm), but not under vmap.
        fused = self.mode != "vmap" and self.plan(model).has_bn

        def task(meta, xs, ys, xq, yq):
            trajectory, forwards = inner(meta, xs, ys)
            phi, forward = trajectory[-1], forwards[-1]

            def query(p: Params):
                out = forward(p, xq)
                return loss(out, yq), out

            with fused_batch_norm() if fused else nullcontext():
                g, out = torch.func.grad(query, has_aux=True)(phi)
            v = implicit_gradient(
                lambda p: loss(forward(p, xs), ys), phi, g, lam=lam, steps=steps, damping=damping
            )
            out = out.detach()
            scale = out.shape[-1] if per_output else 1  # losses.scales_with_outputs
            return v, loss(out, yq) / scale, metric(out, yq)

        return task


def implicit_gradient(
    support_loss: Callable[[Params], torch.Tensor],
    phi: Params,
    g: Params,
    *,
    lam: float,
    steps: int,
    damping: float = 0.0,
) -> Params:
    """v ≈ ((1 + damping)·I + H/λ)⁻¹·g, H the Hessian of ``support_loss`` at ``phi``, by
    ``steps`` of conjugate gradient. The support gradient's graph is built once (``vjp`` of
    ``torch.func.grad``) and each step backpropagates through it again: one double backward
    per step, no Hessian. Runs per task and under ``vmap``."""
    _, hessian_times = torch.func.vjp(torch.func.grad(support_loss), phi)

    def system(v: Params) -> Params:
        (hv,) = hessian_times(v)  # H is symmetric: vᵀH = (Hv)ᵀ
        return {k: (1 + damping) * v[k] + hv[k] / lam for k in v}

    return conjugate_gradient(system, g, steps)


def conjugate_gradient(apply: Callable[[Params], Params], b: Params, steps: int) -> Params:
    """x ≈ A⁻¹·b for a symmetric positive-definite A given as ``apply`` (x ↦ A·x), by
    ``steps`` steps of conjugate gradient from x = 0. A fixed number of steps and no branch
    on values, so that it runs under ``vmap``; a step whose residual is already zero changes
    nothing (``_ratio``)."""
    x = {k: torch.zeros_like(t) for k, t in b.items()}
    r = dict(b)
    p = dict(b)
    rr = _dot(r, r)
    for _ in range(steps):
        ap = apply(p)
        alpha = _ratio(rr, _dot(p, ap))
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rr_next = _dot(r, r)
        beta = _ratio(rr_next, rr)
        p = {k: r[k] + beta * p[k] for k in p}
        rr = rr_next
    return x


def _dot(a: Params, b: Params) -> torch.Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, and 0 where den is 0 (a converged CG: its residual is exactly zero)."""
    safe = torch.where(den == 0, torch.ones_like(den), den)
    return torch.where(den == 0, torch.zeros_like(num), num / safe)


def _refusal(algo: IMAML) -> str | None:
    """What these settings ask that the implicit gradient cannot give, in one line."""
    if algo.lam <= 0 or algo.cg_steps < 1 or algo.cg_damping < 0:
        return (
            f"lam must be > 0, cg_steps >= 1 and cg_damping >= 0, got lam={algo.lam}, "
            f"cg_steps={algo.cg_steps}, cg_damping={algo.cg_damping}"
        )
    if algo.adapt_params != "all":
        return (
            f"adapt_params={algo.adapt_params} is not possible with imaml: its implicit "
            "gradient (I + H/λ)⁻¹·g is that of parameters the inner problem adapts; use all"
        )
    if algo.inner_optimizer != "sgd":
        return (
            f"inner_optimizer={algo.inner_optimizer} is not possible with imaml: the implicit "
            "gradient holds where the inner problem is solved, which Adam with a fixed step "
            "size circles instead of reaching; use sgd"
        )
    if algo.bn_mode != "transductive":
        return (
            f"bn_mode={algo.bn_mode} is not possible with imaml: per-step statistics belong "
            "to the steps of an unrolled inner loop, the implicit gradient only to where it "
            "ends; use transductive"
        )
    return None

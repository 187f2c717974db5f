"""The MAML engine computes the meta-gradient it claims to, per task and batched alike."""

from __future__ import annotations

import pytest
import references
import torch
from conftest import maml, meta_gradient

from mamlrun import config
from mamlrun.data.sinusoid import SinusoidTasks
from mamlrun.data.tasks import TaskBatch
from mamlrun.models.mlp import mlp

ALPHA = 0.05


@pytest.fixture
def problem():
    torch.manual_seed(0)
    model = mlp((1,), 1, **config.settings("backbone", "mlp", hidden=(4, 3))).double()
    source = SinusoidTasks(**config.settings("dataset", "sinusoid", shots=5, query=6))
    batch = source.sample("train", 3, torch.Generator().manual_seed(1))
    return model, TaskBatch(*(t.double() for t in batch))


def forward(model, params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The MLP written out by hand (``references.mlp``), not the engine's forward."""
    names = [n for n, _ in model.named_parameters()]
    return references.mlp(dict(zip(names, params, strict=True)), x)


def test_the_reference_forward_is_the_mlps(problem):
    model, batch = problem
    assert torch.allclose(
        forward(model, list(model.parameters()), batch.x_query), model(batch.x_query), atol=1e-12
    )


def meta_loss_by_hand(model, theta: list[torch.Tensor], batch: TaskBatch, steps: int) -> float:
    """An independent computation of mean_i L_query(θ after `steps` SGD steps on support_i),
    through the hand-written forward."""
    total = 0.0
    for xs, ys, xq, yq in zip(*batch, strict=True):
        params = [t.detach().clone().requires_grad_() for t in theta]
        for _ in range(steps):
            out = forward(model, params, xs)
            grads = torch.autograd.grad(((out - ys) ** 2).mean(), params)
            params = [
                (p - ALPHA * g).detach().requires_grad_()
                for p, g in zip(params, grads, strict=True)
            ]
        out = forward(model, params, xq)
        total += float(((out - yq) ** 2).mean().detach())
    return total / batch.num_tasks


def engine_gradient(model, batch, batching: str, first_order=False, steps=1) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    algo = maml(inner_lr=ALPHA, inner_steps=steps, first_order=first_order, task_batching=batching)
    meta_gradient(algo, model, batch, "regression", batching)
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def finite_difference_gradient(model, batch, steps: int, eps=1e-6) -> torch.Tensor:
    theta = [p.detach().clone() for p in model.parameters()]
    grads = []
    for i, t in enumerate(theta):
        for j in range(t.numel()):
            plus = [x.clone() for x in theta]
            minus = [x.clone() for x in theta]
            plus[i].view(-1)[j] += eps
            minus[i].view(-1)[j] -= eps
            diff = meta_loss_by_hand(model, plus, batch, steps)
            diff -= meta_loss_by_hand(model, minus, batch, steps)
            grads.append(diff / (2 * eps))
    return torch.tensor(grads, dtype=torch.float64)


@pytest.mark.parametrize("steps", [1, 2])
def test_second_order_meta_gradient_matches_finite_differences(problem, steps):
    """Per task (loop); the other batchings are held to the loop's gradient below."""
    model, batch = problem
    exact = engine_gradient(model, batch, "loop", steps=steps)
    numeric = finite_difference_gradient(model, batch, steps)
    rel = (exact - numeric).norm() / numeric.norm()
    assert rel < 1e-5, f"relative error {rel:.2e}"


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("batching", ["threads", "vmap", "vmap:2"])
def test_batched_threaded_and_per_task_paths_give_the_same_meta_gradient(
    problem, first_order, batching
):
    model, batch = problem
    loop = engine_gradient(model, batch, "loop", first_order)
    other = engine_gradient(model, batch, batching, first_order)
    assert (loop - other).abs().max() < 1e-12


def test_first_order_is_the_query_gradient_at_the_adapted_parameters(problem):
    model, batch = problem
    expected = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    for xs, ys, xq, yq in zip(*batch, strict=True):
        theta = [p.detach().clone().requires_grad_() for p in model.parameters()]
        out = forward(model, theta, xs)
        g = torch.autograd.grad(((out - ys) ** 2).mean(), theta)
        adapted = [
            (t - ALPHA * gi).detach().requires_grad_() for t, gi in zip(theta, g, strict=True)
        ]
        out = forward(model, adapted, xq)
        gq = torch.autograd.grad(((out - yq) ** 2).mean(), adapted)
        expected += torch.cat([x.flatten() for x in gq]) / batch.num_tasks

    first = engine_gradient(model, batch, "loop", first_order=True)
    second = engine_gradient(model, batch, "loop", first_order=False)
    assert (first - expected).abs().max() < 1e-12
    assert (first - second).norm() / second.norm() > 1e-3, "first order should drop a real term"


@pytest.mark.parametrize("batching", ["loop", "threads", "vmap", "vmap:2"])
def test_evaluation_reports_the_query_loss_after_each_inner_step(problem, batching):
    model, batch = problem
    algo = maml(inner_lr=ALPHA, inner_steps=1)
    loss, metric = algo.bind("regression", batching).evaluate(model, batch, 3)
    assert loss.shape == metric.shape == (3, 4)
    theta = [p.detach() for p in model.parameters()]
    for steps in range(4):
        assert loss[:, steps].mean().item() == pytest.approx(
            meta_loss_by_hand(model, theta, batch, steps), rel=1e-10
        )
    assert all(p.grad is None for p in model.parameters()), "evaluation must not touch .grad"


def test_inner_steps_lower_the_support_loss():
    """Adaptation has to help on the data it adapts to, or the sign of the step is wrong."""
    torch.manual_seed(0)
    model = mlp((1,), 1, **config.settings("backbone", "mlp")).double()
    batch = SinusoidTasks(**config.settings("dataset", "sinusoid", shots=10, query=10)).sample(
        "train", 8, torch.Generator().manual_seed(0)
    )
    batch = TaskBatch(*(t.double() for t in batch))
    on_support = TaskBatch(batch.x_support, batch.y_support, batch.x_support, batch.y_support)
    loss, _ = maml(inner_lr=0.01).bind("regression", "loop").evaluate(model, on_support, 5)
    assert (loss[:, 1:] < loss[:, :-1]).all()

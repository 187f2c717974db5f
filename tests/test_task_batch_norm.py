"""Task batch norm as one ``autograd.Function`` with a differentiable hand-written backward
(issue 26): it computes what the five plain tensor operations it replaced computed (kept as
``layers.reference_batch_norm``), in values, first and second derivatives, in every way of
batching tasks, and its second derivative holds under ``torch.func.vmap(torch.func.grad(...))``,
where torch's fused kernel's did not."""

from __future__ import annotations

import pytest
import torch
from conftest import image_batch, maml, meta_gradient
from torch.autograd import gradcheck, gradgradcheck

from mamlrun import config
from mamlrun.models import layers
from mamlrun.models.conv4 import conv4
from mamlrun.models.layers import TaskBatchNorm2d, task_batch_norm
from mamlrun.models.layers import reference_batch_norm as plain_batch_norm

EPS = 1e-5


def inputs(requires_grad: bool = True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) * 3 + 1
    w = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(3, generator=g, dtype=torch.float64)
    return tuple(t.requires_grad_(requires_grad) for t in (x, w, b))


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # conftest gives torch's count back


def test_values_and_first_gradients_are_the_plain_operations():
    x, w, b = inputs()
    seed = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    ours, plain = task_batch_norm(x, w, b, EPS), plain_batch_norm(x, w, b, EPS)
    assert (ours - plain).abs().max() < 1e-13
    with torch.no_grad():  # evaluation takes a shorter way
        assert (task_batch_norm(x, w, b, EPS) - plain).abs().max() < 1e-13
    for a, p in zip(
        torch.autograd.grad((ours * seed).sum(), (x, w, b)),
        torch.autograd.grad((plain * seed).sum(), (x, w, b)),
        strict=True,
    ):
        assert (a - p).abs().max() < 1e-12


def test_the_function_passes_gradcheck_to_the_third_derivative():
    """The hand-written backward (first derivative) and autograd's derivative of it (second,
    what second-order MAML uses, and third) against finite differences."""

    def bn(x, w, b):
        return task_batch_norm(x, w, b, EPS)

    def first(x, w, b):  # a loss whose gradient depends on x, w and b non-linearly
        return torch.autograd.grad(bn(x, w, b).sin().sum(), (x, w, b), create_graph=True)

    assert gradcheck(bn, inputs())
    assert gradgradcheck(bn, inputs())
    assert gradgradcheck(first, inputs())


def vmap_grad_meta_loss(batch_norm, p: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """A one-step MAML objective in ``torch.func`` (vmap over tasks of grad of the inner
    loss; the case where the fused kernel's double backward disagreed with finite
    differences), adapting a per-channel scale before a non-linearity (``p[0]``, so the second
    derivative runs through the normalisation) and the batch-norm weight (``p[1]``)."""

    def forward(q, x):
        return batch_norm(torch.tanh(x * q[0, :, None, None]), q[1], q[0] - 1, EPS)

    def task(x):
        adapted = p - 0.3 * torch.func.grad(lambda q: forward(q, x).pow(3).mean())(p)
        return forward(adapted, x).sin().sum()

    return torch.func.vmap(task)(xs).sum()


def test_its_second_derivative_under_vmap_of_grad_matches_finite_differences():
    xs = torch.randn(5, 4, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    p = torch.tensor([[0.7, 1.3, -0.4], [0.9, 1.2, 0.6]], dtype=torch.float64)
    exact = torch.func.grad(lambda q: vmap_grad_meta_loss(task_batch_norm, q, xs))(p)
    h, steps = 1e-6, torch.eye(6, dtype=torch.float64).view(6, 2, 3)
    numeric = torch.stack(
        [
            vmap_grad_meta_loss(task_batch_norm, p + h * e, xs)
            - vmap_grad_meta_loss(task_batch_norm, p - h * e, xs)
            for e in steps
        ]
    ).view(2, 3) / (2 * h)
    assert (exact - numeric).norm() / numeric.norm() < 1e-7
    plain = torch.func.grad(lambda q: vmap_grad_meta_loss(plain_batch_norm, q, xs))(p)
    assert (exact - plain).abs().max() < 1e-10


MODES = {  # every batching mode, and inner-loop checkpointing on the modes that run it
    "loop": ("loop", False),
    "threads": ("threads", False),
    "vmap": ("vmap", False),
    "vmap:2": ("vmap:2", False),
    "checkpoint_inner-loop": ("loop", True),
    "checkpoint_inner-threads": ("threads", True),
}


def conv4_meta_gradient(mode: str, checkpoint: bool) -> torch.Tensor:
    torch.manual_seed(0)
    algo = maml(inner_lr=0.3, inner_steps=2, checkpoint_inner=checkpoint, task_batching=mode)
    net = conv4((1, 8, 8), 3, **config.settings("backbone", "conv4", filters=4)).double()
    with torch.no_grad():  # batch-norm weights away from 1 and biases away from 0
        for m in net.modules():
            if isinstance(m, TaskBatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    model = algo.meta_model(net)
    meta_gradient(algo, model, image_batch(tasks=3), "classification", mode)
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("mode", list(MODES))
def test_second_order_maml_meta_gradient_is_the_plain_operations_in_every_mode(mode, monkeypatch):
    ours = conv4_meta_gradient(*MODES[mode])
    monkeypatch.setattr(layers, "task_batch_norm", plain_batch_norm)
    plain = conv4_meta_gradient(*MODES[mode])
    assert plain.abs().max() > 0
    assert (ours - plain).abs().max() < 1e-12 * plain.abs().max()


@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
def test_running_statistics_behave_as_torch_batch_norms(training):
    """``bn_mode=per_step`` hands the layer running statistics: in training they are updated
    as ``nn.BatchNorm2d`` updates its own (the output still uses the batch's statistics), in
    evaluation they normalise, with gradients to the input and the affine weights."""
    ours, reference = TaskBatchNorm2d(3).double(), torch.nn.BatchNorm2d(3).double()
    ours.running_mean = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    ours.running_var = torch.tensor([2.0, 0.5, 1.5], dtype=torch.float64)
    with torch.no_grad():
        reference.running_mean.copy_(ours.running_mean)
        reference.running_var.copy_(ours.running_var)
        for mine, theirs in zip(ours.parameters(), reference.parameters(), strict=True):
            mine.uniform_(0.5, 1.5)
            theirs.copy_(mine)
    ours.train(training), reference.train(training)
    x = inputs()[0]
    outputs = [m(x) for m in (ours, reference)]
    assert (outputs[0] - outputs[1]).abs().max() < 1e-12
    grads = [torch.autograd.grad(o.sin().sum(), (x, *m.parameters())) for o, m in
             zip(outputs, (ours, reference), strict=True)]  # fmt: skip
    for a, p in zip(*grads, strict=True):
        assert (a - p).abs().max() < 1e-12
    for name in ("running_mean", "running_var"):
        assert (getattr(ours, name) - getattr(reference, name)).abs().max() < 1e-12

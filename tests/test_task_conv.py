"""Task-batched convolution (issue 26, item 2): under ``vmap`` a layer with few input channels
and one weight per task can run as im2col + one batched matrix multiply instead of a grouped
convolution (off by default: it did not reliably pay on whole presets, docs/PERFORMANCE.md),
with the same values and first and second derivatives as ``F.conv2d``; a weight shared by all
tasks (θ at inner step 0) stays one ordinary convolution over all tasks' images.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import image_batch, maml, meta_gradient
from torch.profiler import ProfilerActivity, profile

from mamlrun import config
from mamlrun.models.conv4 import conv4
from mamlrun.models.layers import TaskConv2d, conv2d_as_matmul, per_task

SHAPES = [  # (C_in, C_out, kernel, stride, padding, H, W)
    (1, 4, 3, 2, 1, 9, 9),
    (3, 5, 3, 1, 1, 8, 6),
    (2, 3, 1, 1, 0, 5, 5),
    (2, 3, 3, 2, 0, 7, 8),
]


@pytest.fixture
def matmul_on(monkeypatch):
    """The matrix multiply switched on for layers of one input channel."""
    monkeypatch.setattr(TaskConv2d, "MATMUL_MAX_IN_CHANNELS", 1)


def _inputs(c_in, c_out, k, h, w, tasks=3, n=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tasks, n, c_in, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(tasks, c_out, c_in, k, k, generator=g, dtype=torch.float64)
    bias = torch.randn(tasks, c_out, generator=g, dtype=torch.float64)
    return x, weight, bias


@pytest.mark.parametrize("shape", SHAPES)
def test_matmul_convolution_equals_conv2d_per_task_and_under_vmap(shape):
    c_in, c_out, k, stride, pad, h, w = shape
    x, weight, bias = _inputs(c_in, c_out, k, h, w)
    expected = torch.stack([F.conv2d(x[t], weight[t], bias[t], stride, pad) for t in range(3)])
    one = conv2d_as_matmul(x[0], weight[0], bias[0], stride, pad)
    assert (one - expected[0]).abs().max() < 1e-12
    batched = torch.func.vmap(lambda a, b, c: conv2d_as_matmul(a, b, c, stride, pad))
    assert (batched(x, weight, bias) - expected).abs().max() < 1e-12


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2]])
def test_per_task_matmul_convolution_has_the_derivatives_finite_differences_give(shape):
    """First and second derivatives, batched over tasks by vmap, against finite differences
    (``gradgradcheck``: what the double backward of second-order MAML runs through)."""
    c_in, c_out, k, stride, pad, h, w = shape
    x, weight, bias = (t.requires_grad_() for t in _inputs(c_in, 2, k, 4, 4, tasks=2, n=1))
    conv = torch.func.vmap(lambda a, b, c: conv2d_as_matmul(a, b, c, stride, pad))
    assert torch.autograd.gradcheck(conv, (x, weight, bias))
    assert torch.autograd.gradgradcheck(conv, (x, weight, bias))


def _adapted_query_loss(layer: TaskConv2d, theta: dict, batch, lr: float = 0.5):
    """Sum over tasks of a query loss after one inner step on the support loss, the tasks
    batched by ``vmap`` and the inner gradient by ``torch.func.grad``, as MAML's vmap path."""

    def loss(params, x):
        return torch.func.functional_call(layer, params, (x,)).square().mean()

    def task(xs, xq):
        grads = torch.func.grad(loss)(theta, xs)
        adapted = {k: p - lr * grads[k] for k, p in theta.items()}  # per task from here on
        return loss(adapted, xq)

    return torch.func.vmap(task)(batch.x_support, batch.x_query).sum()


def test_second_order_meta_gradient_through_the_matmul_path_matches_finite_differences(matmul_on):
    torch.manual_seed(0)
    layer = TaskConv2d(1, 3, 3, stride=2, padding=1).double()
    batch = image_batch(tasks=3)
    theta = {k: p.detach().clone().requires_grad_() for k, p in layer.named_parameters()}

    def meta_loss(weight, bias):
        return _adapted_query_loss(layer, {"weight": weight, "bias": bias}, batch)

    assert torch.autograd.gradcheck(meta_loss, (theta["weight"], theta["bias"]))


def _calls(fn) -> list[tuple[str, list[int], list[int]]]:
    """(name, first and second input shapes) of every convolution and batched matrix multiply
    that ``fn()`` runs, in order."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    calls = [e for e in prof.events() if e.name in ("aten::convolution", "aten::bmm")]
    calls.sort(key=lambda e: e.time_range.start)
    return [(e.name, *e.input_shapes[:2]) for e in calls]


def _task_batched_calls(in_channels: int) -> list[tuple[str, list[int], list[int]]]:
    """The calls of one vmap meta-step of a layer over 4 tasks of 6 support and 6 query
    images of ``in_channels``×8×8."""
    layer = TaskConv2d(in_channels, 3, 3, stride=2, padding=1).double()
    batch = image_batch(tasks=4)
    wide = {
        k: batch[i].expand(-1, -1, in_channels, -1, -1)
        for i, k in ((0, "x_support"), (2, "x_query"))
    }
    theta = {k: p.detach().requires_grad_() for k, p in layer.named_parameters()}
    return _calls(lambda: _adapted_query_loss(layer, theta, batch._replace(**wide)).backward())


def test_vmap_runs_the_shared_first_pass_as_one_convolution_and_per_task_ones_as_bmm(matmul_on):
    calls = _task_batched_calls(1)
    shared = ("aten::convolution", [24, 1, 8, 8], [3, 1, 3, 3])
    assert shared in calls, "θ shared by all tasks: one convolution over 4×6 images"
    assert ("aten::bmm", [4, 3, 9], [4, 9, 96]) in calls, "query: (3×9) @ (9 × 16 px·6) per task"
    grouped = ("aten::convolution", [6, 4, 8, 8], [12, 1, 3, 3])
    assert calls.index(grouped) > calls.index(shared), "grouped only in the step-0 backward"
    assert calls.count(grouped) == 1


@pytest.mark.parametrize("channels", [3, 4])
def test_a_wider_layer_keeps_the_grouped_convolution_under_vmap(channels, matmul_on):
    """A layer with more input channels than the limit (here 1) keeps ``F.conv2d``: the
    per-task query pass is one grouped convolution (4 tasks × 3 filters)."""
    calls = _task_batched_calls(channels)
    assert ("aten::convolution", [24, channels, 8, 8], [3, channels, 3, 3]) in calls
    assert ("aten::convolution", [6, 4 * channels, 8, 8], [12, channels, 3, 3]) in calls
    assert not any(name == "aten::bmm" for name, *_ in calls)


def test_by_default_every_layer_keeps_the_grouped_convolution():
    """Off by default: on whole presets the matrix multiply was level or slower."""
    calls = _task_batched_calls(1)
    assert ("aten::convolution", [6, 4, 8, 8], [12, 1, 3, 3]) in calls
    assert not any(name == "aten::bmm" for name, *_ in calls)


def test_only_a_vmapped_weight_counts_as_per_task():
    w = torch.ones(2, 3)
    seen = []

    def task(shared, own):
        seen.append((per_task(shared), per_task(own), per_task(shared - own)))
        return shared + own

    torch.func.vmap(task, in_dims=(None, 0))(w[0], w)
    assert seen == [(False, True, True)] and not per_task(w)


@pytest.mark.parametrize("mode", ["vmap", "vmap:2"])
def test_conv4_meta_gradient_with_the_matmul_first_layer_equals_the_loop(mode, matmul_on):
    """conv4's first layer (one input channel) takes the matrix multiply under vmap: MAML's
    second-order meta-gradient is still the per-task loop's, in float64."""
    torch.manual_seed(0)
    model = conv4((1, 8, 8), 3, **config.settings("backbone", "conv4", filters=4)).double()
    assert isinstance(model[0], TaskConv2d)
    batch = image_batch(tasks=3)
    grads = {}
    for m in ("loop", mode):
        model.zero_grad(set_to_none=True)
        meta_gradient(maml(inner_lr=0.3, inner_steps=2), model, batch, "classification", m)
        grads[m] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert (grads["loop"] - grads[mode]).abs().max() < 1e-12

"""Reptile's inner loop: torch's own Adam kernels, no forward pass for the logged loss, and
the same meta-update as the functional loop it replaces (issue 26, item 5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import image_batch, meta_gradient, reptile
from torch.func import functional_call

from mamlrun import config
from mamlrun.algorithms.functional import adapt, adapt_in_place, autograd_grad
from mamlrun.algorithms.meta_parameters import split
from mamlrun.models.conv4 import conv4
from mamlrun.models.mlp import mlp

STEPS = 3


def tiny_conv4(algo):
    torch.manual_seed(1)
    settings = config.settings("backbone", "conv4", filters=3)
    return algo.meta_model(conv4((1, 8, 8), 3, **settings).double())


def functional_reptile_update(algo, model, batch) -> list[torch.Tensor]:
    """The meta-gradient θ − mean φ as Reptile computed it before: each task's φ from the
    functional loop, ``functional.adapt`` with ``adam_direction`` (its formula, per tensor)."""
    backbone = split(model)[0]
    theta = {k: p.detach() for k, p in backbone.named_parameters()}
    adam = algo.adam_betas if algo.inner_optimizer == "adam" else None
    phis = []
    for xs, ys, xq, yq in zip(*batch, strict=True):
        x, y = torch.cat([xs, xq]), torch.cat([ys, yq])
        start = {k: t.clone().requires_grad_() for k, t in theta.items()}
        (phi,) = adapt(
            lambda p, inputs: functional_call(backbone, p, (inputs,)), F.cross_entropy,
            start, x, y, lr=algo.inner_lr, steps=algo.inner_steps, grad=autograd_grad(False),
            adam=adam, whole=False,
        )  # fmt: skip
        phis.append(phi)
    return [p - torch.stack([phi[k].detach() for phi in phis]).mean(0) for k, p in theta.items()]


@pytest.mark.parametrize("inner_optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("batching", ["loop", "threads", "vmap"])
def test_the_meta_update_is_the_functional_loops_in_float64(inner_optimizer, batching):
    algo = reptile(inner_lr=0.01 if inner_optimizer == "adam" else 0.3, inner_steps=STEPS,
                   inner_optimizer=inner_optimizer)  # fmt: skip
    model, batch = tiny_conv4(algo), image_batch(tasks=3)
    expected = functional_reptile_update(algo, model, batch)
    model.zero_grad(set_to_none=True)
    meta_gradient(algo, model, batch, "classification", batching)
    params = dict(split(model)[0].named_parameters())
    for (name, p), e in zip(params.items(), expected, strict=True):
        if name.endswith("bias") and params[name[: -len("bias")] + "weight"].dim() == 4:
            # A convolution's bias before task batch norm has a zero gradient, computed as
            # rounding noise (1e-17), which Adam divides by its ε (1e-8): both loops move it
            # by noise alone, 1e-10 against the 1e-2 that the weights move.
            assert p.grad.abs().max() < 1e-9 and e.abs().max() < 1e-9, name
            continue
        # Adam: ε added to √v/√(1−β2ᵗ) (torch's) rather than to √(v/(1−β2ᵗ)): rounding only
        assert torch.allclose(p.grad, e, rtol=1e-12, atol=1e-15), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_in_place_loop_is_torch_optim_adams_trajectory_bit_for_bit(dtype):
    """``adapt_in_place`` against ``torch.optim.Adam(fused=True)`` training a copy: the same
    kernels on the same gradients, so φ is torch's own, bit for bit."""
    torch.manual_seed(0)
    net = mlp((3,), 2, **config.settings("backbone", "mlp", hidden=(5, 4))).to(dtype)
    x, y = torch.randn(7, 3, dtype=dtype), torch.randn(7, 2, dtype=dtype)
    theta = {k: p.detach().clone() for k, p in net.named_parameters()}
    (phi,) = adapt_in_place(
        lambda p, inputs: functional_call(net, p, (inputs,)), F.mse_loss, theta, x, y,
        lr=0.01, steps=STEPS, adam=(0.0, 0.999),
    )  # fmt: skip
    adam = torch.optim.Adam(net.parameters(), lr=0.01, betas=(0.0, 0.999), fused=True)
    for _ in range(STEPS):
        adam.zero_grad()
        F.mse_loss(net(x), y).backward()
        adam.step()
    for k, p in net.named_parameters():
        assert torch.equal(phi[k], p.detach()), k
        assert not torch.equal(phi[k], theta[k]), k  # it moved


def test_the_inner_adam_runs_in_torchs_fused_kernel_one_call_per_step():
    algo = reptile(inner_lr=0.01, inner_steps=STEPS)
    model, batch = tiny_conv4(algo), image_batch(tasks=2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        meta_gradient(algo, model, batch, "classification", "loop")
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("aten::_fused_adam_") == 2 * STEPS, sorted(calls)


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("steps", [1, STEPS])
def test_the_logged_loss_is_the_last_inner_steps_own_forward(batching, steps):
    """No forward pass for the log: ``steps`` passes of the backbone per task, and the
    logged loss is the one at θ_{K−1} (before the last update) on support and query."""
    algo = reptile(inner_lr=0.01, inner_steps=steps, adam_betas=(0.0, 0.999))
    model, batch = tiny_conv4(algo), image_batch(tasks=2)
    backbone = split(model)[0]
    passes = []
    handle = backbone.register_forward_hook(lambda *_: passes.append(1))
    try:
        loss, metric = meta_gradient(algo, model, batch, "classification", batching)
    finally:
        handle.remove()
    if batching == "loop":
        assert len(passes) == 2 * steps  # before: 2 * (steps + 1)

    expected_loss, expected_acc = [], []
    for xs, ys, xq, yq in zip(*batch, strict=True):
        copy = conv4((1, 8, 8), 3, **config.settings("backbone", "conv4", filters=3)).double()
        copy.load_state_dict(backbone.state_dict())
        adam = torch.optim.Adam(copy.parameters(), lr=0.01, betas=(0.0, 0.999))
        x, y = torch.cat([xs, xq]), torch.cat([ys, yq])
        for _ in range(steps - 1):
            adam.zero_grad()
            F.cross_entropy(copy(x), y).backward()
            adam.step()
        with torch.no_grad():
            out = copy(x)
        expected_loss.append(F.cross_entropy(out, y))
        expected_acc.append((out.argmax(-1) == y).double().mean())
    assert torch.allclose(loss, torch.stack(expected_loss).mean(), rtol=1e-12)
    assert torch.allclose(metric, torch.stack(expected_acc).mean(), rtol=1e-12)

"""Options that trade speed for memory (or the reverse) must not change what is computed."""

from __future__ import annotations

import weakref

import pytest
import torch
from conftest import image_batch, maml, meta_gradient

from mamlrun import config
from mamlrun.algorithms import functional
from mamlrun.algorithms.maml import MAML
from mamlrun.errors import MamlrunError
from mamlrun.models.conv4 import conv4
from mamlrun.models.layers import fused_batch_norm


def flat_meta_gradient(algo: MAML, model: torch.nn.Module, batch, step=None) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    meta_gradient(algo, model, batch, "classification", "loop", step=step)
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def build(steps: int, checkpoint: bool, **settings) -> tuple[MAML, torch.nn.Module]:
    torch.manual_seed(0)
    algo = maml(inner_lr=0.3, inner_steps=steps, checkpoint_inner=checkpoint, **settings)
    return algo, algo.meta_model(
        conv4((1, 8, 8), 3, **config.settings("backbone", "conv4", filters=4)).double()
    )


VARIANTS = {
    "maml": {},
    "anil": {"adapt_params": "head"},
    "meta_sgd": {"learned_inner_lr": "per_element"},
    "mamlpp": {
        "learned_inner_lr": "per_layer_per_step",
        "per_step_bn_weights": True,
        "multi_step_loss": True,
        "msl_iterations": 10,
    },
}


@pytest.mark.parametrize(
    "variant",  # the fast suite: plain MAML and MAML++ (every flag); ANIL and Meta-SGD in full
    [v if v in ("maml", "mamlpp") else pytest.param(v, marks=pytest.mark.slow) for v in VARIANTS],
)
@pytest.mark.parametrize("steps", [pytest.param(1, marks=pytest.mark.slow), 3])
def test_checkpointed_inner_loop_gives_the_same_meta_gradient(steps, variant):
    """Every meta-parameter (backbone, learned rates, per-step batch norm) gets its gradient,
    the plain one (which test_conv4 holds to finite differences of a reference forward)."""
    batch = image_batch(tasks=2)
    plain = flat_meta_gradient(*build(steps, False, **VARIANTS[variant]), batch, step=3)
    recomputed = flat_meta_gradient(*build(steps, True, **VARIANTS[variant]), batch, step=3)
    assert plain.abs().max() > 0
    assert (recomputed - plain).norm() / plain.norm() < 1e-10


def test_checkpointing_recomputes_every_step_in_the_outer_backward(monkeypatch):
    """The option must really take the recomputing path, not fall back to the plain one."""
    calls = []
    original = functional._RecomputedStep.backward

    def counted(ctx, *grads):
        calls.append(ctx.s)
        return original(ctx, *grads)

    monkeypatch.setattr(functional._RecomputedStep, "backward", staticmethod(counted))
    flat_meta_gradient(*build(3, True), image_batch(tasks=2))
    assert sorted(calls) == [0, 0, 1, 1, 2, 2]


def saved_bytes(algo: MAML, model: torch.nn.Module, batch) -> int:
    """Bytes that autograd still holds for the outer backward after one task's inner loop
    (tensors saved and freed again inside the loop do not count)."""
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(weakref.ref(t))
        return t

    grad = functional.autograd_grad(create_graph=True)
    run = algo.adaptation(model, "classification", algo.inner_steps, grad, algo.checkpoint_inner)
    xs, ys = batch.x_support[0], batch.y_support[0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trajectory, _ = run(algo.meta_tensors(model), xs, ys)
    storages = [t.untyped_storage() for ref in saved if (t := ref()) is not None]
    return sum({s.data_ptr(): s.nbytes() for s in storages}.values())


def test_checkpointing_keeps_less_for_the_outer_backward():
    batch = image_batch(tasks=1, shots=10)  # enough images for activations to dominate
    plain = saved_bytes(*build(4, False), batch)
    checkpointed = saved_bytes(*build(4, True), batch)
    assert checkpointed < plain / 4


def test_checkpointing_is_refused_where_it_cannot_work():
    with pytest.raises(MamlrunError, match="checkpoint_inner"):
        maml(checkpoint_inner=True, task_batching="vmap")
    with pytest.raises(MamlrunError, match="checkpoint_inner.*per_step"):
        maml(checkpoint_inner=True, bn_mode="per_step")
    algo = maml(checkpoint_inner=True)
    assert "vmap" not in algo.batching_modes  # so task_batching=auto never picks it
    model = conv4((1, 8, 8), 3, **config.settings("backbone", "conv4", filters=4)).double()
    with pytest.raises(MamlrunError, match="checkpoint_inner"):
        meta_gradient(algo, model, image_batch(), "classification", "vmap")


def test_checkpointing_leaves_first_order_alone():
    batch = image_batch(tasks=2)
    plain = flat_meta_gradient(*build(2, False, first_order=True), batch)
    checkpointed = flat_meta_gradient(*build(2, True, first_order=True), batch)
    assert torch.equal(plain, checkpointed)


def test_fused_batch_norm_gives_the_same_values_and_first_derivatives():
    torch.manual_seed(0)
    model = conv4((1, 8, 8), 3, **config.settings("backbone", "conv4", filters=4)).double()
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    outputs, grads = [], []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        with fused_batch_norm() if fused else torch.enable_grad():
            out = model(x)
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(outputs[0], outputs[1], atol=1e-12)
    assert torch.allclose(grads[0], grads[1], atol=1e-10)

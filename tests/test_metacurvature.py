"""Meta-Curvature: the inner step goes along G ×₁ M_o ×₂ M_i ×₃ M_f, the matrices learned.

The transform is held against the explicit Kronecker product (M_o ⊗ M_i ⊗ M_f)·vec(G); the
meta-gradient, of the backbone and of the curvature alike, against central differences of an
inner loop written out by hand with that Kronecker product, in float64, on the MLP
(regression) and on conv4 (classification, batch norm), per task and under vmap, with curvature
far from the identity. At the identity it is MAML's; the curvature is in the checkpoint.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_train, image_batch, maml, meta_gradient
from test_variants import (
    ALPHA,
    engine_gradient,
    finite_differences,
    pick,
    relative_error,
    sinusoid_batch,
    tiny_conv4,
    tiny_mlp,
)
from torch.func import functional_call

from mamlrun import config
from mamlrun.algorithms.metacurvature import MetaCurvature, transform
from mamlrun.data.tasks import TaskBatch
from mamlrun.errors import MamlrunError
from mamlrun.models.resnet12 import resnet12
from mamlrun.results import checkpoint
from mamlrun.training import commands

VMAP_IN_FULL_SUITE = pytest.param("vmap", marks=pytest.mark.slow)


def metacurvature(**settings) -> MetaCurvature:
    return config.algorithm("metacurvature", **{"inner_lr": ALPHA, "inner_steps": 2, **settings})


def curved(model: torch.nn.Module, scale: float = 0.3, seed: int = 7) -> torch.nn.Module:
    """Move every curvature factor away from the identity (and the ones), so that a transpose,
    a mode mixed up or a factor left out changes the numbers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.extras["curvature"].parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def kronecker_direction(g: torch.Tensor, factors: dict[str, torch.Tensor]) -> torch.Tensor:
    """MC(g) the long way: the full curvature matrix M_o ⊗ M_i ⊗ M_f built with torch.kron and
    applied to the row-major vec(g); elementwise or a C×C matrix for a 1-D parameter."""
    if g.dim() < 2:
        out = factors["out"]
        return out * g if out.dim() == 1 else out @ g
    filt = factors.get("filter", torch.eye(1, dtype=g.dtype))
    full = torch.kron(torch.kron(factors["out"], factors["in"]), filt)
    return (full @ g.reshape(-1)).reshape(g.shape)


def factors_of(model) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name.replace(":", "."): dict(factors.named_parameters())
        for name, factors in model.extras["curvature"].items()
    }


def by_hand(model, batch, loss_fn, steps: int = 2) -> float:
    """mean_i loss_fn on query_i after ``steps`` steps θ ← θ − α·(M_o ⊗ M_i ⊗ M_f)·∇L on
    support_i, with plain autograd. Values only: finite differences differentiate it."""
    backbone, curvature = model.backbone, factors_of(model)
    total = 0.0
    for xs, ys, xq, yq in zip(*batch, strict=True):
        params = {k: t.detach().clone().requires_grad_() for k, t in backbone.named_parameters()}
        for _ in range(steps):
            with torch.enable_grad():
                loss = loss_fn(functional_call(backbone, params, (xs,)), ys)
                names = list(params)
                grads = torch.autograd.grad(loss, [params[k] for k in names])
            for k, g in zip(names, grads, strict=True):
                step = kronecker_direction(g, curvature[k]) if k in curvature else g
                params[k] = (params[k] - ALPHA * step).detach().requires_grad_()
        total += float(loss_fn(functional_call(backbone, params, (xq,)), yq))
    return total / batch.num_tasks


# --------------------------------------------------------------------------- the transform
def test_a_conv_gradient_is_transformed_by_the_kronecker_product_of_its_three_factors():
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    factors = {
        "out": torch.randn(4, 4, generator=g, dtype=torch.float64),
        "in": torch.randn(3, 3, generator=g, dtype=torch.float64),
        "filter": torch.randn(9, 9, generator=g, dtype=torch.float64),
    }
    torch.testing.assert_close(transform(grad, factors), kronecker_direction(grad, factors))


def test_a_linear_weight_gradient_is_m_o_g_m_i_transposed_and_a_bias_elementwise_or_c_by_c():
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(5, 7, generator=g, dtype=torch.float64)
    m_o = torch.randn(5, 5, generator=g, dtype=torch.float64)
    m_i = torch.randn(7, 7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(transform(grad, {"out": m_o, "in": m_i}), m_o @ grad @ m_i.T)
    bias, scales = torch.randn(5, generator=g), torch.randn(5, generator=g)
    torch.testing.assert_close(transform(bias, {"out": scales}), scales * bias)
    torch.testing.assert_close(transform(bias.double(), {"out": m_o}), m_o @ bias.double())


@pytest.mark.parametrize(
    "vector_curvature, bias_factor", [("elementwise", (5,)), ("matrix", (5, 5)), ("none", None)]
)
def test_every_adapted_parameter_gets_identity_factors_of_its_modes(vector_curvature, bias_factor):
    algo = metacurvature(vector_curvature=vector_curvature)
    conv = torch.nn.Conv2d(3, 5, 3)
    factors = algo.own_meta_parameters(conv, dict(conv.named_parameters()))["curvature"]
    weight = dict(factors["weight"].named_parameters())
    assert {k: tuple(t.shape) for k, t in weight.items()} == {
        "out": (5, 5), "in": (3, 3), "filter": (9, 9)
    }  # fmt: skip
    assert all(torch.equal(t, torch.eye(len(t))) for t in weight.values())
    if bias_factor is None:
        assert "bias" not in factors
    else:
        assert tuple(factors["bias"]["out"].shape) == bias_factor
        assert torch.equal(transform(torch.arange(5.0), dict(factors["bias"])), torch.arange(5.0))


def test_an_unknown_vector_curvature_is_refused_in_one_line():
    with pytest.raises(MamlrunError, match="vector_curvature must be one of elementwise"):
        metacurvature(vector_curvature="diagonal")


# --------------------------------------------------------------------------- meta-gradients
@pytest.mark.parametrize("batching", ["loop", "threads", "vmap"])
def test_at_the_identity_the_backbones_meta_gradient_is_mamls(batching):
    """Identity curvature is MAML, to the bit; the curvature has a gradient of its own."""
    mc, plain = metacurvature(), maml(inner_lr=ALPHA, inner_steps=2)
    model, reference = tiny_conv4(mc), tiny_conv4(plain)
    batch = image_batch(tasks=2)
    meta_gradient(mc, model, batch, "classification", batching)
    meta_gradient(plain, reference, batch, "classification", batching)
    for (name, p), q in zip(model.backbone.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name  # bit for bit: I·g adds exact zeros
    learned = [p.grad for p in model.extras["curvature"].parameters()]
    assert all(g is not None for g in learned) and max(g.abs().max() for g in learned) > 1e-6


@pytest.mark.parametrize("batching", ["loop", "recomputed", VMAP_IN_FULL_SUITE])
def test_mlp_meta_gradient_of_backbone_and_curvature_matches_finite_differences(batching):
    algo = metacurvature(checkpoint_inner=batching == "recomputed")
    model, batch = curved(tiny_mlp(algo)), sinusoid_batch()
    mode = "loop" if batching == "recomputed" else batching
    exact = engine_gradient(algo, model, batch, "regression", mode)
    tensors = list(model.parameters())
    picks, numeric = finite_differences(lambda: by_hand(model, batch, F.mse_loss), tensors)
    assert relative_error(pick(exact, tensors, picks), numeric) < 1e-6
    curvature = set(model.extras["curvature"].parameters())
    on_curvature = [k for k, (i, _) in enumerate(picks) if tensors[i] in curvature]
    assert numeric[on_curvature].abs().max() > 1e-4, "the curvature's gradient is checked too"


@pytest.mark.slow
@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_conv4_meta_gradient_of_backbone_and_curvature_matches_finite_differences(batching):
    algo = metacurvature(vector_curvature="matrix")
    model, batch = curved(tiny_conv4(algo), scale=0.2), image_batch(tasks=2)
    exact = engine_gradient(algo, model, batch, "classification", batching)
    tensors = list(model.parameters())
    picks, numeric = finite_differences(
        lambda: by_hand(model, batch, F.cross_entropy), tensors, every=17
    )
    assert relative_error(pick(exact, tensors, picks), numeric) < 1e-6


# --------------------------------------------------------------------------- the backbones
def test_resnet12_gets_a_curvature_per_convolution_and_trains():
    algo = metacurvature(inner_steps=1)
    backbone = resnet12(
        (3, 16, 16), 3, **config.settings("backbone", "resnet12", widths=[2, 3, 4, 5])
    )
    model = algo.meta_model(backbone.double())
    factors = factors_of(model)
    assert {k: tuple(t.shape) for k, t in factors["blocks.1.conv2.weight"].items()} == {
        "out": (3, 3), "in": (3, 3), "filter": (9, 9)
    }  # fmt: skip
    g = torch.Generator().manual_seed(0)
    images = lambda n: torch.rand(2, n, 3, 16, 16, generator=g, dtype=torch.float64)  # noqa: E731
    labels = torch.arange(3).repeat_interleave(2).expand(2, -1)
    batch = TaskBatch(images(6), labels, images(6), labels)
    meta_gradient(algo, model, batch, "classification", "loop")
    assert all(p.grad is not None for p in model.extras["curvature"].parameters())


# --------------------------------------------------------------------------- the runner
@pytest.mark.slow
def test_the_learned_curvature_is_saved_and_a_resumed_run_ends_where_an_unbroken_one_ends(
    tmp_path,
):
    overrides = ["debug=smoke", "meta_optimizer=metacurvature", "final_test=false",
                 "final_adapt=false", "val_every=5", "checkpoint_every=5"]  # fmt: skip
    commands.train(compose_train(*overrides, "iterations=10"), run_dir=tmp_path / "whole")
    commands.train(compose_train(*overrides, "iterations=5"), run_dir=tmp_path / "halves")
    commands.train(
        compose_train(*overrides, "iterations=10", "resume=true"), run_dir=tmp_path / "halves"
    )
    whole, halves = (
        checkpoint.load(tmp_path / run / "checkpoints" / "last.pt")["model"]
        for run in ("whole", "halves")
    )
    assert {"extras.curvature.2:weight.out", "extras.curvature.2:weight.in",
            "extras.curvature.2:bias.out"} <= whole.keys()  # fmt: skip
    moved = whole["extras.curvature.2:weight.in"]
    assert not torch.equal(moved, torch.eye(len(moved))), "meta-learned, not left at the identity"
    assert whole.keys() == halves.keys()
    for name, tensor in whole.items():
        assert torch.equal(tensor, halves[name]), name

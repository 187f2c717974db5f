"""CAVIA: only a context vector adapts in the inner loop, from zero for every task; the network
and the map that brings the context into it are learned in the outer loop.

Its meta-gradient is held against central differences of a hand-written CAVIA in float64: on
the MLP the context is concatenated to the input (an explicit ``torch.cat``), on conv4 it is
FiLM after the third batch norm (written layer by layer), neither through the hook the
implementation uses, per task and under vmap.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_train, image_batch, meta_gradient
from test_variants import (
    engine_gradient,
    finite_differences,
    pick,
    relative_error,
    sinusoid_batch,
)
from torch.func import functional_call

from mamlrun import config
from mamlrun.algorithms.functional import autograd_grad
from mamlrun.errors import MamlrunError
from mamlrun.models.conv4 import conv4
from mamlrun.models.layers import TaskBatchNorm2d
from mamlrun.models.mlp import mlp
from mamlrun.models.resnet12 import resnet12
from mamlrun.results import checkpoint
from mamlrun.training import commands

ALPHA = 0.3
CONTEXT = 3


def cavia(**settings):
    return config.algorithm(
        "cavia", inner_lr=ALPHA, inner_steps=2, context_size=CONTEXT, **settings
    )


def mlp_backbone():
    torch.manual_seed(0)
    return mlp((1,), 1, **config.settings("backbone", "mlp", hidden=(4, 3))).double()


def conv4_backbone():
    torch.manual_seed(1)
    return conv4((1, 8, 8), 3, **config.settings("backbone", "conv4", filters=3)).double()


def randomized(model):
    """The FiLM map away from its identity start, so that its gradient is not a special case."""
    with torch.no_grad():
        model.modulation.bias.add_(0.1 * torch.randn_like(model.modulation.bias))
    return model


# --------------------------------------------------------------------------- by hand
def mlp_by_hand(params, phi, x):
    """The paper's regression network: [x, φ] → 4 → 3 → 1, the first layer's weight being
    [W_x, W_φ] (the backbone's weight and the context's)."""
    first = torch.cat([params["backbone.0.weight"], params["modulation.weight"]], dim=1)
    h = torch.cat([x, phi.expand(x.shape[0], -1)], dim=1)
    h = F.relu(F.linear(h, first, params["backbone.0.bias"]))
    h = F.relu(F.linear(h, params["backbone.2.weight"], params["backbone.2.bias"]))
    return F.linear(h, params["backbone.4.weight"], params["backbone.4.bias"])


def conv4_by_hand(plain, film_after: int):
    """conv4 run layer by layer, FiLM ``h·γ + β`` (``[γ, β] = W·φ + b``) applied to the output
    of the layer at index ``film_after`` of the plain (unhooked) backbone ``plain``."""

    def forward(params, phi, x):
        for i, layer in enumerate(plain):
            local = {k.split(".", 2)[2]: t for k, t in params.items()
                     if k.startswith(f"backbone.{i}.")}  # fmt: skip
            x = functional_call(layer, local, (x,))
            if i == film_after:
                film = F.linear(phi, params["modulation.weight"], params["modulation.bias"])
                gamma, beta = film.chunk(2)
                x = x * gamma[:, None, None] + beta[:, None, None]
        return x

    return forward


def cavia_by_hand(forward, theta, batch, loss, *, steps: int) -> float:
    """mean_i L_query(f(θ, φ_S)), φ_0 = 0, φ_{s+1} = φ_s − α ∇_φ L_support(f(θ, φ_s)); the
    stored context in ``theta`` is never read. Values only: finite differences differentiate it."""
    total = 0.0
    for xs, ys, xq, yq in zip(*batch, strict=True):
        phi = torch.zeros(CONTEXT, dtype=torch.float64, requires_grad=True)
        for _ in range(steps):
            with torch.enable_grad():
                (g,) = torch.autograd.grad(loss(forward(theta, phi, xs), ys), [phi])
            phi = (phi - ALPHA * g).detach().requires_grad_()
        total += float(loss(forward(theta, phi, xq), yq))
    return total / batch.num_tasks


# --------------------------------------------------------------------------- the algorithm
def test_cavia_is_maml_with_the_context_adapted_and_its_own_two_settings():
    maml, own = (
        config.settings("meta_optimizer", "maml"),
        config.settings("meta_optimizer", "cavia"),
    )
    assert own.pop("adapt_params") == ["context"]
    assert own.pop("context_size") == 100 and own.pop("context_layer") == 3
    assert own.pop("inner_lr") == 1.0
    maml.pop("adapt_params"), maml.pop("inner_lr")
    assert own == maml


def test_the_inner_loop_moves_only_the_context_and_starts_it_at_zero():
    algo = cavia()
    model = algo.meta_model(mlp_backbone())
    inner = algo.adaptation(model, "regression", 2, autograd_grad(create_graph=False))
    batch = sinusoid_batch()
    trajectory, _ = inner(algo.meta_tensors(model), batch.x_support[0], batch.y_support[0])
    assert [set(p) for p in trajectory] == [{"context"}] * 3
    assert torch.equal(trajectory[0]["context"], torch.zeros(CONTEXT, dtype=torch.float64))
    assert trajectory[2]["context"].abs().max() > 1e-3


def test_every_task_starts_from_a_zero_context_whatever_the_model_holds():
    algo = cavia().bind("regression", "loop")
    model, batch = algo.meta_model(mlp_backbone()), sinusoid_batch()
    before = algo.evaluate(model, batch, 2)
    with torch.no_grad():
        model.context.fill_(5.0)  # a checkpoint written by something else, say
    assert torch.equal(algo.meta_tensors(model)["theta"]["context"], torch.zeros(CONTEXT).double())
    after = algo.evaluate(model, batch, 2)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_training_learns_the_network_and_never_the_stored_context():
    algo = cavia()
    model, batch = algo.meta_model(conv4_backbone()), image_batch(tasks=2)
    network = {n: p.detach().clone() for n, p in model.named_parameters() if n != "context"}
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        meta_gradient(algo, model, batch, "classification", "loop")
        optimizer.step()
    assert model.context.grad is None and torch.equal(model.context, torch.zeros(CONTEXT).double())
    moved = {
        n for n, p in model.named_parameters() if n != "context" and not torch.equal(p, network[n])
    }
    assert moved == set(network), "every network tensor and the FiLM map are meta-learned"


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_mlp_meta_gradient_matches_the_context_concatenated_to_the_input(batching):
    algo = cavia()
    model, batch = algo.meta_model(mlp_backbone()), sinusoid_batch()
    exact = engine_gradient(algo, model, batch, "regression", batching)
    theta = dict(model.named_parameters())
    tensors = list(theta.values())
    picks, numeric = finite_differences(
        lambda: cavia_by_hand(mlp_by_hand, theta, batch, F.mse_loss, steps=2), tensors
    )
    assert relative_error(pick(exact, tensors, picks), numeric) < 1e-6
    assert model.modulation.weight.grad.abs().max() > 1e-4, "the context's weight is learned"


@pytest.mark.parametrize("batching", ["loop", pytest.param("vmap", marks=pytest.mark.slow)])
def test_conv4_meta_gradient_matches_film_after_the_third_batch_norm(batching):
    algo = cavia()
    model, batch = randomized(algo.meta_model(conv4_backbone())), image_batch(tasks=2)
    exact = engine_gradient(algo, model, batch, "classification", batching)
    theta = dict(model.named_parameters())
    tensors = list(theta.values())
    plain = conv4_backbone()
    third = [i for i, m in enumerate(plain) if isinstance(m, TaskBatchNorm2d)][2]
    forward = conv4_by_hand(plain, film_after=third)
    picks, numeric = finite_differences(
        lambda: cavia_by_hand(forward, theta, batch, F.cross_entropy, steps=2), tensors, every=9
    )
    assert relative_error(pick(exact, tensors, picks), numeric) < 1e-6


def test_first_order_keeps_the_query_gradient_at_the_adapted_context():
    """FO-CAVIA: the network's gradient is the query loss's at the adapted φ, held fixed."""
    algo = cavia(first_order=True)
    model, batch = algo.meta_model(mlp_backbone()), sinusoid_batch(tasks=1)
    exact = engine_gradient(algo, model, batch, "regression", "loop")
    inner = algo.adaptation(model, "regression", 2, autograd_grad(create_graph=False))
    xs, ys, xq, yq = (t[0] for t in batch)
    phi = inner(algo.meta_tensors(model), xs, ys)[0][-1]["context"].detach()
    theta = dict(model.named_parameters())
    loss = F.mse_loss(mlp_by_hand(theta, phi, xq), yq)
    expected = torch.autograd.grad(loss, list(theta.values())[1:])
    assert torch.allclose(exact[CONTEXT:], torch.cat([g.flatten() for g in expected]))


def test_threads_give_the_loops_meta_gradient():
    algo = cavia()
    model, batch = algo.meta_model(conv4_backbone()), image_batch(tasks=3)
    looped = engine_gradient(algo, model, batch, "classification", "loop")
    threaded = engine_gradient(algo, model, batch, "classification", "threads")
    assert torch.allclose(looped, threaded, rtol=1e-10, atol=1e-12)


def test_with_a_zero_context_the_network_is_the_backbone():
    """The MLP's context weight meets a zero context whatever it has learned; conv4's FiLM map
    starts at the identity (γ = 1, β = 0), so an untrained model is its backbone."""
    for backbone, x in [(mlp_backbone(), torch.randn(7, 1).double()),
                        (conv4_backbone(), torch.rand(6, 1, 8, 8).double())]:  # fmt: skip
        plain = copy.deepcopy(backbone)
        model = cavia().meta_model(backbone)
        with torch.no_grad():
            if not isinstance(backbone[1], TaskBatchNorm2d):
                model.modulation.weight.normal_()
        assert torch.equal(model(x), plain(x))


def test_resnet12_takes_film_at_the_batch_norm_context_layer_names():
    torch.manual_seed(0)
    backbone = resnet12(
        (3, 16, 16), 2, **config.settings("backbone", "resnet12", widths=[2, 3, 2, 2])
    )
    model = cavia(context_layer=11).meta_model(backbone)
    hooked = [n for n, m in backbone.named_modules() if m._forward_hooks]
    assert hooked == ["blocks.2.bn3"]  # block 3's last main-path batch norm
    assert model.modulation.out_features == 2 * 2


@pytest.mark.parametrize(
    ("settings", "backbone", "says"),
    [
        ({"adapt_params": "all"}, mlp_backbone, "CAVIA adapts only its context"),
        ({"context_size": 0}, mlp_backbone, "context_size and context_layer must be >= 1"),
        ({"context_layer": 5}, conv4_backbone, "context_layer=5, but the backbone has 4"),
    ],
)
def test_settings_cavia_cannot_run_are_one_line(settings, backbone, says):
    with pytest.raises(MamlrunError) as error:
        config.algorithm("cavia", **settings).meta_model(backbone())
    assert says in str(error.value) and "\n" not in str(error.value)


def test_a_backbone_with_no_place_for_the_context_is_one_line():
    with pytest.raises(MamlrunError, match="batch-norm layers .for FiLM. or a linear layer"):
        cavia().meta_model(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)).double())


# --------------------------------------------------------------------------- the commands
TRAIN = ("meta_optimizer=cavia", "meta_optimizer.context_size=5", "iterations=6",
         "meta_batch_size=2", "val_every=3", "val_tasks=4", "checkpoint_every=3", "log_every=3",
         "device=cpu", "meta_optimizer.task_batching=loop", "seed=3")  # fmt: skip


@pytest.mark.slow
def test_a_resumed_cavia_run_ends_bit_for_bit_where_an_unbroken_one_does(tmp_path):
    commands.train(compose_train(*TRAIN), run_dir=tmp_path / "unbroken")
    commands.train(compose_train(*TRAIN[:2], "iterations=3", *TRAIN[3:]), run_dir=tmp_path / "r")
    commands.train(compose_train(*TRAIN, "resume=true"), run_dir=tmp_path / "r")
    unbroken, resumed = (checkpoint.load(tmp_path / d / "checkpoints" / "last.pt")["model"]
                         for d in ("unbroken", "r"))  # fmt: skip
    assert unbroken.keys() == resumed.keys() and "context" in unbroken
    assert all(torch.equal(unbroken[k], resumed[k]) for k in unbroken)


@pytest.mark.slow
def test_a_smoke_run_trains_tests_and_adapts_with_cavia(cli_here, tmp_path):
    out = cli_here("train", "debug=smoke", "meta_optimizer=cavia", "hydra.run.dir=run")
    assert out.returncode == 0, out.stderr
    tasks = ("checkpoint=run", "test_tasks=4", "eval_batch_size=4")
    out = cli_here("test", *tasks, "hydra.run.dir=test")
    assert out.returncode == 0, out.stderr
    out = cli_here("adapt", *tasks, "inner_steps=2", "baseline.steps=1", "hydra.run.dir=adapt")
    assert out.returncode == 0, out.stderr
    adapted = json.loads((tmp_path / "adapt" / "results.json").read_text())
    assert adapted["steps"] == [0, 1, 2]

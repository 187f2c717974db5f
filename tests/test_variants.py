"""The MAML family (ANIL, Meta-SGD, MAML++, Reptile) computes what the papers define.

Each variant's meta-gradient is checked against an independent computation: the objective
written out by hand with plain autograd and differentiated by finite differences, or the
update written out by hand. Small float64 models keep every check exact and fast.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    compose_train,
    data_root,
    image_batch,
    maml,
    meta_gradient,
    needs_omniglot,
    reptile,
)
from torch.func import functional_call

from mamlrun import config
from mamlrun.algorithms.batching import choose
from mamlrun.algorithms.functional import autograd_grad
from mamlrun.algorithms.meta_parameters import split
from mamlrun.algorithms.schedules import msl_weights
from mamlrun.data.sinusoid import SinusoidTasks
from mamlrun.data.tasks import TaskBatch
from mamlrun.errors import MamlrunError
from mamlrun.models.conv4 import conv4
from mamlrun.models.mlp import mlp
from mamlrun.results import checkpoint
from mamlrun.training import commands

ALPHA = 0.05


# --------------------------------------------------------------------------- helpers
def sinusoid_batch(tasks=3, shots=5, query=6) -> TaskBatch:
    batch = SinusoidTasks(
        **config.settings("dataset", "sinusoid", shots=shots, query=query)
    ).sample("train", tasks, torch.Generator().manual_seed(1))
    return TaskBatch(*(t.double() for t in batch))


def tiny_mlp(algo):
    torch.manual_seed(0)
    return algo.meta_model(
        mlp((1,), 1, **config.settings("backbone", "mlp", hidden=(4, 3))).double()
    )


def tiny_conv4(algo):
    torch.manual_seed(1)
    return algo.meta_model(
        conv4((1, 8, 8), 3, **config.settings("backbone", "conv4", filters=3)).double()
    )


def randomize(module: torch.nn.Module, low: float, high: float) -> None:
    """Give learned rates / per-step weights distinct values, so that indexing errors show."""
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(low, high)


def engine_gradient(algo, model, batch, task_type, batching, step=None) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    meta_gradient(algo, model, batch, task_type, batching, step=step)
    # First order leaves no gradient on what only the support gradient depends on (the
    # backbone's batch-norm weights when per-step ones take over after step 0).
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]
    return torch.cat([g.flatten() for g in grads])


def finite_differences(objective, tensors, eps=1e-6, every=1) -> tuple[list, torch.Tensor]:
    """Central differences of ``objective()`` in every ``every``-th entry of ``tensors``."""
    picks, numeric = [], []
    with torch.no_grad():
        for i, t in enumerate(tensors):
            for j in range(0, t.numel(), every):
                flat = t.view(-1)
                flat[j] += eps
                up = objective()
                flat[j] -= 2 * eps
                down = objective()
                flat[j] += eps
                picks.append((i, j))
                numeric.append((up - down) / (2 * eps))
    return picks, torch.tensor(numeric, dtype=torch.float64)


def pick(gradient: torch.Tensor, tensors, picks) -> torch.Tensor:
    offsets = [0]
    for t in tensors:
        offsets.append(offsets[-1] + t.numel())
    return torch.stack([gradient[offsets[i] + j] for i, j in picks])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def by_hand(backbone, theta, batch, *, steps, lr, adapted, weights) -> float:
    """mean_i Σ_s w_s · L_query(θ after s inner SGD steps on support_i), with plain autograd.

    ``lr(name, s)`` is the rate of parameter ``name`` at step ``s`` (scalar or tensor);
    parameters not in ``adapted`` stay at θ. Values only: finite differences differentiate it.
    """
    total = 0.0
    for xs, ys, xq, yq in zip(*batch, strict=True):
        params = {k: t.detach().clone().requires_grad_() for k, t in theta.items()}
        for s in range(steps):
            with torch.enable_grad():
                out = functional_call(backbone, params, (xs,))
                names = [k for k in params if k in adapted]
                grads = torch.autograd.grad(F.mse_loss(out, ys), [params[k] for k in names])
            for k, g in zip(names, grads, strict=True):
                params[k] = (params[k] - lr(k, s) * g).detach().requires_grad_()
            query = F.mse_loss(functional_call(backbone, params, (xq,)), yq)
            total += weights[s] * float(query)
    return total / batch.num_tasks


# --------------------------------------------------------------------------- ANIL
#: Finite differences of the per-task path; the batched paths are held to it for every variant
#: by test_per_task_threaded_and_batched_paths_agree, so differencing vmap too is for the full
#: suite only.
VMAP_IN_FULL_SUITE = pytest.param("vmap", marks=pytest.mark.slow)


def test_anil_adapts_only_the_head_in_the_inner_loop():
    algo = maml(inner_lr=ALPHA, inner_steps=2, adapt_params="head")
    model = tiny_mlp(algo)
    inner = algo.adaptation(model, "regression", 2, autograd_grad(create_graph=False))
    meta = algo.meta_tensors(model)
    batch = sinusoid_batch()
    trajectory, _ = inner(meta, batch.x_support[0], batch.y_support[0])
    assert [set(p) for p in trajectory] == [{"4.weight", "4.bias"}] * 3
    assert not torch.equal(trajectory[2]["4.weight"], model[4].weight)


@pytest.mark.parametrize("batching", ["loop", VMAP_IN_FULL_SUITE])
def test_anil_meta_gradient_matches_finite_differences_and_reaches_the_body(batching):
    algo = maml(inner_lr=ALPHA, inner_steps=2, adapt_params="head")
    model, batch = tiny_mlp(algo), sinusoid_batch()
    exact = engine_gradient(algo, model, batch, "regression", batching)
    theta = dict(model.named_parameters())
    tensors = list(theta.values())
    picks, numeric = finite_differences(
        lambda: by_hand(
            model,
            theta,
            batch,
            steps=2,
            lr=lambda k, s: ALPHA,
            adapted={"4.weight", "4.bias"},
            weights=[0, 1],
        ),
        tensors,
    )
    assert relative_error(pick(exact, tensors, picks), numeric) < 1e-6
    body = torch.cat([model[i].weight.grad.flatten() for i in (0, 2)])
    assert body.abs().max() > 1e-4, "the body is meta-learned through the adapted head"


def test_adapt_params_that_select_nothing_are_an_error():
    with pytest.raises(MamlrunError, match="selects no parameter"):
        tiny_mlp(maml(adapt_params=["body."]))


# --------------------------------------------------------------------------- Meta-SGD
@pytest.mark.parametrize("batching", ["loop", VMAP_IN_FULL_SUITE])
def test_meta_sgd_gradient_for_weights_and_rates_matches_finite_differences(batching):
    algo = maml(inner_lr=ALPHA, inner_steps=1, learned_inner_lr="per_element")
    model, batch = tiny_mlp(algo), sinusoid_batch()
    backbone, extras = split(model)
    randomize(extras["inner_lr"], 0.02, 0.1)
    exact = engine_gradient(algo, model, batch, "regression", batching)

    theta = dict(backbone.named_parameters())
    rates = {k.replace(":", "."): v for k, v in extras["inner_lr"].items()}
    tensors = list(model.parameters())  # backbone's, then the rates: the order of `exact`
    assert len(tensors) == 2 * len(theta)
    picks, numeric = finite_differences(
        lambda: by_hand(
            backbone,
            theta,
            batch,
            steps=1,
            lr=lambda k, s: rates[k],
            adapted=set(theta),
            weights=[1],
        ),
        tensors,
    )
    assert relative_error(pick(exact, tensors, picks), numeric) < 1e-6
    rate_grads = torch.cat([p.grad.flatten() for p in extras["inner_lr"].parameters()])
    assert (rate_grads != 0).float().mean() > 0.5, "the inner rates are meta-learned"


def test_meta_sgd_rates_are_meta_parameters_of_the_model():
    algo = maml(inner_lr=0.03, learned_inner_lr="per_element")
    model = tiny_mlp(algo)
    backbone, _ = split(model)
    rates = {k: v for k, v in model.state_dict().items() if k.startswith("extras.inner_lr.")}
    assert len(rates) == len(list(backbone.parameters()))
    assert all(torch.all(v == 0.03) for v in rates.values()), "rates start at inner_lr"
    assert rates["extras.inner_lr.0:weight"].shape == backbone[0].weight.shape


# --------------------------------------------------------------------------- MAML++
def test_msl_weights_are_maml_plus_plus_importance_vector():
    """The original's function, written out with its epoch counter (500 iterations each)."""

    def original(epoch: int, steps: int = 5, msl_epochs: int = 10) -> list[float]:
        weights = [1.0 / steps] * steps
        decay_rate = 1.0 / steps / msl_epochs
        floor = 0.03 / steps
        for i in range(steps - 1):
            weights[i] = max(weights[i] - epoch * decay_rate, floor)
        weights[-1] = min(weights[-1] + epoch * (steps - 1) * decay_rate, 1.0 - (steps - 1) * floor)
        return weights

    for epoch in range(10):
        ours = msl_weights(epoch * 500, 5, 5000)
        assert ours == pytest.approx(original(epoch), abs=1e-12), epoch
        assert sum(ours) == pytest.approx(1.0)
    assert msl_weights(5000, 5, 5000) == [0, 0, 0, 0, 1], "after annealing: the last step only"
    assert msl_weights(None, 3, 100) == [0, 0, 1]


@pytest.mark.parametrize("batching", ["loop", VMAP_IN_FULL_SUITE])
def test_multi_step_loss_matches_finite_differences_of_the_weighted_query_losses(batching):
    algo = maml(inner_lr=ALPHA, inner_steps=3, multi_step_loss=True, msl_iterations=100)
    model, batch = tiny_mlp(algo), sinusoid_batch()
    weights = msl_weights(40, 3, 100)
    assert len(set(weights)) == 2 and weights[-1] > 0.5, "mid-annealing, not uniform"
    exact = engine_gradient(algo, model, batch, "regression", batching, step=40)
    theta = dict(model.named_parameters())
    tensors = list(theta.values())
    picks, numeric = finite_differences(
        lambda: by_hand(
            model, theta, batch, steps=3, lr=lambda k, s: ALPHA, adapted=set(theta), weights=weights
        ),
        tensors,
    )
    assert relative_error(pick(exact, tensors, picks), numeric) < 1e-6


def test_multi_step_loss_with_all_weight_on_the_last_step_is_plain_maml():
    batch = sinusoid_batch()
    msl = maml(inner_lr=ALPHA, inner_steps=3, multi_step_loss=True, msl_iterations=10)
    plain = maml(inner_lr=ALPHA, inner_steps=3)
    assert msl_weights(10, 3, 10) == [0, 0, 1]
    a = engine_gradient(msl, tiny_mlp(msl), batch, "regression", "loop", step=10)
    b = engine_gradient(plain, tiny_mlp(plain), batch, "regression", "loop", step=10)
    assert torch.equal(a, b)


def test_derivative_order_annealing_switches_to_second_order_at_the_configured_step():
    batch = sinusoid_batch()
    da = maml(inner_lr=ALPHA, inner_steps=2, first_order_until=5)
    first = maml(inner_lr=ALPHA, inner_steps=2, first_order=True)
    second = maml(inner_lr=ALPHA, inner_steps=2)

    def grad(algo, step):
        return engine_gradient(algo, tiny_mlp(algo), batch, "regression", "loop", step=step)

    assert torch.equal(grad(da, 0), grad(first, 0))
    assert torch.equal(grad(da, 4), grad(first, 4))
    assert torch.equal(grad(da, 5), grad(second, 5))
    assert not torch.allclose(grad(first, 5), grad(second, 5))


def test_per_layer_per_step_rates_match_finite_differences():
    algo = maml(inner_lr=ALPHA, inner_steps=2, learned_inner_lr="per_layer_per_step")
    model, batch = tiny_mlp(algo), sinusoid_batch()
    backbone, extras = split(model)
    randomize(extras["inner_lr"], 0.02, 0.1)
    rates = {k.replace(":", "."): v for k, v in extras["inner_lr"].items()}
    assert all(r.shape == (2,) for r in rates.values()), "one rate per tensor and step"
    exact = engine_gradient(algo, model, batch, "regression", "loop")
    theta = dict(backbone.named_parameters())
    tensors = list(model.parameters())
    picks, numeric = finite_differences(
        lambda: by_hand(
            backbone,
            theta,
            batch,
            steps=2,
            lr=lambda k, s: rates[k][s],
            adapted=set(theta),
            weights=[0, 1],
        ),
        tensors,
    )
    assert relative_error(pick(exact, tensors, picks), numeric) < 1e-6


def test_per_step_batch_norm_weights_replace_the_backbones_from_step_one():
    algo = maml(inner_lr=0.3, inner_steps=2, per_step_bn_weights=True)
    model = tiny_conv4(algo)
    backbone, extras = split(model)
    randomize(extras["bn_weights"], 0.5, 1.5)
    bn = {k.replace(":", "."): v for k, v in extras["bn_weights"].items()}
    assert set(bn) == {f"{i}.{p}" for i in (1, 4, 7, 10) for p in ("weight", "bias")}
    assert all(v.shape == (2, 3) for v in bn.values())

    batch = image_batch()
    meta = algo.meta_tensors(model)
    inner = algo.adaptation(model, "classification", 2, autograd_grad(create_graph=False))
    trajectory, forwards = inner(meta, batch.x_support[0], batch.y_support[0])
    assert not any(k in bn for k in trajectory[-1]), "batch-norm weights are not adapted"
    theta = dict(backbone.named_parameters())
    x = batch.x_query[0]
    for s in range(3):
        by_hand = {**theta, **trajectory[s]}
        if s > 0:
            by_hand |= {k: v[s - 1] for k, v in bn.items()}
        expected = functional_call(backbone, by_hand, (x,))
        assert torch.allclose(forwards[s](trajectory[s], x), expected, atol=1e-12), s


@pytest.mark.slow  # every MAML++ flag at once: the heaviest difference check here
@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_maml_plus_plus_meta_gradient_matches_finite_differences(batching):
    """LSLR, per-step batch-norm weights and multi-step loss together, through conv4."""
    algo = maml(
        inner_lr=0.3,
        inner_steps=2,
        learned_inner_lr="per_layer_per_step",
        per_step_bn_weights=True,
        multi_step_loss=True,
        msl_iterations=10,
    )
    model, batch = tiny_conv4(algo), image_batch()
    _, extras = split(model)
    randomize(extras["bn_weights"], 0.5, 1.5)
    randomize(extras["inner_lr"], 0.1, 0.5)
    step = 3
    exact = engine_gradient(algo, model, batch, "classification", batching, step=step)
    weights = torch.tensor(msl_weights(step, 2, 10), dtype=torch.float64)

    def objective() -> float:  # evaluation reports the same query losses, per step
        losses, _ = algo.bind("classification", "loop").evaluate(model, batch, 2)
        return float((losses[:, 1:] @ weights).mean())

    tensors = list(model.parameters())
    picks, numeric = finite_differences(objective, tensors, every=5)
    assert relative_error(pick(exact, tensors, picks), numeric) < 1e-5


def test_per_step_running_statistics_are_collected_in_training():
    algo = maml(inner_lr=0.3, inner_steps=1, bn_mode="per_step")
    model, batch = tiny_conv4(algo), image_batch(tasks=3)
    backbone, extras = split(model)
    stats = extras["bn_stats"]
    assert stats.get_buffer("1:running_mean").shape == (2, 3), "one row per inner step 0…S"
    meta_gradient(algo, model, batch, "classification", "loop")

    # Step 0 of each task is the support set through θ: fold its conv-0 statistics in turn.
    mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for xs in batch.x_support:
        h = F.conv2d(xs, backbone[0].weight, backbone[0].bias, stride=2, padding=1)
        mean = 0.9 * mean + 0.1 * h.mean((0, 2, 3))
        var = 0.9 * var + 0.1 * h.transpose(0, 1).flatten(1).var(1, unbiased=True)
    assert torch.allclose(stats.get_buffer("1:running_mean")[0], mean, atol=1e-12)
    assert torch.allclose(stats.get_buffer("1:running_var")[0], var, atol=1e-12)
    assert not torch.equal(stats.get_buffer("1:running_mean")[1], torch.zeros(3).double())


@pytest.mark.parametrize("bn_mode", ["transductive", "per_step"])
def test_evaluation_with_running_statistics_is_not_transductive(bn_mode):
    algo = maml(inner_lr=0.3, inner_steps=1, bn_mode=bn_mode)
    model, batch = tiny_conv4(algo), image_batch()
    if bn_mode == "per_step":
        meta_gradient(algo, model, batch, "classification", "loop")  # collect some statistics
    meta = algo.meta_tensors(model)
    inner = algo.adaptation(model, "classification", 1, autograd_grad(create_graph=False))
    model.eval()
    trajectory, forwards = inner(meta, batch.x_support[0], batch.y_support[0])
    x = batch.x_query[0]
    alone = forwards[1](trajectory[1], x[:2])
    together = forwards[1](trajectory[1], x)[:2]
    assert torch.allclose(alone, together, atol=1e-12) == (bn_mode == "per_step")


def test_running_statistics_cannot_be_batched_with_vmap():
    with pytest.raises(MamlrunError, match="vmap"):
        maml(bn_mode="per_step", task_batching="vmap")
    algo = maml(bn_mode="per_step")
    model = tiny_conv4(algo)
    with pytest.raises(MamlrunError, match="vmap"):
        meta_gradient(algo, model, image_batch(), "classification", "vmap")
    assert algo.batching_modes == ("loop",)
    assert choose(algo.batching_modes, lambda mode: None, torch.device("cpu")) == ("loop", {})


# --------------------------------------------------------------------------- Reptile
@pytest.mark.parametrize("inner_optimizer", ["sgd", "adam"])
def test_reptile_step_moves_theta_toward_the_mean_adapted_weights(inner_optimizer):
    """θ ← θ + ε (mean φ − θ), with φ from torch.optim on each task's support and query."""
    lr, steps, eps = 0.02, 3, 0.7
    algo = reptile(
        inner_lr=lr, inner_steps=steps, inner_optimizer=inner_optimizer, adam_betas=(0.0, 0.99)
    )
    model, batch = tiny_mlp(algo), sinusoid_batch()
    theta = {k: p.detach().clone() for k, p in model.named_parameters()}

    phis = []
    for xs, ys, xq, yq in zip(*batch, strict=True):
        copy = mlp((1,), 1, **config.settings("backbone", "mlp", hidden=(4, 3))).double()
        copy.load_state_dict(theta)
        inner = (
            torch.optim.SGD(copy.parameters(), lr=lr)
            if inner_optimizer == "sgd"
            else torch.optim.Adam(copy.parameters(), lr=lr, betas=(0.0, 0.99), eps=1e-8)
        )
        x, y = torch.cat([xs, xq]), torch.cat([ys, yq])
        for _ in range(steps):
            inner.zero_grad()
            F.mse_loss(copy(x), y).backward()
            inner.step()
        phis.append(dict(copy.named_parameters()))

    outer = torch.optim.SGD(model.parameters(), lr=eps)
    outer.zero_grad()
    meta_gradient(algo, model, batch, "regression", "loop")
    outer.step()
    for k, p in model.named_parameters():
        mean_phi = torch.stack([phi[k].detach() for phi in phis]).mean(0)
        expected = theta[k] + eps * (mean_phi - theta[k])
        assert torch.allclose(p.detach(), expected, atol=1e-12), k


def test_reptile_evaluation_adapts_on_the_support_set_and_scores_the_query_set():
    """Checked against torch.optim on a copy: SGD on the support set, loss on the query set."""
    lr, steps = 0.05, 3
    algo = reptile(inner_lr=lr, inner_optimizer="sgd")
    model, batch = tiny_mlp(algo), sinusoid_batch()
    losses, _ = algo.bind("regression", "loop").evaluate(model, batch, steps)
    for i, (xs, ys, xq, yq) in enumerate(zip(*batch, strict=True)):
        copy = mlp((1,), 1, **config.settings("backbone", "mlp", hidden=(4, 3))).double()
        copy.load_state_dict(model.state_dict())
        sgd = torch.optim.SGD(copy.parameters(), lr=lr)
        for s in range(steps + 1):
            assert torch.allclose(losses[i, s], F.mse_loss(copy(xq), yq), atol=1e-12), (i, s)
            sgd.zero_grad()
            F.mse_loss(copy(xs), ys).backward()
            sgd.step()


# --------------------------------------------------------------------------- loop and vmap
VMAP_VARIANTS = {
    "maml": lambda: maml(inner_lr=0.3, inner_steps=2),
    "fomaml": lambda: maml(inner_lr=0.3, inner_steps=2, first_order=True),
    "anil": lambda: maml(inner_lr=0.3, inner_steps=2, adapt_params="head"),
    "boil": lambda: maml(inner_lr=0.3, inner_steps=2, adapt_params="body"),
    "metasgd": lambda: maml(inner_lr=0.3, inner_steps=2, learned_inner_lr="per_element"),
    "mamlpp_without_running_statistics": lambda: maml(
        inner_lr=0.3,
        inner_steps=2,
        learned_inner_lr="per_layer_per_step",
        multi_step_loss=True,
        msl_iterations=10,
        first_order_until=2,
        per_step_bn_weights=True,
    ),
    "reptile_adam": lambda: reptile(inner_lr=0.01, inner_steps=2),
    "reptile_sgd": lambda: reptile(inner_lr=0.3, inner_steps=2, inner_optimizer="sgd"),
}


def conv_biases_before_batch_norm(model: torch.nn.Module) -> torch.Tensor:
    """Where the conv biases sit in ``engine_gradient``'s vector. Batch norm follows every
    conv of conv4 and removes a per-channel shift, so their true gradient is exactly zero and
    what is computed is rounding noise, which differs with the order of the sums (per task or
    batched). Adam's step lr·g/(|g| + 1e-8) turns noise of 1e-16 into steps of ~1e-10
    (lr 0.01), so for Reptile with Adam those entries can only agree to about lr·1e-6."""
    biases = {id(m.bias) for m in model.modules() if isinstance(m, torch.nn.Conv2d)}
    mask = [torch.full((p.numel(),), id(p) in biases) for p in model.parameters()]
    return torch.cat(mask)


@pytest.mark.parametrize("variant", list(VMAP_VARIANTS))
@pytest.mark.parametrize("step", [pytest.param(1, marks=pytest.mark.slow), 5])
@pytest.mark.parametrize(
    "batching",  # the fast suite: vmap; threads and chunks in the full suite
    [
        pytest.param("threads", marks=pytest.mark.slow),
        "vmap",
        pytest.param("vmap:2", marks=pytest.mark.slow),
    ],
)
def test_per_task_threaded_and_batched_paths_agree(variant, step, batching):
    algo = VMAP_VARIANTS[variant]()
    model, batch = tiny_conv4(algo), image_batch(tasks=3)
    loop = engine_gradient(algo, model, batch, "classification", "loop", step=step)
    other = engine_gradient(algo, model, batch, "classification", batching, step=step)
    tolerance = torch.full_like(loop, 1e-10)
    if variant == "reptile_adam":
        tolerance[conv_biases_before_batch_norm(model)] = 1e-8
    assert ((loop - other).abs() < tolerance).all(), (loop - other).abs().max()
    curves_loop = algo.bind("classification", "loop").evaluate(model, batch, 3)
    curves_other = algo.bind("classification", batching).evaluate(model, batch, 3)
    for a, b in zip(curves_loop, curves_other, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


# --------------------------------------------------------------------------- the runner
META_OPTIMIZERS = sorted(p.stem for p in (config.config_dir() / "meta_optimizer").glob("*.yaml"))


@pytest.mark.parametrize("meta_optimizer", META_OPTIMIZERS)
def test_every_meta_optimizer_trains_tests_and_adapts(tmp_path, meta_optimizer):
    cfg = compose_train("debug=smoke", f"meta_optimizer={meta_optimizer}", "baseline.steps=2")
    commands.train(cfg, run_dir=tmp_path)
    mode = cfg.meta_optimizer.bn_mode
    assert json.loads((tmp_path / "results.json").read_text())["bn_mode"] == mode
    assert json.loads((tmp_path / "test" / "results.json").read_text())["bn_mode"] == mode
    adapted = json.loads((tmp_path / "adapt" / "results.json").read_text())
    steps = cfg.meta_optimizer.inner_steps_test
    assert adapted["metric"] == "mse" and adapted["steps"] == list(range(steps + 1))
    assert adapted["baseline"]["steps"] == adapted["steps"]
    assert all(math.isfinite(m) for m in adapted["mean"])
    assert adapted["mean"] != adapted["baseline"]["mean"], "two models, two curves"
    if meta_optimizer == "metasgd":
        saved = checkpoint.load(tmp_path / "checkpoints" / "last.pt")["model"]
        rates = [v for k, v in saved.items() if k.startswith("extras.inner_lr.")]
        assert len(rates) == len([k for k in saved if k.startswith("backbone.")])
        inner_lr = cfg.meta_optimizer.inner_lr
        assert any(not torch.all(r == inner_lr) for r in rates), "learned, and saved"


RESUME = {
    "sinusoid": [
        "meta_optimizer=mamlpp",
        "meta_optimizer.msl_iterations=5",  # MSL weights and the derivative order both change
        "meta_optimizer.first_order_until=4",  # across the interruption at step 3
        "meta_optimizer.task_batching=vmap",  # not auto: both runs must take the same path
    ],
    "omniglot": [
        "experiment=omniglot_5w1s_mamlpp",
        "backbone.filters=4",
        "meta_optimizer.msl_iterations=5",
        "meta_optimizer.first_order_until=4",
        "meta_optimizer.inner_steps=2",
        "meta_optimizer.inner_steps_test=2",
        "meta_optimizer.bn_mode=per_step",  # per-step statistics must survive the break too
    ],
}


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param(s, marks=[needs_omniglot, pytest.mark.slow] if s == "omniglot" else [])
        for s in RESUME
    ],
)
def test_resumed_maml_plus_plus_run_matches_an_unbroken_one_bit_for_bit(
    tmp_path, monkeypatch, setup
):
    monkeypatch.setenv("MAMLRUN_DATA", str(data_root()))
    common = [
        *RESUME[setup],
        "device=cpu",
        "meta_batch_size=2",
        "val_every=3",
        "val_tasks=2",
        "eval_batch_size=2",
        "checkpoint_every=3",
        "seed=5",
        "meta_optimizer.scheduler.T_max=6",  # the same schedule whatever `iterations` says
    ]
    commands.train(compose_train(*common, "iterations=6"), run_dir=tmp_path / "unbroken")
    commands.train(compose_train(*common, "iterations=3"), run_dir=tmp_path / "broken")
    commands.train(
        compose_train(*common, "iterations=6", "resume=true"), run_dir=tmp_path / "broken"
    )

    a = checkpoint.load(tmp_path / "unbroken" / "checkpoints" / "last.pt")
    b = checkpoint.load(tmp_path / "broken" / "checkpoints" / "last.pt")
    assert a["progress"] == b["progress"] and a["progress"]["step"] == 6
    assert a["model"].keys() == b["model"].keys()
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    if setup == "omniglot":
        assert any("bn_stats" in k for k in a["model"]), "running statistics are checkpointed"
    for key, state in a["optimizer"]["state"].items():
        for field in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[field], b["optimizer"]["state"][key][field])
    assert a["scheduler"] == b["scheduler"]
    lr = a["optimizer"]["param_groups"][0]["lr"]
    expected = 1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * 6 / 6)) / 2
    assert lr == pytest.approx(expected), "cosine-annealed to eta_min at the last iteration"


def test_body_selects_every_parameter_but_the_heads_on_any_backbone():
    from mamlrun.algorithms.selection import adapted_names
    from mamlrun.models.conv4 import conv4

    mlp = tiny_mlp(maml())
    assert adapted_names(mlp, "body") == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert adapted_names(mlp, "head") == ["4.weight", "4.bias"]
    net = conv4(
        in_shape=(1, 28, 28), out_features=5, filters=8, downsample="max_pool", head="flatten"
    )
    body, head = adapted_names(net, "body"), adapted_names(net, "head")
    assert set(body) | set(head) == {n for n, _ in net.named_parameters()}
    assert not set(body) & set(head) and len(head) == 2

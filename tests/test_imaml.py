"""iMAML: the meta-gradient of the proximally regularised inner problem, by implicit
differentiation (conjugate gradient on (I + H/λ)·v = g).

Held against the exact hypergradient of linear regression (closed form), against central
differences of θ ↦ L_query(φ*(θ)) in float64 on the MLP and conv4 (inner problem solved by
hand to convergence), and its conjugate gradient against a direct solve with the Hessian
written out. The inner loop keeps no graph, so the outer graph is the same for 1 step or 8.
"""

from __future__ import annotations

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
    tiny_conv4,
    tiny_mlp,
)
from torch.func import functional_call

from mamlrun import config
from mamlrun.algorithms import learner
from mamlrun.algorithms.imaml import conjugate_gradient, implicit_gradient
from mamlrun.data.tasks import TaskBatch
from mamlrun.errors import MamlrunError
from mamlrun.results import checkpoint
from mamlrun.training import commands


def imaml(**settings):
    return config.algorithm("imaml", **settings)


def test_imaml_is_the_shared_inner_loop_plus_its_own_three_settings():
    shared = set(config.settings("meta_optimizer", "reptile")) - {"optimizer", "scheduler"}
    own = set(config.settings("meta_optimizer", "imaml")) - shared - {"optimizer", "scheduler"}
    assert own == {"lam", "cg_steps", "cg_damping"}
    assert not hasattr(imaml(), "first_order") and not hasattr(imaml(), "learned_inner_lr")


# --------------------------------------------------------------------------- closed form
def regression_tasks(tasks=3, n=8, d=3) -> TaskBatch:
    g = torch.Generator().manual_seed(5)

    def data(m):
        x = torch.randn(tasks, m, d, generator=g, dtype=torch.float64)
        w = torch.randn(tasks, d, 1, generator=g, dtype=torch.float64)
        return x, x @ w + 0.1 * torch.randn(tasks, m, 1, generator=g, dtype=torch.float64)

    (xs, ys), (xq, yq) = data(n), data(n)
    return TaskBatch(xs, ys, xq, yq)


def bias_column(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)


def exact_hypergradient(theta: torch.Tensor, batch: TaskBatch, lam: float) -> torch.Tensor:
    """mean_i λ(A_i + λI)⁻¹ ∇L_query,i(φ*_i), φ*_i = (A_i + λI)⁻¹(b_i + λθ), for the
    mean squared error of [x, 1]·φ (A = 2/n X̃ᵀX̃, b = 2/n X̃ᵀy): torch.linalg only."""

    def quadratic(x, y):
        xt = bias_column(x)
        return 2 / len(x) * xt.T @ xt, 2 / len(x) * xt.T @ y[:, 0]

    eye, total = torch.eye(len(theta), dtype=theta.dtype), 0
    for xs, ys, xq, yq in zip(*batch, strict=True):
        a, b = quadratic(xs, ys)
        phi = torch.linalg.solve(a + lam * eye, b + lam * theta)
        aq, bq = quadratic(xq, yq)
        total = total + lam * torch.linalg.solve(a + lam * eye, aq @ phi - bq)
    return total / batch.num_tasks


@pytest.mark.parametrize("batching", ["loop", "threads", "vmap"])
def test_linear_regression_meta_gradient_is_the_exact_hypergradient(batching):
    lam, batch = 0.5, regression_tasks()
    curvature = max(  # the largest eigenvalue of any A_i: steps of 1/(λ + it) converge
        float(torch.linalg.eigvalsh(2 / len(x) * bias_column(x).mT @ bias_column(x)).max())
        for x in batch.x_support
    )
    algo = imaml(lam=lam, inner_lr=1 / (lam + curvature), inner_steps=400, cg_steps=4)
    torch.manual_seed(0)
    model = algo.meta_model(torch.nn.Linear(3, 1).double())
    theta = torch.cat([model.weight.detach()[0], model.bias.detach()])
    meta_gradient(algo, model, batch, "regression", batching)
    engine = torch.cat([model.weight.grad[0], model.bias.grad])
    exact = exact_hypergradient(theta, batch, lam)
    assert relative_error(engine, exact) < 1e-9
    first_order = exact_hypergradient(theta, batch, 1e9)  # λ → ∞: φ* = θ, v = g at θ
    assert relative_error(first_order, exact) > 0.1, "the test must tell the two apart"


# --------------------------------------------------------------------------- finite differences
def proximal_by_hand(model, theta, batch, *, loss, lam, lr, steps) -> float:
    """mean_i L_query(φ_i) after ``steps`` gradient steps on L_support + λ/2‖φ − θ‖² from θ,
    with plain autograd: θ ↦ L_query(φ*(θ)) when the steps have converged."""
    total = 0.0
    for xs, ys, xq, yq in zip(*batch, strict=True):
        start = {k: t.detach().clone() for k, t in theta.items()}
        params = {k: t.clone().requires_grad_() for k, t in start.items()}
        for _ in range(steps):
            with torch.enable_grad():
                fit = loss(functional_call(model, params, (xs,)), ys)
                prox = sum(((params[k] - start[k]) ** 2).sum() for k in params)
                grads = torch.autograd.grad(fit + lam / 2 * prox, list(params.values()))
            params = {
                k: (p - lr * g).detach().requires_grad_()
                for (k, p), g in zip(params.items(), grads, strict=True)
            }
        with torch.no_grad():
            total += float(loss(functional_call(model, params, (xq,)), yq))
    return total / batch.num_tasks


def smooth(model: torch.nn.Sequential) -> torch.nn.Sequential:
    """``model`` with tanh for ReLU: the implicit gradient needs a loss twice differentiable
    at φ*, and gradient descent on a tiny ReLU network can stall on a kink short of it."""
    for i, layer in enumerate(model):
        if isinstance(layer, torch.nn.ReLU):
            model[i] = torch.nn.Tanh()
    return model


def check_against_finite_differences(algo, model, batch, task_type, loss, every):
    theta = dict(model.named_parameters())
    tensors = list(theta.values())
    picks, numeric = finite_differences(
        lambda: proximal_by_hand(
            model, theta, batch, loss=loss, lam=algo.lam, lr=algo.inner_lr,
            steps=algo.inner_steps,
        ),
        tensors, every=every,
    )  # fmt: skip
    for batching in ("loop", "vmap"):
        exact = engine_gradient(algo, model, batch, task_type, batching)
        assert relative_error(pick(exact, tensors, picks), numeric) < 1e-6, batching


@pytest.mark.slow
def test_mlp_meta_gradient_matches_finite_differences_at_the_inner_solution():
    algo = imaml(lam=6.0, inner_lr=0.1, inner_steps=60, cg_steps=27)
    model, batch = smooth(tiny_mlp(algo)), sinusoid_batch(tasks=2)
    check_against_finite_differences(algo, model, batch, "regression", F.mse_loss, every=1)


def directional_differences(objective, tensors, directions: int, eps=1e-6):
    """Central differences of ``objective()`` along ``directions`` random directions in all
    of ``tensors`` at once (every coordinate counts, at two evaluations a direction), and
    the directions flattened."""
    g = torch.Generator().manual_seed(7)
    numeric, used = [], []
    with torch.no_grad():
        for _ in range(directions):
            d = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in tensors]
            for t, dt in zip(tensors, d, strict=True):
                t += eps * dt
            up = objective()
            for t, dt in zip(tensors, d, strict=True):
                t -= 2 * eps * dt
            down = objective()
            for t, dt in zip(tensors, d, strict=True):
                t += eps * dt
            numeric.append((up - down) / (2 * eps))
            used.append(torch.cat([dt.flatten() for dt in d]))
    return torch.stack(used), torch.tensor(numeric, dtype=torch.float64)


@pytest.mark.slow
def test_conv4_meta_gradient_matches_finite_differences_at_the_inner_solution():
    # Batch norm over six 8×8 images makes H reach about ±55 here: λ = 100 keeps the inner
    # problem convex (A = I + H/λ in [0.45, 1.55]) and steps of 0.008 solve it in 60.
    algo = imaml(lam=100.0, inner_lr=0.008, inner_steps=60, cg_steps=30)
    model, batch = smooth(tiny_conv4(algo)), image_batch(tasks=2)
    theta = dict(model.named_parameters())
    directions, numeric = directional_differences(
        lambda: proximal_by_hand(
            model, theta, batch, loss=F.cross_entropy, lam=algo.lam, lr=algo.inner_lr,
            steps=algo.inner_steps,
        ),
        list(theta.values()), directions=4,
    )  # fmt: skip
    for batching in ("loop", "threads", "vmap"):  # the fused query pass per task, plain in vmap
        exact = engine_gradient(algo, model, batch, "classification", batching)
        assert relative_error(directions @ exact, numeric) < 1e-6, batching


# --------------------------------------------------------------------------- conjugate gradient
def test_conjugate_gradient_converges_to_the_direct_solve_with_the_hessian_written_out():
    model, batch, lam = tiny_mlp(imaml()), sinusoid_batch(tasks=1), 1.5
    xs, ys, xq, yq = (t[0] for t in batch)
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    phi = {k: p.detach() + 0.1 for k, p in model.named_parameters()}

    def unflat(vector):
        return dict(zip(names, (c.view(s) for c, s in
                                zip(vector.split([s.numel() for s in shapes]), shapes,
                                    strict=True)), strict=True))  # fmt: skip

    def support(p):
        return F.mse_loss(functional_call(model, p, (xs,)), ys)

    flat = torch.cat([t.flatten() for t in phi.values()])
    hessian = torch.autograd.functional.hessian(lambda f: support(unflat(f)), flat)
    g = torch.func.grad(lambda p: F.mse_loss(functional_call(model, p, (xq,)), yq))(phi)
    gflat = torch.cat([t.flatten() for t in g.values()])
    direct = torch.linalg.solve(torch.eye(len(flat), dtype=flat.dtype) + hessian / lam, gflat)
    errors = []
    for steps in (1, 3, len(flat)):
        v = implicit_gradient(support, phi, g, lam=lam, steps=steps)
        errors.append(relative_error(torch.cat([t.flatten() for t in v.values()]), direct))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-10, errors
    damped = implicit_gradient(support, phi, g, lam=lam, steps=len(flat), damping=0.5)
    expected = torch.linalg.solve(1.5 * torch.eye(len(flat), dtype=flat.dtype) + hessian / lam,
                                  gflat)  # fmt: skip
    assert relative_error(torch.cat([t.flatten() for t in damped.values()]), expected) < 1e-10


def test_conjugate_gradient_that_has_converged_stays_put_instead_of_dividing_by_zero():
    b = {"w": torch.tensor([2.0, 4.0], dtype=torch.float64)}
    x = conjugate_gradient(lambda v: {"w": 2 * v["w"]}, b, steps=5)
    assert torch.equal(x["w"], torch.tensor([1.0, 2.0], dtype=torch.float64))


# --------------------------------------------------------------------------- memory
def outer_graph_nodes(steps: int, name: str = "imaml") -> int:
    """The nodes of the graph the outer backward runs through, for ``steps`` inner steps."""
    settings = {"inner_steps": steps, **({"cg_steps": 2} if name == "imaml" else {})}
    algo = config.algorithm(name, **settings).bind("regression", "loop")
    model = tiny_mlp(algo)
    seen, stack = (
        set(),
        [part.objective.grad_fn for part in algo.meta_objective(model, sinusoid_batch(tasks=1))],
    )
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(n for n, _ in node.next_functions)
    return len(seen)


def test_the_outer_graph_does_not_grow_with_the_inner_steps_as_mamls_does():
    assert outer_graph_nodes(1) == outer_graph_nodes(8)
    assert outer_graph_nodes(8, "maml") > outer_graph_nodes(1, "maml"), "the measure can fail"


def test_the_inner_loop_keeps_no_graph_and_only_where_it_ends(monkeypatch):
    trajectories = []
    real = learner.adapt

    def spy(*args, **kwargs):
        trajectories.append(real(*args, **kwargs))
        return trajectories[-1]

    monkeypatch.setattr(learner, "adapt", spy)
    algo = imaml(inner_steps=3, cg_steps=2)
    model = tiny_mlp(algo)
    meta_gradient(algo, model, sinusoid_batch(tasks=2), "regression", "loop")
    assert len(trajectories) == 2
    for trajectory in trajectories:
        assert len(trajectory) == 1, "the steps before the last are not kept"
        assert all(t.grad_fn is None and not t.requires_grad for p in trajectory
                   for t in p.values())  # fmt: skip
    assert all(p.grad is not None for p in model.parameters())


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "setting, says",
    [
        ({"adapt_params": "head"}, "adapt_params=head is not possible with imaml"),
        ({"inner_optimizer": "adam"}, "inner_optimizer=adam is not possible with imaml"),
        ({"bn_mode": "per_step"}, "bn_mode=per_step is not possible with imaml"),
        ({"lam": 0.0}, "lam must be > 0"),
        ({"cg_steps": 0}, "cg_steps >= 1"),
        ({"cg_damping": -1.0}, "cg_damping >= 0"),
    ],
)
def test_what_the_implicit_gradient_cannot_do_is_refused_in_one_line(setting, says):
    with pytest.raises(MamlrunError) as error:
        imaml(**setting)
    assert says in str(error.value) and "\n" not in str(error.value)


def test_the_command_line_refuses_head_adaptation_in_one_line(cli_here):
    out = cli_here("train", "meta_optimizer=imaml", "meta_optimizer.adapt_params=head")
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mamlrun: error: ") and "imaml" in lines[0]


# --------------------------------------------------------------------------- the command line
SMOKE = ("meta_optimizer=imaml", "meta_optimizer.inner_steps=3", "meta_optimizer.cg_steps=2",
         "meta_optimizer.inner_steps_test=3",
         "meta_batch_size=2", "val_every=3", "val_tasks=4", "test_tasks=4", "device=cpu",
         "meta_optimizer.task_batching=loop", "checkpoint_every=3")  # fmt: skip


@pytest.mark.slow
def test_a_resumed_imaml_run_ends_bit_for_bit_where_an_unbroken_one_does(tmp_path):
    commands.train(compose_train(*SMOKE, "iterations=6"), run_dir=tmp_path / "unbroken")
    commands.train(compose_train(*SMOKE, "iterations=3"), run_dir=tmp_path / "broken")
    commands.train(
        compose_train(*SMOKE, "iterations=6", "resume=true"), run_dir=tmp_path / "broken"
    )
    a, b = (
        checkpoint.load(tmp_path / r / "checkpoints" / "last.pt") for r in ("unbroken", "broken")
    )
    assert a["progress"]["step"] == b["progress"]["step"] == 6
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


@pytest.mark.slow
def test_a_smoke_run_trains_tests_and_adapts_with_imaml(cli_here, tmp_path):
    out = cli_here(
        "train", "debug=smoke", "meta_optimizer=imaml", "meta_optimizer.inner_steps=4",
        "meta_optimizer.inner_steps_test=4", "hydra.run.dir=run",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "run" / "test" / "results.json").is_file()
    assert (tmp_path / "run" / "adapt" / "results.json").is_file()

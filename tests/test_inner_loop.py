"""The inner loop, specified: what ``adapt`` and its parts promise, checked against arithmetic
done by hand on models small enough to write down.

The model of most tests is linear regression, ``f(x) = x·w + b`` with the mean squared error:
its support gradient is ``2/n·Xᵀr`` (``r`` the residuals) and its Hessian ``2/n·XᵀX`` is
constant, so one inner step and the meta-gradient through it have closed forms. Everything
runs in float64, so "equal" means equal up to rounding.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mamlrun import config
from mamlrun.algorithms.functional import (
    adam_direction,
    adapt,
    at_step,
    autograd_grad,
    checkpointed_adapt,
    functional_grad,
    sgd_step,
)

ALPHA = 0.1
FIRST_ORDER = {"autograd": autograd_grad(False), "functional": functional_grad(True)}
SECOND_ORDER = {"autograd": autograd_grad(True), "functional": functional_grad(False)}


@pytest.fixture(autouse=True)
def float64():
    """Every tensor and model here is float64 (and the default is restored afterwards)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def linear(p, x):
    return x @ p["w"] + p["b"]


def mse(out, y):
    return ((out - y) ** 2).mean()


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g)


def theta(requires_grad: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    w, b = torch.randn(3, 1, generator=g), torch.randn(1, generator=g)
    return {"w": w.requires_grad_(requires_grad), "b": b.requires_grad_(requires_grad)}


def gradient_by_hand(p, x, y) -> dict[str, torch.Tensor]:
    """∇ of the mean squared error of the linear model, written out."""
    r = x @ p["w"] + p["b"] - y
    return {"w": 2 / len(x) * x.T @ r, "b": 2 / len(x) * r.sum(0)}


def hessian_by_hand(x) -> torch.Tensor:
    """The (constant) Hessian of that loss in the flattened (w, b) coordinates."""
    z = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    return 2 / len(x) * z.T @ z


def flat(p) -> torch.Tensor:
    return torch.cat([p["w"].flatten(), p["b"].flatten()])


def detached(p):
    return {k: t.detach() for k, t in p.items()}


def assert_same(a, b, **tolerance) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tolerance)


# ---------------------------------------------------------------------- the pieces
def test_an_sgd_step_is_theta_minus_alpha_g_with_a_scalar_or_a_rate_per_parameter():
    p = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(3.0)}
    g = {"w": torch.tensor([0.5, -1.0]), "b": torch.tensor(2.0)}
    assert_same(sgd_step(p, g, 0.1), {"w": torch.tensor([0.95, 2.1]), "b": torch.tensor(2.8)})
    per_parameter = sgd_step(p, g, {"w": torch.tensor([1.0, 0.0]), "b": 0.5})
    assert_same(per_parameter, {"w": torch.tensor([0.5, 2.0]), "b": torch.tensor(2.0)})


def test_at_step_gives_a_constant_itself_and_a_list_entry_per_step_reusing_the_last():
    assert at_step(0.3, 0) == at_step(0.3, 5) == 0.3
    assert [at_step([1, 2, 3], s) for s in range(5)] == [1, 2, 3, 3, 3]
    assert at_step((1, 2), 9) == 2


@pytest.mark.parametrize("grad", ["autograd", "functional"])
def test_the_grad_functions_give_the_gradient_as_a_dict_like_the_parameters(grad):
    x, y = data(6, seed=1)
    p = theta()
    got = SECOND_ORDER[grad](lambda q: mse(linear(q, x), y), p)
    assert list(got) == list(p)
    assert_same(detached(got), gradient_by_hand(detached(p), x, y))


def test_a_parameter_the_loss_does_not_use_gets_a_zero_gradient_not_none():
    x, y = data(4, seed=1)
    p = {**theta(), "unused": torch.ones(2, requires_grad=True)}
    got = autograd_grad(False)(lambda q: mse(linear(q, x), y), p)
    assert torch.equal(got["unused"], torch.zeros(2))


@pytest.mark.parametrize("grad", ["autograd", "functional"])
def test_first_order_gradients_carry_no_graph_back_to_theta(grad):
    x, y = data(6, seed=1)
    got = FIRST_ORDER[grad](lambda q: mse(linear(q, x), y), theta())
    assert all(g.grad_fn is None and not g.requires_grad for g in got.values())


@pytest.mark.parametrize("grad", ["autograd", "functional"])
def test_second_order_gradients_are_differentiable_in_theta_with_the_hessian(grad):
    x, y = data(6, seed=1)
    p = theta()
    got = SECOND_ORDER[grad](lambda q: mse(linear(q, x), y), p)
    rows = []
    for i in range(4):  # d(∇L)_i/dθ, row i of the Hessian
        row = torch.autograd.grad(flat(got)[i], tuple(p.values()), retain_graph=True)
        rows.append(torch.cat([r.flatten() for r in row]))
    torch.testing.assert_close(torch.stack(rows), hessian_by_hand(x))


def test_the_adam_direction_steps_as_torch_optim_adam_does_over_two_steps():
    betas, lr = (0.8, 0.95), 0.01
    p = theta(requires_grad=False)
    reference = {k: t.clone().requires_grad_() for k, t in p.items()}
    adam = torch.optim.Adam(reference.values(), lr=lr, betas=betas, eps=1e-8)
    g = torch.Generator().manual_seed(3)
    moments = None
    for t in (1, 2):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in p.items()}
        for k, v in reference.items():
            v.grad = grads[k].clone()
        adam.step()
        direction, moments = adam_direction(grads, moments, t, betas)
        p = sgd_step(p, direction, lr)
        assert_same(p, detached(reference))


def test_the_first_adam_direction_is_the_sign_of_the_gradient():
    """With zero moments, the bias-corrected m̂/√v̂ of step 1 is g/|g|, whatever the betas."""
    grads = {"w": torch.tensor([3.0, -0.5, 1e-3])}
    direction, _ = adam_direction(grads, None, 1, (0.9, 0.999))
    torch.testing.assert_close(direction["w"], torch.tensor([1.0, -1.0, 1.0]), rtol=1e-4, atol=0)


# ---------------------------------------------------------------------- adapt
@pytest.mark.parametrize("grad", ["autograd", "functional"])
def test_one_step_of_adapt_is_theta_minus_alpha_times_the_support_gradient(grad):
    x, y = data(6, seed=1)
    p = theta()
    trajectory = adapt(linear, mse, p, x, y, lr=ALPHA, steps=1, grad=FIRST_ORDER[grad])
    by_hand = gradient_by_hand(detached(p), x, y)
    assert_same(detached(trajectory[1]), {k: p[k].detach() - ALPHA * by_hand[k] for k in p})


def test_s_steps_give_s_plus_1_parameter_sets_starting_at_theta_each_one_step_on():
    x, y = data(6, seed=1)
    p = theta()
    trajectory = adapt(linear, mse, p, x, y, lr=ALPHA, steps=3, grad=autograd_grad(False))
    assert len(trajectory) == 4
    assert all(trajectory[0][k] is p[k] for k in p)  # θ itself, not a copy
    for before, after in zip(trajectory[:-1], trajectory[1:], strict=True):
        g = gradient_by_hand(detached(before), x, y)
        assert_same(detached(after), {k: before[k].detach() - ALPHA * g[k] for k in p})


def test_without_the_whole_trajectory_adapt_gives_the_end_alone_and_frees_the_steps_before():
    import weakref

    x, y = data(6, seed=1)
    seen: list[weakref.ref] = []

    def watched(p, inputs):  # a weak reference to the parameters of every step
        seen.append(weakref.ref(p["w"]))
        return linear(p, inputs)

    grad = autograd_grad(False)  # first order: no step's graph keeps the step before alive
    whole = adapt(linear, mse, theta(), x, y, lr=ALPHA, steps=4, grad=grad)
    start = theta()
    end = adapt(watched, mse, start, x, y, lr=ALPHA, steps=4, grad=grad, whole=False)
    assert len(end) == 1
    assert_same(end[0], whole[-1])
    assert [ref() is None for ref in seen] == [False, True, True, True], "θ itself is kept"
    kept = adapt(watched, mse, start, x, y, lr=ALPHA, steps=4, grad=grad)
    assert all(ref() is not None for ref in seen[4:]) and len(kept) == 5, "the test can fail"


def test_zero_steps_give_theta_alone():
    x, y = data(6, seed=1)
    p = theta()
    assert adapt(linear, mse, p, x, y, lr=ALPHA, steps=0, grad=autograd_grad(False)) == [p]


def test_per_step_rates_are_used_at_their_step_and_the_last_one_after_the_list_ends():
    x, y = data(6, seed=1)
    rates = [0.05, 0.2]
    trajectory = adapt(linear, mse, theta(), x, y, lr=rates, steps=3, grad=autograd_grad(False))
    for s, (before, after) in enumerate(zip(trajectory[:-1], trajectory[1:], strict=True)):
        g = gradient_by_hand(detached(before), x, y)
        rate = rates[min(s, 1)]
        assert_same(detached(after), {k: before[k].detach() - rate * g[k] for k in g})


def test_per_step_forwards_are_used_at_their_step():
    """Step s differentiates the loss of ``forward[s]``: here step 1's network doubles the
    output, which doubles the residual's weight in the gradient."""
    x, y = data(6, seed=1)
    forwards = [linear, lambda p, x: 2 * linear(p, x)]
    trajectory = adapt(forwards, mse, theta(), x, y, lr=ALPHA, steps=2, grad=autograd_grad(False))
    p1 = detached(trajectory[1])
    r = 2 * linear(p1, x) - y
    g = {"w": 4 / len(x) * x.T @ r, "b": 4 / len(x) * r.sum(0)}
    assert_same(detached(trajectory[2]), {k: p1[k] - ALPHA * g[k] for k in g})


def test_a_parameter_with_a_zero_rate_stays_where_it_started():
    x, y = data(6, seed=1)
    p = theta()
    lr = {"w": ALPHA, "b": torch.tensor(0.0)}
    trajectory = adapt(linear, mse, p, x, y, lr=lr, steps=3, grad=autograd_grad(False))
    assert all(torch.equal(q["b"].detach(), p["b"].detach()) for q in trajectory)
    assert not torch.equal(trajectory[-1]["w"].detach(), p["w"].detach())


def test_adapt_with_adam_follows_torch_optim_adam_from_a_fresh_state():
    x, y = data(6, seed=1)
    betas, steps = (0.9, 0.999), 3
    p = theta()
    trajectory = adapt(
        linear, mse, p, x, y, lr=ALPHA, steps=steps, grad=autograd_grad(False), adam=betas
    )
    reference = {k: t.detach().clone().requires_grad_() for k, t in p.items()}
    adam = torch.optim.Adam(reference.values(), lr=ALPHA, betas=betas, eps=1e-8)
    for s in range(1, steps + 1):
        adam.zero_grad()
        mse(linear(reference, x), y).backward()
        adam.step()
        assert_same(detached(trajectory[s]), detached(reference))


def test_adapt_with_functional_grad_under_vmap_adapts_each_task_as_alone():
    """The same ``adapt`` batched over tasks: ``torch.func.vmap`` of it equals a loop of it."""
    xs = torch.stack([data(6, seed=s)[0] for s in range(3)])
    ys = torch.stack([data(6, seed=s)[1] for s in range(3)])
    p = theta(requires_grad=False)

    def last(x, y):
        return adapt(linear, mse, p, x, y, lr=ALPHA, steps=2, grad=functional_grad(True))[-1]

    batched = torch.func.vmap(last)(xs, ys)
    for i in range(3):
        assert_same({k: t[i] for k, t in batched.items()}, last(xs[i], ys[i]))


# ---------------------------------------------------------------------- the meta-gradient
def meta_gradient(grad, steps: int) -> torch.Tensor:
    """∇θ of the query loss after ``steps`` inner steps, by autograd through ``adapt``."""
    xs, ys = data(6, seed=1)
    xq, yq = data(5, seed=2)
    p = theta()
    adapted = adapt(linear, mse, p, xs, ys, lr=ALPHA, steps=steps, grad=grad)[-1]
    grads = torch.autograd.grad(mse(linear(adapted, xq), yq), tuple(p.values()))
    return flat(dict(zip(p, grads, strict=True)))


def meta_gradient_by_hand(steps: int, second_order: bool) -> torch.Tensor:
    """(I - αH)^steps · ∇L_query(θ_steps): the chain rule through θ_{s+1} = θ_s - α∇L_s(θ_s),
    whose Jacobian is I - αH (H the support Hessian) in second order and I in first order."""
    xs, ys = data(6, seed=1)
    xq, yq = data(5, seed=2)
    p = theta(requires_grad=False)
    for _ in range(steps):
        g = gradient_by_hand(p, xs, ys)
        p = {k: p[k] - ALPHA * g[k] for k in p}
    jacobian = torch.eye(4) - ALPHA * hessian_by_hand(xs) if second_order else torch.eye(4)
    return torch.linalg.matrix_power(jacobian, steps) @ flat(gradient_by_hand(p, xq, yq))


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("grad", ["autograd", "functional"])
def test_second_order_meta_gradient_is_the_closed_form_with_the_hessian_term(grad, steps):
    got = meta_gradient(SECOND_ORDER[grad], steps)
    torch.testing.assert_close(got, meta_gradient_by_hand(steps, second_order=True))
    assert not torch.allclose(got, meta_gradient_by_hand(steps, second_order=False))


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("grad", ["autograd", "functional"])
def test_first_order_meta_gradient_is_the_query_gradient_at_the_adapted_parameters(grad, steps):
    got = meta_gradient(FIRST_ORDER[grad], steps)
    torch.testing.assert_close(got, meta_gradient_by_hand(steps, second_order=False))


# ---------------------------------------------------------------------- checkpointed_adapt
def tiny_network() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    return net, dict(net.named_parameters())


@pytest.mark.parametrize("steps", [1, 3])
def test_checkpointed_adapt_gives_adapts_trajectory_and_meta_gradient(steps):
    """A nonlinear network (its Hessian is not constant) with per-step learned rates, so the
    meta-gradient reaches both the initialisation and the rates through every step."""
    net, params = tiny_network()
    rates = torch.tensor([0.1, 0.2, 0.3], requires_grad=True)
    meta = {"theta": params, "lr": rates}
    xs, ys = data(6, seed=1)
    xq, yq = data(5, seed=2)

    def forward_at(meta, s):
        return lambda p, x: torch.func.functional_call(net, p, (x,))

    def run(adapter):
        trajectory = adapter()
        loss = mse(forward_at(meta, 0)(trajectory[-1], xq), yq)
        return trajectory, torch.autograd.grad(loss, (*params.values(), rates))

    plain, plain_grads = run(
        lambda: adapt(
            forward_at(meta, 0),
            mse,
            params,
            xs,
            ys,
            lr=list(rates),
            steps=steps,
            grad=autograd_grad(True),
        )  # fmt: skip
    )
    lr_at = lambda meta, s: meta["lr"][s]  # noqa: E731
    checkpointed, checkpointed_grads = run(
        lambda: checkpointed_adapt(forward_at, lr_at, mse, meta, params, xs, ys, steps=steps)
    )
    assert len(checkpointed) == steps + 1
    for a, b in zip(plain, checkpointed, strict=True):
        assert_same(detached(a), detached(b))
    for a, b in zip(plain_grads, checkpointed_grads, strict=True):
        torch.testing.assert_close(a, b)
    assert float(checkpointed_grads[-1][steps - 1].abs()) > 0  # the last step's rate learns


# ---------------------------------------------------------------------- GradientLearner
def learner(**settings):
    """``GradientLearner`` settings of ``conf/meta_optimizer/maml.yaml``, ``settings`` changed."""
    return config.algorithm("maml", **{"task_batching": "loop", **settings})


def regression_batch():
    xs, ys = data(6, seed=1)
    return torch.tanh(xs), ys


@pytest.mark.parametrize("checkpoint", [False, True])
def test_the_learners_adaptation_is_adapt_on_the_backbone_with_its_rate(checkpoint):
    net, params = tiny_network()
    algo = learner(inner_lr=ALPHA, inner_steps=2)
    model = algo.meta_model(net)
    xs, ys = regression_batch()
    run = algo.adaptation(model, "regression", 2, autograd_grad(True), checkpoint=checkpoint)
    trajectory, forwards = run(algo.meta_tensors(model), xs, ys)
    assert len(trajectory) == len(forwards) == 3

    def forward(p, x):
        return torch.func.functional_call(net, p, (x,))

    expected = adapt(forward, mse, params, xs, ys, lr=ALPHA, steps=2, grad=autograd_grad(True))
    for a, b in zip(trajectory, expected, strict=True):
        assert_same(detached(a), detached(b))
    torch.testing.assert_close(forwards[2](trajectory[2], xs), forward(expected[2], xs))


def test_the_learners_adaptation_can_give_where_the_loop_ends_alone():
    net, _ = tiny_network()
    algo = learner(inner_lr=ALPHA, inner_steps=3)
    model = algo.meta_model(net)
    xs, ys = regression_batch()
    meta = algo.meta_tensors(model)
    whole, _ = algo.adaptation(model, "regression", 3, autograd_grad(False))(meta, xs, ys)
    end, forwards = algo.adaptation(model, "regression", 3, autograd_grad(False), whole=False)(
        meta, xs, ys
    )
    assert len(end) == 1 and len(forwards) == 4
    assert_same(detached(end[0]), detached(whole[-1]))


def test_parameters_that_do_not_adapt_stay_fixed_and_still_get_the_meta_gradient():
    """ANIL (``adapt_params=head``): the trajectory holds only the head; the body enters every
    forward as the meta-parameters themselves, so the outer gradient reaches it."""
    net, params = tiny_network()
    algo = learner(inner_lr=ALPHA, adapt_params="head")
    xs, ys = regression_batch()
    run = algo.adaptation(net, "regression", 2, autograd_grad(True))
    trajectory, forwards = run(algo.meta_tensors(net), xs, ys)
    assert all(sorted(p) == ["2.bias", "2.weight"] for p in trajectory)
    assert not torch.equal(trajectory[2]["2.weight"].detach(), params["2.weight"].detach())
    loss = mse(forwards[2](trajectory[2], xs), ys)
    body = torch.autograd.grad(loss, params["0.weight"])[0]
    assert float(body.abs().sum()) > 0
    assert torch.equal(params["0.weight"], net[0].weight)  # the inner loop never wrote it


def test_learned_per_step_rates_are_used_at_their_step():
    """MAML++'s LSLR: a rate per parameter and per step. Setting step 0's rates to zero and
    step 1's to α makes θ₁ = θ₀ and θ₂ = θ₁ - α∇L(θ₁)."""
    net, params = tiny_network()
    algo = learner(inner_lr=ALPHA, inner_steps=2, learned_inner_lr="per_layer_per_step")
    model = algo.meta_model(net)
    meta = algo.meta_tensors(model)
    with torch.no_grad():
        for rate in meta["inner_lr"].values():
            rate.copy_(torch.tensor([0.0, ALPHA]))
    xs, ys = regression_batch()
    trajectory, _ = algo.adaptation(model, "regression", 2, autograd_grad(False))(meta, xs, ys)
    assert_same(detached(trajectory[1]), detached(params))
    g = autograd_grad(False)(lambda p: mse(torch.func.functional_call(net, p, (xs,)), ys), params)
    assert_same(detached(trajectory[2]), {k: params[k].detach() - ALPHA * g[k] for k in params})

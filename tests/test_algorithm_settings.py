"""Algorithm settings compose (issue 24, item 1): a base every gradient-based learner shares,
which each member extends with only its own keys, in Python as in the YAML; an algorithm built
from Python takes its YAML's defaults; the inner objective is a hook a member may extend.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_train, meta_gradient
from omegaconf import OmegaConf
from torch.func import functional_call

from mamlrun import config
from mamlrun.algorithms.functional import autograd_grad, functional_grad
from mamlrun.algorithms.learner import GradientLearner
from mamlrun.algorithms.maml import MAML
from mamlrun.algorithms.reptile import Reptile
from mamlrun.data.sinusoid import SinusoidTasks
from mamlrun.data.tasks import TaskBatch
from mamlrun.errors import MamlrunError
from mamlrun.models.mlp import mlp

CONF = config.config_dir() / "meta_optimizer"
#: ``meta_optimizer`` of every meta_optimizer choice and experiment preset as composed before
#: the settings were split (flattened, interpolations resolved), keyed ``group=choice``.
RECORDED = json.loads((Path(__file__).parent / "recorded_meta_optimizers.json").read_text())


#: Settings every learner gained after the recording, with their default: ``auto``'s memory
#: bound (issue 26).
ADDED_SINCE = {"max_memory": "2x_loop"}


def settings_of(cls: type) -> set[str]:
    return {f.name for f in fields(cls) if f.init}


def own_keys(path: Path) -> set[str]:
    """The keys a YAML file itself writes, beside its defaults, target and outer optimizer."""
    node = OmegaConf.load(path)
    return {k for k in node if k not in ("defaults", "_target_", *config.OUTER_PARTS)}


# ---------------------------------------------------------------------- the tree
@pytest.mark.parametrize("name", sorted(RECORDED))
def test_every_choice_and_preset_composes_the_settings_it_composed_before(name):
    """Only the keys Reptile no longer declares (at the value they had to have) are gone, and
    only the settings added since the recording (at their YAML default) are new."""
    composed = compose_train(name)
    now = config.flatten(OmegaConf.to_container(composed.meta_optimizer, resolve=True))
    for key, default in ADDED_SINCE.items():
        assert now.pop(key) == default
    before = dict(RECORDED[name])
    if before["_target_"].endswith(".Reptile"):
        for key, off in config.RETIRED.items():
            assert before.pop(key) == off
    assert now == before


def test_the_yaml_tree_is_the_class_tree():
    """base/learner.yaml holds the base's settings once; maml.yaml and reptile.yaml extend it
    with their own keys only (Reptile changes values, it adds no key and refuses none). The
    runner's own setting there (``max_memory``, ``config.BatchingBudget``) is no learner's."""
    runners = settings_of(config.BatchingBudget)
    assert runners == {"max_memory"}
    assert own_keys(CONF / "base" / "learner.yaml") == settings_of(GradientLearner) | runners
    for member in ("maml", "reptile"):
        assert list(OmegaConf.load(CONF / f"{member}.yaml").defaults) == [
            "base/learner@_here_",
            "_self_",
        ]
    assert own_keys(CONF / "maml.yaml") == settings_of(MAML) - settings_of(GradientLearner)
    assert settings_of(Reptile) == settings_of(GradientLearner)
    assert own_keys(CONF / "reptile.yaml") <= settings_of(GradientLearner)
    for family in ("anil", "fomaml", "metasgd", "mamlpp"):
        assert "maml" in OmegaConf.load(CONF / f"{family}.yaml").defaults


def test_the_base_is_not_offered_as_a_choice():
    from mamlrun.cli.helptext import choices

    names = [name for name, _ in choices("meta_optimizer")]
    assert "maml" in names and not any("base" in n for n in names)


# ---------------------------------------------------------------------- from Python
@pytest.mark.parametrize(
    "built,choice,changes",
    [
        (lambda: MAML(inner_lr=0.4), "maml", {"inner_lr": 0.4}),
        (lambda: MAML(), "maml", {}),
        (lambda: Reptile(), "reptile", {}),
        (lambda: MAML(adapt_params="head", inner_steps=3), "anil", {"inner_steps": 3}),
    ],
)
def test_an_algorithm_built_from_python_takes_its_yamls_other_settings(built, choice, changes):
    assert built() == config.algorithm(choice, **changes)


def test_an_unknown_setting_from_python_is_one_line_with_a_guess():
    with pytest.raises(MamlrunError) as error:
        MAML(inner_lrr=0.4)
    message = str(error.value)
    assert "MAML has no setting inner_lrr (did you mean inner_lr?)" in message
    assert "\n" not in message
    with pytest.raises(MamlrunError, match="Reptile has no setting first_order"):
        Reptile(first_order=True)


def test_a_setting_out_of_range_from_python_is_refused_as_the_config_refuses_it():
    with pytest.raises(MamlrunError, match="meta_optimizer.inner_lr must be positive"):
        MAML(inner_lr=-1.0)


# ---------------------------------------------------------------------- the inner objective
LAMBDA, ALPHA, STEPS = 2.0, 0.1, 3


@dataclass(kw_only=True)
class Proximal(MAML):
    """MAML whose inner problem is proximally regularised, as iMAML's: λ/2·‖φ − θ‖²."""

    def inner_objective(self, task_loss, params, start):
        return task_loss + LAMBDA / 2 * sum(((params[k] - start[k]) ** 2).sum() for k in params)


def proximal(**changes) -> Proximal:
    return Proximal(**config.settings("meta_optimizer", "maml", **changes))


def sinusoid_batch(tasks=3) -> TaskBatch:
    batch = SinusoidTasks(**config.settings("dataset", "sinusoid", shots=5, query=6)).sample(
        "train", tasks, torch.Generator().manual_seed(1)
    )
    return TaskBatch(*(t.double() for t in batch))


def tiny_mlp(algo):
    torch.manual_seed(0)
    return algo.meta_model(
        mlp((1,), 1, **config.settings("backbone", "mlp", hidden=(4, 3))).double()
    )


def by_hand(model, x, y, *, prox: bool) -> list[dict[str, torch.Tensor]]:
    """φ_{s+1} = φ_s − α ∇_φ [L(φ_s) + λ/2‖φ_s − θ‖²], written out with plain autograd."""
    theta = {k: p.detach() for k, p in model.named_parameters()}
    phi, trajectory = dict(theta), [theta]
    for _ in range(STEPS):
        phi = {k: t.detach().requires_grad_() for k, t in phi.items()}
        loss = F.mse_loss(functional_call(model, phi, (x,)), y)
        if prox:
            loss = loss + LAMBDA / 2 * sum(((phi[k] - theta[k]) ** 2).sum() for k in phi)
        grads = torch.autograd.grad(loss, list(phi.values()))
        phi = {k: (p - ALPHA * g).detach() for (k, p), g in zip(phi.items(), grads, strict=True)}
        trajectory.append(phi)
    return trajectory


@pytest.mark.parametrize("batched", [False, True])
def test_a_proximal_inner_objective_adapts_as_the_hand_written_step_does(batched):
    algo = proximal(inner_lr=ALPHA, inner_steps=STEPS)
    model = tiny_mlp(algo)
    batch = sinusoid_batch()
    grad = functional_grad(first_order=True) if batched else autograd_grad(False)
    inner = algo.adaptation(model, "regression", STEPS, grad)
    meta = {"theta": {k: p.detach().requires_grad_() for k, p in model.named_parameters()}}
    trajectory, _ = inner(meta, batch.x_support[0], batch.y_support[0])
    expected = by_hand(model, batch.x_support[0], batch.y_support[0], prox=True)
    plain = by_hand(model, batch.x_support[0], batch.y_support[0], prox=False)
    for ours, theirs in zip(trajectory[1:], expected[1:], strict=True):
        for k in theirs:
            torch.testing.assert_close(ours[k].detach(), theirs[k], rtol=0, atol=1e-15)
    # The term is zero at φ_0 = θ, so it first shows in the second step.
    assert not any(torch.allclose(trajectory[-1][k], plain[-1][k]) for k in plain[-1])


def test_a_proximal_meta_gradient_is_the_same_with_recomputed_steps():
    """``checkpoint_inner`` recomputes each step from its own copies of θ: the hook's θ term
    must be differentiated there too."""
    grads = []
    for recompute in (False, True):
        algo = proximal(inner_lr=ALPHA, inner_steps=STEPS, checkpoint_inner=recompute)
        model = tiny_mlp(algo)
        meta_gradient(algo, model, sinusoid_batch(), "regression", "loop")
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("batching", ["loop", "threads", "vmap"])
def test_the_default_inner_objective_changes_no_bit_of_the_meta_gradient(batching):
    """MAML's hook is the task loss: its meta-gradient is bitwise that of a second-order
    MAML written out by hand (the inner loop as it was before the hook)."""
    algo = MAML(inner_lr=ALPHA, inner_steps=2)
    model = tiny_mlp(algo)
    batch = sinusoid_batch()
    meta_gradient(algo, model, batch, "regression", batching)
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    theta = dict(model.named_parameters())
    for xs, ys, xq, yq in zip(*batch, strict=True):
        phi = theta
        for _ in range(2):
            loss = F.mse_loss(functional_call(model, phi, (xs,)), ys)
            grads = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
            phi = {k: p - ALPHA * g for (k, p), g in zip(phi.items(), grads, strict=True)}
        (F.mse_loss(functional_call(model, phi, (xq,)), yq) / batch.num_tasks).backward()
    for a, b in zip(ours, model.parameters(), strict=True):
        if batching == "loop":
            assert torch.equal(a, b.grad)
        else:  # the batched paths sum in another order: equal to rounding
            torch.testing.assert_close(a, b.grad, rtol=1e-12, atol=1e-15)


class Scaled(MAML):
    """A member that meta-learns one positive scale per adapted parameter tensor and steps
    along the gradient times it: what Meta-Curvature does with matrices, in one number."""

    def own_meta_parameters(self, backbone, adapted):
        return {
            "scale": torch.nn.ParameterDict(
                {
                    k.replace(".", ":"): torch.nn.Parameter(torch.full((), 1.5).to(p))
                    for k, p in adapted.items()
                }
            )
        }

    def inner_direction(self, meta):
        scales = {k.replace(":", "."): s for k, s in meta["scale"].items()}
        return lambda grads, step: {k: scales[k] * g for k, g in grads.items()}


def scaled(**changes) -> Scaled:
    return Scaled(**config.settings("meta_optimizer", "maml", **changes))


def test_a_members_own_meta_parameters_live_in_the_model_and_its_checkpoint():
    algo = scaled(inner_lr=ALPHA, inner_steps=STEPS)
    model = tiny_mlp(algo)
    assert {k for k in model.state_dict() if k.startswith("extras.scale.")} == {
        "extras.scale.0:weight", "extras.scale.0:bias", "extras.scale.2:weight",
        "extras.scale.2:bias", "extras.scale.4:weight", "extras.scale.4:bias",
    }  # fmt: skip
    assert set(algo.meta_tensors(model)) == {"theta", "scale"}


def test_an_inner_direction_steps_along_the_transformed_gradient():
    algo = scaled(inner_lr=ALPHA / 1.5, inner_steps=STEPS)
    model = tiny_mlp(algo)
    batch = sinusoid_batch()
    inner = algo.adaptation(model, "regression", STEPS, autograd_grad(False))
    meta = algo.meta_tensors(model)
    meta = {**meta, "theta": {k: p.detach().requires_grad_() for k, p in meta["theta"].items()}}
    trajectory, _ = inner(meta, batch.x_support[0], batch.y_support[0])
    expected = by_hand(model.backbone, batch.x_support[0], batch.y_support[0], prox=False)
    for ours, theirs in zip(trajectory[1:], expected[1:], strict=True):
        for k in theirs:  # α/1.5 along 1.5·g is α along g
            torch.testing.assert_close(ours[k].detach(), theirs[k], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("batching", ["loop", "recomputed", "threads", "vmap"])
def test_the_meta_gradient_reaches_what_the_inner_direction_reads(batching):
    """∂/∂scale of the query loss after the steps, against central differences; the same in
    every batching mode and with recomputed steps (their copies of ``scale`` count too)."""
    algo = scaled(inner_lr=ALPHA, inner_steps=2, checkpoint_inner=batching == "recomputed")
    model = tiny_mlp(algo)
    batch = sinusoid_batch()
    meta_gradient(
        algo, model, batch, "regression", "loop" if batching == "recomputed" else batching
    )
    scales = list(model.extras["scale"].values())
    exact = torch.stack([s.grad for s in scales])
    assert exact.abs().min() > 1e-6

    def loss() -> float:
        with torch.enable_grad():  # the inner steps differentiate
            parts = algo.bind("regression", "loop").meta_objective(model, batch)
            return sum(float(part.objective.detach()) for part in parts)

    numeric = []
    with torch.no_grad():
        for s in scales:
            s += 1e-6
            up = loss()
            s -= 2e-6
            down = loss()
            s += 1e-6
            numeric.append((up - down) / 2e-6)
    torch.testing.assert_close(
        exact, torch.tensor(numeric, dtype=exact.dtype), rtol=1e-6, atol=1e-9
    )


class LoopOnly(MAML):
    """A member that runs its tasks one at a time for reasons of its own (as a conjugate-
    gradient solve per task might), whatever its batch-norm and recomputation settings."""

    @property
    def batching_modes(self):
        return ("loop",)


def test_a_member_that_runs_fewer_modes_is_refused_with_its_own_modes_not_another_reason():
    algo = LoopOnly(**config.settings("meta_optimizer", "maml"))
    with pytest.raises(MamlrunError) as refusal:
        algo.bind("regression", "vmap")
    assert str(refusal.value) == (
        "meta_optimizer.task_batching=vmap is not possible with these settings: they run a "
        "meta-batch's tasks only as loop; use loop or auto"
    )  # not "not possible with checkpoint_inner=true", which this member does not set
    with pytest.raises(MamlrunError, match="not possible with checkpoint_inner=true"):
        LoopOnly(**config.settings("meta_optimizer", "maml", checkpoint_inner=True)).bind(
            "regression", "vmap"
        )
    assert algo.bind("regression", "loop").batching == "loop"

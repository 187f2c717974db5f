"""The episode loop's and evaluation's contract: one loop draws the batches of every split,
an evaluation covers exactly the tasks it asks for and sees the same tasks for the same seed,
an outer step does one update, and an algorithm computes with the task type and batching it
was bound to, once, at set-up."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import compose_train, maml

from mamlrun.algorithms import learner
from mamlrun.algorithms.maml import MAML
from mamlrun.errors import MamlrunError
from mamlrun.training.components import build
from mamlrun.training.episodes import Evaluation, OuterStep, episodes, evaluate

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sinusoid():
    """Source, model and (unbound) MAML as ``train`` builds them, made tiny."""
    cfg = compose_train("backbone.hidden=[8]", "meta_optimizer.inner_steps=1", "device=cpu")
    return build(cfg, CPU, seed=0)


class Recording:
    """A task source that records what it was asked for (and hands out sinusoid tasks)."""

    def __init__(self, source):
        self.source, self.asked = source, []
        self.device = source.device

    def sample(self, split, num_tasks, generator):
        self.asked.append((split, num_tasks))
        return self.source.sample(split, num_tasks, generator)


def test_one_loop_draws_the_batches_of_whichever_split_it_is_asked_for(sinusoid):
    source = Recording(sinusoid.source)
    for split in ("train", "val", "test"):
        list(episodes(source, split, torch.Generator().manual_seed(0), 4, num_tasks=4))
    assert source.asked == [("train", 4), ("val", 4), ("test", 4)]


def test_training_episodes_go_on_until_the_caller_stops(sinusoid):
    batches = episodes(sinusoid.source, "train", torch.Generator().manual_seed(0), 3)
    assert [b.num_tasks for b in itertools.islice(batches, 50)] == [3] * 50


def test_an_evaluation_covers_exactly_the_requested_tasks(sinusoid):
    source = Recording(sinusoid.source)
    algorithm = sinusoid.algorithm.bind("regression", "loop")
    seen = []
    curves = evaluate(
        algorithm, sinusoid.model, source, Evaluation("val", 0, 10, 4, 2), on_batch=seen.append
    )
    assert source.asked == [("val", 4), ("val", 4), ("val", 2)], "the last batch: the rest"
    assert seen == [4, 4, 2]
    assert curves["loss"].shape == curves["metric"].shape == (10, 3), "tasks × steps 0…2"


def test_an_evaluation_sees_the_same_tasks_for_the_same_seed_whatever_ran_before(sinusoid):
    algorithm, model = sinusoid.algorithm.bind("regression", "loop"), sinusoid.model
    fixed = Evaluation("val", seed=7, tasks=6, batch_size=4, steps=1)
    first = evaluate(algorithm, model, sinusoid.source, fixed)
    torch.rand(100)  # the global generator moves on, as training moves it
    again = evaluate(algorithm, model, sinusoid.source, fixed)
    other = evaluate(algorithm, model, sinusoid.source, Evaluation("val", 8, 6, 4, 1))
    assert torch.equal(first["metric"], again["metric"])
    assert not torch.equal(first["metric"], other["metric"])


def test_an_evaluation_does_not_change_the_meta_parameters(sinusoid):
    before = [p.detach().clone() for p in sinusoid.model.parameters()]
    algorithm = sinusoid.algorithm.bind("regression", "loop")
    evaluate(algorithm, sinusoid.model, sinusoid.source, Evaluation("test", 0, 4, 4, 3))
    after = list(sinusoid.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_an_outer_step_updates_the_model_and_steps_the_scheduler_once(sinusoid):
    model = sinusoid.algorithm.meta_model(torch.nn.Linear(1, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    update = OuterStep(sinusoid.algorithm.bind("regression", "loop"), optimizer, scheduler)
    batch = sinusoid.source.sample("train", 2, torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in model.parameters()]
    out = update(model, batch, 0)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert scheduler.last_epoch == 1 and optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert not out["loss"].requires_grad and out["loss"].ndim == 0


def test_an_outer_step_tells_the_algorithm_the_iteration_it_is_given(sinusoid, monkeypatch):
    told, real = [], MAML.meta_objective

    def meta_objective(self, model, batch, step=None):
        told.append(step)
        return real(self, model, batch, step)

    monkeypatch.setattr(MAML, "meta_objective", meta_objective)
    model = sinusoid.algorithm.meta_model(torch.nn.Linear(1, 1))
    update = OuterStep(
        sinusoid.algorithm.bind("regression", "loop"), torch.optim.SGD(model.parameters(), 0.1)
    )
    batch = sinusoid.source.sample("train", 2, torch.Generator().manual_seed(0))
    for iteration in (0, 1, 41):
        update(model, batch, iteration)
    assert told == [0, 1, 41]


def test_an_unbound_algorithm_refuses_to_compute(sinusoid):
    batch = sinusoid.source.sample("train", 2, torch.Generator().manual_seed(0))
    with pytest.raises(MamlrunError, match="bind"):
        next(iter(maml().meta_objective(sinusoid.model, batch, 0)))
    with pytest.raises(MamlrunError, match="bind"):
        maml().evaluate(sinusoid.model, batch, 1)


def test_bind_checks_the_batching_once_and_leaves_the_original_unbound():
    with pytest.raises(MamlrunError, match="not possible with bn_mode=per_step"):
        maml(bn_mode="per_step").bind("classification", "vmap")
    with pytest.raises(MamlrunError, match="unknown task batching"):
        maml().bind("regression", "sideways")
    with pytest.raises(MamlrunError, match="task type"):
        maml().bind("ranking", "loop")
    original = maml()
    bound = original.bind("regression", "vmap")
    assert (bound.task_type, bound.batching) == ("regression", "vmap")
    assert original.batching is None, "auto binds one copy per mode it measures"


def test_the_bound_task_type_and_batching_are_the_ones_used(sinusoid, monkeypatch):
    modes, task_types = [], []
    real_map, real_losses = learner.map_tasks, learner.losses_for

    def map_tasks(make_fn, model, shared, batch, mode):
        modes.append(mode)
        return real_map(make_fn, model, shared, batch, mode)

    def losses_for(task_type, *args):
        task_types.append(task_type)
        return real_losses(task_type, *args)

    monkeypatch.setattr(learner, "map_tasks", map_tasks)
    monkeypatch.setattr(learner, "losses_for", losses_for)
    algorithm = sinusoid.algorithm.bind("regression", "vmap")
    evaluate(algorithm, sinusoid.model, sinusoid.source, Evaluation("val", 0, 4, 2, 1))
    assert modes == ["vmap", "vmap"], "one call per batch, in the bound mode"
    assert task_types == ["regression"], "the losses are chosen once, by bind"

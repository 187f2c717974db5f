"""What is constant for a run is worked out once, not on every training iteration (issue 21,
"bind constants once"): the batching and the task type's losses at ``bind``, what a model is
made of (``ModelPlan``) when it is built, the single-process outer step when it is made. The
count of mamlrun modules one iteration passes through (``scripts/trace_iteration.py``) is
the measure, so it must not grow back unnoticed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from mamlrun import config
from mamlrun.training.trainer import Trainer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "trace_iteration.py"
#: Modules one turn of the default loop (sinusoid, MLP, MAML, fp32, loop) passes through:
#: 19 before the binding, 9 after it (trainer, episodes, sinusoid, tasks, maml, learner,
#: functional, tensorboard, progress), and 10 since a run measures its own speed (speed: three
#: clock reads per iteration and, on a logged turn, their sums; issue 26).
MOST_MODULES = 10


def trace_script():
    spec = importlib.util.spec_from_file_location("trace_iteration", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_training_iteration_runs_only_what_varies(monkeypatch):
    monkeypatch.setattr(Trainer, "step", Trainer.step)  # the script wraps it; put it back after
    result = trace_script().trace(None, [])
    modules = [row["module"] for row in result["modules"]]
    assert result["count"] <= MOST_MODULES, modules
    constants = ("config.ranges", "algorithms.losses", "algorithms.selection", "distributed")
    assert not [m for m in modules if m.endswith(constants)]


def test_a_model_is_planned_once_and_again_when_it_changes():
    algorithm = config.algorithm("maml")
    model = algorithm.meta_model(nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1)))
    plan = algorithm.plan(model)
    assert algorithm.bind("regression", "loop").plan(model) is plan  # bind keeps it
    assert plan.adapted == ("0.weight", "0.bias", "2.weight", "2.bias")
    model.add_module("3", nn.Linear(1, 1))  # another parameter set: planned afresh
    assert algorithm.plan(model).adapted[-2:] == ("3.weight", "3.bias")
    other = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))  # same names, new object
    assert algorithm.plan(other).backbone is other
    algorithm.adapt_params = "head"  # other settings: planned afresh
    assert algorithm.plan(other).adapted == ("2.weight", "2.bias")


def test_the_plan_reads_no_tensor_so_a_loaded_or_moved_model_is_seen():
    algorithm = config.algorithm("maml")
    model = algorithm.meta_model(nn.Sequential(nn.Linear(1, 1)))
    model.load_state_dict({"0.weight": torch.ones(1, 1), "0.bias": torch.zeros(1)})
    assert algorithm.meta_tensors(model)["theta"]["0.weight"].item() == 1.0

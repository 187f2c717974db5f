"""Adding a dataset, a backbone or an algorithm costs one Python module and one YAML file in
a config group, and no edit to mamlrun: each is shown here by a toy one that lives outside
``src/`` and is reached through ``hydra.searchpath`` and ``_target_``, as a user's would be
(docs/ARCHITECTURE.md, "Adding a component")."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
from conftest import run_cli

#: A user's own module: a task source, a backbone builder and an algorithm, each written
#: against the declared interfaces only (TaskSource, a module builder, Algorithm).
TOY_MODULE = '''
import torch
from torch import nn

from mamlrun.algorithms.base import Part
from mamlrun.data.tasks import TaskBatch


class LineTasks:
    """y = a * x with a per-task slope: regression tasks that any learner can fit."""

    task_type, input_shape, output_size = "regression", (1,), 1

    def __init__(self, shots: int, device=None):
        self.shots, self.device = shots, torch.device(device or "cpu")

    def sample(self, split, num_tasks, generator):
        a = 1 + torch.rand(num_tasks, 1, 1, generator=generator, device=self.device)
        x = torch.rand(num_tasks, 2 * self.shots, 1, generator=generator, device=self.device)
        y = a * x
        k = self.shots
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])

    def describe(self):
        return {"name": "lines", "shots": self.shots}

    def save_splits(self, directory):
        pass


def tiny_net(in_shape, out_features, width):
    return nn.Sequential(nn.Linear(in_shape[0], width), nn.ReLU(), nn.Linear(width, out_features))


class NoAdaptation:
    """The simplest member of the family: learn one model for all tasks, adapt nothing."""

    batching_modes = ("loop",)

    def __init__(self, task_batching="loop", inner_steps_test=1):
        self.task_batching, self.inner_steps_test = task_batching, inner_steps_test

    def meta_model(self, backbone):
        return backbone

    def bind(self, task_type, batching):
        return self  # nothing of it depends on the task type or the batching

    def meta_objective(self, model, batch, step):
        loss = nn.functional.mse_loss(model(batch.x_query), batch.y_query)
        yield Part(loss, loss.detach(), loss.detach(), batch.x_query.shape[0])

    def evaluate(self, model, batch, steps):
        with torch.no_grad():
            mse = ((model(batch.x_query) - batch.y_query) ** 2).mean(dim=(1, 2))
        curve = mse[:, None].expand(-1, steps + 1)
        return curve, curve

    def describe(self):
        return {"algorithm": "NoAdaptation"}


class Incomplete:
    """An algorithm someone has not finished: it cannot compute anything yet."""

    def __init__(self, task_batching="loop", inner_steps_test=1):
        self.task_batching, self.inner_steps_test = task_batching, inner_steps_test
'''

TOY_CONFIGS = {
    "dataset/lines.yaml": "_target_: toy_components.LineTasks\nshots: 5\n",
    "backbone/tiny.yaml": "_target_: toy_components.tiny_net\nwidth: 16\n",
    "meta_optimizer/no_adaptation.yaml": textwrap.dedent(
        """\
        _target_: toy_components.NoAdaptation
        task_batching: loop
        inner_steps_test: 1
        optimizer:
          _target_: torch.optim.Adam
          _partial_: true
          lr: 0.01
        """
    ),
}


def write_toys(tmp_path):
    (tmp_path / "toy_components.py").write_text(TOY_MODULE)
    for name, text in TOY_CONFIGS.items():
        path = tmp_path / "conf" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


#: The tree under test stays importable beside the toy components.
PYTHONPATH = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]


def train_with(tmp_path, *choices):
    if not (tmp_path / "toy_components.py").exists():
        write_toys(tmp_path)
    return run_cli(
        "train", *choices, f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        "iterations=60", "meta_batch_size=4", "val_every=30",
        "val_tasks=20", "final_test=true", "test_tasks=20", "device=cpu", "hydra.run.dir=run",
        cwd=tmp_path, env={"PYTHONPATH": os.pathsep.join([str(tmp_path), *PYTHONPATH])},
    )  # fmt: skip


def results(tmp_path):
    return json.loads((tmp_path / "run" / "results.json").read_text())


@pytest.mark.slow
def test_a_new_dataset_is_a_module_and_a_yaml_file(tmp_path):
    out = train_with(tmp_path, "dataset=lines", "backbone=mlp")
    assert out.returncode == 0, out.stderr
    assert results(tmp_path)["dataset"] == {"name": "lines", "shots": 5}
    assert results(tmp_path)["test"]["mean"] < 0.2, "predicting 0 would score 0.78"


@pytest.mark.slow
def test_a_new_backbone_is_a_module_and_a_yaml_file(tmp_path):
    out = train_with(tmp_path, "dataset=lines", "backbone=tiny")
    assert out.returncode == 0, out.stderr
    assert "_target_: toy_components.tiny_net" in (tmp_path / "run" / "config.yaml").read_text()
    assert results(tmp_path)["test"]["mean"] < 0.2, "predicting 0 would score 0.78"


@pytest.mark.slow
def test_a_new_algorithm_is_a_module_and_a_yaml_file(tmp_path):
    out = train_with(tmp_path, "dataset=lines", "backbone=tiny", "meta_optimizer=no_adaptation")
    assert out.returncode == 0, out.stderr
    r = results(tmp_path)
    assert r["algorithm"] == "NoAdaptation"
    first, best = r["val_history"][0]["mean"], r["best_val"]
    assert best <= first and r["test"]["mean"] < 0.2, "one model for all lines fits them roughly"


def test_an_algorithm_that_misses_a_member_is_named_in_one_line(tmp_path):
    write_toys(tmp_path)
    yaml = tmp_path / "conf" / "meta_optimizer" / "no_adaptation.yaml"
    yaml.write_text(
        yaml.read_text().replace("toy_components.NoAdaptation", "toy_components.Incomplete")
    )
    out = train_with(tmp_path, "dataset=lines", "backbone=tiny", "meta_optimizer=no_adaptation")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "lacks" in out.stderr and "meta_objective" in out.stderr

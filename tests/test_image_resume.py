"""A miniImageNet run stopped and resumed ends bit for bit where an unbroken one does, and the
task picture in TensorBoard shows what the network sees, whatever the normalisation."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_train
from test_miniimagenet import write_pickles

from mamlrun.data.miniimagenet import SPLIT_CLASSES
from mamlrun.data.tasks import TaskBatch
from mamlrun.results import checkpoint
from mamlrun.results.pictures import task_grid
from mamlrun.training import commands
from mamlrun.training.trainer import Launch


def fixture_config(root, iterations: int, resume: bool = False):
    return compose_train(
        "experiment=miniimagenet_5w1s", f"dataset.root={root}", "dataset.query=1",
        "meta_optimizer.inner_steps=1", "meta_optimizer.task_batching=loop",
        f"iterations={iterations}", "val_every=2", "val_tasks=2", "eval_batch_size=2",
        "checkpoint_every=2", "device=cpu", f"resume={str(resume).lower()}",
    )  # fmt: skip


@pytest.mark.slow
def test_a_resumed_miniimagenet_run_matches_an_unbroken_one_bit_for_bit(tmp_path):
    root = tmp_path / "data"
    write_pickles(root, classes=SPLIT_CLASSES, per_class=2)
    commands.train(fixture_config(root, 6), run_dir=tmp_path / "unbroken")
    commands.train(fixture_config(root, 4), run_dir=tmp_path / "broken")
    extend = Launch(changed=frozenset({"iterations", "resume"}))
    commands.train(fixture_config(root, 6, resume=True), tmp_path / "broken", extend)
    a, b = (
        checkpoint.load(tmp_path / d / "checkpoints" / "last.pt") for d in ("unbroken", "broken")
    )
    assert a["progress"]["step"] == b["progress"]["step"] == 6
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["progress"]["history"] == b["progress"]["history"]
    assert torch.equal(a["generator"], b["generator"])


def test_the_task_picture_stretches_normalised_images_into_view():
    xs = torch.tensor([-2.0, 3.0]).view(2, 1, 1, 1).expand(2, 3, 4, 4)[None]
    ys = torch.tensor([[0, 1]])
    grid = task_grid(TaskBatch(xs, ys, xs, ys))
    assert grid.min() == 0 and grid.max() == 1  # not clipped to one flat colour

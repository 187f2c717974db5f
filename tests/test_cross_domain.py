"""Cross-domain testing: a model meta-trained on one dataset, tested on another's tasks.

``mamlrun test checkpoint=RUN dataset=OTHER`` keeps the run's N-way K-shot, brings OTHER's
images to the model's input shape, marks ``results.json`` as cross-domain, and ``mamlrun
report`` shows it apart, with no paper verdict (Chen et al. 2019's miniImageNet → CUB setting).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from image_fixtures import write_cifar_archive, write_cub_folder

from mamlrun.data.reshaped import Reshaped
from mamlrun.data.tasks import TaskBatch
from mamlrun.errors import MamlrunError


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A CIFAR-FS run (3×32×32, 5-way 1-shot) with CUB beside its data: ``<base>/run``."""
    base = tmp_path_factory.mktemp("crossed")
    write_cifar_archive(base / "data")
    write_cub_folder(base / "data")
    out = run_cli(
        "train", "experiment=cifarfs_5w1s", f"dataset.root={base / 'data'}", "dataset.query=1",
        "iterations=2", "val_every=2", "val_tasks=2", "eval_batch_size=2",
        "meta_optimizer.task_batching=loop", "device=cpu", "hydra.run.dir=run",
        cwd=base, env={"OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(base / "xdg")},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return base


@pytest.fixture(scope="module")
def crossed(trained) -> subprocess.CompletedProcess:
    """The run's model tested on CUB's tasks (``dataset.ways=20`` given, in vain)."""
    return run_cli(
        "test", "checkpoint=run", "dataset=cub", "dataset.query=1", "dataset.ways=20",
        f"data_root={trained / 'data'}", "test_tasks=2", "eval_batch_size=2", "device=cpu",
        "hydra.run.dir=run/cross_cub",
        cwd=trained, env={"OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(trained / "xdg")},
    )  # fmt: skip


def test_a_model_is_tested_on_another_datasets_tasks_at_its_own_shape(trained, crossed):
    assert crossed.returncode == 0, crossed.stderr
    assert "cross-domain test: trained on cifarfs, tested on cub at [3, 32, 32]" in crossed.stdout
    results = json.loads((trained / "run" / "cross_cub" / "results.json").read_text())
    assert results["cross_domain"] is True
    assert (results["trained_on"], results["tested_on"]) == ("cifarfs", "cub")
    tested = results["dataset"]
    assert tested["name"] == "cub" and tested["resized_to"] == [3, 32, 32]
    assert (tested["ways"], tested["shots"]) == (5, 1), "the model's N-way K-shot, not 20"


def test_the_report_shows_a_cross_domain_test_apart_without_a_paper_verdict(
    trained, crossed, cli_here
):
    assert crossed.returncode == 0, crossed.stderr
    out = cli_here("report", str(trained / "run"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    run_row = next(line for line in lines if "| cifarfs_5w1s |" in line)
    assert "| - | 58.9 ± 1.9% (10 steps) |" in run_row, "not the run's test"
    crossed_row = next(line for line in lines if "cross_cub" in line)
    assert "| cifarfs | cub | " in crossed_row
    assert crossed_row.endswith("| cross-domain: no reference for cifarfs → cub |")


class Source:
    """A task source of one fixed batch of images of ``shape``."""

    task_type, output_size, device = "classification", 5, torch.device("cpu")

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.input_shape = shape
        x, y = torch.rand(2, 5, *shape), torch.zeros(2, 5, dtype=torch.long)
        self.batch = TaskBatch(x, y, x + 1, y)

    def sample(self, split: str, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        return self.batch


def test_images_are_resized_and_grey_becomes_rgb_and_rgb_grey():
    grey = Reshaped(Source((1, 84, 84)), (3, 28, 28)).sample("test", 2, None)
    assert grey.x_support.shape == (2, 5, 3, 28, 28)
    assert torch.equal(grey.x_support[:, :, 0], grey.x_support[:, :, 2]), "the channel repeated"
    rgb = Source((3, 28, 28))
    luma = Reshaped(rgb, (1, 28, 28)).sample("test", 2, None).x_query
    x = rgb.batch.x_query
    expected = 0.299 * x[:, :, 0] + 0.587 * x[:, :, 1] + 0.114 * x[:, :, 2]
    torch.testing.assert_close(luma[:, :, 0], expected)
    same = Reshaped(rgb, (3, 28, 28)).sample("test", 2, None)
    assert torch.equal(same.x_support, rgb.batch.x_support), "the model's shape: untouched"


def test_inputs_that_cannot_be_brought_over_are_one_line():
    with pytest.raises(MamlrunError, match="only greyscale and RGB convert into each other"):
        Reshaped(Source((4, 32, 32)), (3, 32, 32))
    with pytest.raises(MamlrunError, match=r"only images \(C, H, W\) can be brought"):
        Reshaped(Source((1,)), (3, 32, 32))

"""The transfer baseline of ``adapt`` and ``test`` for classification: Chen et al. (2019)'s
Baseline and Baseline++ (``training/transfer.py``).

A ``mamlrun pretrain`` checkpoint (written here directly in its format, /work WARM.md's
contract: ``kind``, ``model``, ``head``, ``classes``, ``input_shape``, ``backbone``,
``dataset``, ``config``) gives the frozen features; a new head is fine-tuned on each test
task's support set. What a user sees: both curves side by side in ``adapt`` (its log,
results.json, TensorBoard, adapt.png), the baseline's accuracy in ``test``, one line when
there is no baseline checkpoint, and one line, exit 2 and no run folder for a checkpoint
that cannot be the baseline. What it computes: Chen et al.'s fine-tuning, against a
hand-written loop over ``torch.optim.SGD`` and ``nn.Linear`` (or a weight-normalised one).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from omegaconf import OmegaConf
from test_own_images import class_folders
from test_resnet12 import TINY
from torch import nn
from torch.nn import functional as F

from mamlrun import config
from mamlrun.algorithms.selection import head as head_name
from mamlrun.data.tasks import TaskBatch
from mamlrun.results import checkpoint
from mamlrun.training import transfer

#: A folder of images (12 classes, 3 images each; 2 test classes), 2-way 1-shot, conv4 with 4
#: filters on 16x16 images: as small as a classification run can be.
DATA = [
    "dataset.ways=2", "dataset.shots=1", "dataset.query=1", "dataset.image_size=16",
    "backbone=conv4", "backbone.filters=4",
]  # fmt: skip
SHAPE = [3, 16, 16]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A directory holding ``run`` (a `mamlrun train` run on the images) and ``pre.pt`` (a
    pretrain checkpoint of the same backbone for the same images, 7 classes)."""
    root = tmp_path_factory.mktemp("transfer")
    images = class_folders(root / "images")
    out = run_cli(
        "train", "debug=smoke", "dataset=images", f"dataset.root={images}", *DATA,
        "iterations=2", "val_every=2", "val_tasks=2", "checkpoint_every=2", "final_test=false",
        "final_adapt=false", "threads=1", "hydra.run.dir=run", cwd=root,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    pretrain_file(root / "pre.pt", backbone_of(root / "run"))
    return root


def backbone_of(run: Path) -> dict:
    return checkpoint.load(run / "checkpoints" / "best.pt")["config"]["components"]["backbone"]


def pretrain_file(path: Path, backbone: dict, shape=SHAPE, classes: int = 7, **extra) -> dict:
    """A `mamlrun pretrain` checkpoint: the backbone built as pretrain builds it (its output
    width the number of pretraining classes), random weights."""
    torch.manual_seed(1)
    network = config.instantiate(
        OmegaConf.create(backbone), in_shape=tuple(shape), out_features=classes
    )
    state = {
        "kind": "pretrain", "model": network.state_dict(), "head": head_name(network),
        "classes": classes, "input_shape": list(shape), "backbone": backbone,
        "dataset": "images", "config": {"backbone": backbone}, **extra,
    }  # fmt: skip
    checkpoint.save(path, state)
    return state


def log_of(out) -> str:
    return out.stdout + out.stderr


# --------------------------------------------------------------------------- through the CLI
@pytest.mark.slow
def test_adapt_shows_the_baseline_curve_beside_the_models_and_writes_it(work):
    out = run_cli(
        "adapt", "checkpoint=run", "baseline.checkpoint=pre.pt", "test_tasks=3",
        "eval_batch_size=2", "inner_steps=2", "baseline.finetune_epochs=4", "threads=1",
        "hydra.run.dir=adapted", cwd=work,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = log_of(out).splitlines()
    rows = [line for line in lines if "step " in line and "Baseline after" in line]
    assert [r.split("Baseline after")[1].split("epochs")[0].strip() for r in rows] == [
        "0", "2", "4"
    ], "inner step k of 2 beside the baseline after round(k*4/2) of its 4 epochs"  # fmt: skip
    result = json.loads((work / "adapted" / "results.json").read_text())
    base = result["baseline"]
    assert base["steps"] == result["steps"] == [0, 1, 2] and base["epochs"] == [0, 2, 4]
    assert base["method"] == "Baseline" and base["head"] == "linear"
    assert Path(base["checkpoint"]) == work / "pre.pt"
    assert len(base["mean"]) == len(base["ci95"]) == 3
    predictions = 3 * 2 * 1  # tasks x ways x query
    for mean in base["mean"]:
        assert mean * predictions == pytest.approx(round(mean * predictions), abs=1e-6)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(work / "adapted" / "tb"))
    events.Reload()
    shown = events.Scalars("adapt/baseline_accuracy")
    assert [e.step for e in shown] == [0, 1, 2]
    assert [e.value for e in shown] == pytest.approx(base["mean"])
    assert (work / "adapted" / "adapt.png").stat().st_size > 0


@pytest.mark.slow
def test_test_reports_the_baselines_accuracy_with_its_ci(work):
    out = run_cli(
        "test", "checkpoint=run", "baseline.checkpoint=pre.pt", "baseline.head=cosine",
        "test_tasks=3", "baseline.finetune_epochs=2", "threads=1", "hydra.run.dir=tested",
        cwd=work,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads((work / "tested" / "results.json").read_text())
    base = result["baseline"]
    assert base["method"] == "Baseline++" and base["epochs"] == 2 and base["ci95"] >= 0
    assert 0 <= base["mean"] <= 1 and Path(base["checkpoint"]) == work / "pre.pt"
    said = [line for line in log_of(out).splitlines() if "Baseline++ (cosine head" in line]
    assert len(said) == 1 and "accuracy on the same tasks" in said[0], log_of(out)


@pytest.mark.slow
def test_without_a_baseline_checkpoint_one_line_says_how_to_get_one(work):
    out = run_cli(
        "adapt", "checkpoint=run", "test_tasks=2", "inner_steps=1", "threads=1",
        "hydra.run.dir=alone", cwd=work,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    said = [line for line in log_of(out).splitlines() if "no transfer baseline" in line]
    assert len(said) == 1, log_of(out)
    assert "`mamlrun pretrain dataset=images`" in said[0] and "baseline.checkpoint=" in said[0]
    assert json.loads((work / "alone" / "results.json").read_text())["baseline"] is None


@pytest.mark.slow
@pytest.mark.parametrize(
    "given, says",
    [
        ("missing.pt", "baseline.checkpoint=missing.pt: no such file"),
        ("run/checkpoints/best.pt", "is a `mamlrun train` checkpoint: its network was meta-"),
        ("grey.pt", "was pretrained on omniglot images of shape [1, 28, 28]; this test's "
                    "images are [3, 16, 16]: pretrain on the model's training data (mamlrun "
                    "pretrain dataset=images)"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("command", ["adapt", "test"])
def test_a_checkpoint_that_cannot_be_the_baseline_is_one_line_and_no_folder(
    work, given, says, command
):
    if given == "grey.pt" and not (work / given).exists():
        pretrain_file(work / given, backbone_of(work / "run"), shape=[1, 28, 28],
                      dataset="omniglot")  # fmt: skip
    out = run_cli(command, "checkpoint=run", f"baseline.checkpoint={given}", "test_tasks=2",
                  f"hydra.run.dir=refused_{command}", cwd=work)  # fmt: skip
    assert out.returncode == 2, log_of(out)
    assert out.stderr.strip().splitlines()[-1].startswith("mamlrun: error: baseline.checkpoint=")
    assert says in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, out.stderr
    assert not (work / f"refused_{command}").exists()


# --------------------------------------------------------------------------- the features
@pytest.mark.parametrize("backbone", ["conv4", "resnet12"])
def test_the_frozen_features_are_the_checkpoints_without_its_head(backbone, tmp_path):
    node = config.group_config("backbone", backbone)
    if backbone == "resnet12":
        node.widths = TINY
    node = OmegaConf.to_container(node)
    state = pretrain_file(tmp_path / "pre.pt", node, classes=5)
    pretrained = transfer.prepare(baseline(checkpoint=str(tmp_path / "pre.pt")),
                                  tuple(SHAPE), "images", torch.device("cpu"))  # fmt: skip
    kept = pretrained.features.state_dict()
    head = state["head"]
    assert set(kept) == {k for k in state["model"] if not k.startswith(f"{head}.")}
    for key, tensor in kept.items():
        assert torch.equal(tensor, state["model"][key]), key
    assert not any(p.requires_grad for p in pretrained.features.parameters())

    # The features are what the pretrained network's head read.
    network = config.instantiate(OmegaConf.create(node), in_shape=tuple(SHAPE),
                                 out_features=5)  # fmt: skip
    network.load_state_dict(state["model"])
    seen = []
    network.get_submodule(head).register_forward_hook(lambda m, i, o: seen.append(i[0]))
    x = torch.randn(4, *SHAPE)
    network.eval()(x)
    assert torch.equal(pretrained.features(x), seen[0])


def baseline(**changes) -> config.BaselineConfig:
    values = {**config.settings("baseline", "default"), **changes}
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(config.BaselineConfig), values))


# --------------------------------------------------------------------------- the arithmetic
def recipe(head: str, **changes) -> transfer.Recipe:
    return transfer.Recipe.of(baseline(head=head, **changes))


def by_hand(recipe: transfer.Recipe, head: dict, support, query, orders, at) -> tuple:
    """Chen et al.'s loop, one task at a time: an ``nn.Linear`` (or one weight-normalised
    over its rows, times the scale, on normalised features), ``torch.optim.SGD`` with their
    settings, mini-batches of the support set in the given order."""
    losses, accuracies = [], []
    for t in range(support[0].shape[0]):
        zs, ys, zq, yq = support[0][t], support[1][t], query[0][t], query[1][t]
        dim, ways = zs.shape[1], head[next(iter(head))].shape[1]
        layer = nn.Linear(dim, ways, bias=recipe.head == "linear").double()
        with torch.no_grad():
            if recipe.head == "linear":
                layer.weight.copy_(head["weight"][t])
                layer.bias.copy_(head["bias"][t])
            else:
                layer = nn.utils.parametrizations.weight_norm(layer, dim=0)
                layer.parametrizations.weight.original0.copy_(head["g"][t])
                layer.parametrizations.weight.original1.copy_(head["v"][t])

        def scores(z, layer=layer):
            if recipe.head == "linear":
                return layer(z)
            return recipe.scale * layer(z / (z.norm(dim=1, keepdim=True) + 1e-5))

        sgd = torch.optim.SGD(
            layer.parameters(), lr=recipe.lr, momentum=recipe.momentum,
            dampening=recipe.dampening, weight_decay=recipe.weight_decay,
        )  # fmt: skip
        curve = {}
        for epoch in range(recipe.epochs + 1):
            with torch.no_grad():
                out = scores(zq)
                curve[epoch] = (F.cross_entropy(out, yq), (out.argmax(1) == yq).double().mean())
            if epoch == recipe.epochs:
                break
            order = orders[t, epoch]
            for start in range(0, len(order), recipe.batch_size):
                chosen = order[start : start + recipe.batch_size]
                sgd.zero_grad()
                F.cross_entropy(scores(zs[chosen]), ys[chosen]).backward()
                sgd.step()
        losses.append(torch.stack([curve[e][0] for e in at]))
        accuracies.append(torch.stack([curve[e][1] for e in at]))
    return torch.stack(losses), torch.stack(accuracies)


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_fine_tuning_is_chen_et_als_sgd_on_a_new_head(head):
    torch.manual_seed(0)
    tasks, ways, shots, dim = 2, 3, 2, 5
    ys = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1)
    zs = torch.randn(tasks, ways * shots, dim, dtype=torch.float64) + 2 * F.one_hot(ys, dim)
    yq = torch.arange(ways).repeat(2).expand(tasks, -1)
    zq = torch.randn(tasks, yq.shape[1], dim, dtype=torch.float64) + 2 * F.one_hot(yq, dim)
    r = recipe(head, finetune_epochs=6, finetune_batch_size=4, finetune_lr=0.5)
    gens = [torch.Generator().manual_seed(i) for i in range(tasks)]
    new = {k: t.double() for k, t in transfer.new_heads(head, ways, dim, gens).items()}
    orders = transfer.support_orders(r.epochs, ways * shots, gens)
    at = transfer.report_epochs(r.epochs, 3)
    ours = transfer.fine_tune(r, new, (zs, ys), (zq, yq), orders, at)
    theirs = by_hand(r, new, (zs, ys), (zq, yq), orders, at)
    torch.testing.assert_close(ours[0], theirs[0])
    torch.testing.assert_close(ours[1], theirs[1])
    assert (ours[0][:, -1] < ours[0][:, 0]).all(), "fine-tuning lowered each task's query loss"


def test_a_new_head_starts_as_nn_linear_does():
    """Weight and bias uniform in ±1/sqrt(dim); the cosine head's norms are its rows'."""
    gens = [torch.Generator().manual_seed(0) for _ in range(2)]
    linear = transfer.new_heads("linear", 4, 100, gens[:1])
    assert linear["weight"].shape == (1, 4, 100) and linear["bias"].shape == (1, 4)
    assert linear["weight"].abs().max() <= 0.1 and linear["weight"].abs().max() > 0.09
    cosine = transfer.new_heads("cosine", 4, 100, gens[1:])
    torch.testing.assert_close(cosine["g"][..., 0], cosine["v"].norm(dim=-1))


def test_inner_step_k_of_s_shows_the_baseline_after_round_k_e_over_s_epochs():
    assert transfer.report_epochs(100, 5) == [0, 20, 40, 60, 80, 100]
    assert transfer.report_epochs(100, 3) == [0, 33, 67, 100]
    assert transfer.report_epochs(100, 0) == [100], "no inner steps: the whole recipe"
    assert recipe("linear").sgd_steps(5) == 200, "5-way 1-shot: batches of 4 and 1, 100 epochs"
    assert recipe("linear").sgd_steps(20) == 500


def test_a_tasks_result_does_not_depend_on_the_batch_it_was_adapted_in():
    torch.manual_seed(0)
    features = nn.Sequential(nn.Flatten(), nn.Linear(12, 6))
    x = torch.randn(3, 4, 3, 2, 2)
    y = torch.tensor([0, 0, 1, 1]).expand(3, -1)
    tasks = TaskBatch(x, y, x + 0.1, y)
    r = recipe("cosine", finetune_epochs=3)
    whole = transfer.TransferBaseline(r, 2, seed=0).evaluate(features, tasks, 3)
    split = transfer.TransferBaseline(r, 2, seed=0)
    parts = [split.evaluate(features, TaskBatch(*(t[s] for t in tasks)), 3)
             for s in (slice(0, 1), slice(1, 3))]  # fmt: skip
    torch.testing.assert_close(whole[0], torch.cat([p[0] for p in parts]))
    torch.testing.assert_close(whole[1], torch.cat([p[1] for p in parts]))


# --------------------------------------------------------------------------- train's final test
def test_trains_final_test_and_adapt_show_the_runs_baseline(tmp_path):
    from conftest import compose_train

    from mamlrun.training import commands

    cfg = compose_train("debug=smoke", "baseline.checkpoint=pre.pt", "baseline.head=cosine")
    for command in ("test", "adapt"):
        settings = commands.final_settings(command, cfg, tmp_path / "best.pt")
        assert (settings.baseline.checkpoint, settings.baseline.head) == ("pre.pt", "cosine")


def test_train_refuses_a_baseline_it_could_not_show_before_training(cli_here, tmp_path):
    images = class_folders(tmp_path / "images")
    out = cli_here("train", "debug=smoke", "dataset=images", f"dataset.root={images}", *DATA,
                   "baseline.checkpoint=missing.pt", "hydra.run.dir=refused")  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "mamlrun: error: baseline.checkpoint=missing.pt: no such file (give the "
        "checkpoints/best.pt of a `mamlrun pretrain` run, or its directory)"
    ]
    assert not (tmp_path / "refused").exists()


@pytest.mark.slow
def test_the_baseline_is_fine_tuned_on_the_models_own_test_tasks(work, cli_here, monkeypatch):
    from mamlrun.algorithms.learner import GradientLearner

    seen: dict[str, list] = {"model": [], "baseline": []}

    def spy(who, real):
        def evaluate(self, model, batch, steps):
            seen[who].append([t.clone() for t in batch])
            return real(self, model, batch, steps)

        return evaluate

    monkeypatch.setattr(GradientLearner, "evaluate", spy("model", GradientLearner.evaluate))
    real = transfer.TransferBaseline.evaluate
    monkeypatch.setattr(transfer.TransferBaseline, "evaluate", spy("baseline", real))
    out = cli_here("adapt", f"checkpoint={work / 'run'}", f"baseline.checkpoint={work / 'pre.pt'}",
                   "test_tasks=3", "eval_batch_size=2", "inner_steps=1", "threads=1",
                   "baseline.finetune_epochs=1", "hydra.run.dir=same")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert len(seen["model"]) == len(seen["baseline"]) == 2, "3 tasks in batches of 2 and 1"
    for ours, theirs in zip(seen["model"], seen["baseline"], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


@pytest.mark.slow
def test_a_resnet12_model_and_baseline_side_by_side(tmp_path):
    """ResNet-12 (its head is a named module, ``head``, not a Sequential's last index)."""
    images = class_folders(tmp_path / "images")
    conv4 = ["~backbone.filters", "~backbone.downsample", "~backbone.head"]  # the preset's
    small = [*DATA[:4], "backbone=resnet12", "backbone.widths=[2,3,4,5]", *conv4]
    out = run_cli(
        "train", "debug=smoke", "dataset=images", f"dataset.root={images}", *small,
        "iterations=1", "val_every=1", "val_tasks=2", "final_test=false", "final_adapt=false",
        "threads=1", "hydra.run.dir=run", cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    state = pretrain_file(tmp_path / "pre.pt", backbone_of(tmp_path / "run"))
    assert state["head"] == "head"
    out = run_cli(
        "adapt", "checkpoint=run", "baseline.checkpoint=pre.pt", "baseline.head=cosine",
        "test_tasks=2", "inner_steps=1", "baseline.finetune_epochs=2", "threads=1",
        "hydra.run.dir=adapted", cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    base = json.loads((tmp_path / "adapted" / "results.json").read_text())["baseline"]
    assert base["method"] == "Baseline++" and base["epochs"] == [0, 2]

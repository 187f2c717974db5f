"""``mamlrun pretrain``: one classifier over every training class, validated by nearest
centroids on few-shot tasks of the validation split, its checkpoint the contract that
``train backbone.init=`` and the transfer baseline read (training/pretrain.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from omegaconf import OmegaConf
from test_own_images import class_folders

from mamlrun import config
from mamlrun.data.tasks import TaskBatch
from mamlrun.errors import MamlrunError
from mamlrun.results import checkpoint
from mamlrun.training import commands
from mamlrun.training import pretrain as pre
from mamlrun.training.signals import Interrupted, StopFlag

#: Keys every pretrain checkpoint holds for its readers (the contract of issue 25).
CONTRACT = ("kind", "model", "head", "classes", "input_shape", "backbone", "dataset", "config")


@pytest.fixture(scope="module")
def own_images(tmp_path_factory) -> Path:
    """Twelve classes of three images, split 64/16/20% by seed: 8 train, 2 val, 2 test."""
    return class_folders(tmp_path_factory.mktemp("own-images"))


#: The smallest of each backbone: conv4, and ResNet-12 with DropBlock (ramped by the step).
BACKBONES = {
    "conv4": ["backbone=conv4", "backbone.filters=4"],
    "resnet12": ["backbone=resnet12", "backbone.widths=[4,4,4,4]", "backbone.drop_block=true",
                 "backbone.drop_block_size=1", "backbone.drop_block_ramp=4"],
}  # fmt: skip


def tiny(images: Path, backbone: str = "conv4") -> list[str]:
    return ["dataset=images", f"dataset.root={images}", "dataset.ways=2", "dataset.shots=1",
            "dataset.query=1", "dataset.image_size=16", *BACKBONES[backbone]]  # fmt: skip


def compose_pretrain(*overrides: str):
    """The `pretrain` config as the CLI composes it (``debug=`` is its ``pretrain_debug=``)."""
    from hydra import compose, initialize_config_dir

    config.register_schemas()
    with initialize_config_dir(config_dir=str(config.config_dir()), version_base="1.3"):
        return compose("pretrain", overrides=list(overrides))


# --------------------------------------------------------------------------- the smoke run
@pytest.fixture(scope="module", params=list(BACKBONES))
def smoke(request, tmp_path_factory, own_images) -> Path:
    cwd = tmp_path_factory.mktemp("smoke")
    data = tiny(own_images, request.param)
    out = run_cli("pretrain", "debug=smoke", *data, "hydra.run.dir=run", cwd=cwd)
    assert out.returncode == 0, out.stderr
    return cwd / "run"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["best.pt", "last.pt"])
def test_smoke_writes_checkpoints_in_the_contract_format(smoke, name):
    state = checkpoint.load(smoke / "checkpoints" / name)
    assert set(CONTRACT) <= set(state), set(CONTRACT) - set(state)
    assert state["kind"] == "pretrain" and state["dataset"] == "images"
    assert state["input_shape"] == [3, 16, 16] and state["classes"] == 8
    assert state["backbone"]["_target_"].startswith("mamlrun.models.")
    assert state["config"]["backbone"] == state["backbone"]
    assert state["config"]["dataset"]["ways"] == 2
    rebuilt = config.instantiate(
        OmegaConf.create(state["backbone"]),
        in_shape=tuple(state["input_shape"]),
        out_features=state["classes"],
    )
    rebuilt.load_state_dict(state["model"])  # strict: every key, every shape
    for key, tensor in rebuilt.state_dict().items():
        assert torch.equal(tensor, state["model"][key]), key
    head = rebuilt.get_submodule(state["head"])
    assert head.weight.shape[0] == state["classes"]
    assert f"{state['head']}.weight" in state["model"]


@pytest.mark.slow
def test_smoke_writes_results_and_tensorboard_scalars(smoke):
    results = json.loads((smoke / "results.json").read_text())
    assert results["kind"] == "pretrain" and results["steps"] == results["iterations"] == 6
    assert results["classes"] == 8 and results["train_images"] == 24
    assert [h["step"] for h in results["val_history"]] == [3, 6]
    best = max(results["val_history"], key=lambda h: h["mean"])  # the first of equals
    assert results["best_val"] == best["mean"] and results["best_step"] == best["step"]
    events = b"".join(p.read_bytes() for p in (smoke / "tb").glob("events.out.tfevents.*"))
    for tag in (b"train/loss", b"train/accuracy", b"train/lr", b"val/accuracy",
                b"speed/images_per_s", b"speed/sampling_share", b"memory/peak_mib"):  # fmt: skip
        assert tag in events, tag
    speed = results["speed"]  # a batch of images per iteration: images/s, not tasks/s
    assert speed["images_per_s"] > 0 and 0 <= speed["sampling_share"] <= 1
    assert speed["peak_mib"] > 0 and speed["iterations_timed"] == 5
    best_pt = checkpoint.load(smoke / "checkpoints" / "best.pt")
    assert best_pt["progress"]["step"] == results["best_step"]


# --------------------------------------------------------------------------- the classes
@pytest.mark.slow
@pytest.mark.parametrize("rotations,classes", [(True, 4400), (False, 1100)])
def test_omniglot_classes_are_the_training_characters_times_their_rotations(
    tmp_path, monkeypatch, rotations, classes
):
    """The maml split's 1,100 training characters (1,200 less the 100 of validation), each
    rotation a class of its own when rotations are on, as MAML counts Omniglot's classes."""
    from omniglot_fixtures import synthetic_data

    from mamlrun.data import omniglot

    monkeypatch.setattr(omniglot, "load_omniglot", lambda root, size: synthetic_data(size))
    cfg = compose_pretrain(
        "pretrain_debug=smoke", f"dataset.rotations={rotations}", "dataset.ways=5",
        "backbone.filters=2", "iterations=1", "val_every=1", "val_tasks=1", "batch_size=4",
    )  # fmt: skip
    commands.pretrain(cfg, tmp_path)
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    splits = json.loads((tmp_path / "splits.json").read_text())
    assert state["classes"] == len(splits["classes"]["train"]) == classes
    assert state["model"][f"{state['head']}.weight"].shape[0] == classes


# --------------------------------------------------------------------------- validation
def test_nearest_centroid_classifies_by_the_closest_class_mean():
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0], [10.0, 12.0]])
    labels = torch.tensor([1, 1, 0, 0])  # class 1's centroid (1, 0), class 0's (10, 11)
    query = torch.tensor([[1.0, 5.0], [6.0, 6.0], [5.0, 5.0]])
    # distances² to (10,11) and (1,0): 117 vs 25 | 41 vs 61 | 61 vs 41
    assert pre.nearest_centroid(support, labels, query, ways=2).tolist() == [1, 0, 1]


def test_validation_accuracy_uses_the_features_the_head_sees():
    """Per task: support and query through the network, the head's input compared with the
    support centroids; an identity body makes the features the inputs, computed by hand."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2, 7))
    x_support = torch.tensor([[[0.0, 0.0], [4.0, 0.0]], [[0.0, 0.0], [4.0, 0.0]]])
    y_support = torch.tensor([[0, 1], [1, 0]])
    x_query = torch.tensor([[[1.0, 0.0], [3.0, 1.0]], [[1.0, 0.0], [3.9, 0.0]]])
    y_query = torch.tensor([[0, 1], [0, 0]])
    batch = TaskBatch(x_support, y_support, x_query, y_query)
    accuracy = pre.task_accuracy(model, "1", batch, ways=2)
    # task 0: both right; task 1: (1,0) is nearest (0,0), labelled 1 -> wrong; (3.9,0) -> 0 right
    assert accuracy.tolist() == [1.0, 0.5]


def test_the_schedules_follow_cosine_and_feats_epoch_milestones():
    step = OmegaConf.create({"schedule": "step", "lr": 0.1, "gamma": 0.1, "milestones": [2, 3]})
    # 10 steps per epoch: epoch 1 is steps 0-9, epoch 2 (from the first milestone) 10-19
    rates = [pre.learning_rate(step, s, 40, 10) for s in (0, 9, 10, 19, 20, 39)]
    assert rates == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    cosine = OmegaConf.create({"schedule": "cosine", "lr": 0.2})
    assert pre.learning_rate(cosine, 0, 40, 10) == pytest.approx(0.2)
    assert pre.learning_rate(cosine, 20, 40, 10) == pytest.approx(0.1)


# --------------------------------------------------------------------------- resume
class StopAt(StopFlag):
    """A signal that arrives once the run has done ``step`` steps (as SIGTERM would)."""

    def __init__(self, run_state: list, step: int) -> None:
        super().__init__()
        self.run_state, self.step = run_state, step

    @property  # type: ignore[override]
    def signal(self) -> int | None:
        return 15 if self.run_state and self.run_state[0].step >= self.step else None

    @signal.setter
    def signal(self, value: int | None) -> None:
        pass


@pytest.mark.slow
@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_a_stopped_and_resumed_run_is_bitwise_the_unbroken_run(
    tmp_path, own_images, monkeypatch, backbone
):
    """Cosine schedule, augmentation (and ResNet-12's DropBlock, drawn from the global RNG)
    over three epochs, stopped mid-epoch at step 4."""
    run = [*tiny(own_images, backbone), "pretrain_debug=smoke", "iterations=8", "batch_size=8",
           "dataset.augment=true", "dataset.crop_padding=2", "val_every=2",
           "checkpoint_every=100"]  # fmt: skip
    commands.pretrain(compose_pretrain(*run), tmp_path / "unbroken")

    states: list = []
    start = pre.Pretraining.start

    def recording(*args, **kwargs):
        made = start(*args, **kwargs)
        states.append(made.state)
        return made

    monkeypatch.setattr(pre.Pretraining, "start", recording)
    monkeypatch.setattr(commands, "catch_signals", lambda: _flag(StopAt(states, 4)))
    with pytest.raises(Interrupted, match="resume=true"):
        commands.pretrain(compose_pretrain(*run), tmp_path / "broken")
    assert checkpoint.load(tmp_path / "broken" / "checkpoints" / "last.pt")["progress"]["step"] == 4
    monkeypatch.undo()
    commands.pretrain(compose_pretrain(*run, "resume=true"), tmp_path / "broken")

    a, b = (
        checkpoint.load(tmp_path / r / "checkpoints" / "last.pt") for r in ("unbroken", "broken")
    )
    assert a["progress"] == b["progress"] and a["progress"]["step"] == 8
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(
            state["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"]
        )
    assert torch.equal(a["generator"], b["generator"])


def _flag(flag: StopFlag):
    from contextlib import nullcontext

    return nullcontext(flag)


def test_resume_refuses_to_change_the_recipe(tmp_path, own_images):
    run = [*tiny(own_images), "pretrain_debug=smoke", "iterations=2", "val_every=2"]
    commands.pretrain(compose_pretrain(*run), tmp_path)
    with pytest.raises(MamlrunError, match=r"resume would change what this run computes \(lr"):
        commands.pretrain(compose_pretrain(*run, "iterations=4", "lr=0.5", "resume=true"), tmp_path)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "arguments,line",
    [
        (["dataset=sinusoid"], "pretrain classifies images, and sinusoid is regression: there "
                               "are no classes to pre-train on"),
        (["IMAGES", "dataset.ways=5"], "the val split has 2 classes"),
        (["IMAGES", "dataset.shots=3"], "fewer than the 4 images a task takes"),
        (["lrr=0.1"], "unknown key lrr; did you mean lr?"),
        (["experiment=omniglot_5w1s"], "its recipes are preset=NAME"),
        (["preset=omniglot"], "did you mean preset=omniglot_conv4?"),
        (["epochs=3"], "set one of epochs and iterations (the other null)"),
        (["schedule=linear"], "schedule must be one of cosine, step, got 'linear'"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_exit_2_and_no_run_folder(cli_here, tmp_path, own_images,
                                                        arguments, line):  # fmt: skip
    images = tiny(own_images)
    expanded = [a for arg in arguments for a in (images if arg == "IMAGES" else [arg])]
    out = cli_here("pretrain", "debug=smoke", *expanded, "hydra.run.dir=refused")
    assert out.returncode == 2
    errors = out.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("mamlrun: error: "), out.stderr
    assert line in errors[0]
    assert not (tmp_path / "refused").exists()
    assert not (tmp_path / "outputs").exists()


# --------------------------------------------------------------------------- presets
@pytest.mark.parametrize(
    "preset,expected",
    [
        ("omniglot_conv4", {"dataset": "omniglot", "lr": 0.05, "schedule": "cosine"}),
        ("miniimagenet_conv4", {"dataset": "miniimagenet", "lr": 0.05, "filters": 32}),
        ("miniimagenet_resnet12", {"dataset": "miniimagenet", "lr": 0.1, "epochs": 500,
                                   "milestones": [350, 400, 440, 460, 480], "augment": True}),
        ("tieredimagenet_resnet12", {"dataset": "tieredimagenet", "epochs": 600,
                                     "milestones": [400, 500, 550, 580]}),
    ],
)  # fmt: skip
def test_presets_compose_with_the_recipe_they_cite(preset, expected):
    cfg = compose_pretrain(f"preset={preset}")
    config.validate(cfg, config.PretrainConfig)
    seen = {"dataset": pre.dataset_name(cfg.dataset), "lr": cfg.lr, "epochs": cfg.epochs,
            "schedule": cfg.schedule, "milestones": list(cfg.milestones),
            "augment": cfg.dataset.get("augment"),
            "filters": cfg.backbone.get("filters")}  # fmt: skip
    assert {k: seen[k] for k in expected} == expected
    smoke = compose_pretrain(f"preset={preset}", "pretrain_debug=smoke")
    assert smoke.iterations == 6 and smoke.epochs is None and smoke.lr == cfg.lr


@pytest.mark.slow
def test_resume_from_the_command_line_continues_with_the_runs_own_overrides(smoke, tmp_path):
    """Only the run's folder and the new length: the dataset, its root and the smoke settings
    come from the run (its .hydra record), as `train resume=true` does."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(smoke, run)
    out = run_cli("pretrain", "resume=true", f"hydra.run.dir={run}", "iterations=8", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "resumed from step 6" in out.stderr + out.stdout
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 8
    # the speed of this process's segment: steps 7 and 8, the first its warm-up
    assert (results["speed"]["from_step"], results["speed"]["iterations_timed"]) == (6, 1)
    again = run_cli("pretrain", "resume=true", f"hydra.run.dir={run}", "seed=5", cwd=tmp_path)
    assert again.returncode == 2
    refusal = "mamlrun: error: resume would change what this run computes (seed: 0 → 5)"
    assert again.stderr.strip().splitlines()[-1].startswith(refusal)


@pytest.mark.slow
def test_a_spent_time_budget_validates_saves_and_says_so(tmp_path, own_images):
    cfg = compose_pretrain(*tiny(own_images), "pretrain_debug=smoke", "max_minutes=0.00001")
    commands.pretrain(cfg, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["stopped_by"] == "max_minutes" and results["steps"] == 1
    assert [h["step"] for h in results["val_history"]] == [1]
    assert checkpoint.load(tmp_path / "checkpoints" / "last.pt")["progress"]["step"] == 1

"""``backbone.init=PATH``: meta-training that starts from a pretrained backbone.

The file is a ``mamlrun pretrain`` checkpoint (written here in its format, WARM.md's contract:
``kind: pretrain``, the backbone's ``state_dict`` under ``model`` with a head as wide as the
pretraining classes, ``head``, ``classes``, ``input_shape``, ``backbone``), a ``mamlrun train``
checkpoint (its meta-model's backbone) or a plain ``state_dict``. Every tensor but the head's
starts as the file's; the head keeps the factory's initialisation for the run's N ways. What
does not fit is one line, exit 2, and no run folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_own_images import class_folders
from test_report import hparams_row

from mamlrun import config
from mamlrun.algorithms import selection
from mamlrun.models.conv4 import conv4
from mamlrun.models.resnet12 import resnet12
from mamlrun.results import checkpoint

WAYS, SIZE = 2, 16
#: The run's backbone, as small as each can be (conv4 with 4 filters, a tiny ResNet-12).
BACKBONES = {
    "conv4": ["backbone=conv4", "backbone.filters=4"],
    "resnet12": [
        "backbone=resnet12",
        "backbone.widths=[2,3,2,2]",
        "~backbone.filters",
        "~backbone.downsample",
        "~backbone.head",
    ],  # the preset's conv4 settings
}
#: Their settings in those runs (``dataset=images`` picks the MAML paper's miniImageNet conv4).
SETTINGS = {
    "conv4": {"filters": 4, "downsample": "max_pool", "head": "flatten"},
    "resnet12": {"widths": [2, 3, 2, 2]},
}
FACTORIES = {
    "conv4": lambda shape, out: conv4(shape, out, **config.settings("backbone", "conv4",
                                                                    **SETTINGS["conv4"])),
    "resnet12": lambda shape, out: resnet12(shape, out, **config.settings("backbone", "resnet12",
                                                                          **SETTINGS["resnet12"])),
}  # fmt: skip


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A user's folder of twelve classes of three RGB images (``dataset=images``)."""
    return class_folders(tmp_path_factory.mktemp("init-images"))


def train(images: Path, backbone: str, run: str, *extra: str) -> list[str]:
    """Two outer steps at an outer learning rate of 0 (Adam then moves nothing), so the saved
    meta-parameters are the ones the run started from."""
    return ["train", "debug=smoke", "dataset=images", f"dataset.root={images}",
            f"dataset.ways={WAYS}", "dataset.shots=1", "dataset.query=1",
            f"dataset.image_size={SIZE}", *BACKBONES[backbone], f"hydra.run.dir={run}",
            "iterations=2", "val_every=2", "checkpoint_every=2", "val_tasks=2",
            "meta_optimizer.optimizer.lr=0", "meta_optimizer.task_batching=loop",
            "final_test=false", "final_adapt=false", "threads=1", *extra]  # fmt: skip


def random_weights(net: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor of ``net`` drawn anew: unlike a factory's (batch norm's ones and zeros), no
    two files or initialisations share a value by chance."""
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator) for k, v in net.state_dict().items()}


def pretrain_file(path: Path, backbone: str, classes: int = 7, shape=(3, SIZE, SIZE),
                  **changes) -> dict[str, torch.Tensor]:  # fmt: skip
    """A ``mamlrun pretrain`` checkpoint of ``backbone`` over ``classes`` classes; its weights."""
    net = FACTORIES[backbone](tuple(shape), classes)
    weights = random_weights(net, seed=3)
    node = OmegaConf.to_container(config.group_config("backbone", backbone), resolve=True)
    node.update(SETTINGS[backbone])
    state = {"kind": "pretrain", "model": weights, "head": selection.head(net),
             "classes": classes, "input_shape": list(shape), "backbone": node,
             "dataset": "images", "config": {}, **changes}  # fmt: skip
    checkpoint.save(path, state)
    return weights


def started_from(run: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(run / "checkpoints" / "last.pt")["model"]


def assert_one_line(out, *parts: str) -> None:
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mamlrun: error: backbone.init"), lines
    for part in parts:
        assert part in lines[0], lines[0]


# --------------------------------------------------------------------------- starting from one
@pytest.mark.slow
@pytest.mark.parametrize("backbone", BACKBONES)
def test_a_run_starts_from_the_pretrained_backbone_with_a_fresh_head(
    backbone, images, cli_here, tmp_path
):
    weights = pretrain_file(tmp_path / "pretrained.pt", backbone, classes=WAYS)
    out = cli_here(*train(images, backbone, "warm", "backbone.init=pretrained.pt"))
    assert out.returncode == 0, out.stderr
    out = cli_here(*train(images, backbone, "cold"))
    assert out.returncode == 0, out.stderr
    warm, cold = started_from(tmp_path / "warm"), started_from(tmp_path / "cold")
    head = selection.head(FACTORIES[backbone]((3, SIZE, SIZE), WAYS))
    assert warm.keys() == weights.keys()
    for name, tensor in warm.items():
        if name.startswith(f"{head}."):  # as the factory made it for this seed, not the file's
            assert torch.equal(tensor, cold[name]) and not torch.equal(tensor, weights[name])
        else:
            assert torch.equal(tensor, weights[name]), name


@pytest.mark.slow
def test_the_init_is_recorded_in_results_hparams_and_checkpoints(images, cli_here, tmp_path):
    pretrain_file(tmp_path / "pretrained.pt", "conv4")
    out = cli_here(*train(images, "conv4", "warm", "backbone.init=pretrained.pt"))
    assert out.returncode == 0, out.stderr
    digest = hashlib.sha256((tmp_path / "pretrained.pt").read_bytes()).hexdigest()
    recorded = {"path": str(tmp_path / "pretrained.pt"), "sha256": digest, "kind": "pretrain"}
    assert json.loads((tmp_path / "warm" / "results.json").read_text())["init"] == recorded
    for name in ("last.pt", "best.pt"):
        saved = checkpoint.load(tmp_path / "warm" / "checkpoints" / name)
        assert saved["init"] == recorded
        assert saved["config"]["run"]["backbone"]["init"] == "pretrained.pt"
    assert f"sha256 {digest[:12]}" in (tmp_path / "warm" / "train.log").read_text()
    _, hparams = hparams_row(tmp_path / "warm" / "tb")
    assert hparams["backbone.init"] == "pretrained.pt"
    assert hparams["backbone.init_sha256"] == digest
    # A test of the run reads its weights from its checkpoint, never from the init again.
    (tmp_path / "pretrained.pt").unlink()
    out = cli_here("test", "checkpoint=warm", "test_tasks=2", "eval_batch_size=2",
                   "hydra.run.dir=warm/test")  # fmt: skip
    assert out.returncode == 0, out.stderr


@pytest.mark.slow
def test_a_plain_state_dict_and_a_train_checkpoint_work_too(images, cli_here, tmp_path):
    net = FACTORIES["conv4"]((3, SIZE, SIZE), 5)
    weights = random_weights(net, seed=8)
    torch.save(weights, tmp_path / "plain.pt")
    out = cli_here(*train(images, "conv4", "plain", "backbone.init=plain.pt"))
    assert out.returncode == 0, out.stderr
    plain = started_from(tmp_path / "plain")
    head = selection.head(net)
    assert all(torch.equal(v, weights[k]) for k, v in plain.items() if not k.startswith(head))

    # A train checkpoint (Meta-SGD's: its backbone under backbone., its rates beside it)
    # gives its backbone; the rates are the new run's algorithm's own.
    out = cli_here(*train(images, "conv4", "metasgd", "meta_optimizer=metasgd",
                          "backbone.init=plain/checkpoints/last.pt"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    again = started_from(tmp_path / "metasgd")
    assert any(k.startswith("extras.") for k in again)
    for name, tensor in plain.items():
        if not name.startswith(head):
            assert torch.equal(again[f"backbone.{name}"], tensor), name
    results = json.loads((tmp_path / "metasgd" / "results.json").read_text())
    assert results["init"]["kind"] == "train"


# --------------------------------------------------------------------------- one line each
def refused(cli_here, images: Path, tmp_path: Path, *extra: str):
    out = cli_here(*train(images, "conv4", "refused", *extra))
    assert not (tmp_path / "refused").exists(), "no run folder is left behind"
    return out


def test_another_backbones_weights_are_refused_with_the_keys_summarised(images, cli_here, tmp_path):
    pretrain_file(tmp_path / "resnet.pt", "resnet12")
    out = refused(cli_here, images, tmp_path, "backbone.init=resnet.pt")
    assert_one_line(
        out, "does not fit this run's backbone: missing 16 (0.weight, 0.bias, 1.weight, … and "
        "13 more); unexpected 48 (blocks.0.conv1.weight, ", "… and 45 more): another backbone? "
        "(the file holds backbone=resnet12, this run builds backbone=conv4)",
    )  # fmt: skip


def test_other_settings_of_the_backbone_are_refused_by_their_shapes(images, cli_here, tmp_path):
    pretrain_file(tmp_path / "wider.pt", "conv4")
    out = refused(cli_here, images, tmp_path, "backbone.init=wider.pt", "backbone.filters=3")
    assert_one_line(out, "tensors of other shapes", "another backbone's settings? "
                    "(backbone.filters=4 in the file, 3 here)")  # fmt: skip


def test_an_init_for_another_input_shape_is_refused(images, cli_here, tmp_path):
    pretrain_file(tmp_path / "grey.pt", "conv4", shape=(1, 28, 28))
    out = refused(cli_here, images, tmp_path, "backbone.init=grey.pt")
    assert_one_line(out, "trained on inputs of shape 1x28x28, this run's dataset gives 3x16x16")
    # A state_dict records no input shape: its first layer says it.
    torch.save(random_weights(FACTORIES["conv4"]((1, SIZE, SIZE), 5), 1), tmp_path / "grey_sd.pt")
    out = refused(cli_here, images, tmp_path, "backbone.init=grey_sd.pt")
    assert_one_line(out, "inputs of another shape", "1 input channels against 3")


@pytest.mark.parametrize(
    "content,says",
    [
        (
            b"not a checkpoint",
            "bad.pt is not a mamlrun checkpoint or a PyTorch state_dict: "
            "torch.load cannot read it (",
        ),
        ({"weights": [1, 2]}, "holds a dict of other things (keys weights)"),
        ([torch.zeros(2)], "holds a list, not a mamlrun checkpoint or a state_dict"),
        ({"format": 1, "kind": "baseline", "model": {"w": torch.zeros(1)}}, "a mamlrun baseline"),
    ],
)
def test_a_file_that_holds_no_weights_is_one_line(content, says, images, cli_here, tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
    assert_one_line(refused(cli_here, images, tmp_path, "backbone.init=bad.pt"), says)


def test_a_missing_file_or_a_run_directory_is_one_line(images, cli_here, tmp_path):
    """Said before the data is built (which can take minutes): here, before its root is read."""
    out = refused(cli_here, images, tmp_path, "backbone.init=nowhere.pt", "dataset.root=nowhere")
    assert_one_line(out, "backbone.init=nowhere.pt: no such file")
    pretrain_file(tmp_path / "pre" / "checkpoints" / "best.pt", "conv4")
    out = refused(cli_here, images, tmp_path, "backbone.init=pre")
    assert_one_line(out, "is a directory: name a file in it, e.g. backbone.init=pre/checkpoints")


# --------------------------------------------------------------------------- resume and report
@pytest.mark.slow
def test_resume_refuses_to_change_the_init(images, cli_here, tmp_path):
    pretrain_file(tmp_path / "pretrained.pt", "conv4")
    out = cli_here(*train(images, "conv4", "warm", "backbone.init=pretrained.pt"))
    assert out.returncode == 0, out.stderr
    before = sorted(p.name for p in tmp_path.iterdir())
    for init in ("other.pt", "null"):
        out = cli_here(*train(images, "conv4", "warm", "iterations=4", "resume=true",
                              f"backbone.init={init}"))  # fmt: skip
        assert out.returncode == 2
        assert out.stderr.strip().splitlines() == [
            f"mamlrun: error: backbone.init={init} cannot be combined with resume=true: the "
            "resumed run already holds its weights (it started from backbone.init="
            "pretrained.pt); start a new run (another hydra.run.dir) to start from another init"
        ]
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # Resumed as it was started, it goes on from its own weights (the file is not read again).
    (tmp_path / "pretrained.pt").unlink()
    out = cli_here(*train(images, "conv4", "warm", "iterations=4", "resume=true"))
    assert out.returncode == 0, out.stderr
    assert checkpoint.load(tmp_path / "warm" / "checkpoints" / "last.pt")["init"]["kind"] == (
        "pretrain"
    )


def test_the_report_shows_an_init_as_a_difference_from_the_preset():
    from mamlrun.results import reference

    preset = config.flatten(compose("experiment=omniglot_5w1s"))
    warm = config.flatten(compose("experiment=omniglot_5w1s", "backbone.init=pre/best.pt"))
    assert reference.differences(warm, preset) == ["backbone.init: None → pre/best.pt"]


def test_a_config_saved_before_backbone_init_reads_as_no_init():
    """Runs from before the setting started from their factory's weights: the report and
    resume see no change where there was none."""
    from mamlrun.results import reference

    now = OmegaConf.to_container(compose("experiment=omniglot_5w1s"), resolve=True)
    before = {**now, "backbone": {k: v for k, v in now["backbone"].items() if k != "init"}}
    read = config.flatten(config.read_forward(before))
    assert reference.differences(read, config.flatten(now)) == []


def compose(*overrides: str):
    from conftest import compose_train

    return compose_train(*overrides)


def test_train_help_shows_the_setting(cli_here):
    out = cli_here("train", "--help")
    assert out.returncode == 0
    assert "  backbone.init=null              weights to start from: a `mamlrun pretrain`" in (
        out.stdout
    )


def test_a_train_checkpoints_backbone_is_found_inside_cavias_wrapping(tmp_path):
    """CAVIA's meta-model holds the backbone under ``backbone.`` beside its context and FiLM
    map; those are the old algorithm's, and left behind."""
    from mamlrun.training import warm_start

    net = FACTORIES["conv4"]((3, SIZE, SIZE), WAYS)
    net.load_state_dict(random_weights(net, seed=5))
    meta_model = config.algorithm("cavia").meta_model(net)
    assert any(not k.startswith("backbone.") for k in meta_model.state_dict())
    checkpoint.save(tmp_path / "cavia.pt", {"model": meta_model.state_dict(), "config": {}})
    fresh = FACTORIES["conv4"]((3, SIZE, SIZE), WAYS)
    node = {"_target_": "mamlrun.models.conv4.conv4", **SETTINGS["conv4"]}
    weights = warm_start.read(str(tmp_path / "cavia.pt"))
    init = warm_start.load_into(fresh, weights, (3, SIZE, SIZE), node)
    assert init.kind == "train"
    head = selection.head(fresh)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, net.state_dict()[name]) != name.startswith(f"{head}."), name

"""Issue 25's two stages end to end, through the CLI on a folder of images: ``mamlrun
pretrain`` writes a checkpoint; ``train backbone.init=`` starts meta-training from exactly its
weights (all but the head); ``test`` and ``adapt`` of that run show the transfer baseline from
the same pretrain checkpoint beside the meta-learned model. For conv4 and ResNet-12."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_train, run_cli
from omegaconf import OmegaConf
from test_miniimagenet import write_pickles
from test_own_images import class_folders

from mamlrun.data.miniimagenet import SPLIT_CLASSES
from mamlrun.results import checkpoint

DATA = ["dataset=images", "dataset.ways=2", "dataset.shots=1", "dataset.query=1",
        "dataset.image_size=16", "threads=1"]  # fmt: skip
#: The same network in both stages (``dataset=images`` gives train the miniImageNet conv4's
#: max-pooling and flattened head, so pretrain is told them too).
BACKBONES = {
    "conv4": ["backbone=conv4", "backbone.filters=4", "backbone.downsample=max_pool",
              "backbone.head=flatten"],
    "resnet12": ["backbone=resnet12", "backbone.widths=[2,3,2,2]"],
}  # fmt: skip
#: What train must drop of the images preset's conv4 settings to build a ResNet-12.
NOT_CONV4 = ["~backbone.filters", "~backbone.downsample", "~backbone.head"]


@pytest.fixture(scope="module", params=list(BACKBONES))
def stages(request, tmp_path_factory) -> tuple[Path, str]:
    """``pre`` (a pretrain smoke run) and ``warm`` (two outer steps at outer rate 0 from its
    best.pt, so the saved weights are the ones the run started from)."""
    root = tmp_path_factory.mktemp(f"cycle-{request.param}")
    images = class_folders(root / "images")
    data = [*DATA, f"dataset.root={images}", *BACKBONES[request.param]]
    out = run_cli("pretrain", "debug=smoke", *data, "hydra.run.dir=pre", cwd=root)
    assert out.returncode == 0, out.stderr
    drop = NOT_CONV4 if request.param == "resnet12" else []
    out = run_cli("train", "debug=smoke", *data, *drop, "backbone.init=pre/checkpoints/best.pt",
                  "iterations=2", "val_every=2", "val_tasks=2", "meta_optimizer.optimizer.lr=0",
                  "final_test=false", "final_adapt=false", "hydra.run.dir=warm",
                  cwd=root)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return root, request.param


@pytest.mark.slow
def test_meta_training_starts_from_the_pretrained_weights_but_the_head(stages):
    root, _ = stages
    pre = checkpoint.load(root / "pre" / "checkpoints" / "best.pt")
    warm = checkpoint.load(root / "warm" / "checkpoints" / "last.pt")["model"]
    head = pre["head"] + "."
    body = [k for k in pre["model"] if not k.startswith(head)]
    assert body and all(torch.equal(warm[k], pre["model"][k]) for k in body)
    assert pre["model"][head + "weight"].shape[0] == pre["classes"] > 2  # its classes, not 2 ways
    assert warm[head + "weight"].shape[0] == 2
    results = json.loads((root / "warm" / "results.json").read_text())
    assert results["init"]["kind"] == "pretrain"


@pytest.mark.slow
@pytest.mark.parametrize("command", ["test", "adapt"])
def test_the_warm_run_is_shown_beside_the_transfer_baseline_of_the_same_pretraining(
    stages, command
):
    root, _ = stages
    out = run_cli(command, "checkpoint=warm", "baseline.checkpoint=pre/checkpoints/best.pt",
                  "test_tasks=4", f"hydra.run.dir={command}", cwd=root)  # fmt: skip
    assert out.returncode == 0, out.stderr
    results = json.loads((root / command / "results.json").read_text())
    assert results["baseline"]["checkpoint"] == str(root / "pre" / "checkpoints" / "best.pt")


# ------------------------------------------------------------- the ResNet-12 presets' two stages
CONF = Path(__file__).parents[1] / "conf"
WARM_PRESETS = [
    f"miniimagenet_resnet12_{a}_{k}" for a in ("maml", "anil") for k in ("5w1s", "5w5s")
]


def pretrain_writes() -> dict[str, str]:
    """The best.pt each pretrain preset writes, relative to where `mamlrun pretrain` runs."""
    return {
        p.stem: f"{OmegaConf.load(p).hydra.run.dir}/checkpoints/best.pt"
        for p in sorted((CONF / "preset").glob("*.yaml"))
    }


def test_every_train_preset_with_an_init_starts_where_a_pretrain_preset_writes():
    writes = pretrain_writes()
    inits = {}
    for path in sorted((CONF / "experiment").glob("*.yaml")):
        init = compose_train(f"experiment={path.stem}").backbone.init
        if init is not None:
            inits[path.stem] = init
    assert sorted(inits) == sorted(WARM_PRESETS)  # the ResNet-12 MAML and ANIL ones
    assert set(inits.values()) == {writes["miniimagenet_resnet12"]}


def test_the_two_stage_presets_target_ye_and_chaos_numbers_from_the_pretrained_backbone():
    cfg = compose_train("experiment=miniimagenet_resnet12_maml_5w5s")
    mo = cfg.meta_optimizer
    assert (cfg.dataset.shots, mo.inner_lr, mo.inner_steps, mo.inner_steps_test) == (5, 0.1, 20, 20)
    assert (cfg.reference.value, cfg.reference.ci95) == (0.8344, None)  # the README prints no CI
    assert "pre-trained" in cfg.reference.source


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory) -> Path:
    """The README's two commands, as typed, on miniImageNet pickles and a tiny ResNet-12."""
    root = tmp_path_factory.mktemp("two-stages")
    write_pickles(root / "data", classes=SPLIT_CLASSES, per_class=3)
    tiny = ["dataset.root=data", "backbone.widths=[2,3,2,2]", "dataset.query=1", "threads=1"]
    out = run_cli("pretrain", "preset=miniimagenet_resnet12", "debug=smoke", *tiny, cwd=root)
    assert out.returncode == 0, out.stderr
    out = run_cli("train", "experiment=miniimagenet_resnet12_maml_5w1s", "debug=smoke", *tiny,
                  "iterations=2", "val_every=2", "meta_optimizer.inner_steps=1",
                  "meta_optimizer.inner_steps_test=1", "final_adapt=false", "test_tasks=2",
                  "hydra.run.dir=warm", cwd=root)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return root


@pytest.mark.slow
def test_the_resnet12_preset_starts_from_the_pretrain_presets_best_checkpoint(two_stages):
    results = json.loads((two_stages / "warm" / "results.json").read_text())
    best = two_stages / "outputs" / "pretrain" / "miniimagenet_resnet12" / "checkpoints" / "best.pt"
    assert results["init"]["path"] == str(best) and results["init"]["kind"] == "pretrain"
    log = (two_stages / "warm" / "train.log").read_text()
    assert f"add baseline.checkpoint={best} to compare" in log  # its own pretraining's baseline


@pytest.mark.slow
def test_without_the_first_stage_the_preset_says_which_command_writes_its_init(tmp_path):
    out = run_cli("train", "experiment=miniimagenet_resnet12_anil_5w5s", "debug=smoke",
                  f"dataset.root={tmp_path}", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "mamlrun: error: backbone.init=outputs/pretrain/miniimagenet_resnet12/checkpoints/"
        "best.pt: no such file; `mamlrun pretrain preset=miniimagenet_resnet12` writes it (run "
        "it from this directory first), or set backbone.init=null to start from random weights"
    )
    assert not (tmp_path / "outputs").exists()

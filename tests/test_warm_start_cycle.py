"""Issue 25's two stages end to end, through the CLI on a folder of images: ``mamlrun
pretrain`` writes a checkpoint; ``train backbone.init=`` starts meta-training from exactly its
weights (all but the head); ``test`` and ``adapt`` of that run show the transfer baseline from
the same pretrain checkpoint beside the meta-learned model. For conv4 and ResNet-12."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from test_own_images import class_folders

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

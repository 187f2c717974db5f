"""Meta-training on real Omniglot learns: a short run clearly beats chance on unseen characters."""

from __future__ import annotations

import json

import pytest
from conftest import compose_train, data_root, needs_omniglot

from mamlrun.training import commands

pytestmark = needs_omniglot


@pytest.mark.slow
def test_short_5way_1shot_run_beats_chance_by_a_wide_margin(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMLRUN_DATA", str(data_root()))
    cfg = compose_train(
        "experiment=omniglot_5w1s",
        "iterations=50",
        "meta_batch_size=6",
        "val_every=50",
        "val_tasks=30",
        "meta_optimizer.inner_steps_test=5",
        "meta_optimizer.task_batching=loop",
        "final_test=true",
        "test_tasks=60",
        "device=cpu",
    )
    best_val = commands.train(cfg, run_dir=tmp_path)
    test = json.loads((tmp_path / "test" / "results.json").read_text())
    assert test["metric"] == "accuracy" and test["test_tasks"] == 60
    # Chance is 0.2; after 50 meta-steps MAML is well above 0.5 on held-out characters.
    assert best_val > 0.45
    assert test["mean"] - test["ci95"] > 0.4, test
    splits = json.loads((tmp_path / "splits.json").read_text())
    classes = splits["classes"]
    assert [len(classes[s]) for s in ("train", "val", "test")] == [4400, 400, 1692]


@pytest.mark.slow
def test_task_grid_image_is_logged_for_classification(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("MAMLRUN_DATA", str(data_root()))
    cfg = compose_train(
        "experiment=omniglot_5w1s",
        "debug=smoke",
        "final_test=false",
        "final_adapt=false",
        "iterations=2",
        "val_every=2",
        "val_tasks=2",
        "meta_optimizer.task_batching=loop",
        "meta_optimizer.inner_steps_test=1",
    )
    commands.train(cfg, run_dir=tmp_path)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 1})
    events.Reload()
    assert any(tag.startswith("data/train_task") for tag in events.Tags()["images"])

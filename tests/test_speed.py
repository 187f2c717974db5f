"""Every run reports its own speed and memory: results.json, TensorBoard, HParams, progress."""

from __future__ import annotations

import json
import logging
import resource

import pytest
import torch
from conftest import compose_train
from test_report import hparams_row

from mamlrun.training import speed as speed_module
from mamlrun.training.speed import SpeedMeter, peak_mib

SCALARS = ("speed/tasks_per_s", "speed/iterations_per_s", "speed/sampling_share", "memory/peak_mib")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 6-iteration sine run, logged every 2 iterations, with its log lines captured."""
    from mamlrun.training import commands

    run_dir = tmp_path_factory.mktemp("speed")
    cfg = compose_train("iterations=6", "log_every=2", "val_every=6", "val_tasks=4",
                        "meta_batch_size=3", "checkpoint_every=6", "final_test=false",
                        "final_adapt=false", "device=cpu", "progress_seconds=0.000001")  # fmt: skip
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("mamlrun")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        commands.train(cfg, run_dir=run_dir)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return run_dir, lines


def test_results_json_holds_the_runs_speed_and_peak_memory(trained):
    run_dir, _ = trained
    speed = json.loads((run_dir / "results.json").read_text())["speed"]
    assert speed["tasks_per_s"] > 0 and speed["iterations_per_s"] > 0
    assert speed["tasks_per_s"] == pytest.approx(3 * speed["iterations_per_s"])  # 3 tasks each
    assert 0 <= speed["sampling_share"] <= 1
    assert speed["peak_mib"] > 0 and speed["peak_of"] == "process peak RSS"
    # the first iteration is warm-up; the other 5 of this process are averaged
    assert (speed["iterations_timed"], speed["warmup_iterations"], speed["from_step"]) == (5, 1, 0)


def test_tensorboard_holds_speed_and_memory_at_every_log_step(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = trained
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    for tag in SCALARS:
        assert [e.step for e in events.Scalars(tag)] == [2, 4, 6], tag
    assert all(0 <= e.value <= 1 for e in events.Scalars("speed/sampling_share"))
    assert all(e.value > 0 for e in events.Scalars("memory/peak_mib"))


def test_the_hparams_row_holds_tasks_per_second_and_peak_memory(trained):
    run_dir, _ = trained
    metrics, _ = hparams_row(run_dir / "tb")
    speed = json.loads((run_dir / "results.json").read_text())["speed"]
    assert metrics["hparam/tasks_per_s"] == pytest.approx(speed["tasks_per_s"])
    assert metrics["hparam/peak_mib"] == pytest.approx(speed["peak_mib"])


def test_the_progress_line_shows_tasks_per_second_sampling_and_peak(trained):
    _, lines = trained
    progress = [line for line in lines if line.startswith("train: ")]
    assert progress, lines
    shown = [line for line in progress if ", at step 6," in line]
    assert shown, progress
    assert any(
        part.startswith("tasks/s ") and float(part.split()[1]) > 0 for part in shown[-1].split(", ")
    ), shown[-1]
    assert ", sampling " in shown[-1] and " MiB" in shown[-1]


# --------------------------------------------------------------------------- the meter
def test_the_meter_splits_sampling_from_the_step_and_leaves_the_warm_up_out(monkeypatch):
    """Iteration 1 (warm-up): 10 s. Then two of 1 s sampling + 3 s step, 2 tasks each."""
    clock = iter([0, 1, 10, 10, 11, 14, 20, 21, 24])  # begin, sampled, stepped per iteration
    monkeypatch.setattr(speed_module.time, "perf_counter", lambda: next(clock))
    meter = SpeedMeter(torch.device("cpu"), warmup=1, first_step=40, unit="tasks")
    for _ in range(3):
        meter.begin()
        meter.sampled()
        meter.stepped(2)
    interval = meter.flush()
    assert interval["speed/iterations_per_s"] == pytest.approx(3 / 18)  # all three
    summary = meter.summary()
    assert summary["iterations_per_s"] == pytest.approx(2 / 8)
    assert summary["tasks_per_s"] == pytest.approx(4 / 8)
    assert summary["sampling_share"] == pytest.approx(0.25)
    assert summary["from_step"] == 40 and summary["iterations_timed"] == 2
    assert meter.flush() == {}  # nothing ran since


def test_cpu_peak_memory_is_the_process_peak_rss():
    expected = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    assert peak_mib(torch.device("cpu")) == pytest.approx(expected, rel=0.05)

"""The trainer's contract, stated on a tiny sinusoid run: what a run writes, how it counts its
steps, when it validates, keeps ``best.pt`` and saves ``last.pt``, how it stops, who steps the
scheduler, that a resumed run goes on from the step it saved, and the CPU threads train, test
and adapt run with."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import pytest
import torch
from conftest import compose_train
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mamlrun import config
from mamlrun.algorithms.maml import MAML
from mamlrun.algorithms.reptile import Reptile
from mamlrun.results import checkpoint
from mamlrun.training import commands, distributed, evaluation, trainer
from mamlrun.training.signals import Interrupted, StopFlag
from mamlrun.training.trainer import Launch, Trainer, fit

TINY = [
    "iterations=6",
    "meta_batch_size=2",
    "val_every=2",
    "val_tasks=4",
    "eval_batch_size=4",
    "checkpoint_every=3",
    "log_every=1",
    "progress_seconds=0",
    "device=cpu",
    "backbone.hidden=[8]",
    "meta_optimizer.task_batching=loop",
    "meta_optimizer.inner_steps=1",
    "meta_optimizer.inner_steps_test=1",
]


def start(run_dir, *overrides: str, launch: Launch | None = None) -> Trainer:
    cfg = compose_train(*TINY, *overrides)
    launch = launch or Launch()
    return Trainer.start(cfg, run_dir, launch, distributed.SINGLE, torch.device("cpu"))


def record_saves(t: Trainer) -> list[tuple[int, str]]:
    """(step, file name) of every checkpoint ``t`` writes."""
    saves, real = [], t.save

    def save(path):
        saves.append((t.state.step, path.name))
        real(path)

    t.save = save
    return saves


def record_iterations(monkeypatch, algorithm_class) -> list[int | None]:
    """The training iteration each meta-objective of ``algorithm_class`` is asked for."""
    told, real = [], algorithm_class.meta_objective

    def meta_objective(self, model, batch, step=None):
        told.append(step)
        return real(self, model, batch, step)

    monkeypatch.setattr(algorithm_class, "meta_objective", meta_objective)
    return told


def test_a_run_writes_its_config_checkpoints_events_and_results(tmp_path):
    best = commands.train(compose_train(*TINY), run_dir=tmp_path)
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert {"config.yaml", "checkpoints/last.pt", "checkpoints/best.pt", "results.json"} <= written
    assert any(name.startswith("tb/") for name in written), "TensorBoard events"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["steps"] == results["iterations"] == 6
    assert results["stopped_by"] == "iterations"
    assert results["best_val"] == best, "train returns the metric it records"
    assert [h["step"] for h in results["val_history"]] == [2, 4, 6]


def test_the_one_step_counter_counts_outer_updates_and_is_what_the_algorithm_is_told(
    tmp_path, monkeypatch
):
    told = record_iterations(monkeypatch, MAML)
    with start(tmp_path) as t:
        fit(t, StopFlag())
    assert t.state.step == 6
    assert told == [0, 1, 2, 3, 4, 5], "iteration i is the i-th update, from 0"


def test_best_pt_is_written_when_validation_improves_and_only_then(tmp_path, monkeypatch):
    mse = iter([3.0, 1.0, 2.0])  # validations at steps 2, 4, 6: better, better, worse

    def evaluate(algorithm, model, source, evaluation):
        value = torch.full((evaluation.tasks, evaluation.steps + 1), next(mse))
        return {"loss": value, "metric": value}

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    with start(tmp_path) as t:
        saves = record_saves(t)
        fit(t, StopFlag())
    assert [step for step, name in saves if name == "best.pt"] == [2, 4]
    assert (t.state.best, t.state.best_step) == (1.0, 4)
    assert checkpoint.load(t.best_path)["progress"]["step"] == 4


def test_last_pt_is_saved_every_checkpoint_every_steps_and_at_the_end(tmp_path):
    with start(tmp_path, "iterations=7") as t:
        saves = record_saves(t)
        fit(t, StopFlag())
    assert [step for step, name in saves if name == "last.pt"] == [3, 6, 7]
    assert checkpoint.load(t.last_path)["progress"]["step"] == 7


def test_a_signal_stops_the_run_after_the_step_it_came_in_saving_last_pt(tmp_path):
    flag = StopFlag(signal=signal.SIGTERM)
    with start(tmp_path) as t, pytest.raises(Interrupted, match="resume=true"):
        fit(t, flag)
    assert t.state.step == 1
    assert checkpoint.load(t.last_path)["progress"]["step"] == 1


def test_a_spent_time_budget_stops_the_run_validated_and_saved(tmp_path):
    with start(tmp_path, "max_minutes=1") as t:
        t.started -= 61  # as if the minute had gone by before the first step
        stopped_by = fit(t, StopFlag())
    assert stopped_by == "max_minutes" and t.state.step == 1
    assert [h[0] for h in t.state.history] == [1], "the last step is validated"
    assert checkpoint.load(t.last_path)["progress"]["step"] == 1


def test_a_spent_time_budget_is_logged_with_what_was_saved_and_how_to_go_on(tmp_path, caplog):
    with start(tmp_path, "max_minutes=2", "iterations=60000") as t:
        t.started -= 121  # two minutes and a second before the first step ends
        with caplog.at_level(logging.INFO, logger="mamlrun"):
            fit(t, StopFlag())
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopped")]
    assert said == [
        f"stopped after 2.0 minutes (max_minutes=2) at step 1 of 60,000; saved {t.last_path}; "
        f"continue with `mamlrun train resume=true hydra.run.dir={tmp_path}`"
    ]
    assert checkpoint.load(t.last_path)["progress"]["step"] == 1, "what it says is saved is"


def test_the_scheduler_is_stepped_once_per_outer_step_and_checkpointed(tmp_path):
    # Reptile's config anneals the outer learning rate linearly to 0 over the iterations.
    with start(tmp_path, "meta_optimizer=reptile", "meta_optimizer.task_batching=loop") as t:
        fit(t, StopFlag())
    scheduler = t.state.update.scheduler
    assert scheduler.last_epoch == 6
    assert t.state.update.optimizer.param_groups[0]["lr"] == pytest.approx(0.0)
    assert checkpoint.load(t.last_path)["scheduler"]["last_epoch"] == 6


def test_a_resumed_run_goes_on_from_the_step_it_saved(tmp_path, monkeypatch):
    reptile = ["meta_optimizer=reptile", "meta_optimizer.task_batching=loop"]
    with start(tmp_path, *reptile, "iterations=4", "checkpoint_every=2") as t:
        fit(t, StopFlag())
    told = record_iterations(monkeypatch, Reptile)
    extend = Launch(changed=frozenset({"iterations", "resume"}))
    with start(tmp_path, *reptile, "iterations=6", "resume=true", launch=extend) as t:
        assert t.state.step == 4, "restored from last.pt"
        assert t.state.update.scheduler.last_epoch == 4, "the scheduler's place is restored too"
        fit(t, StopFlag())
    assert told == [4, 5]
    assert t.state.step == 6


def test_the_final_test_is_mamlrun_test_with_the_runs_own_values_for_the_keys_they_share(
    tmp_path,
):
    cfg = compose_train(*TINY, "test_tasks=7", "test_seed=5", "baseline.steps=3", "precision=tf32")
    yaml = OmegaConf.load(config.config_dir() / "test.yaml")
    test = commands.final_settings("test", cfg, tmp_path / "best.pt")
    assert (test.test_tasks, test.test_seed, test.eval_batch_size) == (7, 5, 4), "the run's"
    assert test.precision == yaml.precision != cfg.precision, "its own arithmetic, not the run's"
    assert test.inner_steps == yaml.inner_steps
    assert test.data_root is None, "the data the run read: the checkpoint's dataset.root"
    assert test.dataset is None, "the run's own dataset, not a cross-domain test"
    assert test.checkpoint == str(tmp_path / "best.pt")
    adapt = commands.final_settings("adapt", cfg, tmp_path / "best.pt")
    assert adapt.baseline.steps == 3 and adapt.test_tasks == 7


# --------------------------------------------------------------- threads (issue 22)
def test_threads_are_set_for_the_run_said_recorded_and_given_back(tmp_path, monkeypatch, caplog):
    before = torch.get_num_threads()
    wanted = 1 if before > 1 else 2  # not what torch uses already
    during = []
    real_step = Trainer.step
    monkeypatch.setattr(Trainer, "step", lambda t: during.append(torch.get_num_threads())
                        or real_step(t))  # fmt: skip
    with caplog.at_level(logging.INFO, logger="mamlrun"):
        commands.train(compose_train(*TINY, f"threads={wanted}"), run_dir=tmp_path)
    assert set(during) == {wanted}, "every step ran with the threads asked for"
    assert json.loads((tmp_path / "results.json").read_text())["threads"] == wanted
    assert f"threads: {wanted} (threads={wanted})" in caplog.messages
    assert torch.get_num_threads() == before, "the caller's own count, given back"


@pytest.mark.parametrize("command", ["test", "adapt"])
def test_test_and_adapt_take_threads_too_and_leave_torchs_default_alone_by_default(
    tmp_path, monkeypatch, caplog, command
):
    commands.train(compose_train(*TINY), run_dir=tmp_path / "run")
    before = torch.get_num_threads()
    wanted = 1 if before > 1 else 2
    during = []
    real_evaluate = evaluation.evaluate
    monkeypatch.setattr(evaluation, "evaluate", lambda *a: during.append(torch.get_num_threads())
                        or real_evaluate(*a))  # fmt: skip
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    run = getattr(commands, command)
    with caplog.at_level(logging.INFO, logger="mamlrun"):
        run(compose_command(command, tmp_path / "run", f"threads={wanted}"), tmp_path / "set")
        assert during and set(during) == {wanted}
        during.clear()
        run(compose_command(command, tmp_path / "run"), tmp_path / "default")
        assert during and set(during) == {before}
    assert json.loads((tmp_path / "set" / "results.json").read_text())["threads"] == wanted
    assert json.loads((tmp_path / "default" / "results.json").read_text())["threads"] == before
    assert f"threads: {wanted} (threads={wanted})" in caplog.messages
    assert f"threads: {before} (torch's default; set threads=N)" in caplog.messages
    assert torch.get_num_threads() == before


def compose_command(command: str, checkpoint: Path, *overrides: str):
    """``mamlrun test`` or ``adapt`` on ``checkpoint``, tiny."""
    tiny = ["test_tasks=2", "eval_batch_size=2", "inner_steps=1", "device=cpu"]
    if command == "adapt":
        tiny.append("baseline.steps=1")
    with initialize_config_dir(config_dir=str(config.config_dir()), version_base="1.3"):
        return compose(command, overrides=[f"checkpoint={checkpoint}", *tiny, *overrides])

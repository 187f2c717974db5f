"""A run stopped by a signal saves, and resumed it ends exactly where an unbroken run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import compose_train as compose
from conftest import run_cli

from mamlrun.errors import MamlrunError
from mamlrun.results import checkpoint
from mamlrun.training import commands
from mamlrun.training.trainer import Launch

OVERRIDES = [
    "iterations=600",
    "meta_batch_size=4",
    "val_every=200",
    "val_tasks=10",
    "checkpoint_every=25",
    "log_every=50",
    "device=cpu",
    "meta_optimizer.task_batching=vmap",
    "seed=3",
]


def compose_train(*extra: str):
    return compose(*OVERRIDES, *extra)


def start_cli(run_dir: Path, *extra: str) -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "mamlrun.cli",
        "train",
        *OVERRIDES,
        *extra,
        f"hydra.run.dir={run_dir}",
    ]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def final_state(run_dir: Path) -> dict:
    return checkpoint.load(run_dir / "checkpoints" / "last.pt")


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("unbroken")
    commands.train(compose_train(), run_dir=run_dir)
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_and_resumed_run_matches_an_unbroken_run_bit_for_bit(
    tmp_path, unbroken, signum
):
    broken = tmp_path / "broken"
    proc = start_cli(broken)
    last = broken / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, output
    assert "resume=true" in output
    stopped_at = final_state(broken)["progress"]["step"]
    assert 25 <= stopped_at < 600, "the signal must arrive mid-run for this test to mean much"

    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "mamlrun.cli",
            "train",
            *OVERRIDES,
            "resume=true",
            f"hydra.run.dir={broken}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr

    a, b = final_state(unbroken), final_state(broken)
    assert a["progress"]["step"] == b["progress"]["step"] == 600
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], b["optimizer"]["state"][key]["exp_avg"])
    assert a["progress"]["history"] == b["progress"]["history"]


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(MamlrunError, match="holds no checkpoints/last.pt"):
        commands.train(compose_train("resume=true"), run_dir=tmp_path)


def test_a_finished_run_directory_is_not_overwritten(tmp_path):
    commands.train(compose_train("iterations=3", "val_every=3"), run_dir=tmp_path)
    with pytest.raises(MamlrunError, match="already holds a run"):
        commands.train(compose_train("iterations=3", "val_every=3"), run_dir=tmp_path)


def test_resume_refuses_a_change_to_what_the_run_computes_and_lists_each_key(tmp_path):
    commands.train(compose_train("iterations=3", "val_every=3"), run_dir=tmp_path)
    changed = compose_train("iterations=6", "resume=true", "seed=4", "meta_optimizer.inner_lr=0.5")
    with pytest.raises(MamlrunError) as error:
        commands.train(changed, run_dir=tmp_path)
    assert "meta_optimizer.inner_lr: 0.01 → 0.5" in str(error.value)
    assert "seed: 3 → 4" in str(error.value)
    assert "iterations" not in str(error.value).split("may only")[0], "extending is allowed"


def test_resume_can_extend_a_finished_run(tmp_path):
    commands.train(compose_train("iterations=3", "val_every=3"), run_dir=tmp_path)
    commands.train(compose_train("iterations=6", "val_every=3", "resume=true"), run_dir=tmp_path)
    assert final_state(tmp_path)["progress"]["step"] == 6


def test_a_resumed_run_may_change_its_threads_and_keeps_its_own_when_not_told(tmp_path):
    commands.train(compose_train("iterations=3", "val_every=3", "threads=1"), run_dir=tmp_path)
    more = compose_train("iterations=6", "val_every=3", "resume=true", "threads=2")
    commands.train(more, run_dir=tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["threads"] == 2
    again = compose_train("iterations=9", "val_every=3", "resume=true")  # threads: YAML's null
    told = Launch(changed=frozenset({"iterations", "resume"}))  # as from `mamlrun train ...`
    commands.train(again, run_dir=tmp_path, launch=told)
    assert json.loads((tmp_path / "results.json").read_text())["threads"] == 2, "the run's own"


def test_resuming_a_finished_run_without_more_iterations_says_how_to_extend_it(tmp_path):
    commands.train(compose_train("iterations=3", "val_every=3"), run_dir=tmp_path)
    with pytest.raises(MamlrunError, match="already finished at step 3 of iterations=3"):
        commands.train(
            compose_train("iterations=3", "val_every=3", "resume=true"), run_dir=tmp_path
        )


# ---------------------------------------------------------------- resume from the command line
SHORT = ["iterations=4", "val_every=2", "checkpoint_every=2", "meta_batch_size=3", "seed=7",
         "device=cpu", "val_tasks=4"]  # fmt: skip


@pytest.fixture
def finished_run(tmp_path) -> Path:
    run_dir = tmp_path / "run"
    out = run_cli("train", *SHORT, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    return run_dir


@pytest.mark.slow
def test_resume_with_only_the_run_directory_continues_with_the_runs_own_config(finished_run):
    """Forgetting the original overrides must not turn a 4-step run into a 70,000-step one."""
    out = run_cli("train", "resume=true", f"hydra.run.dir={finished_run}", cwd=finished_run.parent)
    assert out.returncode == 2
    assert "already finished at step 4 of iterations=4" in out.stderr
    out = run_cli(
        "train", "resume=true", "iterations=6", f"hydra.run.dir={finished_run}",
        cwd=finished_run.parent,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if "[mamlrun]" in ln]
    assert "resumed from step 4 of 6" in lines[0], "the first line says where the run goes on"
    assert "resume changes iterations: 4 → 6" in out.stdout
    saved = final_state(finished_run)
    assert saved["progress"]["step"] == 6
    kept = saved["config"]["run"]
    assert (kept["seed"], kept["meta_batch_size"], kept["val_every"]) == (7, 3, 2)


def test_resume_from_the_command_line_refuses_a_changed_seed(finished_run):
    out = run_cli(
        "train", "resume=true", "iterations=6", "seed=8", f"hydra.run.dir={finished_run}",
        cwd=finished_run.parent,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert "seed: 7 → 8" in out.stderr
    assert final_state(finished_run)["progress"]["step"] == 4, "nothing ran"
    assert "seed=7" in (finished_run / ".hydra" / "overrides.yaml").read_text(), "record kept"


@pytest.mark.slow
def test_resume_needs_a_run_directory_and_resume_latest_finds_the_newest(tmp_path):
    out = run_cli("train", "resume=true", cwd=tmp_path)
    assert out.returncode == 2 and "add hydra.run.dir=DIR" in out.stderr
    assert not (tmp_path / "outputs").exists(), "a refused command leaves no folder"
    out = run_cli("train", *SHORT, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    out = run_cli("train", "resume=latest", "iterations=6", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (run_dir,) = (tmp_path / "outputs" / "train").glob("*/*")
    assert final_state(run_dir)["progress"]["step"] == 6


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    checkpoint.save(path, {"model": {"w": torch.ones(2)}})

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", explode)
    with pytest.raises(OSError):
        checkpoint.save(path, {"model": {"w": torch.zeros(2)}})
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(2))
    assert os.listdir(tmp_path) == ["c.pt"], "no temporary file may be left behind"


def test_checkpoints_load_with_weights_only(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save(path, {"model": {}, "evil": torch.nn.Linear(1, 1)})
    with pytest.raises(MamlrunError, match="corrupt or not a mamlrun checkpoint"):
        checkpoint.load(path)


def test_a_time_budget_stops_training_early_but_validates_saves_and_reports(tmp_path):
    commands.train(compose_train("max_minutes=0.0001", "iterations=100000"), run_dir=tmp_path)
    state = final_state(tmp_path)
    assert 1 <= state["progress"]["step"] < 100000
    assert state["progress"]["history"][-1][0] == state["progress"]["step"], "validated at the end"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["stopped_by"] == "max_minutes" and results["steps"] == state["progress"]["step"]


#: MAML's flags as every Reptile config held them before each algorithm declared only its own
#: settings (issue 24), at the one value Reptile allowed.
REPTILE_WITH_MAMLS_FLAGS = {
    "learned_inner_lr": "none",
    "per_step_bn_weights": False,
    "checkpoint_inner": False,
    "first_order": True,
}


def with_saved_meta_optimizer(run_dir: Path, **keys) -> None:
    """Rewrite a run's checkpoints as an older mamlrun wrote them: ``keys`` in both copies of
    its config (the run's and its components')."""
    for name in ("last.pt", "best.pt"):
        path = run_dir / "checkpoints" / name
        state = torch.load(path, map_location="cpu", weights_only=True)
        for saved in state["config"].values():
            saved["meta_optimizer"].update(keys)
        checkpoint.save(path, {k: v for k, v in state.items() if k != "format"})


def composed_test(run_dir: Path, *extra: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from mamlrun import config

    with initialize_config_dir(config_dir=str(config.config_dir()), version_base="1.3"):
        overrides = [f"checkpoint={run_dir}", "test_tasks=4", "device=cpu", *extra]
        return hydra_compose("test", overrides)


def test_a_reptile_checkpoint_with_mamls_flags_off_still_tests_and_resumes(tmp_path):
    """A run stopped by its time budget, so that resuming it changes only that budget
    (Reptile's annealing is over ``iterations``, which it may therefore not change)."""
    run = tmp_path / "run"
    reptile = ("meta_optimizer=reptile", "val_every=3", "test_tasks=4", "iterations=6")
    commands.train(compose_train(*reptile, "max_minutes=0.0001"), run_dir=run)
    assert final_state(run)["progress"]["step"] < 6
    with_saved_meta_optimizer(run, **REPTILE_WITH_MAMLS_FLAGS)
    read = checkpoint.load(run / "checkpoints" / "last.pt")["config"]
    assert not set(read["run"]["meta_optimizer"]) & set(REPTILE_WITH_MAMLS_FLAGS)
    assert not set(read["components"]["meta_optimizer"]) & set(REPTILE_WITH_MAMLS_FLAGS)
    commands.test(composed_test(run), run_dir=tmp_path / "test")
    commands.train(compose_train(*reptile, "max_minutes=null", "resume=true"), run_dir=run)
    assert final_state(run)["progress"]["step"] == 6


def test_a_reptile_checkpoint_with_a_maml_flag_on_is_refused_in_one_line(tmp_path):
    run = tmp_path / "run"
    reptile = ("meta_optimizer=reptile", "val_every=3", "test_tasks=4", "iterations=3")
    commands.train(compose_train(*reptile), run_dir=run)
    flags = {**REPTILE_WITH_MAMLS_FLAGS, "learned_inner_lr": "per_element"}
    with_saved_meta_optimizer(run, **flags)
    with pytest.raises(MamlrunError) as error:
        commands.test(composed_test(run), run_dir=tmp_path / "test")
    message = str(error.value)
    assert "meta_optimizer.learned_inner_lr=per_element" in message and "Reptile" in message
    assert "\n" not in message

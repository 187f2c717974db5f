"""Distributed meta-training: N gloo processes under torchrun train exactly what one process
does on the full meta-batch, resume included; only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mamlrun.training.distributed import Context

RUN = ("debug=smoke", "final_test=false", "final_adapt=false", "meta_optimizer.task_batching=loop")


def torchrun(nproc: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc_per_node={nproc}", "-m", "mamlrun.cli", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def one_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mamlrun.cli", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)


def assert_same_training(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a["progress"]["step"] == b["progress"]["step"]
    for name, value in a["model"].items():
        assert torch.allclose(value, b["model"][name], atol=tol, rtol=0), name
    moments_a = a["optimizer"]["state"]
    moments_b = b["optimizer"]["state"]
    for i in moments_a:
        assert torch.allclose(moments_a[i]["exp_avg"], moments_b[i]["exp_avg"], atol=tol), i


@pytest.mark.slow
def test_two_processes_resumed_midway_match_one_process_on_the_full_meta_batch(tmp_path):
    # meta_batch_size=5 splits 3 + 2: the average must weight ranks by their task counts.
    common = (*RUN, "meta_batch_size=5", "val_every=3", "checkpoint_every=3")
    single = one_process(*common, "iterations=6", "hydra.run.dir=single", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    first = torchrun(2, *common, "iterations=3", "hydra.run.dir=multi", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    resumed = torchrun(
        2, *common, "iterations=6", "resume=true", "hydra.run.dir=multi", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr
    assert_same_training(final_state(tmp_path / "single"), final_state(tmp_path / "multi"))
    results = json.loads((tmp_path / "multi" / "results.json").read_text())
    assert results["processes"] == 2 and results["steps"] == 6
    single_results = json.loads((tmp_path / "single" / "results.json").read_text())
    assert results["best_val"] == pytest.approx(single_results["best_val"], rel=1e-5)


@pytest.mark.slow
def test_reptile_averages_its_update_over_processes_too(tmp_path):
    common = (*RUN, "meta_optimizer=reptile", "meta_batch_size=4", "iterations=3")
    single = one_process(*common, "hydra.run.dir=single", cwd=tmp_path)
    multi = torchrun(2, *common, "hydra.run.dir=multi", cwd=tmp_path)
    assert single.returncode == 0 and multi.returncode == 0, single.stderr + multi.stderr
    assert_same_training(final_state(tmp_path / "single"), final_state(tmp_path / "multi"))


@pytest.mark.slow
def test_only_rank_0_writes_and_logs(tmp_path):
    done = torchrun(2, *RUN, "iterations=2", "hydra.run.dir=run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "no stray rank directories"
    writers = {p.name.split(".")[4] for p in (tmp_path / "run" / "tb").glob("events.out.*")}
    assert len(writers) == 1, "event files of one process (its pid is in their names)"
    assert (tmp_path / "run" / "train.log").read_text().count("best val mse") == 1
    assert (done.stdout + done.stderr).count("best val mse") == 1


def test_a_meta_batch_splits_into_contiguous_shares_differing_by_at_most_one():
    for tasks in (2, 5, 7, 32):
        for world in range(1, tasks + 1):
            shares = [Context(r, world).share(tasks) for r in range(world)]
            covered = [i for s in shares for i in range(tasks)[s]]
            assert covered == list(range(tasks))
            sizes = [s.stop - s.start for s in shares]
            assert max(sizes) - min(sizes) <= 1


def test_a_meta_batch_smaller_than_the_process_count_is_refused(cli_here, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")  # as torchrun sets them; refused before any start
    monkeypatch.setenv("RANK", "0")
    done = cli_here("train", *RUN, "meta_batch_size=2")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "mamlrun: error: meta_batch_size=2 cannot be split across 4 processes: give each at "
        "least one task"
    )


@pytest.mark.parametrize("command", ["test", "adapt"])
def test_test_and_adapt_refuse_torchrun(cli_here, monkeypatch, command):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    done = cli_here(command, "checkpoint=x.pt")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"mamlrun: error: mamlrun {command} runs in one process: start it without torchrun"
    )

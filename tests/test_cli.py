"""The command line, as a researcher uses it: smoke cycle, outputs, Hydra flags, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mamlrun.cli import main

SMOKE = ("train", "debug=smoke")


def run_dir_of(cwd: Path, command: str = "train") -> Path:
    dirs = sorted((cwd / "outputs" / command).glob("*/*"))
    assert dirs, f"no run directory under {cwd}/outputs/{command}"
    return dirs[-1]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One `mamlrun train debug=smoke` shared by the tests that inspect its outputs."""
    from conftest import run_cli

    cwd = tmp_path_factory.mktemp("smoke")
    result = run_cli(*SMOKE, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd, run_dir_of(cwd), result


def test_help_lists_the_subcommands(cli):
    out = cli("--help")
    assert out.returncode == 0
    for command in ("train", "test", "adapt"):
        assert command in out.stdout


@pytest.mark.parametrize(
    "gpus, device",
    [([], "cpu: no CUDA device"), (["NVIDIA H200"], "cuda: NVIDIA H200"),
     (["NVIDIA H200"] * 2, "cuda: 2 x NVIDIA H200")],
)  # fmt: skip
def test_version_is_mamlruns_with_torchs_and_the_device_for_every_command(
    gpus, device, cli_here, monkeypatch
):
    from mamlrun import __version__

    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(gpus))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: gpus[i])
    expected = f"mamlrun {__version__} (torch {torch.__version__}, {device})\n"
    for args in (["--version"], ["train", "--version"], ["test", "--version"],
                 ["adapt", "checkpoint=run", "--version"]):  # fmt: skip
        out = cli_here(*args)
        assert (out.returncode, out.stdout, out.stderr) == (0, expected, ""), args


def test_unknown_subcommand_is_one_line_and_nonzero(cli):
    out = cli("trian")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "unknown command 'trian'" in out.stderr


def test_smoke_cycle_writes_config_checkpoints_results_and_events(smoke_run):
    _, run_dir, _ = smoke_run
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "config.yaml").is_file()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["metric"] == "mse" and results["best_step"] in (10, 20)
    assert [h["step"] for h in results["val_history"]] == [10, 20]
    test = json.loads((run_dir / "test" / "results.json").read_text())
    assert set(test) >= {"metric", "test_tasks", "inner_steps", "mean", "ci95"}
    assert test["test_tasks"] == 8 and test["inner_steps"] == 10
    adapt = json.loads((run_dir / "adapt" / "results.json").read_text())
    assert adapt["steps"] == list(range(11)) and len(adapt["mean"]) == len(adapt["ci95"]) == 11
    assert len(adapt["baseline"]["mean"]) == 11
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))


def test_tensorboard_events_hold_train_val_and_hparams(smoke_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, _ = smoke_run
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/mse", "val/mse", "val/loss"} <= tags
    assert [e.step for e in events.Scalars("val/mse")] == [10, 20]
    hparams_runs = [p for p in (run_dir / "tb").rglob("events.out.tfevents.*")]
    assert len(hparams_runs) >= 2, "add_hparams writes its own event file"


def test_checkpoint_holds_everything_needed_to_resume(smoke_run):
    _, run_dir, _ = smoke_run
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert {"model", "optimizer", "generator", "rng", "progress", "config"} <= set(state)
    assert state["progress"]["step"] == 20
    assert state["config"]["components"]["backbone"]["hidden"] == [40, 40]


@pytest.mark.slow
def test_test_and_adapt_commands_on_the_checkpoint(smoke_run, cli, tmp_path):
    _, run_dir, _ = smoke_run
    ckpt = run_dir / "checkpoints" / "best.pt"
    out = cli("test", f"checkpoint={ckpt}", "test_tasks=12", "device=cpu")
    assert out.returncode == 0, out.stderr
    assert "±" in out.stdout
    result = json.loads((run_dir_of(tmp_path, "test") / "results.json").read_text())
    assert result["metric"] == "mse" and result["test_tasks"] == 12 and result["inner_steps"] == 10
    assert result["ci95"] > 0

    out = cli("adapt", f"checkpoint={ckpt}", "test_tasks=6", "inner_steps=3", "baseline.steps=5")
    assert out.returncode == 0, out.stderr
    result = json.loads((run_dir_of(tmp_path, "adapt") / "results.json").read_text())
    assert result["steps"] == [0, 1, 2, 3] and result["baseline"]["steps"] == [0, 1, 2, 3]


@pytest.mark.slow
def test_the_same_seed_gives_the_same_test_tasks_and_another_seed_others(smoke_run, cli, tmp_path):
    _, run_dir, _ = smoke_run
    ckpt = run_dir / "checkpoints" / "best.pt"
    means = []
    for i, seed in enumerate((2002, 2002, 7)):
        out = cli("test", f"checkpoint={ckpt}", "test_tasks=5", f"test_seed={seed}",
                  f"hydra.run.dir=t{i}")  # fmt: skip
        assert out.returncode == 0, out.stderr
        means.append(json.loads((tmp_path / f"t{i}" / "results.json").read_text())["mean"])
    assert means[0] == means[1] and means[2] != means[0]


def test_cfg_job_prints_the_composed_config(cli_here):
    out = cli_here("train", "experiment=sinusoid_maml_paper", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    assert "iterations: 70000" in out.stdout and "inner_lr: 0.01" in out.stdout


@pytest.mark.parametrize(
    "override,message",
    [  # the reason, not the words of the override (which any one-line error would echo)
        (
            "meta_optimizer.inner_lrr=0.1",
            "unknown key meta_optimizer.inner_lrr; did you mean meta_optimizer.inner_lr?",
        ),
        ("seed=abc", "'abc' of type 'str' could not be converted to Integer"),
        ("meta_optimizer.inner_lr=fast", "has the wrong type: expected float"),
        ("dataset=imagenet9000", "no such choice (available: cifarfs, cub, fc100,"),
        ("dataset.shots=0", "shots must be a positive"),
        ("dataset.query=-1", "query must be a positive"),
        ("device=cuda:7", "was requested but CUDA is not available here")
        if not torch.cuda.is_available()
        else ("device=cuda:99", "device=cuda:99 does not exist: this machine has"),
        ("device=tpu", "device='tpu' is not a device (use auto, cpu, cuda or cuda:N)"),
        ("iterations=0", "iterations must be positive"),
        ("meta_optimizer.task_batching=fast", "unknown task batching 'fast' (one of loop,"),
        ("meta_optimizer.optimizer.lr=1e6", "train loss is nan at step 5: the run diverged"),
        ("meta_optimizer.inner_lr=1e4", "validation mse is nan at step 10: the run diverged"),
    ],
)
def test_bad_input_is_a_one_line_error_and_nonzero_exit(
    override, message, capfd, monkeypatch, tmp_path
):
    # In-process (the CLI's own main) to keep the suite fast; one case below runs it as a
    # subprocess too.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main([*SMOKE, override])
    assert exit_info.value.code == 2
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mamlrun: error:") and message in lines[0]
    assert "Traceback" not in err


def test_bad_input_in_a_real_process(cli):
    out = cli(*SMOKE, "meta_optimizer.inner_lr=fast")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "mamlrun: error: meta_optimizer.inner_lr='fast' has the wrong type: expected float"
    ]


@pytest.mark.slow  # a real process: the traceback is what Hydra prints on its way out
def test_full_traceback_on_request(cli, tmp_path):
    out = cli(*SMOKE, "dataset.shots=0", env={"HYDRA_FULL_ERROR": "1"})
    assert out.returncode != 0 and "Traceback" in out.stderr
    # The traceback was asked for, not a run: one that failed before doing anything leaves
    # no folder, as without HYDRA_FULL_ERROR.
    assert "dataset.shots must be" in out.stderr and not (tmp_path / "outputs").exists()


def test_missing_and_corrupt_checkpoints_are_one_line_errors(cli_here, tmp_path):
    out = cli_here("test", "checkpoint=nope.pt")
    assert out.returncode == 2 and "checkpoint not found: nope.pt" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    out = cli_here("test", f"checkpoint={bad}")
    assert out.returncode == 2 and "corrupt" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1

    out = cli_here("test")
    assert out.returncode == 2 and "test needs checkpoint=PATH" in out.stderr


def test_a_run_stopped_before_its_first_validation_points_at_its_last_pt(
    smoke_run, cli_here, tmp_path
):
    """Such a run has checkpoints/last.pt but no best.pt yet: the line says so and gives the
    command that tests last.pt, which works."""
    _, run_dir, _ = smoke_run
    stopped = tmp_path / "stopped"
    shutil.copytree(run_dir / ".hydra", stopped / ".hydra")
    last = stopped / "checkpoints" / "last.pt"
    last.parent.mkdir()
    shutil.copy(run_dir / "checkpoints" / "last.pt", last)

    out = cli_here("test", f"checkpoint={stopped}")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"mamlrun: error: checkpoint={stopped} is a run directory without checkpoints/best.pt "
        "(it stopped before its first validation); its checkpoints/last.pt is there: "
        f"mamlrun test checkpoint={last}"
    ]
    suggested = out.stderr.strip().rpartition(": mamlrun ")[2].split()
    tested = cli_here(*suggested, "test_tasks=2", "eval_batch_size=2", "hydra.run.dir=tested")
    assert tested.returncode == 0, tested.stderr
    assert (tmp_path / "tested" / "results.json").is_file()


def test_a_directory_without_any_checkpoint_says_what_it_is(cli_here, tmp_path):
    (tmp_path / "unsaved" / ".hydra").mkdir(parents=True)
    out = cli_here("test", "checkpoint=unsaved")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "mamlrun: error: checkpoint=unsaved is a run directory without checkpoints/best.pt or "
        "checkpoints/last.pt: it stopped before it saved any, so there is nothing to test"
    ]

    run = tmp_path / "runs" / "train" / "2026-01-02" / "03-04-05"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.pt").touch()
    out = cli_here("adapt", "checkpoint=runs")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "mamlrun: error: checkpoint=runs is not a run directory (no checkpoints/best.pt or "
        "checkpoints/last.pt in it): give a run's directory or a .pt file; the newest run "
        f"below it: checkpoint={Path('runs', 'train', '2026-01-02', '03-04-05')}"
    ]
    assert not (tmp_path / "outputs").exists()


def test_truncated_checkpoint_is_rejected(smoke_run, cli, tmp_path):
    _, run_dir, _ = smoke_run
    data = (run_dir / "checkpoints" / "best.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    out = cli("test", f"checkpoint={cut}")
    assert out.returncode == 2 and "corrupt" in out.stderr


def test_non_tty_output_has_no_progress_bar_garbage(smoke_run):
    _, _, result = smoke_run
    assert "\r" not in result.stderr and "\r" not in result.stdout
    assert "step 20: val mse" in result.stdout + result.stderr


@pytest.mark.slow  # three interpreters
def test_shell_completion_completes_subcommands_and_config_groups(cli):
    out = cli("train", "-sc", "install=bash")
    assert out.returncode == 0 and "complete" in out.stdout and "mamlrun" in out.stdout
    out = cli("-sc", "query=bash", env={"COMP_LINE": "mamlrun tr"})
    assert out.stdout.split() == ["train"]
    out = cli("-sc", "query=bash", env={"COMP_LINE": "mamlrun train meta_optimizer="})
    assert out.returncode == 0, out.stderr
    assert {"meta_optimizer=maml", "meta_optimizer=fomaml"} <= set(out.stdout.split())


def test_a_config_group_set_to_null_is_one_line_not_a_traceback(tmp_path):
    from conftest import run_cli

    out = run_cli("train", "experiment=null", "debug=smoke", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "mamlrun: error: Config group override must be a string or a list. Got NoneType: a "
        "config group takes one of its choices by name (~GROUP drops it)"
    ]
    assert not any(tmp_path.iterdir())

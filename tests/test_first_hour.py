"""What a new user meets in the first hour: the command we are known by trains the right
model, a run shows it is alive, logs hold results and errors, and mistakes read as one line
that keeps what is needed to fix them."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import compose_train, needs_omniglot, run_cli

from mamlrun import config
from mamlrun.results.stats import format_ci
from mamlrun.training.progress import Progress


# --------------------------------------------------------------- 1. choosing a dataset
def test_dataset_omniglot_alone_composes_conv4_with_the_papers_settings(cli_here):
    out = cli_here("train", "dataset=omniglot", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    assert "_target_: mamlrun.models.conv4.conv4" in out.stdout
    assert "inner_lr: 0.4" in out.stdout and "loss_normalization: tf_maml" in out.stdout
    assert "meta_batch_size: 32" in out.stdout


def test_what_the_user_chose_still_wins_over_the_datasets_preset(cli_here):
    out = cli_here("train", "dataset=omniglot", "meta_optimizer.inner_lr=0.1", "backbone=mlp",
              "--cfg", "job")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "inner_lr: 0.1" in out.stdout and "_target_: mamlrun.models.mlp.mlp" in out.stdout


@pytest.mark.slow
@needs_omniglot
def test_dataset_omniglot_alone_learns_well_above_chance(tmp_path):
    out = run_cli(
        "train", "dataset=omniglot", "iterations=60", "meta_batch_size=8", "val_every=60",
        "val_tasks=40", "device=cpu", "hydra.run.dir=run", cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["metric"] == "accuracy"
    assert results["best_val"] > 0.2 + 0.15, "5-way chance is 0.2"


def test_an_mlp_on_images_is_allowed_but_warned_about_in_one_line(caplog):
    from mamlrun.models.mlp import mlp

    with caplog.at_level(logging.WARNING, logger="mamlrun"):
        mlp((1, 28, 28), 5, **config.settings("backbone", "mlp", hidden=(8,)))
    assert len(caplog.records) == 1 and "backbone=conv4" in caplog.records[0].message


# --------------------------------------------------------------- 3. signs of life
def test_without_a_terminal_progress_is_a_log_line_at_a_steady_pace(caplog):
    with caplog.at_level(logging.INFO, logger="mamlrun"):
        with Progress("train", 100, every_s=0.05, terminal=False) as bar:
            for _ in range(3):
                time.sleep(0.06)
                bar.update(10, loss=0.5)
    lines = [r.message for r in caplog.records]
    assert len(lines) == 3
    assert lines[-1].startswith("train: 30/100 it (30.0%)") and "loss 0.5" in lines[-1]
    assert "it/s" in lines[-1] and "ETA" in lines[-1]


def test_on_a_terminal_progress_is_a_bar_and_no_log_lines(caplog, capsys):
    with caplog.at_level(logging.INFO, logger="mamlrun"):
        with Progress("test", 10, unit="tasks", every_s=0.0, terminal=True) as bar:
            bar.update(10)
    assert not caplog.records
    assert "10/10" in capsys.readouterr().err


def _screen(text: str) -> list[str]:
    """The lines a terminal shows after ``text``: newlines, carriage returns and tqdm's
    cursor-up (``ESC[A``, for a bar under another) move the cursor; characters overwrite."""
    rows, row, col = [""], 0, 0
    for token in re.findall(r"\x1b\[A|[\r\n]|[^\r\n\x1b]+", text):
        if token == "\n":
            row, col = row + 1, 0
            rows += [""] * (row + 1 - len(rows))
        elif token == "\r":
            col = 0
        elif token == "\x1b[A":
            row = max(row - 1, 0)
        else:
            line = rows[row].ljust(col)
            rows[row] = line[:col] + token + line[col + len(token) :]
            col += len(token)
    return [line.rstrip() for line in rows]


@contextlib.contextmanager
def console_and_file(log_file: Path):
    """The root logger's handlers as Hydra sets them up: the console (on the terminal the bar
    is drawn on, here pytest's capture of it) and the run's log file, and no others (handlers
    that earlier tests' runs left on the root logger would write into the captured output)."""
    root = logging.getLogger()
    console, file = logging.StreamHandler(sys.stderr), logging.FileHandler(log_file)
    before, root.handlers = root.handlers, [console, file]
    try:
        yield root
    finally:
        root.handlers = before
        file.close()


def test_a_log_line_during_a_bar_is_on_its_own_line_and_the_bar_is_drawn_below_it(
    caplog, capsys, tmp_path
):
    with caplog.at_level(logging.INFO, logger="mamlrun"), console_and_file(tmp_path / "log"):
        with Progress("train", 10, terminal=True) as bar:
            bar.update(3)
            logging.getLogger("mamlrun").info("step 3: val mse 0.5")
            bar.update(1)
    err = capsys.readouterr().err
    assert "step 3: val mse 0.5" in _screen(err), "glued onto the bar's text"
    after = err.split("step 3: val mse 0.5\n", 1)[1]
    assert re.match(r"\rtrain: +30%.* 3/10", after), "the bar is drawn again below the line"


def test_the_log_file_gets_every_line_and_nested_bars_give_the_console_back(
    caplog, capsys, tmp_path
):
    log_file = tmp_path / "train.log"
    with caplog.at_level(logging.INFO, logger="mamlrun"), console_and_file(log_file) as root:
        handlers = list(root.handlers)
        with Progress("train", 10, terminal=True) as bar:
            bar.update(1)
            with Progress("val", 4, unit="tasks", terminal=True) as inner:
                inner.update(2)  # as a validation inside training
                logging.getLogger("mamlrun").info("half of the validation tasks")
                inner.update(2)
            logging.getLogger("mamlrun").info("step 1: val mse 0.5")
            bar.update(1)
        assert root.handlers == handlers
        with Progress("test", 4, terminal=False) as plain:
            assert root.handlers == handlers, "no bar, nothing to write around"
            plain.update(4)
    screen = _screen(capsys.readouterr().err)
    assert screen[:2] == ["half of the validation tasks", "step 1: val mse 0.5"], screen
    assert screen[2].startswith("train:  20%") and screen[3:] == [""], "the val bar is gone"
    assert log_file.read_text() == "half of the validation tasks\nstep 1: val mse 0.5\n"


@pytest.mark.slow
def test_train_test_and_adapt_show_progress_in_a_log_file(tmp_path):
    out = run_cli(
        "train", "debug=smoke", "progress_seconds=0.0001", "hydra.run.dir=r", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    log = (tmp_path / "r" / "train.log").read_text()
    for what in ("train: ", "test: ", "adapt: ", "baseline: "):
        assert what in log, what
    # the train loss is shown until the next log_every step: the line says which step it is of
    assert re.search(r"train: \d+/20 it .*, loss [\d.]+, mse [\d.]+, at step \d+", log)


# --------------------------------------------------------------- 4. logs and run folders
def test_a_command_that_fails_before_any_work_leaves_no_folder(cli_here, tmp_path):
    out = cli_here("train", "iterations=0")
    assert out.returncode == 2 and "iterations must be positive" in out.stderr
    assert not (tmp_path / "outputs").exists()
    out = cli_here("test", "checkpoint=missing.pt")
    assert out.returncode == 2 and not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_results_and_errors_reach_the_runs_log(tmp_path):
    out = run_cli("train", "debug=smoke", "final_adapt=false", "hydra.run.dir=r", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    out = run_cli("test", "checkpoint=r", "test_tasks=5", "hydra.run.dir=t", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "test mse after 10 inner steps" in (tmp_path / "t" / "test.log").read_text()
    out = run_cli("train", "debug=smoke", "meta_optimizer.inner_lr=1e4", "hydra.run.dir=d",
                  cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2
    assert "the run diverged" in (tmp_path / "d" / "train.log").read_text()


# --------------------------------------------------------------- 5. errors keep their detail
@pytest.mark.parametrize(
    "args,expected",
    [
        (["train", "dataset=omniglt"], "omniglot, sinusoid, tieredimagenet); did you mean "
                                       "dataset=omniglot"),
        (["train", "iteratons=30"], "unknown key iteratons; did you mean iterations?"),
        (["train", "inner_lr=0.1"], "did you mean meta_optimizer.inner_lr?"),
        (["train", "dataset.ways=0"], "dataset has no ways (its keys: amplitude, phase, query"),
        (["test"], "test needs checkpoint=PATH"),
        (["test", "experiment=omniglot_5w1s", "checkpoint=x.pt"],
         "test takes backbone and algorithm from the checkpoint"),
        (["test", "checkpoint=x.pt", "dataset.root=/data"],
         "dataset.root: test reads the run's own dataset (data_root=DIR says where its data is"),
        (["train", "hydra/launcher=paralel"], "did you mean hydra/launcher=parallel"),
        (["train", "threads=0"], "threads must be positive (or null: torch's default), got 0"),
    ],
)  # fmt: skip
def test_a_mistake_is_one_line_that_says_how_to_fix_it(cli_here, args, expected):
    out = cli_here(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("mamlrun: error:") and expected in lines[0], lines[0]


@pytest.mark.slow
def test_a_run_directory_works_as_a_checkpoint(tmp_path):
    out = run_cli("train", "debug=smoke", "final_test=false", "final_adapt=false",
                  "hydra.run.dir=r", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    out = run_cli("test", "checkpoint=r", "test_tasks=4", "hydra.run.dir=t", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "t" / "results.json").read_text())
    assert result["checkpoint"].endswith("r/checkpoints/best.pt")


def test_missing_omniglot_zips_are_named_together(tmp_path, monkeypatch):
    from mamlrun.data import omniglot
    from mamlrun.errors import MamlrunError

    def offline(url, dest, md5=None):
        raise MamlrunError(f"could not download {url} (offline); download it by hand")

    monkeypatch.setattr(omniglot, "ensure_file", lambda dest, url, md5: offline(url, dest))
    with pytest.raises(MamlrunError) as error:
        omniglot.ensure_zips(tmp_path / "omniglot")
    assert "images_background.zip and images_evaluation.zip are missing" in str(error.value)


@pytest.mark.slow
def test_the_old_names_of_test_keys_still_work_with_a_warning(tmp_path):
    out = run_cli("train", "debug=smoke", "final_test=false", "final_adapt=false",
                  "hydra.run.dir=r", cwd=tmp_path)  # fmt: skip
    out = run_cli("test", "checkpoint=r", "n_tasks=3", "seed=5", "hydra.run.dir=t", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "n_tasks is now test_tasks" in out.stderr and "seed is now test_seed" in out.stderr
    assert json.loads((tmp_path / "t" / "results.json").read_text())["test_tasks"] == 3


# --------------------------------------------------------------- 6. help
def test_train_help_lists_its_options_with_descriptions_and_its_groups(cli_here):
    out = cli_here("train", "--help")
    assert out.returncode == 0, out.stderr
    assert "iterations=70000" in out.stdout and "outer (meta) steps" in out.stdout
    assert "omniglot_5w1s" in out.stdout and "MAML paper, Omniglot 5-way 1-shot" in out.stdout
    assert "hydra/launcher:" in out.stdout and "slurm" in out.stdout and "parallel" in out.stdout
    groups = out.stdout.split("config groups")[1].split("options")[0]
    choices = groups.split("meta_optimizer:")[1].split("experiment:")[0]
    assert [line.split()[0] for line in choices.strip().splitlines()] == [
        "anil", "boil", "cavia", "fomaml", "imaml", "maml", "mamlpp", "metacurvature", "metasgd",
        "reptile",
    ]  # fmt: skip


def test_test_help_lists_only_what_test_takes(cli_here):
    out = cli_here("test", "--help")
    assert out.returncode == 0, out.stderr
    assert "test_tasks=600" in out.stdout and "checkpoint=???" in out.stdout
    assert "dataset:" not in out.stdout and "iterations" not in out.stdout


# --------------------------------------------------------------- 7. numbers that mislead
def test_the_logged_loss_is_the_mean_cross_entropy_whatever_the_inner_normalisation():
    from conftest import image_batch, maml

    from mamlrun.models.conv4 import conv4

    losses = []
    for normalization in ("mean", "tf_maml"):
        algo = maml(inner_lr=0.1, loss_normalization=normalization)
        torch.manual_seed(0)  # the same network for both
        model = algo.meta_model(
            conv4((1, 8, 8), 3, **config.settings("backbone", "conv4", filters=4)).double()
        )
        loss, _ = algo.bind("classification", "loop").evaluate(model, image_batch(), 0)
        losses.append(loss)
    assert (losses[0] - losses[1]).abs().max() < 1e-12, "step 0: same model, same loss"


def test_hparams_show_booleans_as_text_and_no_target_columns():
    from mamlrun.results.tensorboard import hparams_of
    from mamlrun.training.components import component_config

    hparams = hparams_of(component_config(compose_train("experiment=omniglot_5w1s")))
    assert hparams["meta_optimizer.first_order"] == "false"
    assert hparams["backbone"] == "conv4" and hparams["meta_optimizer"] == "MAML"
    assert not any("_target_" in k or "_partial_" in k for k in hparams)


@pytest.mark.parametrize(
    "mean,ci,percent,text",
    [(4.49, 3.0, False, "4.5 ± 3.0"), (3.158, 0.2668, False, "3.16 ± 0.27"),
     (0.9203, 0.00841, True, "92.03 ± 0.84%"), (0.575000014, 2.4e-10, True, "57.5 ± 0%")],
)  # fmt: skip
def test_mean_and_ci_are_printed_to_the_cis_precision(mean, ci, percent, text):
    assert format_ci(mean, ci, percent) == text


@pytest.mark.slow
def test_sigterm_during_the_final_evaluation_says_what_is_saved(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "mamlrun.cli", "train", "debug=smoke", "baseline.steps=1000000",
         "progress_seconds=0.1", "hydra.run.dir=r"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    log = Path(tmp_path / "r" / "train.log")
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and "baseline: " in log.read_text()):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert err.strip().splitlines()[-1].startswith("mamlrun: SIGTERM received: stopped during")
    assert "training is done" in err and (tmp_path / "r" / "checkpoints" / "best.pt").exists()

"""Sweeps: ``-m`` ends with a summary of every job, failures do not lose the others, the
joblib launcher runs jobs in parallel processes, and the Optuna preset searches."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from conftest import data_root, needs_omniglot, run_cli
from omegaconf import OmegaConf

from mamlrun.results import sweep
from mamlrun.results.stats import format_ci, mean_ci95_t, t_quantile_975

pytestmark = pytest.mark.slow  # every test here runs sweeps of real jobs

QUICK = ("debug=smoke", "final_adapt=false")


def rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def best_val(job_dir: Path) -> float:
    return json.loads((job_dir / "results.json").read_text())["best_val"]


def hparams_of(tb_dir: Path) -> dict[str, object]:
    """The HParams row TensorBoard shows for one run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    for events_file in tb_dir.rglob("events.out.tfevents.*"):
        events = EventAccumulator(str(events_file.parent))
        events.Reload()
        for content in events.PluginTagToContent("hparams").values():
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            if data.HasField("session_start_info"):
                values = data.session_start_info.hparams
                return {
                    k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
                    for k, v in values.items()
                }
    return {}


@pytest.fixture(scope="module")
def lr_seed_sweep(tmp_path_factory):
    """2 inner learning rates × 2 seeds, run as a user would."""
    cwd = tmp_path_factory.mktemp("sweep")
    done = run_cli(
        "train", "-m", *QUICK, "meta_optimizer.inner_lr=0.01,0.02", "seed=0,1",
        "hydra.sweep.dir=sweep", cwd=cwd,
    )  # fmt: skip
    return done, cwd / "sweep"


def test_sweep_ends_with_a_csv_row_per_job_holding_its_results(lr_seed_sweep):
    done, sweep_dir = lr_seed_sweep
    assert done.returncode == 0, done.stderr
    table = rows(sweep_dir / "summary.csv")
    assert [r["job"] for r in table] == ["0", "1", "2", "3"]
    assert {(r["meta_optimizer.inner_lr"], r["seed"]) for r in table} == {
        ("0.01", "0"), ("0.01", "1"), ("0.02", "0"), ("0.02", "1"),
    }  # fmt: skip
    for r in table:
        assert r["status"] == "ok"
        assert float(r["best_val_mse"]) == pytest.approx(best_val(Path(r["directory"])))
        assert float(r["test_mse"]) > 0  # debug=smoke runs the final test


def test_sweep_groups_seeds_with_a_students_t_interval(lr_seed_sweep):
    _, sweep_dir = lr_seed_sweep
    per_job = rows(sweep_dir / "summary.csv")
    grouped = {r["meta_optimizer.inner_lr"]: r for r in rows(sweep_dir / "summary_grouped.csv")}
    assert set(grouped) == {"0.01", "0.02"}
    for lr, group in grouped.items():
        values = [float(r["best_val_mse"]) for r in per_job if r["meta_optimizer.inner_lr"] == lr]
        mean, ci = mean_ci95_t(values)
        assert group["jobs"] == "2" and group["failed"] == "0"
        assert float(group["best_val_mse"]) == pytest.approx(mean)
        assert float(group["best_val_mse_ci95"]) == pytest.approx(ci)
        assert ci == pytest.approx(12.706 * abs(values[0] - values[1]) / 2, rel=1e-3)


def test_sweep_prints_the_tables(lr_seed_sweep):
    done, sweep_dir = lr_seed_sweep
    assert "sweep summary: sweep" in done.stdout
    assert "grouped over seed (mean ± 95% CI, Student's t)" in done.stdout
    assert "common overrides: debug=smoke final_adapt=False" in done.stdout


def test_two_algorithms_over_two_seeds_are_two_groups_in_every_table(cli_here, tmp_path):
    done = cli_here("train", "-m", *QUICK, "seed=0,1", "meta_optimizer=maml,fomaml",
                    "hydra.sweep.dir=s")  # fmt: skip
    assert done.returncode == 0, done.stderr
    grouped = {r["meta_optimizer"]: r for r in rows(tmp_path / "s" / "summary_grouped.csv")}
    assert set(grouped) == {"maml", "fomaml"}
    assert all(g["jobs"] == "2" and g["failed"] == "0" for g in grouped.values())
    printed = [line for line in done.stdout.splitlines() if line.startswith("| - | meta_opt")]
    assert printed == [
        f"| - | meta_optimizer={algorithm} | 0, 1 | "
        f"{format_ci(float(g['test_mse']), float(g['test_mse_ci95']))} | - | no reference |"
        for algorithm, g in grouped.items()
    ], "the report's table over seeds groups as summary_grouped.csv does"
    assert "| 0, 0, 1, 1 |" not in done.stdout  # not one group of both algorithms


def test_every_job_of_a_sweep_is_a_row_in_tensorboards_hparams_tab(lr_seed_sweep):
    _, sweep_dir = lr_seed_sweep
    seen = set()
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        hparams = hparams_of(job / "tb")
        seen.add((round(hparams["meta_optimizer.inner_lr"], 6), hparams["seed"]))
    assert seen == {(0.01, 0), (0.01, 1), (0.02, 0), (0.02, 1)}


def test_a_failed_job_is_reported_and_the_others_keep_their_results(cli, tmp_path):
    done = cli("train", "-m", *QUICK, "meta_optimizer.inner_lr=0.01,-1", "hydra.sweep.dir=s")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "mamlrun: error: 1 of 2 jobs did not finish; the others' results are in s/summary.csv"
    )
    ok, failed = rows(tmp_path / "s" / "summary.csv")
    assert ok["status"] == "ok" and float(ok["best_val_mse"]) > 0
    assert failed["status"] == "failed"
    assert failed["error"] == "meta_optimizer.inner_lr must be positive, got -1"
    assert (
        "Traceback" in json.loads((tmp_path / "s" / "1" / "failure.json").read_text())["traceback"]
    )


def test_joblib_launcher_runs_a_two_job_sweep_in_parallel_processes(cli, tmp_path, lr_seed_sweep):
    done = cli(
        "train", "-m", *QUICK, "hydra/launcher=parallel", "meta_optimizer.inner_lr=0.01",
        "seed=0,1", "hydra.sweep.dir=p",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Joblib.Parallel(n_jobs=2" in done.stdout + done.stderr
    table = rows(tmp_path / "p" / "summary.csv")
    assert [r["status"] for r in table] == ["ok", "ok"]
    # Same jobs as the sequential sweep: the launcher changes where they run, not the result.
    _, sequential = lr_seed_sweep
    expected = {
        r["seed"]: float(r["best_val_mse"])
        for r in rows(sequential / "summary.csv")
        if r["meta_optimizer.inner_lr"] == "0.01"
    }
    assert {r["seed"]: float(r["best_val_mse"]) for r in table} == pytest.approx(expected)


@pytest.mark.slow
@needs_omniglot
def test_optuna_preset_maximises_validation_accuracy(cli, tmp_path):
    done = cli(
        "train", "hparams_search=optuna", "experiment=omniglot_5w1s", "debug=smoke",
        "iterations=2", "val_every=2", "final_test=false", "final_adapt=false",
        "meta_optimizer.task_batching=loop", "hydra.sweeper.n_trials=3", "hydra.sweep.dir=o",
        f"dataset.root={data_root()}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    table = rows(tmp_path / "o" / "summary.csv")
    assert len(table) == 3 and all(r["status"] == "ok" for r in table)
    lrs = {r["meta_optimizer.inner_lr"] for r in table}
    assert len(lrs) == 3, "each trial gets its own sampled inner_lr"
    for r in table:
        assert 0.01 <= float(r["meta_optimizer.inner_lr"]) <= 1.0
    best = OmegaConf.load(tmp_path / "o" / "optimization_results.yaml")
    accuracies = [float(r["best_val_accuracy"]) for r in table]
    assert best.best_value == pytest.approx(max(accuracies))  # maximised, the train return


def test_optuna_preset_refuses_to_maximise_a_loss(cli):
    done = cli("train", "hparams_search=optuna", "debug=smoke", "hydra.sweeper.n_trials=2")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "mamlrun: error: the sweeper would maximize mse, which this dataset wants to minimize: "
        "set hydra.sweeper.direction=minimize"
    )


# --------------------------------------------------------------------------- the summary itself
def fake_job(sweep_dir: Path, name: str, overrides: list[str], results: dict | None) -> Path:
    job = sweep_dir / name
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    if results is not None:
        (job / "results.json").write_text(json.dumps(results))
    return job


def train_results(best: float) -> dict:
    return {
        "metric": "accuracy",
        "best_val": best,
        "best_val_ci95": 0.01,
        "best_step": 5,
        "steps": 5,
    }


def test_a_killed_job_shows_as_incomplete_and_counts_as_not_finished(tmp_path):
    fake_job(tmp_path, "0", ["seed=0"], train_results(0.9))
    fake_job(tmp_path, "1", ["seed=1"], None)
    summary = sweep.summarise(tmp_path)
    assert [j.status for j in summary.jobs] == ["ok", "incomplete"]
    assert summary.groups == [
        {"jobs": 2, "failed": 1, "best_val_accuracy": 0.9, "best_val_accuracy_ci95": 0.0}
    ]
    assert "1 of 2 jobs did not finish" in sweep.render(summary)


def test_jobs_are_in_numeric_order_and_a_summary_can_be_rebuilt(tmp_path, capsys):
    for n in (10, 2, 1):
        fake_job(tmp_path, str(n), [f"seed={n}", "meta_batch_size=4"], train_results(n / 100))
    assert sweep.main([str(tmp_path)]) == 0
    assert [r["job"] for r in rows(tmp_path / "summary.csv")] == ["1", "2", "10"]
    out = capsys.readouterr().out
    assert "common overrides: meta_batch_size=4" in out


def test_test_and_adapt_results_are_summarised_too():
    metrics, headline = sweep.job_metrics({"metric": "mse", "mean": 0.5, "ci95": 0.1})
    assert metrics == {"test_mse": 0.5, "test_mse_ci95": 0.1} and headline == ["test_mse"]
    adapt = {"metric": "mse", "steps": [0, 1, 2], "mean": [3.0, 1.0, 0.5], "ci95": [0, 0, 0]}
    metrics, headline = sweep.job_metrics(adapt)
    assert metrics["mse_step2"] == 0.5 and headline == ["mse_step2"]


def test_students_t_matches_the_tables():
    assert t_quantile_975(1) == 12.706
    assert t_quantile_975(2) == 4.303
    assert t_quantile_975(30) == 2.042
    assert t_quantile_975(40) == pytest.approx(2.021, abs=1e-3)
    assert t_quantile_975(120) == pytest.approx(1.980, abs=1e-3)
    assert t_quantile_975(10**6) == pytest.approx(1.960, abs=1e-3)
    mean, ci = mean_ci95_t([1.0, 2.0, 3.0])
    assert mean == 2.0 and ci == pytest.approx(4.303 * 1.0 / math.sqrt(3))

"""`mamlrun report`: each run against the published result its preset targets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import compose_train, needs_omniglot, run_cli
from omegaconf import OmegaConf

from mamlrun import config
from mamlrun.results import reference, report
from mamlrun.results.stats import format_ci

QUICK = ["iterations=10", "val_every=10", "val_tasks=4", "checkpoint_every=10",
         "final_test=true", "test_tasks=8", "device=cpu"]  # fmt: skip


# --------------------------------------------------------------------------- the verdict
@pytest.mark.parametrize(
    "mean,ci,expected",
    [(0.986, 0.01, reference.INSIDE), (0.980, 0.005, reference.OVERLAP),
     (0.960, 0.005, reference.BELOW), (0.999, 0.001, reference.ABOVE)],
)  # fmt: skip
def test_the_verdict_places_our_interval_against_the_papers(mean, ci, expected):
    assert reference.verdict(mean, ci, 0.987, 0.004) == expected


def test_a_run_short_of_its_presets_iterations_is_not_compared_with_the_paper():
    short = reference.verdict(0.81, 0.04, 0.987, 0.004, trained=300, budget=60000)
    assert short == "not comparable (300 / 60,000 iterations)"  # not "below"
    assert reference.verdict(0.81, 0.04, 0.987, 0.004, trained=60000, budget=60000) == "below"
    assert reference.verdict(0.99, 0.003, 0.987, 0.004, trained=70000, budget=60000) == (
        reference.INSIDE  # longer than the paper: it had the budget
    )
    unknown = reference.verdict(0.99, 0.003, 0.987, 0.004, trained=None, budget=60000)
    assert unknown == "not comparable (? / 60,000 iterations)"


def test_where_data_lives_and_how_tasks_are_batched_do_not_make_runs_incomparable():
    preset = {"dataset.ways": 5, "dataset.root": None, "meta_optimizer.task_batching": "auto",
              "meta_batch_size": 32, "seed": 0, "iterations": 60000}  # fmt: skip
    run = {**preset, "dataset.root": "/data", "meta_optimizer.task_batching": "loop",
           "seed": 3, "iterations": 5000}  # fmt: skip
    assert reference.differences(run, preset) == []
    assert reference.differences({**run, "meta_batch_size": 4}, preset) == [
        "meta_batch_size: 32 → 4"
    ]


def test_published_numbers_are_shown_with_the_papers_digits():
    assert reference.shown(0.987, 0.004, "accuracy") == "98.7 ± 0.4%"
    assert reference.shown(0.9947, 0.0014, "accuracy") == "99.47 ± 0.14%"
    assert reference.shown(0.8344, None, "accuracy") == "83.44% (no interval given)"


def test_a_reference_without_an_interval_is_compared_as_the_point_it_gives():
    assert reference.verdict(0.8344, 0.01, 0.8344, None) == reference.INSIDE
    assert reference.verdict(0.84, 0.003, 0.8344, None) == reference.ABOVE
    assert reference.verdict(0.83, 0.005, 0.8344, None) == reference.OVERLAP


def test_every_image_preset_names_its_paper_or_says_why_not_and_sinusoid_has_none():
    presets = Path(__file__).resolve().parents[1].glob("conf/experiment/*.yaml")
    for preset in presets:
        ref = compose_train(f"experiment={preset.stem}").reference
        if preset.stem.startswith(("sinusoid", "images")):
            assert ref is None  # the paper shows curves, no number; a user's data has none
            continue
        if ref is None:  # a number that could not be checked against the paper is left out
            assert "not verified" in preset.read_text().lower(), f"{preset.stem}: say why"
            continue
        assert ref.metric == "accuracy" and 0.2 < ref.value < 1
        if ref.ci95 is None:  # the source prints the mean alone: the preset says so
            assert "could not be read" in preset.read_text(), f"{preset.stem}: say why"
        else:
            assert 0 < ref.ci95 < 0.02
        assert ref.inner_steps >= 1 and "Table" in ref.source
        if preset.stem.startswith("omniglot"):
            assert ref.value > 0.9


# --------------------------------------------------------------------------- runs on disk
def fake_run(directory: Path, preset: str | None, *overrides: str, results=None, tests=()):
    """A run folder as `mamlrun train` leaves it: .hydra/, results.json, test folders."""
    cfg = compose_train(*([f"experiment={preset}"] if preset else []), *overrides)
    (directory / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, directory / ".hydra" / "config.yaml")
    given = [*([f"experiment={preset}"] if preset else []), *overrides]
    OmegaConf.save(OmegaConf.create(given), directory / ".hydra" / "overrides.yaml")
    choices = {"experiment": preset}
    OmegaConf.save({"hydra": {"runtime": {"choices": choices}, "searchpath": []}},
                   directory / ".hydra" / "hydra.yaml")  # fmt: skip
    if results is not None:
        (directory / "results.json").write_text(json.dumps(results))
    for sub, mean, ci, steps, trained in tests:
        (directory / sub).mkdir(parents=True)
        test = {"metric": "accuracy", "test_tasks": 600, "inner_steps": steps, "mean": mean,
                "ci95": ci, "trained_steps": trained}  # fmt: skip
        (directory / sub / "results.json").write_text(json.dumps(test))
    return directory


def row_of(directory: Path) -> report.Row:
    (row,) = report.rows_of([directory])
    return row


def test_the_latest_test_with_the_papers_inner_steps_is_the_one_compared(tmp_path):
    run = fake_run(tmp_path / "r", "omniglot_5w1s", tests=[
        ("periodic_test/30000", 0.97, 0.006, 10, 24000),
        ("periodic_test_3steps/30000", 0.96, 0.007, 3, 24000),
        ("periodic_test_3steps/60000", 0.981, 0.005, 3, 59000),
        ("periodic_test/60000", 0.99, 0.004, 10, 59000),
    ])  # fmt: skip
    row = row_of(run)
    assert (row.test.mean, row.test.inner_steps, row.test.step) == (0.981, 3, 59000)
    assert row.verdict == reference.OVERLAP and row.done is None and row.planned == 60000


def test_a_test_with_other_inner_steps_is_not_compared_and_the_fix_is_named(tmp_path):
    run = fake_run(tmp_path / "r", "omniglot_5w1s", tests=[("test", 0.99, 0.004, 10, 100)])
    verdict = row_of(run).verdict
    assert verdict.startswith("not comparable: tested with 10 inner steps, the reference with 3")
    assert f"mamlrun test checkpoint={run} inner_steps=3" in verdict


def test_runs_without_a_test_or_without_a_reference_say_so(tmp_path):
    assert row_of(fake_run(tmp_path / "a", "omniglot_20w1s")).verdict == "no test"
    sine = fake_run(tmp_path / "b", "sinusoid_maml_paper", results={"metric": "mse", "steps": 7})
    row = row_of(sine)
    assert row.verdict == "no reference" and row.done == 7 and row.metric == "mse"


def test_a_preset_this_mamlrun_does_not_have_makes_the_run_incomparable(tmp_path):
    run = fake_run(tmp_path / "r", "omniglot_5w1s", tests=[("test_3steps", 0.98, 0.01, 3, 60000)])
    hydra = OmegaConf.load(run / ".hydra" / "hydra.yaml")
    hydra.hydra.runtime.choices.experiment = "omniglot_gone"
    OmegaConf.save(hydra, run / ".hydra" / "hydra.yaml")
    assert row_of(run).verdict == (
        "not comparable: preset omniglot_gone is not in this mamlrun's configs"
    )


def test_seeds_of_one_setting_are_grouped_with_a_t_interval(tmp_path):
    for seed, mean in [(0, 0.985), (1, 0.987), (2, 0.989)]:
        fake_run(tmp_path / f"s{seed}", "omniglot_5w1s", f"seed={seed}",
                 tests=[("test_3steps", mean, 0.005, 3, 60000)])  # fmt: skip
    fake_run(tmp_path / "other", "omniglot_5w1s", "meta_batch_size=8",
             tests=[("test_3steps", 0.9, 0.01, 3, 60000)])  # fmt: skip
    rows = report.rows_of([tmp_path])
    (group,) = report.grouped(rows)
    assert group["seeds"] == ["0", "1", "2"] and group["mean"] == pytest.approx(0.987)
    assert group["ci95"] == pytest.approx(4.303 * 0.002 / 3**0.5, rel=1e-3)
    assert group["verdict"] == reference.INSIDE
    assert "Grouped over seeds" in report.render(rows)


def short_run(directory: Path, steps: int, *overrides: str, stopped_by="iterations"):
    results = {"metric": "accuracy", "steps": steps, "stopped_by": stopped_by}
    return fake_run(directory, "omniglot_5w1s", *overrides, results=results,
                    tests=[("test_3steps", 0.81, 0.04, 3, steps)])  # fmt: skip


def test_a_shortened_run_is_reported_as_not_comparable_with_its_iterations(tmp_path):
    row = row_of(short_run(tmp_path / "short", 300, "iterations=300"))
    assert (row.done, row.planned) == (300, 60000)
    assert row.verdict == "not comparable (300 / 60,000 iterations)"
    assert "| 300 / 60,000 |" in report.render([row])
    smoke = row_of(short_run(tmp_path / "smoke", 20, "debug=smoke"))
    assert smoke.verdict == "not comparable (20 / 60,000 iterations): meta_batch_size: 32 → 4"
    out_of_time = row_of(
        short_run(tmp_path / "timed", 412, "max_minutes=2", stopped_by="max_minutes")
    )
    assert out_of_time.verdict == "not comparable (412 / 60,000 iterations)"
    assert row_of(short_run(tmp_path / "full", 60000)).verdict == reference.BELOW


def test_a_periodic_test_is_compared_only_if_made_after_the_whole_budget(tmp_path):
    done = {"metric": "accuracy", "steps": 60000}
    early = [("periodic_test_3steps/5000", 0.96, 0.007, 3, 4000)]
    run = fake_run(tmp_path / "r", "omniglot_5w1s", results=done, tests=early)
    assert row_of(run).verdict == "not comparable (5,000 / 60,000 iterations)"


def test_each_run_names_its_algorithm_by_the_choice_it_ran(tmp_path):
    """BOIL is MAML's class adapting the body: only the meta_optimizer choice tells the two
    apart; a run whose .hydra/ records no choice falls back to the class in results.json."""
    boil = fake_run(tmp_path / "boil", "miniimagenet_5w1s_boil")
    hydra = OmegaConf.load(boil / ".hydra" / "hydra.yaml")
    hydra.hydra.runtime.choices.meta_optimizer = "boil"
    OmegaConf.save(hydra, boil / ".hydra" / "hydra.yaml")
    fake_run(tmp_path / "older", None, results={"algorithm": "MAML", "steps": 3})
    rows = {r.run: r for r in report.rows_of([tmp_path])}
    assert (rows["boil"].algorithm, rows["older"].algorithm) == ("boil", "MAML")
    table = report.render([rows["boil"]]).splitlines()
    assert table[0].startswith("| run | preset | algorithm | seed |")
    assert table[2].startswith("| boil | miniimagenet_5w1s_boil | boil | 0 |")


def test_the_report_shows_each_runs_speed_and_a_dash_for_runs_that_did_not_measure_it(tmp_path):
    speed = {"tasks_per_s": 41.234, "iterations_per_s": 10.3, "sampling_share": 0.02,
             "peak_mib": 1811.6, "peak_of": "process peak RSS"}  # fmt: skip
    fake_run(tmp_path / "new", None, results={"metric": "mse", "steps": 3, "speed": speed})
    fake_run(tmp_path / "old", None, results={"metric": "mse", "steps": 3})  # before speed
    rows = report.rows_of([tmp_path])
    table = report.render(rows).splitlines()
    assert table[0].endswith("| verdict | tasks/s | peak memory |")
    by_run = {line.split(" | ")[0].strip("| "): line for line in table[2:4]}
    assert by_run["new"].endswith("| 41.2 | 1,812 MiB |")
    assert by_run["old"].endswith("| - | - |")
    report.write(rows, tmp_path)
    with (tmp_path / "report.csv").open() as f:
        written = {r["run"]: r for r in csv.DictReader(f)}
    assert float(written["new"]["tasks_per_s"]) == 41.234
    assert written["new"]["peak_of"] == "process peak RSS"
    assert written["old"]["tasks_per_s"] == written["old"]["peak_mib"] == ""


def test_seeds_are_grouped_per_algorithm_as_in_the_sweeps_csv(tmp_path):
    for algorithm, seed, mean in [("maml", 0, 5.9), ("fomaml", 0, 5.8), ("maml", 1, 6.1),
                                  ("fomaml", 1, 6.2)]:  # fmt: skip
        fake_run(tmp_path / f"{algorithm}{seed}", None, f"meta_optimizer={algorithm}",
                 f"seed={seed}", tests=[("test", mean, 4.5, 10, 20)])  # fmt: skip
    groups = report.grouped(report.rows_of([tmp_path]))
    assert [(g["setting"], g["seeds"]) for g in groups] == [
        ({"meta_optimizer": "fomaml"}, ["0", "1"]), ({"meta_optimizer": "maml"}, ["0", "1"])
    ]  # fmt: skip
    assert [g["mean"] for g in groups] == [pytest.approx(6.0), pytest.approx(6.0)]
    assert [g["ci95"] for g in groups] == [
        pytest.approx(12.706 * 0.2, rel=1e-3), pytest.approx(12.706 * 0.1, rel=1e-3)
    ]  # fmt: skip
    assert "| - | meta_optimizer=maml | 0, 1 |" in report.render(report.rows_of([tmp_path]))


def test_the_one_grouping_keeps_every_swept_key_but_the_seed():
    from mamlrun.results import sweep

    runs = [{"seed": "0", "meta_optimizer": "maml"}, {"seed": "1", "meta_optimizer": "maml"},
            {"seed": "0", "meta_optimizer": "fomaml", "meta_batch_size": "8"}]  # fmt: skip
    groups = sweep.seed_groups(runs, lambda r: r)
    assert [(setting, [r["seed"] for r in members]) for setting, members in groups] == [
        ({"meta_optimizer": "maml", "meta_batch_size": ""}, ["0", "1"]),
        ({"meta_optimizer": "fomaml", "meta_batch_size": "8"}, ["0"]),
    ]


def test_the_hparams_row_holds_our_tests_and_the_papers_number_apart(tmp_path):
    """Our test with the paper's inner steps is a metric named for what it is, the paper's
    number a setting named ``paper.``; neither may read as the other."""
    from mamlrun.training import commands

    cfg = compose_train("iterations=2", "val_every=2", "val_tasks=4", "meta_batch_size=2",
                        "final_test=true", "test_tasks=4", "eval_batch_size=4", "device=cpu",
                        "meta_optimizer.inner_steps_test=1")  # fmt: skip
    cfg.reference = config.Reference("mse", 0.5, 0.1, 2, "a paper")  # a preset's, for a sine
    commands.train(cfg, run_dir=tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    metrics, settings = hparams_row(tmp_path / "tb")
    assert set(metrics) == {
        "hparam/best_val_mse", "hparam/test_mse", "hparam/test_mse_at_paper_steps",
        "hparam/tasks_per_s", "hparam/peak_mib",  # the run's own speed (test_speed.py)
    }  # fmt: skip
    assert metrics["hparam/test_mse_at_paper_steps"] == pytest.approx(
        results["reference_test"]["mean"]  # ours, after the paper's 2 inner steps
    )
    assert metrics["hparam/test_mse"] == pytest.approx(results["test"]["mean"])  # after 1
    assert settings["paper.value"] == pytest.approx(0.5)
    assert settings["paper.inner_steps"] == 2 and settings["paper.source"] == "a paper"
    assert not any(k.startswith("reference") for k in [*metrics, *settings])


def hparams_row(tb_dir: Path) -> tuple[dict[str, float], dict[str, object]]:
    """The metrics and the settings of a run's row in TensorBoard's HParams table, read from
    its event files."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.util import tensor_util

    metrics, settings = {}, {}
    for path in tb_dir.rglob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag.startswith("hparam/"):
                    metrics[value.tag] = float(tensor_util.make_ndarray(value.tensor))
                if value.tag == "_hparams_/session_start_info":
                    data = plugin_data_pb2.HParamsPluginData.FromString(
                        value.metadata.plugin_data.content
                    )
                    for k, v in data.session_start_info.hparams.items():
                        settings[k] = getattr(v, v.WhichOneof("kind"))
    return metrics, settings


@pytest.mark.parametrize(
    "args,expected",
    [([], "report needs a run directory: mamlrun report DIR [DIR...] [--out DIR]"),
     (["/no/such/dir"], "/no/such/dir is not a directory"),
     (["."], "no training runs under ."), (["--out"], "--out needs a directory"),
     (["--bogus", "."], "unknown option --bogus")],
)  # fmt: skip
def test_report_mistakes_are_one_line_and_exit_2(cli_here, args, expected):
    out = cli_here("report", *args)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip() == f"mamlrun: error: {expected}" or (
        out.stderr.count("\n") == 1 and expected in out.stderr
    )


# --------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Short runs of two presets: one with its paper's settings, one with a smaller
    meta-batch, as a user would make them."""
    root = tmp_path_factory.mktemp("report")
    for name, preset, extra in [("paper", "omniglot_5w1s", []),
                                ("changed", "omniglot_5w5s", ["meta_batch_size=4"])]:  # fmt: skip
        out = run_cli("train", f"experiment={preset}", *QUICK, *extra,
                      f"hydra.run.dir={root / name}", cwd=root)  # fmt: skip
        assert out.returncode == 0, out.stderr
    return root


@pytest.mark.slow
@needs_omniglot
def test_report_of_two_presets_fills_every_column(two_runs):
    out = run_cli("report", str(two_runs), cwd=two_runs)
    assert out.returncode == 0, out.stderr
    table = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == [
        "run", "preset", "algorithm", "seed", "iterations", "test", "reference", "verdict",
        "tasks/s", "peak memory",
    ]  # fmt: skip
    rows = {r[0]: r for r in ([c.strip() for c in line.strip("|").split("|")]
                              for line in table[2:4])}  # fmt: skip
    changed, paper = rows["changed"], rows["paper"]
    assert paper[1:5] == ["omniglot_5w1s", "maml", "0", "10 / 60,000"]
    assert paper[5].endswith("(8 tasks, 3 steps, step 10)")  # the paper's 3 steps, not 10
    assert paper[6] == "98.7 ± 0.4% (3 steps)"
    assert paper[7] == "not comparable (10 / 60,000 iterations)"  # not "below" after 10
    assert changed[1:5] == ["omniglot_5w5s", "maml", "0", "10 / 60,000"]
    assert changed[6] == "99.9 ± 0.1% (3 steps)"
    assert changed[7] == "not comparable (10 / 60,000 iterations): meta_batch_size: 32 → 4"
    assert float(paper[8]) > 0 and paper[9].endswith(" MiB")
    assert (two_runs / "report.md").read_text().count("| paper |") == 1
    with (two_runs / "report.csv").open() as f:
        by_run = {r["run"]: r for r in csv.DictReader(f)}
    assert by_run["paper"]["test_inner_steps"] == "3" and by_run["paper"]["test_tasks"] == "8"
    assert by_run["paper"]["algorithm"] == by_run["changed"]["algorithm"] == "maml"
    assert float(by_run["paper"]["reference_value"]) == 0.987
    assert by_run["changed"]["verdict"].startswith("not comparable")


@pytest.mark.slow
@needs_omniglot
def test_a_run_records_its_preset_and_reference_in_results_and_hparams(two_runs):

    results = json.loads((two_runs / "paper" / "results.json").read_text())
    assert results["preset"] == "omniglot_5w1s"
    assert results["reference"]["value"] == 0.987 and results["reference"]["inner_steps"] == 3
    assert results["test"]["inner_steps"] == 10 and results["reference_test"]["inner_steps"] == 3
    metrics, settings = hparams_row(two_runs / "paper" / "tb")
    assert settings["paper.value"] == pytest.approx(0.987)
    assert settings["preset"] == "omniglot_5w1s"
    assert metrics["hparam/test_accuracy_at_paper_steps"] == pytest.approx(
        results["reference_test"]["mean"]
    )


@pytest.mark.slow
@needs_omniglot
def test_a_short_run_ends_saying_it_is_not_comparable_with_the_paper(two_runs):
    results = json.loads((two_runs / "paper" / "results.json").read_text())
    at_3 = results["reference_test"]
    ours = format_ci(at_3["mean"], at_3["ci95"], percent=True)
    log = (two_runs / "paper" / "train.log").read_text()
    assert (
        f"test accuracy after 3 inner steps {ours} against 98.7 ± 0.4% in Finn et al. 2017, "
        "Table 1: MAML, Omniglot 5-way 1-shot, 98.7 ± 0.4%: not comparable (10 / 60,000 "
        "iterations)\n"
    ) in log


@pytest.mark.slow
@needs_omniglot
def test_a_run_that_changed_its_presets_settings_says_so_where_it_ends(two_runs):
    """The run's last line says what the report's verdict says: another meta-batch (or
    another algorithm on the preset) is not the paper's number, whatever the budget."""
    log = (two_runs / "changed" / "train.log").read_text()
    assert "not comparable (10 / 60,000 iterations): meta_batch_size: 32 → 4\n" in log


# --------------------------------------------------------------------------- the curve script
def plot_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "plot_test_curve.py"
    spec = importlib.util.spec_from_file_location("plot_test_curve", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_curve_table_and_png_come_from_the_runs_files(tmp_path, capsys):
    from mamlrun.results import checkpoint

    run = fake_run(tmp_path / "long", "omniglot_5w1s", tests=[
        ("periodic_test/5000", 0.97, 0.0066, 10, None),
        ("periodic_test_3steps/5000", 0.955, 0.008, 3, None),
        ("periodic_test/10000", 0.975, 0.006, 10, None),
    ])  # fmt: skip
    history = [[1000, 0.9, 0.03], [4000, 0.97, 0.01], [5000, 0.97, 0.01], [9000, 0.98, 0.01]]
    checkpoint.save(run / "checkpoints" / "last.pt", {"model": {}, "progress": {
        "step": 10000, "history": history}})  # fmt: skip
    assert plot_script().main([str(run), "--table"]) == 0
    out = capsys.readouterr().out
    # best.pt after 5,000 iterations was the first best validation up to then: step 4000
    assert "| 5,000 | 4000 | 3 | 95.50 ± 0.80% | 600 |" in out
    assert "| 10,000 | 9000 | 10 | 97.50 ± 0.60% | 600 |" in out
    assert "Paper: 98.7 ± 0.4% with 3 inner steps" in out
    png = run / "test_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_the_curve_script_says_when_there_is_nothing_to_draw(tmp_path, capsys):
    assert plot_script().main([str(fake_run(tmp_path / "r", "omniglot_5w1s"))]) == 2
    assert "no test results in" in capsys.readouterr().err


def test_a_run_made_before_presets_had_references_is_compared_with_its_presets(tmp_path):
    run = fake_run(tmp_path / "old", "omniglot_5w1s",
                   tests=[("test_3steps", 0.985, 0.005, 3, 60000)])  # fmt: skip
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    del cfg["reference"]
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    row = row_of(run)
    assert row.reference["value"] == 0.987 and row.verdict == reference.INSIDE


def test_a_training_sweep_ends_with_the_report_grouped_over_seeds(tmp_path, capsys):
    from mamlrun.results import sweep

    for seed, mean in [(0, 0.985), (1, 0.989)]:
        fake_run(tmp_path / str(seed), "omniglot_5w1s", f"seed={seed}",
                 tests=[("test_3steps", mean, 0.005, 3, 60000)])  # fmt: skip
    sweep._report(tmp_path)
    out = capsys.readouterr().out
    assert "against the papers (mamlrun report):" in out and "Grouped over seeds" in out
    assert "| omniglot_5w1s | - | 0, 1 | 98.7 ± 2.5% |" in out  # t-interval over the two seeds
    assert (tmp_path / "report.md").is_file() and (tmp_path / "report.csv").is_file()

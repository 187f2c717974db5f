"""``mamlrun report DIR [DIR...]``: did these runs reproduce their papers?

One row per training run found under the directories (a run, a sweep, ``outputs/train``):
its preset, its algorithm (the ``meta_optimizer`` choice), iterations done of the preset's,
its test result ± 95% CI, the preset's reference ± CI and a verdict (``reference``; a run
short of the preset's iterations is not compared), then the tasks/s and peak memory the run
measured (results.json's ``speed``; "-" for a run from before that). Printed, and written as
``report.md`` and ``report.csv``. Runs that differ only in ``seed`` are also grouped, mean ± 95% CI
(Student's t) over seeds, by the sweep summary's own grouping (``sweep.seed_groups``).

Everything is read from what runs leave on disk (``.hydra/``, ``results.json``, checkpoints,
the ``results.json`` of each test inside the run's folder), so a finished, a running and a
killed run are reported alike. The test held against the reference is the latest one made
with the reference's number of inner steps, wherever it is in the run's folder (``test/``,
``test_3steps/``, ``periodic_test_3steps/<step>/``).
"""

from __future__ import annotations

import csv
import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mamlrun import config
from mamlrun.errors import MamlrunError
from mamlrun.results import checkpoint, reference, sweep
from mamlrun.results.stats import format_ci, mean_ci95_t

USAGE = """usage: mamlrun report DIR [DIR...] [--out DIR]

Reads training runs (a run directory, a sweep, or a folder of runs such as outputs/train)
and prints one row per run: preset, algorithm, iterations done / the preset's, test result
± 95% CI, the paper's result ± CI and a verdict (inside the reference CI, CIs overlap, below, above,
not comparable: what differs), and the run's measured tasks/s and peak memory ("-" for a
run made before runs measured them). A run is compared only once it has trained its preset's
iterations (the paper's budget): before that it is "not comparable (300 / 60,000
iterations)". Writes report.md and report.csv into --out (default: the one DIR given, else
the current directory).
"""


@dataclass
class Test:
    mean: float
    ci95: float
    inner_steps: int
    tasks: int
    step: int | None  # the training step of the checkpoint tested, where recorded
    directory: Path
    at: int | None = None  # iterations trained when it ran (``periodic_test/<at>/``)


@dataclass
class Row:
    run: str
    directory: Path
    preset: str | None
    seed: int | None
    metric: str
    done: int | None
    planned: int | None
    test: Test | None
    reference: dict[str, Any] | None
    differences: list[str] = field(default_factory=list)
    verdict: str = ""
    #: What the run was asked for: its overrides (``.hydra/overrides.yaml``), else its whole
    #: flattened config; runs are grouped over seeds by it (``sweep.seed_groups``).
    setting: dict[str, str] = field(default_factory=dict)
    #: The ``meta_optimizer`` choice it ran (``boil``), else its class (``MAML``), else None.
    algorithm: str | None = None
    #: results.json's ``speed`` block (tasks/s, peak memory, ...); {} for a run from before
    #: runs measured their speed, or one still running.
    speed: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- finding runs
def find_runs(directory: Path) -> list[Path]:
    """Training runs at or under ``directory``: folders whose config has ``iterations``."""
    if _run_config(directory) is not None:
        return [directory]
    found = {p.parent.parent for p in directory.glob("**/.hydra/config.yaml")}
    runs = [d for d in found if _run_config(d) is not None]
    return sorted(runs, key=lambda p: _natural(str(p)))


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


@functools.lru_cache(maxsize=256)
def _run_config(directory: Path) -> dict[str, Any] | None:
    """The run's flattened config: ``.hydra/config.yaml``, else the one in its checkpoint."""
    hydra_file = directory / ".hydra" / "config.yaml"
    if hydra_file.is_file():
        saved = OmegaConf.to_container(OmegaConf.load(hydra_file))
        flat = config.flatten(config.read_forward(saved))  # as checkpoint.load reads it
    else:
        saved = _checkpoint(directory)
        flat = config.flatten(saved["config"]["run"]) if saved else {}
    return flat if "iterations" in flat else None


def _checkpoint(directory: Path) -> dict[str, Any] | None:
    for name in ("last.pt", "best.pt"):
        path = directory / "checkpoints" / name
        if path.is_file():
            try:
                return checkpoint.load(path)
            except MamlrunError:
                continue  # being replaced this instant, or corrupt: try the other
    return None


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------- one run
def read_run(directory: Path, root: Path) -> Row:
    flat = _run_config(directory) or {}
    results = _json(directory / "results.json")
    preset, searchpath = _preset_of(directory, results)
    preset_flat = preset_config(preset, searchpath) if preset else None
    ref = _reference_or_presets(flat, preset_flat)
    metric = (results or {}).get("metric") or ("accuracy" if ref is None else ref["metric"])
    tests = tests_in(directory, results)
    row = Row(
        run=_name(directory, root),
        directory=directory,
        preset=preset,
        seed=flat.get("seed"),
        metric=metric,
        done=_steps_done(directory, results),
        planned=(preset_flat or flat).get("iterations"),
        test=_pick(tests, ref),
        reference=ref,
        setting=_setting(directory, flat),
        algorithm=_algorithm_of(directory, results),
        speed=(results or {}).get("speed") or {},
    )
    if preset and preset_flat is None:
        row.differences = [f"preset {preset} is not in this mamlrun's configs"]
    elif preset_flat is not None:
        row.differences = reference.differences(flat, preset_flat)
    row.verdict = _verdict(row, tests)
    return row


def _name(directory: Path, root: Path) -> str:
    if directory == root:
        return directory.name or str(directory)
    return str(directory.relative_to(root)) if directory.is_relative_to(root) else str(directory)


def _setting(directory: Path, flat: dict[str, Any]) -> dict[str, str]:
    overrides = directory / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        return sweep.read_overrides(directory)
    return {k: str(v) for k, v in flat.items()}


def _preset_of(directory: Path, results: dict | None) -> tuple[str | None, tuple[str, ...]]:
    """The experiment preset the run composed, and the config search path it used."""
    hydra_file = directory / ".hydra" / "hydra.yaml"
    if hydra_file.is_file():
        hydra = OmegaConf.load(hydra_file).hydra
        searchpath = tuple(str(p) for p in hydra.get("searchpath") or ())
        return hydra.runtime.choices.get("experiment"), searchpath
    return (results or {}).get("preset"), ()


def _algorithm_of(directory: Path, results: dict | None) -> str | None:
    """The ``meta_optimizer`` choice the run composed: several members of the family are one
    class with other settings (BOIL is MAML adapting the body), so only the choice tells them
    apart; a run without ``.hydra/`` has its class in ``results.json``."""
    hydra_file = directory / ".hydra" / "hydra.yaml"
    if hydra_file.is_file():
        choice = OmegaConf.load(hydra_file).hydra.runtime.choices.get("meta_optimizer")
        if choice:
            return str(choice)
    return (results or {}).get("algorithm")


@functools.lru_cache(maxsize=64)
def preset_config(name: str, searchpath: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The preset as ``mamlrun train experiment=NAME`` composes it, flattened (None when this
    mamlrun has no such preset)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    config.register_schemas()
    overrides = [f"experiment={name}"]
    if searchpath:
        overrides.append(f"hydra.searchpath=[{','.join(searchpath)}]")
    try:
        if GlobalHydra.instance().is_initialized():  # inside a running Hydra app (a sweep's end)
            return config.flatten(compose("train", overrides=overrides))
        with initialize_config_dir(str(config.config_dir()), version_base="1.3"):
            return config.flatten(compose("train", overrides=overrides))
    except (HydraException, OmegaConfBaseException):
        return None


def reference_of(directory: Path) -> dict[str, Any] | None:
    """The reference block of a run's config (None without one)."""
    preset, searchpath = _preset_of(directory, _json(directory / "results.json"))
    preset_flat = preset_config(preset, searchpath) if preset else None
    return _reference_or_presets(_run_config(directory) or {}, preset_flat)


def _reference_or_presets(flat: dict[str, Any], preset_flat: dict | None) -> dict | None:
    """The run's reference; for a run made before presets carried one, its preset's."""
    ref = _reference(flat)
    if ref is None and "reference" not in flat and preset_flat is not None:
        ref = _reference(preset_flat)
    return ref


def _reference(flat: dict[str, Any]) -> dict[str, Any] | None:
    if flat.get("reference") is None and "reference.value" not in flat:
        return None
    return {k: flat.get(f"reference.{k}") for k in ("metric", "value", "ci95", "inner_steps",
                                                     "source")}  # fmt: skip


def _steps_done(directory: Path, results: dict | None) -> int | None:
    """The furthest step on disk: a resumed run's last.pt is ahead of the results.json its
    previous segment wrote."""
    saved = _checkpoint(directory)
    found = [(results or {}).get("steps"), saved["progress"]["step"] if saved else None]
    steps = [v for v in found if v is not None]
    return max(steps) if steps else None


def tests_in(directory: Path, results: dict | None = None) -> list[Test]:
    """Every test result inside the run's folder (``mamlrun test`` wrote each)."""
    tests = []
    for path in directory.glob("**/results.json"):
        data = _json(path)
        if path.parent == directory or not data or not isinstance(data.get("mean"), int | float):
            continue
        if data.get("cross_domain"):  # other data than the paper's: never held against it
            continue
        step = data.get("trained_steps")
        at = int(path.parent.name) if path.parent.name.isdigit() else None  # periodic_test/<at>
        if step is None and at is None and results:  # train's final test of best.pt
            step = results.get("best_step")
        tasks = data.get("test_tasks", data.get("n_tasks", 0))
        tests.append(
            Test(data["mean"], data["ci95"], data["inner_steps"], tasks, step, path.parent, at)
        )
    return tests


def _trained(test: Test, done: int | None) -> int | None:
    """The iterations the tested model had trained: a periodic test's own count; for the
    others the furthest step of the run (the final test's best.pt was chosen among all its
    steps), at least the tested checkpoint's step."""
    if test.at is not None:
        return test.at
    known = [v for v in (done, test.step) if v is not None]
    return max(known) if known else None


def _when(test: Test) -> int:
    """How far training had got: the periodic folder's iterations, else the checkpoint's."""
    return next((v for v in (test.at, test.step) if v is not None), -1)


def _pick(tests: list[Test], ref: dict[str, Any] | None) -> Test | None:
    """The latest test with the reference's inner steps (any test without a reference)."""
    if ref is not None:
        tests = [t for t in tests if t.inner_steps == ref["inner_steps"]]
    if not tests:
        return None
    return max(tests, key=lambda t: (_when(t), t.step if t.step is not None else -1, t.tasks))


def _verdict(row: Row, tests: list[Test]) -> str:
    ref = row.reference
    if ref is None:
        return "no reference"
    if ref["metric"] != row.metric:
        return f"not comparable: the reference is {ref['metric']}, the run measures {row.metric}"
    if row.differences:  # with the iterations when it is short of them too
        trained = row.done if row.test is None else _trained(row.test, row.done)
        short = reference.short_of_budget(trained, row.planned) or "not comparable"
        return f"{short}: " + "; ".join(row.differences)
    if row.test is None:
        if not tests:
            return "no test"
        steps = ", ".join(str(s) for s in sorted({t.inner_steps for t in tests}))
        return (
            f"not comparable: tested with {steps} inner steps, the reference with "
            f"{ref['inner_steps']} (mamlrun test checkpoint={row.directory} "
            f"inner_steps={ref['inner_steps']})"
        )
    trained = _trained(row.test, row.done)
    return reference.verdict(
        row.test.mean, row.test.ci95, ref["value"], ref["ci95"], trained, row.planned
    )


# --------------------------------------------------------------------------- several runs
def rows_of(directories: list[Path]) -> list[Row]:
    rows = []
    for directory in directories:
        if not directory.is_dir():
            raise MamlrunError(f"{directory} is not a directory")
        runs = find_runs(directory)
        if not runs and not crossed_in(directory):
            raise MamlrunError(
                f"no training runs under {directory} (a run's folder holds .hydra/config.yaml "
                "or checkpoints/ written by mamlrun train)"
            )
        rows += [read_run(run, directory) for run in runs]
    return rows


@dataclass
class Crossed:
    """A cross-domain test (``mamlrun test checkpoint=RUN dataset=OTHER``): the run's model on
    another dataset's tasks, shown apart from the paper comparisons."""

    directory: Path
    results: dict[str, Any]

    @property
    def verdict(self) -> str:
        r = self.results
        return f"cross-domain: no reference for {r.get('trained_on')} → {r.get('tested_on')}"


def crossed_in(directory: Path) -> list[Crossed]:
    """Every cross-domain test at or under ``directory``, inside runs' folders or not."""
    found = []
    for path in sorted(directory.glob("**/results.json"), key=lambda p: _natural(str(p))):
        data = _json(path)
        if data and data.get("cross_domain") and isinstance(data.get("mean"), int | float):
            found.append(Crossed(path.parent, data))
    return found


def _crossed_table(crossed: list[Crossed]) -> list[str]:
    lines = ["", "Cross-domain tests (the model on another dataset's tasks):", ""]
    header = ["test", "trained on", "tested on", "test", "checkpoint", "verdict"]
    lines += [_md_row(header), _md_row(["---"] * len(header))]
    for c in crossed:
        r = c.results
        test = f"{_value(r['mean'], r['ci95'], r['metric'])} ({r['test_tasks']} tasks, " \
               f"{r['inner_steps']} steps)"  # fmt: skip
        lines.append(_md_row([str(c.directory), str(r.get("trained_on")),
                              str(r.get("tested_on")), test, str(r.get("checkpoint")),
                              c.verdict]))  # fmt: skip
    return lines


def grouped(rows: list[Row]) -> list[dict[str, Any]]:
    """Tested runs that differ only in seed: mean ± t-CI over seeds. The groups are the
    sweep summary's (``sweep.seed_groups``), plus the inner steps of the test compared."""
    tested = [r for r in rows if r.test is not None]
    out = []
    for setting, members in sweep.seed_groups(tested, _group_setting):
        if len(members) < 2:
            continue
        mean, ci = mean_ci95_t([r.test.mean for r in members])
        first = members[0]
        apart = [r.verdict for r in members if r.verdict not in reference.COMPARISONS]
        verdict = apart[0] if apart else first.verdict
        if not apart and first.reference is not None:  # every member trained the budget
            verdict = reference.verdict(mean, ci, first.reference["value"],
                                        first.reference["ci95"])  # fmt: skip
        out.append({"preset": first.preset, "setting": setting,
                    "seeds": sorted(str(r.seed) for r in members),
                    "mean": mean, "ci95": ci, "row": first, "verdict": verdict})  # fmt: skip
    return out


def _group_setting(row: Row) -> dict[str, str]:
    return {**row.setting, "test inner_steps": str(row.test.inner_steps)}


# --------------------------------------------------------------------------- writing
def _value(mean: float, ci: float, metric: str) -> str:
    return format_ci(mean, ci, percent=metric == "accuracy")


def _test_cell(row: Row) -> str:
    t = row.test
    if t is None:
        return "-"
    when = [f"{t.tasks} tasks", f"{t.inner_steps} steps"]
    if t.step is not None:
        when.append(f"step {t.step}")  # of the checkpoint tested
    if t.at is not None and t.at != t.step:
        when.append(f"at iteration {t.at:,}")
    return f"{_value(t.mean, t.ci95, row.metric)} ({', '.join(when)})"


def _reference_cell(row: Row) -> str:
    ref = row.reference
    if ref is None:
        return "-"
    shown = reference.shown(ref["value"], ref["ci95"], ref["metric"])
    return f"{shown} ({ref['inner_steps']} steps)"


def _iterations_cell(row: Row) -> str:
    done = "?" if row.done is None else f"{row.done:,}"
    return done if row.planned is None else f"{done} / {row.planned:,}"


def _speed_cells(row: Row) -> list[str]:
    """tasks/s and peak memory as the run measured them (``training/speed.py``); "-" for a
    run that did not (older than the measurement, or not finished)."""
    tasks, peak = row.speed.get("tasks_per_s"), row.speed.get("peak_mib")
    return ["-" if tasks is None else f"{tasks:.3g}", "-" if peak is None else f"{peak:,.0f} MiB"]


def render(rows: list[Row], crossed: list[Crossed] = ()) -> str:
    """The report as Markdown: the per-run table, the seed groups, the cross-domain tests, the
    references' sources."""
    header = ["run", "preset", "algorithm", "seed", "iterations", "test", "reference", "verdict",
              "tasks/s", "peak memory"]  # fmt: skip
    lines = [_md_row(header), _md_row(["---"] * len(header))] if rows else []
    for r in rows:
        cells = [r.run, r.preset or "-", r.algorithm or "-",
                 "-" if r.seed is None else str(r.seed), _iterations_cell(r), _test_cell(r),
                 _reference_cell(r), r.verdict, *_speed_cells(r)]  # fmt: skip
        lines.append(_md_row(cells))
    groups = grouped(rows)
    if groups:
        lines += ["", "Grouped over seeds (mean ± 95% CI over the runs, Student's t):", ""]
        lines += [_md_row(["preset", "setting", "seeds", "test", "reference", "verdict"]),
                  _md_row(["---"] * 6)]  # fmt: skip
        for g in groups:
            row = g["row"]
            cells = [
                g["preset"] or "-",
                " ".join(f"{k}={v}" for k, v in g["setting"].items() if v) or "-",
                ", ".join(g["seeds"]),
                _value(g["mean"], g["ci95"], row.metric),
                _reference_cell(row),
                g["verdict"],
            ]
            lines.append(_md_row(cells))  # fmt: skip
    if crossed:
        lines += _crossed_table(list(crossed))
    sources = dict.fromkeys(r.reference["source"] for r in rows if r.reference)
    if sources:
        lines += ["", "References:", *(f"- {s}" for s in sources)]
    return "\n".join(lines) + "\n"


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


CSV_COLUMNS = [
    "run", "preset", "algorithm", "seed", "steps_done", "steps_planned", "metric", "test_mean",
    "test_ci95", "test_inner_steps", "test_tasks", "test_step", "reference_value", "reference_ci95",
    "reference_inner_steps", "reference_source", "verdict", "tasks_per_s", "peak_mib", "peak_of",
    "directory",
]  # fmt: skip


def csv_rows(rows: list[Row]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        t, ref = r.test, r.reference or {}
        out.append({
            "run": r.run, "preset": r.preset or "", "algorithm": r.algorithm or "",
            "seed": r.seed, "steps_done": r.done, "steps_planned": r.planned, "metric": r.metric,
            "test_mean": t and t.mean, "test_ci95": t and t.ci95,
            "test_inner_steps": t and t.inner_steps, "test_tasks": t and t.tasks,
            "test_step": t and t.step, "reference_value": ref.get("value"),
            "reference_ci95": ref.get("ci95"), "reference_inner_steps": ref.get("inner_steps"),
            "reference_source": ref.get("source"), "verdict": r.verdict,
            "tasks_per_s": r.speed.get("tasks_per_s"), "peak_mib": r.speed.get("peak_mib"),
            "peak_of": r.speed.get("peak_of"), "directory": str(r.directory.resolve()),
        })  # fmt: skip
    return out


def _crossed_csv(c: Crossed) -> dict[str, Any]:
    r = c.results
    return {"run": str(c.directory), "metric": r["metric"], "test_mean": r["mean"],
            "test_ci95": r["ci95"], "test_inner_steps": r["inner_steps"],
            "test_tasks": r["test_tasks"], "test_step": r.get("trained_steps"),
            "verdict": c.verdict, "directory": str(c.directory.resolve())}  # fmt: skip


def write(rows: list[Row], out_dir: Path, crossed: list[Crossed] = ()) -> tuple[Path, Path]:
    """``report.md`` and ``report.csv`` in ``out_dir`` (each replaced whole)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, table = out_dir / "report.md", out_dir / "report.csv"
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text("# mamlrun report\n\n" + render(rows, crossed))
    tmp.replace(md)
    tmp = table.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_rows(rows) + [_crossed_csv(c) for c in crossed])
    tmp.replace(table)
    return md, table


def main(argv: list[str]) -> int:
    """The command: exit 0 with a report, 2 with one line saying what is wrong."""
    if not argv:
        raise MamlrunError("report needs a run directory: mamlrun report DIR [DIR...] [--out DIR]")
    if argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0
    args, out = list(argv), None
    if "--out" in args:
        i = args.index("--out")
        if i + 1 >= len(args):
            raise MamlrunError("--out needs a directory")
        out = Path(args.pop(i + 1))
        args.pop(i)
    if unknown := [a for a in args if a.startswith("-")]:
        raise MamlrunError(f"unknown option {unknown[0]} (see mamlrun report --help)")
    directories = [Path(a) for a in args]
    rows = rows_of(directories)
    crossed = [c for d in directories for c in crossed_in(d)]
    print(render(rows, crossed), end="")
    where = out or (directories[0] if len(directories) == 1 else Path.cwd())
    md, table = write(rows, where, crossed)
    print(f"written: {md} and {table}")
    return 0

"""The end of a ``-m`` sweep: one table of every job's final metrics, and the same grouped
over seeds (mean ± 95% CI), printed and written as CSV into the sweep directory.

The summary is built from what the jobs left on disk (``.hydra/overrides.yaml``,
``results.json``, ``failure.json``), not from the launcher's return values, so it works the
same for local, joblib and Slurm jobs, counts a failed or killed job instead of losing the
others, and can be rebuilt later with ``python -m mamlrun.results.sweep DIR``.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mamlrun.results.stats import mean_ci95_t

FAILURE_FILE = "failure.json"
GROUPED_OVER = "seed"
T = TypeVar("T")


@dataclass
class Job:
    name: str
    directory: Path
    overrides: dict[str, str]
    status: str  # ok | failed | incomplete
    metrics: dict[str, float] = field(default_factory=dict)
    headline: list[str] = field(default_factory=list)  # the metrics worth grouping
    error: str = ""


@dataclass
class Summary:
    sweep_dir: Path
    jobs: list[Job]
    swept: list[str]  # override keys that differ between jobs
    common: dict[str, str]  # overrides every job shares
    groups: list[dict[str, Any]]

    @property
    def failed(self) -> list[Job]:
        return [j for j in self.jobs if j.status != "ok"]


# --------------------------------------------------------------------------- reading jobs
def record_failure(job_dir: Path, error: BaseException, message: str) -> None:
    """Leave the reason a job failed where the summary will find it."""
    payload = {
        "error": message,
        "type": type(error).__name__,
        "traceback": "".join(traceback.format_exception(error)),
    }
    (Path(job_dir) / FAILURE_FILE).write_text(json.dumps(payload, indent=2) + "\n")


def job_metrics(results: dict) -> tuple[dict[str, float], list[str]]:
    """The numbers worth comparing from one ``results.json`` of train, test or adapt, and
    which of them are the headline (grouped over seeds)."""
    name = results.get("metric", "metric")
    if "best_val" in results:  # train
        metrics = {
            f"best_val_{name}": results["best_val"],
            f"best_val_{name}_ci95": results.get("best_val_ci95"),
            "best_step": results.get("best_step"),
            "steps": results.get("steps"),
        }
        headline = [f"best_val_{name}"]
        if results.get("test"):
            metrics[f"test_{name}"] = results["test"]["mean"]
            metrics[f"test_{name}_ci95"] = results["test"]["ci95"]
            headline.append(f"test_{name}")
        if results.get("adapt"):
            last = results["adapt"]["steps"][-1]
            metrics[f"adapt_{name}_step{last}"] = results["adapt"]["mean"][-1]
            headline.append(f"adapt_{name}_step{last}")
        return metrics, headline
    if isinstance(results.get("mean"), list):  # adapt: the metric after each inner step
        pairs = zip(results["steps"], results["mean"], strict=True)
        metrics = {f"{name}_step{s}": m for s, m in pairs}
        return metrics, [f"{name}_step{results['steps'][-1]}"]
    metrics = {f"test_{name}": results["mean"], f"test_{name}_ci95": results["ci95"]}
    return metrics, [f"test_{name}"]


def read_overrides(directory: Path) -> dict[str, str]:
    """The run's command-line overrides (``.hydra/overrides.yaml``) as key → value."""
    overrides = {}
    for item in OmegaConf.load(directory / ".hydra" / "overrides.yaml"):
        key, _, value = str(item).partition("=")
        overrides[key.lstrip("+~")] = value
    return overrides


def read_job(directory: Path, sweep_dir: Path) -> Job:
    overrides = read_overrides(directory)
    name = str(directory.relative_to(sweep_dir))
    results, failure = directory / "results.json", directory / FAILURE_FILE
    if results.exists():
        metrics, headline = job_metrics(json.loads(results.read_text()))
        return Job(name, directory, overrides, "ok", metrics, headline)
    if failure.exists():
        error = json.loads(failure.read_text()).get("error", "failed")
        return Job(name, directory, overrides, "failed", error=error)
    return Job(name, directory, overrides, "incomplete", error="no results.json (killed?)")


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def summarise(sweep_dir: str | Path) -> Summary:
    """Every job under ``sweep_dir`` (any depth, as launchers lay them out differently)."""
    sweep_dir = Path(sweep_dir)
    found = sorted(
        (p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml")),
        key=lambda p: _natural(str(p.relative_to(sweep_dir))),
    )
    jobs = [read_job(d, sweep_dir) for d in found]
    keys = list(dict.fromkeys(k for j in jobs for k in j.overrides))
    swept = swept_keys([j.overrides for j in jobs])
    common = {k: jobs[0].overrides[k] for k in keys if k not in swept} if jobs else {}
    return Summary(sweep_dir, jobs, swept, common, _group(jobs))


def swept_keys(settings: Sequence[Mapping[str, str]]) -> list[str]:
    """The keys whose value is not the same in every run (absent counts as a value)."""
    keys = list(dict.fromkeys(k for s in settings for k in s))
    return [k for k in keys if len({s.get(k) for s in settings}) > 1]


def seed_groups(
    members: Sequence[T], setting: Callable[[T], Mapping[str, str]]
) -> list[tuple[dict[str, str], list[T]]]:
    """Runs that differ only in ``seed``: the one grouping of the sweep's summary and of
    ``mamlrun report``. A group is fixed by every key that varies between the runs except
    the seed (a group choice such as ``meta_optimizer=fomaml`` is such a key, so two
    algorithms are never averaged together); each comes with those keys' values."""
    settings = [setting(m) for m in members]
    keys = [k for k in swept_keys(settings) if k != GROUPED_OVER]
    groups: dict[tuple[str, ...], list[T]] = {}
    for member, values in zip(members, settings, strict=True):
        groups.setdefault(tuple(values.get(k, "") for k in keys), []).append(member)
    return [(dict(zip(keys, values, strict=True)), group) for values, group in groups.items()]


def _group(jobs: list[Job]) -> list[dict[str, Any]]:
    """Jobs that differ only in ``seed``, with mean ± 95% CI (Student's t) of each headline."""
    rows = []
    for values, members in seed_groups(jobs, lambda j: j.overrides):
        done = [j for j in members if j.status == "ok"]
        row: dict[str, Any] = dict(values)
        row["jobs"] = len(members)
        row["failed"] = len(members) - len(done)
        headline = list(dict.fromkeys(h for j in done for h in j.headline))
        for metric in headline:
            values_ok = [j.metrics[metric] for j in done if _finite(j.metrics.get(metric))]
            if values_ok:
                row[metric], row[f"{metric}_ci95"] = mean_ci95_t(values_ok)
        rows.append(row)
    return rows


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


# --------------------------------------------------------------------------- writing
def write(summary: Summary) -> tuple[Path, Path]:
    """``summary.csv`` (one row per job) and ``summary_grouped.csv`` (over seeds)."""
    per_job = summary.sweep_dir / "summary.csv"
    metric_keys = list(dict.fromkeys(k for j in summary.jobs for k in j.metrics))
    header = ["job", "status", *summary.swept, *metric_keys, "error", "directory"]
    rows = [
        {
            "job": j.name,
            "status": j.status,
            **{k: j.overrides.get(k, "") for k in summary.swept},
            **j.metrics,
            "error": j.error,
            "directory": str(j.directory.resolve()),
        }
        for j in summary.jobs
    ]
    _write_csv(per_job, header, rows)
    grouped = summary.sweep_dir / "summary_grouped.csv"
    _write_csv(grouped, list(dict.fromkeys(k for r in summary.groups for k in r)), summary.groups)
    return per_job, grouped


def _write_csv(path: Path, header: list[str], rows: list[dict]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def render(summary: Summary) -> str:
    """The printed form: the per-job table, then the seed-grouped one when seeds were swept."""
    lines = [f"sweep summary: {summary.sweep_dir}"]
    if summary.common:
        lines.append("common overrides: " + " ".join(f"{k}={v}" for k, v in summary.common.items()))
    headline = list(dict.fromkeys(h for j in summary.jobs for h in j.headline))
    rows = [
        [
            j.name,
            j.status,
            *(j.overrides.get(k, "") for k in summary.swept),
            *(_fmt(j.metrics.get(h)) for h in headline),
            j.error,
        ]
        for j in summary.jobs
    ]
    lines += _table(["job", "status", *summary.swept, *headline, "error"], rows)
    if GROUPED_OVER in summary.swept:
        keys = [k for k in summary.swept if k != GROUPED_OVER]
        lines.append(f"grouped over {GROUPED_OVER} (mean ± 95% CI, Student's t):")
        rows = [
            [
                *(str(g.get(k, "")) for k in keys),
                f"{g['jobs'] - g['failed']}/{g['jobs']}",
                *(f"{_fmt(g[h])} ± {_fmt(g[f'{h}_ci95'])}" if h in g else "-" for h in headline),
            ]
            for g in summary.groups
        ]
        lines += _table([*keys, "ok", *headline], rows)
    if summary.failed:
        lines.append(f"{len(summary.failed)} of {len(summary.jobs)} jobs did not finish")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


# --------------------------------------------------------------------------- Hydra hook
class SweepSummary(Callback):
    """Registered in every command's config (``hydra.callbacks.summary``)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Print and write the summary; exit with status 1 when a job did not finish (a
        callback is Hydra's public hook at the end of a sweep, and the exit status is the
        only way a script or CI learns that some of the jobs failed)."""
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        summary = summarise(sweep_dir)
        per_job, grouped = write(summary)
        print(render(summary))
        print(f"written: {per_job} and {grouped}")
        if config.hydra.job.name == "train":
            _report(sweep_dir)
        if summary.failed:
            failed, total = len(summary.failed), len(summary.jobs)
            print(
                f"mamlrun: error: {failed} of {total} jobs did not finish; the others' results "
                f"are in {per_job}",
                file=sys.stderr,
            )
            raise SystemExit(1)


def _report(sweep_dir: Path) -> None:
    """The jobs against their presets' references (``mamlrun report``), grouped over seeds."""
    from mamlrun.errors import MamlrunError
    from mamlrun.results import report

    try:
        rows = report.rows_of([sweep_dir])
    except MamlrunError:
        return  # no job got as far as writing its config
    print("against the papers (mamlrun report):")
    print(report.render(rows), end="")
    md, table = report.write(rows, sweep_dir)
    print(f"written: {md} and {table}")


def main(argv: list[str] | None = None) -> int:
    """``python -m mamlrun.results.sweep SWEEP_DIR``: rebuild the summary of a sweep, e.g.
    after some of its jobs were rerun."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m mamlrun.results.sweep SWEEP_DIR", file=sys.stderr)
        return 2
    summary = summarise(args[0])
    write(summary)
    print(render(summary))
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())

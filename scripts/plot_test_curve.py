#!/usr/bin/env python
"""The test accuracy curve of a long run, drawn from the run's own files.

    python scripts/plot_test_curve.py RUN_DIR [--out PNG] [--table]

Reads every test result inside RUN_DIR (``periodic_test/<step>/``, ``periodic_test_3steps/
<step>/``, ``test/``, ... as ``scripts/reproduce_omniglot.sh`` and ``final_test`` write them),
one curve per number of inner steps, with the 95% CI of each point, and the paper's result
from the run's ``reference`` as a band. ``--table`` also prints the points as a Markdown
table (for docs/RESULTS.md). Needs matplotlib (``pip install -e ".[plot]"``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mamlrun.results import checkpoint, reference, report
from mamlrun.results.stats import format_ci


def curves(run_dir: Path) -> dict[int, list[report.Test]]:
    """Test results by inner steps, each curve ordered by the iterations trained."""
    by_steps: dict[int, dict[int, report.Test]] = {}
    history = _history(run_dir)
    for test in report.tests_in(run_dir):
        at = _iterations(test)
        if at is None:
            continue
        if test.step is None:  # tested by an older mamlrun: best.pt's step from the history
            test.step = _best_step(history, at)
        by_steps.setdefault(test.inner_steps, {}).setdefault(at, test)
    return {k: [v[at] for at in sorted(v)] for k, v in sorted(by_steps.items())}


def _iterations(test: report.Test) -> int | None:
    """Iterations trained when the test ran: the periodic folder's name, else the step of
    the checkpoint tested."""
    return test.at if test.at is not None else test.step


def _history(run_dir: Path) -> list[list[float]]:
    """The validation history ([step, accuracy, ci95], ...) of the run's last.pt."""
    path = run_dir / "checkpoints" / "last.pt"
    if not path.is_file():
        return []
    return checkpoint.load(path)["progress"]["history"]


def _best_step(history: list[list[float]], at: int) -> int | None:
    """The step best.pt held after ``at`` iterations: the first best validation up to it."""
    seen = [(mean, -step) for step, mean, _ in history if step <= at]
    return -max(seen)[1] if seen else None


def table(run_dir: Path) -> str:
    ref = report.reference_of(run_dir)
    lines = ["| iterations | best.pt step | inner steps | test accuracy (95% CI) | tasks |",
             "| --- | --- | --- | --- | --- |"]  # fmt: skip
    points = [(_iterations(t), t) for c in curves(run_dir).values() for t in c]
    for at, t in sorted(points, key=lambda p: (p[0], p[1].inner_steps)):
        ci = format_ci(t.mean, t.ci95, percent=True)
        lines.append(f"| {at:,} | {t.step if t.step is not None else '-'} | {t.inner_steps} "
                     f"| {ci} | {t.tasks} |")  # fmt: skip
    if ref is not None:
        shown = reference.shown(ref["value"], ref["ci95"], ref["metric"])
        lines.append(f"\nPaper: {shown} with {ref['inner_steps']} inner steps ({ref['source']}).")
    return "\n".join(lines)


def plot(run_dir: Path, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(
            'plot_test_curve.py: error: matplotlib is not installed (pip install -e ".[plot]")'
        ) from None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ref = report.reference_of(run_dir)
    if ref is not None:
        low, high = (ref["value"] - ref["ci95"]) * 100, (ref["value"] + ref["ci95"]) * 100
        shown = reference.shown(ref["value"], ref["ci95"], ref["metric"])
        label = f"paper ({ref['inner_steps']} steps): {shown}"
        ax.axhspan(low, high, color="tab:green", alpha=0.2, label=label)
    tasks = sorted({t.tasks for c in curves(run_dir).values() for t in c})
    for steps, points in curves(run_dir).items():
        x = [_iterations(t) for t in points]
        ax.errorbar(x, [t.mean * 100 for t in points], yerr=[t.ci95 * 100 for t in points],
                    marker="o", capsize=3, label=f"best.pt, {steps} inner steps")  # fmt: skip
    planned = report.read_run(run_dir, run_dir.parent).planned
    if planned:  # the whole budget on the axis, so a run that stopped short looks it
        ax.set_xlim(0, planned * 1.03)
        ax.axvline(
            planned, color="grey", linestyle=":", label=f"the preset's {planned:,} iterations"
        )
    ax.set_xlabel("meta-training iterations")
    ax.set_ylabel("test accuracy (%), 95% CI")
    ax.set_title(f"{run_dir.name}: {' or '.join(map(str, tasks))} fixed test tasks per point")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"written: {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="PNG path (default: RUN_DIR/test_curve.png)")
    parser.add_argument("--table", action="store_true", help="also print a Markdown table")
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        print(f"plot_test_curve.py: error: {args.run_dir} is not a directory", file=sys.stderr)
        return 2
    if not curves(args.run_dir):
        print(f"plot_test_curve.py: error: no test results in {args.run_dir}", file=sys.stderr)
        return 2
    if args.table:
        print(table(args.run_dir))
    plot(args.run_dir, args.out or args.run_dir / "test_curve.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

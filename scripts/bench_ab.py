"""Old code against new, interleaved in one run: did a change slow mamlrun down?

A refactoring should cost nothing. This checks it the only way that holds on a noisy machine:
the two trees run the same workloads one after the other, A B A B, each in a fresh process
with its own ``PYTHONPATH``, and the ratio of their medians is reported.

    python scripts/bench_ab.py --old main                 # this checkout against branch main
    python scripts/bench_ab.py --old HEAD~3 --rounds 5 --json ab.json

Two workloads:
- ``engine``: each tree's own ``scripts/bench.py --configs 5w1s --orders second`` (no memory
  processes): mamlrun's meta-gradient in tasks/s, the number ``make bench`` reports.
- ``train``: ``mamlrun train`` on the default sinusoid setup for a few hundred iterations with
  validation and checkpoints at their usual share: the runner around the engine (episodes,
  outer step, logging, checkpoints), in iterations/s from the wall clock of the training loop.

The old tree is checked out with ``git worktree`` into a temporary folder and removed after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def engine_tasks_per_s(tree: Path, threads: int) -> float:
    """mamlrun's tasks/s on the 5w1s second-order workload, as that tree's bench.py says."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        command = [sys.executable, str(tree / "scripts/bench.py"), "--configs", "5w1s"]
        command += ["--orders", "second", "--repeats", "1", "--no-memory", "--json", str(out)]
        _run(command, tree, threads)
        rows = json.loads(out.read_text())["rows"]
    return next(r["tasks_per_s"] for r in rows if r["engine"] == "mamlrun")


def train_iterations_per_s(tree: Path, threads: int, iterations: int) -> float:
    """Iterations/s of a sinusoid training run, start-up (imports, Hydra) excluded: the time
    of a one-iteration run is subtracted from that of the full one."""
    seconds = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, iterations):
            args = [f"iterations={n}", "val_every=100", "checkpoint_every=100", "log_every=50"]
            args += ["device=cpu", "progress_seconds=0", f"hydra.run.dir={tmp}/run{n}"]
            start = time.perf_counter()
            _run([sys.executable, "-m", "mamlrun.cli", "train", *args], tree, threads)
            seconds.append(time.perf_counter() - start)
    return (iterations - 1) / max(seconds[1] - seconds[0], 1e-9)


def _run(command: list[str], tree: Path, threads: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed in {tree}:\n{done.stderr[-2000:]}")


def compare(old: Path, new: Path, rounds: int, threads: int, iterations: int) -> dict:
    samples: dict[str, dict[str, list[float]]] = {
        w: {"old": [], "new": []} for w in ("engine", "train")
    }
    for r in range(rounds):
        order = [("old", old), ("new", new)] if r % 2 == 0 else [("new", new), ("old", old)]
        for name, tree in order:
            samples["engine"][name].append(engine_tasks_per_s(tree, threads))
            samples["train"][name].append(train_iterations_per_s(tree, threads, iterations))
        print(f"round {r + 1}/{rounds}: " + json.dumps(samples), flush=True)
    return {
        w: {
            "old_median": statistics.median(s["old"]),
            "new_median": statistics.median(s["new"]),
            "ratio_new_over_old": statistics.median(s["new"]) / statistics.median(s["old"]),
            "samples": s,
        }
        for w, s in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="main", help="git ref of the old code")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(old), args.old],
                       cwd=ROOT, check=True)  # fmt: skip
        try:
            result = compare(old, ROOT, args.rounds, args.threads, args.iterations)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT)
    print(f"{'workload':8} {'old':>10} {'new':>10} {'new/old':>8}")
    for w, r in result.items():
        print(f"{w:8} {r['old_median']:10.3f} {r['new_median']:10.3f} "
              f"{r['ratio_new_over_old']:8.3f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"old": args.old, **result}, indent=2))


if __name__ == "__main__":
    main()

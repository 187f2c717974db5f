"""Which mamlrun modules one training iteration passes through, and how often.

    PYTHONPATH=src python scripts/trace_iteration.py [--json PATH] [--hook MOD:Class.method]
                                                      [override ...]

Composes the default ``train`` config (sinusoid, MLP, MAML) with Hydra's compose API, as the
tests do, shrinks it to two iterations on the CPU (``TINY`` below; overrides given on the
command line go after those) and runs ``train`` on it in a temporary directory.

What is traced is one turn of the training loop and nothing of start-up, validation or
saving: the window opens when ``fit`` calls the hook for the first iteration and closes when
it calls it for the second. The hook is the trainer's method that does one outer step
(``Trainer.step``: sampling the meta-batch, the inner and outer loops, backward, the
optimizer and scheduler update); after it the turn logs the training loss (``log_every=1``,
as every ``log_every``-th turn does: issue 21 counted 19 modules in such a turn; since the
run-constant choices are bound once, 9; 10 since each run measures its speed) and
updates the progress display. Validation and checkpoints are not due at iteration 1. The
modules the hook's own call passes through are marked ``step`` in the table.

While the window is open, ``sys.setprofile`` sees every Python call and generator
resumption; a call counts for the module whose globals its code runs in, so a lambda that
``torch.func.grad`` calls back counts for the mamlrun module that wrote it.

The hook is found by name, the first of ``HOOKS`` that imports, so the script runs on the
layered tree (``mamlrun.training.trainer``) and on the layout before it (``mamlrun.trainer``,
e.g. ``PYTHONPATH=/work/main/src``). If the engine no longer has such a method, name the one
that ``fit`` calls once per iteration with ``--hook``; the script refuses a trace whose hook
did not run exactly twice.

``task_batching`` is pinned to ``loop``: ``auto`` (the default) times the modes at start-up,
so the path traced would depend on the machine's load, and the profiler (per thread) would
not follow ``threads`` into its workers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

#: Where one iteration starts, newest layout first: ``module:Class.method``.
HOOKS = ("mamlrun.training.trainer:Trainer.step", "mamlrun.trainer:Trainer.step")
#: Where ``train(cfg, run_dir)`` lives, newest layout first.
TRAIN = ("mamlrun.training.commands", "mamlrun.run")
TINY = (
    "device=cpu",
    "iterations=2",  # the window ends where the second iteration starts
    "meta_batch_size=2",
    "meta_optimizer.task_batching=loop",
    "val_tasks=2",
    "eval_batch_size=2",
    "final_test=false",
    "final_adapt=false",
    "log_every=1",  # the turn traced logs the training loss, as every log_every-th one does
)


def first_importable(names: tuple[str, ...]):
    for name in names:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            continue
    raise SystemExit(f"none of {', '.join(names)} can be imported: is mamlrun on PYTHONPATH?")


def find_hook(spec: str | None) -> tuple[str, type, str]:
    """``(spec, class, method name)`` of the hook: ``spec`` if given, else the first of HOOKS."""
    errors = []
    for candidate in [spec] if spec else HOOKS:
        module, _, qualname = candidate.partition(":")
        owner, _, method = qualname.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), owner)
        except (ModuleNotFoundError, AttributeError) as ex:
            errors.append(f"{candidate}: {ex}")
            continue
        if callable(getattr(cls, method, None)):
            return candidate, cls, method
        errors.append(f"{candidate}: {owner} has no method {method}")
    raise SystemExit("no hook for one iteration:\n  " + "\n  ".join(errors))


def compose(overrides: list[str]):
    """The ``train`` config as the CLI composes it (as ``tests/conftest.py`` does)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from mamlrun import config

    config.register_schemas()
    with initialize_config_dir(config_dir=str(config.config_dir()), version_base="1.3"):
        return hydra_compose("train", overrides=[*TINY, *overrides])


class Tracer:
    """Counts, per mamlrun module, the Python calls seen while installed (``sys.setprofile``).

    ``wrap`` installs it when the hook is first called and removes it when the hook is called
    the second time: the window is one whole turn of the training loop. Calls made while the
    first hook call runs are also counted apart (``in_step``): the outer step itself.
    """

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.step_calls: Counter[str] = Counter()
        self.functions: dict[str, Counter[str]] = defaultdict(Counter)
        self.order: list[str] = []  # modules in the order the iteration first enters them
        self.hooked = 0
        self.in_step = False

    def profile(self, frame, event, arg) -> None:
        if event != "call":
            return
        module = frame.f_globals.get("__name__", "")
        if module != "mamlrun" and not module.startswith("mamlrun."):
            return
        if module not in self.calls:
            self.order.append(module)
        self.calls[module] += 1
        self.step_calls[module] += self.in_step
        self.functions[module][frame.f_code.co_qualname] += 1

    def wrap(self, cls: type, method: str) -> None:
        """Replace ``cls.method`` by one that opens the window on its first call and closes
        it on its second."""
        original = getattr(cls, method)
        tracer = self

        def traced(*args, **kwargs):
            tracer.hooked += 1
            if tracer.hooked > 1:
                sys.setprofile(None)
                return original(*args, **kwargs)
            sys.setprofile(tracer.profile)
            tracer.in_step = True
            try:
                return original(*args, **kwargs)
            finally:
                tracer.in_step = False

        setattr(cls, method, traced)


def trace(hook: str | None, overrides: list[str]) -> dict:
    import mamlrun

    train = first_importable(TRAIN).train
    spec, cls, method = find_hook(hook)
    cfg = compose(overrides)
    tracer = Tracer()
    tracer.wrap(cls, method)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            train(cfg, Path(tmp) / "run")
    finally:
        sys.setprofile(None)
    if tracer.hooked != 2:
        raise SystemExit(f"the hook {spec} ran {tracer.hooked} times in 2 iterations, not twice")

    def rows(calls: Counter[str]) -> list[dict]:
        return [
            {"module": m, "calls": calls[m], "functions": dict(tracer.functions[m].most_common())}
            for m in tracer.order
            if calls[m]
        ]

    loop, step = rows(tracer.calls), rows(tracer.step_calls)
    return {
        "source": str(Path(mamlrun.__file__).parent),
        "hook": spec,
        "overrides": [*TINY, *overrides],
        "count": len(loop),
        "step_count": len(step),
        "modules": loop,
        "step_modules": [row["module"] for row in step],
    }


def table(result: dict) -> str:
    inside = set(result["step_modules"])
    lines = [
        f"mamlrun from {result['source']}; hook {result['hook']}",
        f"{'#':>3}  {'module':<36} {'step':>4} {'calls':>6}  most called",
    ]
    for i, row in enumerate(result["modules"], 1):
        top = ", ".join(list(row["functions"])[:3])
        mark = "yes" if row["module"] in inside else "-"
        lines.append(f"{i:>3}  {row['module']:<36} {mark:>4} {row['calls']:>6}  {top}")
    lines.append(
        f"{result['count']} mamlrun modules in one turn of the training loop, "
        f"{result['step_count']} of them in the outer step ({result['hook']})"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--hook", help="module:Class.method that runs one iteration")
    parser.add_argument("overrides", nargs="*", help="train config overrides, after the tiny ones")
    args = parser.parse_args()
    result = trace(args.hook, args.overrides)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

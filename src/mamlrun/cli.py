"""``mamlrun train|test|adapt [hydra overrides]``: picks the command, hands Hydra the rest.

Everything after the subcommand is Hydra's (``--cfg job``, ``--help``, ``-m``,
``hydra.run.dir=...``), so the CLI only routes and turns user errors into one line.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mamlrun import __version__

COMMANDS: dict[str, str] = {
    "train": "meta-train a model (validates periodically, keeps the best checkpoint)",
    "test": "meta-test a checkpoint: metric after the test-time inner steps, mean ± 95% CI",
    "adapt": "metric after each inner step 0…S, against a pretrained baseline",
}

USAGE = f"""usage: mamlrun {{{",".join(COMMANDS)}}} [hydra overrides] [hydra flags]

Meta-learning experiments (MAML and its family) configured with Hydra.

commands:
{os.linesep.join(f"  {name:<7}{text}" for name, text in COMMANDS.items())}

examples:
  mamlrun train                               sinusoid regression with MAML
  mamlrun train experiment=sinusoid_maml_paper
  mamlrun train debug=smoke                   a whole train → test → adapt cycle in seconds
  mamlrun train -m meta_optimizer.inner_lr=0.01,0.1 seed=0,1
  mamlrun train hparams_search=optuna experiment=omniglot_5w1s
  torchrun --standalone --nproc_per_node=2 -m mamlrun.cli train
  mamlrun test checkpoint=outputs/train/.../checkpoints/best.pt
  mamlrun train --help                        config groups and options of a command
  mamlrun train --cfg job                     print the composed config and exit

options:
  -h, --help     show this message
  --version      print the version
"""


def main(argv: Sequence[str] | None = None) -> Any:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if args else _exit(2)
    if args[0] == "--version":
        print(f"mamlrun {__version__}")
        return 0
    if args[0] in ("-sc", "--shell-completion") and any(a.startswith("query=") for a in args):
        return _complete(args)
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(
            f"mamlrun: error: unknown command {command!r} (choose from "
            f"{', '.join(COMMANDS)}; see mamlrun --help)",
            file=sys.stderr,
        )
        return _exit(2)
    return _run_hydra(command, rest)


def _run_hydra(command: str, overrides: list[str]) -> Any:
    import hydra
    import hydra._internal.utils as hydra_utils

    from mamlrun import config, run, sweep
    from mamlrun.errors import MamlrunError

    config.register_schemas()
    command_fn: Callable = getattr(run, command)

    def task(cfg: Any) -> Any:
        # Report inside the job: once the error leaves it, Hydra adds a line of its own.
        if run.in_sweep():
            return _sweep_job(command_fn, cfg)
        try:
            return command_fn(cfg)
        except MamlrunError as ex:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"mamlrun: error: {_one_line(ex)}", file=sys.stderr)
            return _exit(2)

    scratch = None
    if int(os.environ.get("RANK", "0")) > 0:
        overrides, scratch = _quiet_rank(overrides)
    sys.argv = ["mamlrun", *overrides]
    entry = hydra.main(
        version_base="1.3", config_path=str(config.config_dir()), config_name=command
    )(task)
    original = hydra_utils.run_and_report
    hydra_utils.run_and_report = _run_and_report_one_line
    sweep.LAST = None
    try:
        result = entry()
    finally:
        hydra_utils.run_and_report = original
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if sweep.LAST is not None and sweep.LAST.failed:
        failed, total = len(sweep.LAST.failed), len(sweep.LAST.jobs)
        print(
            f"mamlrun: error: {failed} of {total} jobs did not finish; the others' results are "
            f"in {sweep.LAST.sweep_dir / 'summary.csv'}",
            file=sys.stderr,
        )
        return _exit(1)
    return result


def _sweep_job(command_fn: Callable, cfg: Any) -> Any:
    """One job of a ``-m`` sweep: a failure is recorded in the job's directory and the sweep
    goes on (an exception would stop Hydra's launcher and lose the summary).

    The job returns NaN, which Optuna records as a failed trial.
    """
    from hydra.core.hydra_config import HydraConfig

    from mamlrun import sweep
    from mamlrun.errors import MamlrunError, SweepConfigError

    try:
        return command_fn(cfg)
    except SweepConfigError as ex:
        print(f"mamlrun: error: {_one_line(ex)}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as ex:
        message = _one_line(ex)
        if not isinstance(ex, MamlrunError):
            message = f"{type(ex).__name__}: {message}"
        job_dir = Path(HydraConfig.get().runtime.output_dir)
        job_dir.mkdir(parents=True, exist_ok=True)
        sweep.record_failure(job_dir, ex, message)
        print(f"mamlrun: error in job {job_dir}: {message}", file=sys.stderr)
        return float("nan")


def _quiet_rank(overrides: list[str]) -> tuple[list[str], str | None]:
    """Under torchrun, ranks other than 0 write nothing: no Hydra output directory of their
    own (they use rank 0's, which it broadcasts), no log file, warnings only."""
    quiet = [
        *overrides,
        "hydra.output_subdir=null",
        "hydra/job_logging=stdout",
        "hydra.job_logging.root.level=WARNING",
    ]
    if any(o.startswith("hydra.run.dir=") for o in overrides):
        return quiet, None
    scratch = tempfile.mkdtemp(prefix="mamlrun-rank-")
    return [*quiet, f"hydra.run.dir={scratch}"], scratch


def _complete(args: list[str]) -> Any:
    """Shell completion: Hydra's script calls ``mamlrun -sc query=SHELL`` with the typed line in
    ``COMP_LINE``; pick the subcommand from that line and let Hydra complete the rest."""
    line = os.environ.get("COMP_LINE", "")
    words = line.split()
    if len(words) < 2 or (len(words) == 2 and not line.endswith(" ")):
        prefix = words[1] if len(words) == 2 else ""
        print(" ".join(c for c in COMMANDS if c.startswith(prefix)))
        return 0
    command = words[1]
    if command not in COMMANDS:
        return 0
    os.environ["COMP_LINE"] = line.replace(f" {command}", "", 1)
    return _run_hydra(command, args)


def _run_and_report_one_line(func: Callable[[], Any]) -> Any:
    """Hydra's ``run_and_report``, but a user error becomes one line and exit status 2.

    Hydra prints composition errors over several lines with a hint about
    ``HYDRA_FULL_ERROR``; researchers scanning a sweep's logs want one line naming the
    problem. Real bugs (anything that is not a config or input error) keep their traceback,
    and ``HYDRA_FULL_ERROR=1`` restores every traceback.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from mamlrun.errors import MamlrunError

    try:
        return func()
    except (MamlrunError, HydraException, OmegaConfBaseException) as ex:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"mamlrun: error: {_one_line(ex)}", file=sys.stderr)
        _exit(2)


def _one_line(ex: BaseException) -> str:
    """The first line of the message, plus the first line of its cause when that adds detail."""
    first = _lines(ex)[0] if _lines(ex) else type(ex).__name__
    key = getattr(ex, "full_key", None)
    if key and key not in first:
        first = f"{key}: {first}"
    cause = ex.__cause__ or (None if ex.__suppress_context__ else ex.__context__)
    if cause is not None and _lines(cause) and _lines(cause)[0] not in first:
        first = f"{first.rstrip('.:')}: {_lines(cause)[0]}"
    return first


def _lines(ex: BaseException) -> list[str]:
    return [ln.strip() for ln in str(ex).splitlines() if ln.strip()]


def _exit(code: int) -> int:
    sys.exit(code)


if __name__ == "__main__":
    main()

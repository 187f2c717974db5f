"""``mamlrun train|test|adapt [overrides]``: picks the command, hands Hydra the rest.

Everything Hydra-specific lives here (but for ``train``'s final test, which composes
``conf/test.yaml`` and ``conf/adapt.yaml`` in ``training.commands``): the command line is
prepared (``overrides``) and composed once up front so that a mistake becomes one line that
keeps its detail (``messages``), then ``hydra.main`` runs the job and this module tells the
plain functions of ``training.commands`` what only Hydra knows (the run directory, the keys a
resume changes, a sweeper's direction). ``--help`` is per command (``helptext``).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mamlrun import __version__
from mamlrun.errors import MamlrunError, SweepConfigError

COMMANDS: dict[str, str] = {
    "train": "meta-train a model (validates periodically, keeps the best checkpoint)",
    "test": "meta-test a checkpoint: metric after the test-time inner steps, mean ± 95% CI",
    "adapt": "metric after each inner step 0…S, against a pretrained baseline",
    "pretrain": "train the backbone as one classifier over all training classes (a warm start)",
}

#: Commands that read what runs left on disk; they take plain arguments, not Hydra's.
TOOLS: dict[str, str] = {
    "report": "did these runs reproduce their papers? one row per run against its reference",
    "data": "prepare or check a dataset: download, verify, cache; what each split holds",
}

USAGE = f"""usage: mamlrun {{{",".join(COMMANDS)}}} [overrides] [hydra flags]
       mamlrun report DIR [DIR...] [--out DIR]
       mamlrun data {{prepare,check}} dataset=NAME

Meta-learning experiments (MAML and its family) configured with Hydra.

commands:
{os.linesep.join(f"  {name:<8}{text}" for name, text in (COMMANDS | TOOLS).items())}

examples:
  mamlrun train                               sinusoid regression with MAML
  mamlrun train dataset=omniglot              Omniglot 5-way 1-shot, the MAML paper's setup
  mamlrun train debug=smoke                   a whole train → test → adapt cycle in seconds
  mamlrun train resume=latest                 continue the newest run here
  mamlrun train -m meta_optimizer.inner_lr=0.01,0.1 seed=0,1
  mamlrun train hparams_search=optuna experiment=omniglot_5w1s
  torchrun --standalone --nproc_per_node=2 -m mamlrun.cli train
  mamlrun test checkpoint=outputs/train/<date>/<time>      (a run directory or a .pt file)
  mamlrun pretrain preset=omniglot_conv4      a backbone pre-trained on every training class
  mamlrun report outputs/train                every run against its paper's result
  mamlrun data prepare dataset=cifarfs        download, verify and cache a dataset
  mamlrun train --help                        a command's options and config groups
  mamlrun train --cfg job                     print the composed config and exit

options:
  -h, --help     show this message
  --version      print the version of mamlrun and torch, and the CUDA device seen
"""


def main(argv: Sequence[str] | None = None) -> Any:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if args else _exit(2)
    if args[0] == "--version" or (args[0] in COMMANDS and "--version" in args[1:]):
        print(version())  # before Hydra, which would print its own version
        return 0
    if args[0] in ("-sc", "--shell-completion") and any(a.startswith("query=") for a in args):
        return _complete(args)
    command, rest = args[0], args[1:]
    if command in TOOLS:
        return _tool(command, rest)
    if command not in COMMANDS:
        return _error(f"unknown command {command!r} (choose from {', '.join(COMMANDS)}; see "
                      "mamlrun --help)")  # fmt: skip
    if "--help" in rest or "-h" in rest:
        from mamlrun.cli import helptext

        print(helptext.render(command, COMMANDS[command]), end="")
        return 0
    try:
        line, original = _prepare(command, rest)
    except MamlrunError as ex:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        return _error(str(ex))
    return _run_hydra(command, line, original)


def version() -> str:
    """``mamlrun X (torch Y, cuda: GPU)``: what a bug report needs to say which code ran where.
    Asks torch what it sees; builds nothing."""
    import torch

    if not torch.cuda.is_available():
        device = "cpu: no CUDA device"
    else:
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        same = len(names) > 1 and len(set(names)) == 1
        device = f"cuda: {len(names)} x {names[0]}" if same else f"cuda: {' + '.join(names)}"
    return f"mamlrun {__version__} (torch {torch.__version__}, {device})"


def _tool(command: str, args: list[str]) -> int:
    from mamlrun.cli import data_command
    from mamlrun.results import report

    tool = {"report": report.main, "data": data_command.main}[command]
    try:
        code = tool(args)
    except MamlrunError as ex:
        return _error(str(ex))
    return code if code == 0 else _exit(code)


def _prepare(command: str, args: list[str]):
    """The command line Hydra will run (see ``overrides``), checked by composing it once."""
    from mamlrun.cli import overrides

    line = overrides.CommandLine.parse(args)
    line = overrides.CommandLine(line.flags, overrides.renamed(command, line.overrides))
    original = None
    if command == "train":
        line = overrides.with_dataset_preset(line)
    if command in ("train", "pretrain"):
        line, original = overrides.resumed(line, command)
        overrides.check_fresh_dir(line)
    if not any(f.startswith(("-sc", "--shell-completion")) for f in line.flags):
        _compose(command, line.overrides, check_required=not line.only_prints)
    return line, original


def _compose(command: str, args: list[str], check_required: bool = True) -> Any:
    """Compose as Hydra will (the first job of a sweep); a mistake becomes a MamlrunError."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from mamlrun import config
    from mamlrun.cli import messages

    config.register_schemas()
    first = _first_job(args)

    def known_keys(bad: str) -> list[str]:
        from mamlrun.cli.overrides import key_of

        try:
            with initialize_config_dir(str(config.config_dir()), version_base="1.3"):
                rest = [o for o in first if key_of(o) != bad]
                return list(config.flatten(compose(command, overrides=rest)))
        except (HydraException, OmegaConfBaseException):
            return []

    try:
        with initialize_config_dir(str(config.config_dir()), version_base="1.3"):
            cfg = compose(command, overrides=first)
    except (HydraException, OmegaConfBaseException) as ex:
        raise messages.composition_error(ex, command, known_keys) from ex
    except ValueError as ex:  # Hydra's own for a group set to null (experiment=null)
        first_line = str(ex).strip().splitlines()[0]
        raise MamlrunError(
            f"{first_line}: a config group takes one of its choices by name (~GROUP drops it)"
        ) from ex
    if check_required and command in ("test", "adapt") and OmegaConf.is_missing(cfg, "checkpoint"):
        raise MamlrunError(
            f"{command} needs checkpoint=PATH: a best.pt or last.pt written by mamlrun train, "
            "or the run's directory (its checkpoints/best.pt)"
        )
    return cfg


def _first_job(args: list[str]) -> list[str]:
    """The overrides of a sweep's first job (sweeps Hydra cannot enumerate are left out)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    first = []
    for override in OverridesParser.create().parse_overrides(args):
        if not override.is_sweep_override():
            first.append(override.input_line)
            continue
        try:
            first.append(f"{override.get_key_element()}={next(override.sweep_string_iterator())}")
        except HydraException:
            continue  # interval(...) and tag(...): a search space, checked by the sweeper
    return first


def _run_hydra(command: str, line: Any, original: list[str] | None) -> Any:
    import hydra

    from mamlrun import config

    config.register_schemas()
    args, scratch = line.args(), None
    if int(os.environ.get("RANK", "0")) > 0:
        args, scratch = _quiet_rank(args)
    run_dir = line.get("hydra.run.dir")
    fresh = run_dir is None or not Path(run_dir).exists()

    def task(cfg: Any) -> Any:
        return _job(command, cfg, original, fresh)

    sys.argv = ["mamlrun", *args]
    entry = hydra.main(
        version_base="1.3", config_path=str(config.config_dir()), config_name=command
    )
    try:
        return entry(task)()
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _job(command: str, cfg: Any, original: list[str] | None, fresh: bool) -> Any:
    """One job: the command's plain function with what Hydra knows; user errors as one line
    (in the run's log too), and a run that failed before doing anything leaves no folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from mamlrun.cli import messages
    from mamlrun.training import commands
    from mamlrun.training.signals import Interrupted

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return _sweep_job(command, cfg, run_dir)
    try:
        if command == "train":
            return commands.train(cfg, run_dir, _launch(cfg, original))
        if command == "pretrain":
            return commands.pretrain(cfg, run_dir, _changed("pretrain", cfg, original))
        return getattr(commands, command)(cfg, run_dir)
    except MamlrunError as ex:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":  # the traceback was asked for, not a run
            _discard(run_dir, fresh, command)
            raise
        _failed(f"mamlrun: error: {messages.one_line(ex)}", run_dir, fresh, command, 2)
    except Interrupted as ex:
        _failed(f"mamlrun: {ex.name} received: {ex}", run_dir, False, command, ex.exit_code)


def _launch(cfg: Any, original: list[str] | None) -> Any:
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    from mamlrun.training import resume
    from mamlrun.training.commands import Launch

    hydra_cfg = HydraConfig.get()
    direction = hydra_cfg.sweeper.get("direction")
    changed = None
    if original is not None:  # resume: the keys this command changes, against the run's own
        changed = resume.changed_keys(cfg, compose("train", overrides=original))
    preset = hydra_cfg.runtime.choices.get("experiment")
    return Launch(changed, direction if isinstance(direction, str) else None, preset)


def _changed(command: str, cfg: Any, original: list[str] | None) -> frozenset[str] | None:
    """On resume, the keys this command changes against the run's own overrides."""
    from hydra import compose

    from mamlrun.training import resume

    if original is None:
        return None
    return resume.changed_keys(cfg, compose(command, overrides=original))


def _failed(message: str, run_dir: Path, fresh: bool, command: str, code: int) -> None:
    print(message, file=sys.stderr)
    if not _discard(run_dir, fresh, command):
        record = logging.makeLogRecord({"name": "mamlrun", "levelno": logging.ERROR,
                                        "levelname": "ERROR", "msg": message})  # fmt: skip
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
    raise SystemExit(code)


def _discard(run_dir: Path, fresh: bool, command: str) -> bool:
    """Remove the folder of a run that failed before doing anything (it holds only Hydra's
    config and the log), with the empty default ``outputs/<command>/<date>`` above it."""
    if not fresh or {p.name for p in run_dir.iterdir()} - {".hydra", f"{command}.log"}:
        return False
    logging.shutdown()
    shutil.rmtree(run_dir, ignore_errors=True)
    default_root = Path.cwd().resolve() / "outputs"
    for parent in run_dir.resolve().parents:
        if not parent.is_relative_to(default_root) or any(parent.iterdir()):
            break
        parent.rmdir()
    return True


def _sweep_job(command: str, cfg: Any, job_dir: Path) -> Any:
    """One job of a ``-m`` sweep: a failure is recorded in the job's directory and the sweep
    goes on (an exception would stop Hydra's launcher and lose the summary). The job returns
    NaN, which Optuna records as a failed trial."""
    from hydra.core.hydra_config import HydraConfig

    from mamlrun.cli import messages
    from mamlrun.results import sweep
    from mamlrun.training import commands

    try:
        if command == "train":
            hydra_cfg = HydraConfig.get()
            direction = hydra_cfg.sweeper.get("direction")
            preset = hydra_cfg.runtime.choices.get("experiment")
            launch = commands.Launch(
                None, direction if isinstance(direction, str) else None, preset
            )
            return commands.train(cfg, job_dir, launch)
        return getattr(commands, command)(cfg, job_dir)
    except SweepConfigError as ex:
        print(f"mamlrun: error: {messages.one_line(ex)}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as ex:
        message = messages.one_line(ex)
        if not isinstance(ex, MamlrunError):
            message = f"{type(ex).__name__}: {message}"
        job_dir.mkdir(parents=True, exist_ok=True)
        sweep.record_failure(job_dir, ex, message)
        print(f"mamlrun: error in job {job_dir}: {message}", file=sys.stderr)
        return float("nan")


def _quiet_rank(args: list[str]) -> tuple[list[str], str | None]:
    """Under torchrun, ranks other than 0 write nothing: no Hydra output directory of their
    own (they use rank 0's, which it broadcasts), no log file, warnings only."""
    quiet = [
        *args,
        "hydra.output_subdir=null",
        "hydra/job_logging=stdout",
        "hydra.job_logging.root.level=WARNING",
    ]
    if any(a.startswith("hydra.run.dir=") for a in args):
        return quiet, None
    scratch = tempfile.mkdtemp(prefix="mamlrun-rank-")
    return [*quiet, f"hydra.run.dir={scratch}"], scratch


def _complete(args: list[str]) -> Any:
    """Shell completion: Hydra's script calls ``mamlrun -sc query=SHELL`` with the typed line in
    ``COMP_LINE``; pick the subcommand from that line and let Hydra complete the rest."""
    from mamlrun.cli import overrides

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
    return _run_hydra(command, overrides.CommandLine.parse(args), None)


def _error(message: str) -> int:
    print(f"mamlrun: error: {message}", file=sys.stderr)
    return _exit(2)


def _exit(code: int) -> int:
    sys.exit(code)


if __name__ == "__main__":
    main()

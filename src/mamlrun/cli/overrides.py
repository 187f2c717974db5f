"""What the CLI does to a command line before Hydra composes it.

* ``dataset=X`` alone trains X's usual setup: the dataset config names its preset
  (``_preset_``), which is added as ``experiment=...``; anything else the user gives still
  overrides it.
* ``resume=true`` continues the run in ``hydra.run.dir`` (``resume=latest``: the newest run
  under ``outputs/train``) with that run's own overrides, so the command does not have to
  repeat them; the new ones are put after them and win.
* Old key names of ``test``/``adapt`` (``n_tasks``, ``seed``) still work, with a warning.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from omegaconf import OmegaConf

from mamlrun import config
from mamlrun.training import resume

#: Hydra flags that take a value as the next argument.
_FLAGS_WITH_VALUE = {
    "--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
    "--config-dir", "-cd", "--experimental-rerun", "--shell-completion", "-sc",
}  # fmt: skip
#: Renamed keys of test and adapt: the names train uses for the same settings.
RENAMED = {"n_tasks": "test_tasks", "seed": "test_seed"}


@dataclass
class CommandLine:
    """A command's arguments, split into Hydra's flags and the overrides."""

    flags: list[str]
    overrides: list[str]

    @classmethod
    def parse(cls, args: list[str]) -> CommandLine:
        flags, overrides, take_value = [], [], False
        for arg in args:
            if take_value or arg.startswith("-"):
                flags.append(arg)
                take_value = not take_value and arg in _FLAGS_WITH_VALUE
            else:
                overrides.append(arg)
        return cls(flags, overrides)

    @property
    def multirun(self) -> bool:
        return "-m" in self.flags or "--multirun" in self.flags

    @property
    def only_prints(self) -> bool:
        """``--cfg``, ``--info``, ``--help``, completion: Hydra prints and runs nothing."""
        printing = {"--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "-sc"}
        return bool(printing & set(self.flags)) or any(
            f.startswith("--shell-completion") for f in self.flags
        )

    def get(self, key: str) -> str | None:
        values = [value_of(o) for o in self.overrides if key_of(o) == key]
        return values[-1] if values else None

    def args(self) -> list[str]:
        return [*self.flags, *self.overrides]


def key_of(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def value_of(override: str) -> str:
    return override.partition("=")[2]


def merged(first: list[str], then: list[str]) -> list[str]:
    """``first`` with every key that ``then`` sets replaced, then ``then``."""
    replaced = {key_of(o) for o in then}
    return [o for o in first if key_of(o) not in replaced] + then


#: pretrain's own groups under the names every command uses: ``debug=smoke`` is pretrain's
#: smoke run (conf/pretrain_debug/), whose keys are not train's.
PRETRAIN_GROUPS = {"debug": "pretrain_debug"}


def renamed(command: str, overrides: list[str]) -> list[str]:
    if command == "pretrain":
        return [
            o.replace(key_of(o), PRETRAIN_GROUPS[key_of(o)], 1) if key_of(o) in PRETRAIN_GROUPS
            else o
            for o in overrides
        ]  # fmt: skip
    if command not in ("test", "adapt"):
        return overrides
    out = []
    for o in overrides:
        old = key_of(o)
        if old in RENAMED:
            new = RENAMED[old]
            print(f"mamlrun: warning: {old} is now {new} (the name train uses)", file=sys.stderr)
            o = o.replace(old, new, 1)
        out.append(o)
    return out


def with_dataset_preset(line: CommandLine) -> CommandLine:
    """``dataset=X`` without ``experiment=``: add X's preset (see the module docstring)."""
    dataset = line.get("dataset")
    if dataset is None or line.get("experiment") is not None or "," in dataset:
        return line
    path = config.config_dir() / "dataset" / f"{dataset}.yaml"
    if not path.is_file():
        return line  # Hydra reports the unknown choice with the available ones
    preset = OmegaConf.load(path).get("_preset_")
    if preset is None:
        return line
    return CommandLine(line.flags, [f"experiment={preset}", *line.overrides])


# ------------------------------------------------------------------------------------- resume
def resumed(line: CommandLine, command: str = "train") -> tuple[CommandLine, list[str] | None]:
    """For ``resume=true|latest``: the command line that continues the run, and the run's
    original overrides (None when there is nothing to resume or it is a sweep). Which run,
    and whether it can be continued, ``training.resume`` decides; this only writes the line.
    """
    if line.multirun or line.only_prints:
        return line, None
    value = resume.wanted(line.get("resume"))
    if value is None:
        return line, None
    directory = resume.run_to_continue(value, line.get("hydra.run.dir"), command)
    original = resume.original_overrides(directory)
    new = [o for o in line.overrides if key_of(o) not in ("resume", "hydra.run.dir")]
    keep = ["resume=true", f"hydra.run.dir={directory}", "hydra.output_subdir=null"]
    return CommandLine(line.flags, merged(original, new) + keep), original


def check_fresh_dir(line: CommandLine) -> None:
    """Before Hydra writes its ``.hydra/`` record into ``hydra.run.dir``: a new run must not
    take over another run's directory (``training.resume.check_fresh``)."""
    run_dir = line.get("hydra.run.dir")
    if run_dir and not line.only_prints and (line.get("resume") or "false").lower() in (
        "false", "no", "0",
    ):  # fmt: skip
        resume.check_fresh(run_dir)

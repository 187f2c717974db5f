"""Resume, in one place: which run to continue, reading it back, what it continues with.

A run directory's checkpoint holds the config the run was started with, and that is what a
resumed run continues with: forgetting the original overrides must not silently turn a 3,000
step run into a 70,000 step one. A command may change how long the run goes on, where, and
how it reports (``MAY_CHANGE``); a change to anything that decides what the run computes (a
seed, the meta-batch, a learning rate, the validation schedule that picks ``best.pt``) is
refused with the list of differing keys, since the result would be neither the old run nor
a new one.

The CLI asks ``run_to_continue`` (``resume=true|latest``) and ``original_overrides`` before
Hydra composes, and ``check_fresh`` before Hydra writes into a folder; the trainer asks
``prepare`` once, which either reads the run back (``Resumed``) or checks that the folder is
free. Every decision and message about resuming is here.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mamlrun import config
from mamlrun.config import flatten
from mamlrun.errors import MamlrunError
from mamlrun.results import checkpoint
from mamlrun.training.auto_batching import RECOMPUTED

#: Where a run keeps what a resume continues from, relative to its directory.
LAST = Path("checkpoints", "last.pt")
#: Where ``resume=latest`` looks: the CLI's default ``outputs/train/<date>/<time>``.
OUTPUTS = Path("outputs")

#: Keys (or key prefixes, ending in ".") a resumed run may change.
MAY_CHANGE = (
    "iterations",
    "epochs",
    "max_minutes",
    "device",
    "threads",
    "log_every",
    "progress_seconds",
    "checkpoint_every",
    "final_test",
    "final_adapt",
    "test_tasks",
    "test_seed",
    "resume",
    "reference.",
    "baseline.",
    "dataset.root",
)


#: Where a run's weights started: read once, at its first step; a resumed run has its own.
INIT = "backbone.init"


def may_change(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_CHANGE)


def continued_config(
    saved: dict, requested: DictConfig, changed: Collection[str] | None,
    decided: Collection[str] = (),
) -> tuple[DictConfig, list[str]]:  # fmt: skip
    """The config to continue with, and one line per accepted change (``key: old → new``).

    ``saved`` is the resolved config of the run's checkpoint; ``requested`` the config this
    command composed; ``changed`` the keys (or key prefixes) this command asks to change,
    or None when every key of ``requested`` is meant as given (a Python caller), but for
    ``decided``: keys the run set itself (``auto_batching``'s ``checkpoint_inner``), which
    only a command that names them changes. Keys the run's config does not have (added by a
    newer mamlrun) come from ``requested``.
    """
    old, new = flatten(saved), flatten(requested)
    every = set(new) - set(decided)
    wanted = every if changed is None else {k for k in new if _named(k, changed)}
    differing = [k for k in sorted(wanted) if k in old and old[k] != new[k]]
    if INIT in differing:
        raise MamlrunError(
            f"{INIT}={_show(new[INIT])} cannot be combined with resume=true: the resumed run "
            f"already holds its weights (it started from {INIT}={_show(old[INIT])}); start a "
            "new run (another hydra.run.dir) to start from another init"
        )
    refused = [k for k in differing if not may_change(k)]
    if refused:
        listed = ", ".join(f"{k}: {_show(old[k])} → {_show(new[k])}" for k in refused)
        raise MamlrunError(
            f"resume would change what this run computes ({listed}); a resumed run may only "
            f"change {', '.join(k.rstrip('.') for k in MAY_CHANGE)}: start a new run "
            "(another hydra.run.dir) for the rest"
        )
    merged = {**old, **{k: v for k, v in new.items() if k not in old or k in differing}}
    lines = [f"{k}: {_show(old[k])} → {_show(new[k])}" for k in differing if k != "resume"]
    return OmegaConf.create(_unflatten(merged)), lines


def _named(key: str, changed: Collection[str]) -> bool:
    return any(key == c or key.startswith(f"{c}.") for c in changed)


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``flatten``; where one side has ``key: null`` and the other ``key.sub``
    (``reference`` set on one side only), the keys below win."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        if not (value is None and isinstance(node.get(leaf), dict)):
            node[leaf] = value
    return tree


# ---------------------------------------------------------------------- which run, if any
def holds_run(run_dir: str | Path) -> bool:
    return (Path(run_dir) / LAST).is_file()


def check_fresh(run_dir: str | Path) -> None:
    """A new run must not take over another run's directory (its ``last.pt`` and, under the
    CLI, Hydra's ``.hydra/`` record would be overwritten)."""
    if holds_run(run_dir):
        raise MamlrunError(
            f"{run_dir} already holds a run; pass resume=true to continue it, "
            "or choose another hydra.run.dir"
        )


def wanted(value: str | bool | None) -> str | None:
    """``resume=`` as given: None (start afresh), ``true`` or ``latest``."""
    text = str(value if value is not None else "false").lower()
    if text in ("false", "no", "0"):
        return None
    if text in ("true", "yes", "1", "latest"):
        return "latest" if text == "latest" else "true"
    raise MamlrunError(f"resume must be true, false or latest, got {text!r}")


def run_to_continue(value: str, run_dir: str | None, command: str = "train") -> Path:
    """The run that ``resume=value`` (``true`` or ``latest``) continues, checked to hold a
    ``last.pt``: ``run_dir`` when given, else (``latest``) the newest under
    ``outputs/<command>``."""
    if value == "latest" and run_dir is None:
        run_dir = str(latest_run(command=command))
    if run_dir is None:
        newest = latest_run(required=False, command=command)
        hint = f" (the newest here: {newest})" if newest else ""
        raise MamlrunError(
            f"resume=true needs the run to continue: add hydra.run.dir=DIR{hint}, "
            "or use resume=latest"
        )
    directory = Path(run_dir)
    if not holds_run(directory):
        raise MamlrunError(
            f"resume=true: {directory} holds no {LAST.as_posix()}, so there is nothing to "
            "continue (check hydra.run.dir, or start the run without resume=true)"
        )
    return directory


def latest_run(required: bool = True, command: str = "train") -> Path | None:
    """The newest ``outputs/<command>/<date>/<time>`` that holds a ``last.pt``."""
    runs = sorted(p.parents[1] for p in (OUTPUTS / command).glob(f"*/*/{LAST.as_posix()}"))
    if runs:
        return runs[-1]
    if required:
        raise MamlrunError(
            f"resume=latest found no run under {OUTPUTS / command} (with {LAST.as_posix()}) "
            "in this folder; name one with hydra.run.dir=DIR"
        )
    return None


def original_overrides(directory: Path) -> list[str]:
    """The overrides the run was started with (Hydra's record in ``.hydra/``), less those
    that only said where and whether to resume."""
    path = directory / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    skip = ("resume", "hydra.run.dir", "hydra.output_subdir")
    return [str(o) for o in OmegaConf.load(path) if _key(str(o)) not in skip]


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def changed_keys(requested: DictConfig, original: DictConfig) -> frozenset[str]:
    """The keys this command sets to other values than the run's own overrides gave."""
    base = flatten(original)
    return frozenset(k for k, v in flatten(requested).items() if base.get(k, v) != v)


# ---------------------------------------------------------------------- reading it back
@dataclass(frozen=True)
class Resumed:
    """A run read back: the config it continues with, its ``last.pt`` and the changes made."""

    cfg: DictConfig
    saved: dict[str, Any]
    changes: list[str]

    @property
    def step(self) -> int:
        return self.saved["progress"]["step"]

    @property
    def batching(self) -> str:
        """The task batching the run chose (``auto`` was resolved before its first step)."""
        return self.saved["task_batching"]


def decided(saved: dict[str, Any]) -> list[str]:
    """The keys of the run's config that the run set itself: ``checkpoint_inner`` where
    ``task_batching=auto`` chose to recompute the inner steps (``auto_batching``)."""
    chosen = (saved.get("task_batching_probe") or {}).get("chosen", "")
    return ["meta_optimizer.checkpoint_inner"] if chosen.endswith(RECOMPUTED) else []


def prepare(cfg: DictConfig, run_dir: Path, changed: Collection[str] | None) -> Resumed | None:
    """What ``train`` starts from: with ``resume``, the run in ``run_dir`` read back and
    continued with ``cfg``'s allowed changes (``changed``: the keys the command changes, None
    for all); without, None, after checking that ``run_dir`` holds no run."""
    if not cfg.resume:
        check_fresh(run_dir)
        return None
    if not holds_run(run_dir):
        raise MamlrunError(
            f"resume=true but {run_dir} holds no {LAST.as_posix()}: nothing to continue "
            "(start it without resume=true, or name the run with hydra.run.dir=DIR)"
        )
    # RNG and generator states must stay CPU tensors; load_state_dict moves the rest.
    saved = checkpoint.load(run_dir / LAST, map_location="cpu")
    merged, changes = continued_config(saved["config"]["run"], cfg, changed, decided(saved))
    merged = config.validate(merged, config.TrainConfig)
    done = saved["progress"]["step"]
    if done >= merged.iterations:
        raise MamlrunError(
            f"this run already finished at step {done} of iterations={merged.iterations}: "
            f"pass iterations=N (more than {done}) to extend it"
        )
    return Resumed(merged, saved, changes)

"""Which data a run read, and whether a test of its checkpoint reads the same.

A checkpoint records the data root the run actually read (its ``dataset.root``, else the
``$MAMLRUN_DATA`` or user cache it fell back to) and the fingerprint of the data found there
(``data.fingerprint``). ``test`` and ``adapt`` read from that root, not from whatever
``$MAMLRUN_DATA`` says on the day of the test: the variable names where data lives on a
machine, and a run's own data is a fact about the run. An explicit ``data_root=`` is the user
saying where the same data lives now (another machine, a moved folder); the fingerprint then
shows whether it is the same data, and anything else is refused unless the user asks for a
cross-domain test.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mamlrun.data import fingerprint
from mamlrun.data.download import ENV_VAR, resolve_root
from mamlrun.data.tasks import Fingerprinted, TaskSource
from mamlrun.errors import MamlrunError

log = logging.getLogger("mamlrun")


def record(dataset_cfg: Any, source: TaskSource) -> dict[str, Any]:
    """What a checkpoint keeps of its data: the root read (None for data without files) and
    the fingerprint of what was found there."""
    root = resolve_root(dataset_cfg["root"]) if "root" in dataset_cfg else None
    root = None if root is None else root.absolute()  # a test may run from another folder
    return {
        "root": None if root is None else str(root),
        "fingerprint": _fingerprint(source),
        "input_shape": list(source.input_shape),  # what a cross-domain test brings images to
    }


def _fingerprint(source: TaskSource) -> fingerprint.Fingerprint | None:
    return source.fingerprint() if isinstance(source, Fingerprinted) else None


@dataclass(frozen=True)
class Choice:
    """The data root a test reads (None: the dataset has none) and why that one."""

    root: str | None
    reason: str


def choose_root(saved: dict[str, Any], dataset_cfg: Any, data_root: str | None) -> Choice:
    """The root a test of checkpoint ``saved`` reads: an explicit ``data_root``, else the
    root the run recorded, else (checkpoints that recorded none) the run's configured
    ``dataset.root``, then ``$MAMLRUN_DATA``, then the user cache."""
    if "root" not in dataset_cfg:
        return Choice(None, "the dataset reads no files")
    if data_root is not None:
        return Choice(data_root, "data_root= given")
    recorded = (saved.get("data") or {}).get("root")
    if recorded is not None:
        if not Path(recorded).exists():
            raise MamlrunError(
                f"the run read its data from {recorded}, which is not on this machine; pass "
                "data_root=DIR for where the same data lives here (it is checked against the "
                "run's fingerprint)"
            )
        return Choice(recorded, "the root the run read")
    if dataset_cfg.get("root") is not None:
        return Choice(str(dataset_cfg["root"]), "the run's dataset.root")
    env = os.environ.get(ENV_VAR)
    if env:
        return Choice(env, f"${ENV_VAR} (the checkpoint records no data root)")
    return Choice(str(resolve_root(None)), "the user cache (the checkpoint records no data root)")


def compare(saved: dict[str, Any], source: TaskSource, root: str | None,
            cross_domain: bool) -> list[str]:  # fmt: skip
    """What differs between the data the run recorded and ``source``'s; a difference is an
    error unless ``cross_domain``. Checkpoints without a fingerprint are not checked."""
    recorded = (saved.get("data") or {}).get("fingerprint")
    if recorded is None:
        return []
    found = _fingerprint(source)
    diffs = fingerprint.differences(recorded, found or {})
    if diffs and not cross_domain:
        raise MamlrunError(
            f"the data in {root} is not what the run trained on ({'; '.join(diffs)}); point "
            "data_root= at the run's data, or add cross_domain=true to test on this data"
        )
    if diffs:
        log.info(f"cross-domain test on {root}: {'; '.join(diffs)}")
    return diffs

"""What a resumed run continues with: its own config, plus only the changes that are safe.

A run directory's checkpoint holds the config the run was started with, and that is what a
resumed run continues with: forgetting the original overrides must not silently turn a 3,000
step run into a 70,000 step one. A command may change how long the run goes on, where, and
how it reports (``MAY_CHANGE``); a change to anything that decides what the run computes (a
seed, the meta-batch, a learning rate, the validation schedule that picks ``best.pt``) is
refused with the list of differing keys, since the result would be neither the old run nor
a new one.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mamlrun.config import flatten
from mamlrun.errors import MamlrunError

#: Keys (or key prefixes, ending in ".") a resumed run may change.
MAY_CHANGE = (
    "iterations",
    "max_minutes",
    "device",
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


def may_change(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_CHANGE)


def continued_config(
    saved: dict, requested: DictConfig, changed: Collection[str] | None
) -> tuple[DictConfig, list[str]]:
    """The config to continue with, and one line per accepted change (``key: old → new``).

    ``saved`` is the resolved config of the run's checkpoint; ``requested`` the config this
    command composed; ``changed`` the keys (or key prefixes) this command asks to change,
    or None when every key of ``requested`` is meant as given (a Python caller). Keys the
    run's config does not have (added by a newer mamlrun) come from ``requested``.
    """
    old, new = flatten(saved), flatten(requested)
    wanted = set(new) if changed is None else {k for k in new if _named(k, changed)}
    differing = [k for k in sorted(wanted) if k in old and old[k] != new[k]]
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

"""``adapt``'s curves as a picture beside its results.json, in the spirit of the MAML paper's
Figures 2 and 3 (the meta-learned model against the pretrained baseline, step by step).

Drawn only with the ``plot`` extra (matplotlib); without it ``adapt`` says where the numbers
are and writes no picture.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("mamlrun")


def adaptation_curve(results: dict[str, Any], path: Path) -> Path | None:
    """The metric after each inner step with its 95% CI, and the baseline's beside it (a
    transfer baseline's fine-tuning epochs on a second axis); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        log.info('no adapt.png: matplotlib is not installed (pip install "mamlrun[plot]")')
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    _band(ax, results["steps"], results, "meta-learned", "C0")
    base = results.get("baseline")
    if base:
        label = base.get("method", "pretrained baseline")
        _band(ax, results["steps"], base, label, "C1")
        if "epochs" in base:
            _epoch_axis(ax, results["steps"], base["epochs"])
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("inner steps")
    ax.set_ylabel(results["metric"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _band(ax: Any, steps: list[int], curve: dict[str, Any], label: str, colour: str) -> None:
    mean, ci = curve["mean"], curve["ci95"]
    ax.plot(steps, mean, marker="o", color=colour, label=label)
    low = [m - c for m, c in zip(mean, ci, strict=True)]
    high = [m + c for m, c in zip(mean, ci, strict=True)]
    ax.fill_between(steps, low, high, color=colour, alpha=0.2)


def _epoch_axis(ax: Any, steps: list[int], epochs: list[int]) -> None:
    """The transfer baseline's fine-tuning epochs at each inner step, on the top axis."""
    top = ax.secondary_xaxis("top")
    top.set_xticks(steps, [str(e) for e in epochs])
    top.set_xlabel("baseline's fine-tuning epochs")

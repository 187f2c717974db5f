"""Did a run reproduce its paper? The comparison of a test result with the published one.

A preset carries the result it targets (``reference:``, see ``config.Reference``). A run's
number can only be held against it when the run computed the same thing: the same dataset,
network, algorithm and meta-batch as the preset (``differences``) and a test with the same
number of inner steps as the paper's. Only then does ``verdict`` compare the two intervals.

And only after the same training: a run is compared once it has trained the preset's own
``iterations`` (the budget of the paper it targets), whatever shortened it (``iterations=``,
``debug=smoke``, a ``max_minutes`` that ran out, a run still going). Before that it is ``not
comparable (300 / 60,000 iterations)``. The published number is what the method reached
after that budget; held against a shortened run, "below" would as often mean "not trained
yet" as "does not reproduce". No fraction of the budget would do instead: how much the last
part of training adds differs per benchmark, and where the learning rate is scheduled over
``iterations`` (Reptile's anneals to zero at the last one) a shortened run does not even
follow the paper's schedule. A run longer than the preset is compared: it had the budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: The parts of a config a published result depends on (flattened key prefixes).
COMPARED = ("dataset.", "backbone.", "meta_optimizer.", "meta_batch_size")

#: Keys inside those parts that change how a run is computed or where it reads from, not what
#: it learns: where the data lives and is kept, loop or vmap (equal to 1e-15) and the memory
#: auto may spend choosing, recomputation
#: in the backward, and the inner steps of validation (the test's own steps are checked
#: separately).
NEUTRAL = frozenset(
    {
        "dataset.root",
        "dataset.storage",
        "dataset._preset_",
        "meta_optimizer.task_batching",
        "meta_optimizer.max_memory",
        "meta_optimizer.checkpoint_inner",
        "meta_optimizer.inner_steps_test",
    }
)

INSIDE = "inside the reference CI"
OVERLAP = "CIs overlap"
BELOW = "below"
ABOVE = "above"


def settings(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The result-relevant part of a flattened config (``config.flatten``)."""
    return {k: v for k, v in flat.items() if k.startswith(COMPARED) and k not in NEUTRAL}


def differences(run: Mapping[str, Any], preset: Mapping[str, Any]) -> list[str]:
    """``key: preset's → run's`` for every result-relevant key the run changed."""
    ours, theirs = settings(run), settings(preset)
    missing = object()
    changed = []
    for key in sorted(ours.keys() | theirs.keys()):
        a, b = theirs.get(key, missing), ours.get(key, missing)
        if a != b:
            changed.append(f"{key}: {_show(a, missing)} → {_show(b, missing)}")
    return changed


def _show(value: Any, missing: object) -> str:
    return "(unset)" if value is missing else str(value)


#: The verdicts that hold a result against the paper's (any other says why it is not).
COMPARISONS = (INSIDE, OVERLAP, BELOW, ABOVE)


def short_of_budget(trained: int | None, budget: int | None) -> str | None:
    """``not comparable (300 / 60,000 iterations)`` while a run has trained less than its
    preset's ``iterations`` (or nobody knows how long it trained); None once it has them or
    when there is no budget to hold it to."""
    if budget is None or (trained is not None and trained >= budget):
        return None
    done = "?" if trained is None else f"{trained:,}"
    return f"not comparable ({done} / {budget:,} iterations)"


def verdict(
    mean: float,
    ci95: float,
    ref_value: float,
    ref_ci95: float | None,
    trained: int | None = None,
    budget: int | None = None,
) -> str:
    """Where our interval ``mean ± ci95`` lies against the reference's, for a run that trained
    ``trained`` iterations of the preset's ``budget`` (not comparable before it has them all).

    Inside: our mean lies in the paper's interval. Overlap: the intervals share values, so the
    difference is not significant at this many tasks. Below or above: they are disjoint. A
    source that prints no interval (``ref_ci95`` None) is compared as the point it gives.
    """
    if (short := short_of_budget(trained, budget)) is not None:
        return short
    ref_ci95 = ref_ci95 or 0.0
    if abs(mean - ref_value) <= ref_ci95:
        return INSIDE
    if mean + ci95 < ref_value - ref_ci95:
        return BELOW
    if mean - ci95 > ref_value + ref_ci95:
        return ABOVE
    return OVERLAP


def shown(value: float, ci95: float | None, metric: str) -> str:
    """A published number as the paper prints it (98.7 ± 0.4%, 99.47 ± 0.14%): the digits
    given, not our two significant digits of the CI; only the value where it prints none."""
    scale, unit = (100, "%") if metric == "accuracy" else (1, "")
    if ci95 is None:
        return f"{round(value * scale, 6):g}{unit} (no interval given)"
    return f"{round(value * scale, 6):g} ± {round(ci95 * scale, 6):g}{unit}"

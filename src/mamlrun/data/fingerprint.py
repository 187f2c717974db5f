"""What data a run read, recorded so that a later test can tell whether it reads the same.

A fingerprint is every split's class names in class-index order, each with its image count:
what decides which tasks a seed draws. Two folders with the same fingerprint give the same
task stream; any difference (a class more or less, a class with other images, another order)
means a test would measure the model on other data than it was trained and validated on,
which is either a mistake (``$MAMLRUN_DATA`` pointing at another copy) or a cross-domain
test, and only the user can say which.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

#: ``{split: {class name: images}}``, the class order being the class index order.
Fingerprint = dict[str, dict[str, int]]

_SHOWN = 3  # names listed per kind of difference; the count says how many there are


def of_classes(
    classes: Mapping[str, Sequence[str]], counts: Mapping[str, Sequence[int]]
) -> Fingerprint:
    """The fingerprint of splits given as class names and their image counts."""
    return {
        split: {name: int(n) for name, n in zip(classes[split], counts[split], strict=True)}
        for split in classes
    }


def differences(recorded: Fingerprint, found: Fingerprint) -> list[str]:
    """What differs between the data a run recorded and the data found now, one phrase per
    split; empty when they are the same data."""
    out = []
    for split in sorted(recorded.keys() | found.keys()):
        if split not in found or split not in recorded:
            out.append(f"split {split} {'missing' if split not in found else 'not in the run'}")
            continue
        out.extend(_split_differences(split, recorded[split], found[split]))
    return out


def _split_differences(split: str, recorded: dict[str, int], found: dict[str, int]) -> list[str]:
    extra = [c for c in found if c not in recorded]
    missing = [c for c in recorded if c not in found]
    counts = [f"{c}: {recorded[c]} → {found[c]}" for c in recorded if found.get(c, recorded[c])
              != recorded[c]]  # fmt: skip
    parts = []
    if missing:
        parts.append(f"{len(missing)} of its {len(recorded)} classes missing ({_some(missing)})")
    if extra:
        parts.append(f"{len(extra)} classes the run did not have ({_some(extra)})")
    if counts:
        parts.append(f"{len(counts)} classes with other image counts ({_some(counts)})")
    if not parts and list(found) != list(recorded):
        parts.append("the same classes in another order (other tasks for the same seed)")
    return [f"{split}: {', '.join(parts)}"] if parts else []


def _some(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (", …" if len(items) > _SHOWN else "")

"""Which image files make which class of which split, in the three layouts a user's own folder
comes in (``dataset=images``, ``data/folders.py``):

* **split folders** ``root/{train,val,test}/<class>/*``: the splits as the user made them;
* **class folders** ``root/<class>/*``: split by the class lists ``train.txt``, ``val.txt`` and
  ``test.txt`` in ``root`` (one class name a line) when they are there, else by a seeded rule
  (``split_fractions`` of the classes, sorted by name and shuffled with ``split_seed``);
* **a CSV** of ``filename,label[,split]`` rows (Ravi & Larochelle's layout, generalised:
  filenames relative to ``root``, an optional header row), split by its third column or, when
  it has none, by the seeded rule.

Only reading happens here: nothing is written into the user's folder. Every way the folder can
be wrong is one ``MamlrunError`` naming the file or class and what to do about it.
"""

from __future__ import annotations

import csv as csv_module
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mamlrun.data.tasks import SPLITS
from mamlrun.errors import MamlrunError

log = logging.getLogger(__name__)

#: The image files read (any case); every other file in a class folder is ignored.
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
#: How many names a message lists before "and N more".
SHOWN = 5
_LAYOUTS_HELP = (
    "put each class's images in DIR/<class>/ or DIR/{train,val,test}/<class>/, or name a CSV "
    "of filename,label[,split] rows with dataset.csv"
)


@dataclass(frozen=True)
class Layout:
    """The files of every class of every split, in the order they are cached (split by split,
    class by class, each class's files sorted by path), and how the classes were split."""

    kind: str  # "split folders" | "class folders" | "csv"
    rule: str  # the split rule used, in words
    files: dict[str, dict[str, list[Path]]]  # split → class → files


def counted(count: int, noun: str) -> str:
    """``1 file``, ``2 files``; ``class`` → ``classes``."""
    return (
        f"{count} {noun}" if count == 1 else f"{count} {noun}{'es' if noun.endswith('s') else 's'}"
    )


def named(items: Sequence[str], shown: int = SHOWN) -> str:
    """``a, b, c`` or ``a, b, c, ... and 7 more``: a message names the first few."""
    head = ", ".join(str(i) for i in items[:shown])
    return head if len(items) <= shown else f"{head}, ... and {len(items) - shown} more"


def read_layout(root: Path, csv: str | None, fractions: Sequence[float], seed: int) -> Layout:
    """The layout of ``root``: the CSV when ``csv`` names one, the split folders when
    ``root/train`` and the others are there, else the class folders."""
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise MamlrunError(f"dataset.root={root} {what}; point it at your folder of images")
    if csv is not None:
        return _from_csv(
            root, Path(csv) if Path(csv).is_absolute() else root / csv, fractions, seed
        )
    present = [s for s in SPLITS if (root / s).is_dir()]
    if present and len(present) < len(SPLITS):
        missing = [s for s in SPLITS if s not in present]
        raise MamlrunError(
            f"{root} has {'/ and '.join(present)}/ but no {'/ or '.join(missing)}/: give every "
            "split its folder, or put the class folders directly in it to have them split"
        )
    if present:
        return _from_split_folders(root)
    classes = class_folders(root)
    if not classes:
        raise MamlrunError(f"{root} holds no class folders of images ({', '.join(EXTENSIONS)}); "
                           + _LAYOUTS_HELP.replace("DIR", str(root)))  # fmt: skip
    if any((root / f"{s}.txt").is_file() for s in SPLITS):
        return _from_lists(root, classes)
    assigned = seeded_split(sorted(classes), fractions, seed)
    rule = seeded_rule(len(classes), fractions, seed)
    return Layout("class folders", rule, {s: {c: classes[c] for c in assigned[s]} for s in SPLITS})


def images_in(folder: Path) -> list[Path]:
    """The image files under ``folder`` (subfolders too), sorted, hidden ones left out."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
    )


def class_folders(folder: Path) -> dict[str, list[Path]]:
    """Every visible subfolder of ``folder`` that holds image files, by name."""
    found = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = images_in(sub)
        if files:
            found[sub.name] = files
    return found


def _from_split_folders(root: Path) -> Layout:
    files = {s: class_folders(root / s) for s in SPLITS}
    in_two(files, lambda c, a, b: f"{root}/{a}/{c} and {root}/{b}/{c}")
    return Layout("split folders", "the folders train/, val/ and test/", files)


def in_two(files: Mapping[str, Mapping[str, object]], where) -> None:
    """The same class in two splits would test on classes the model trained on: the first
    such class named with where it is, then every other one with its two splits."""
    both = [(c, a, b) for i, a in enumerate(SPLITS) for b in SPLITS[i + 1 :]
            for c in files[a] if c in files[b]]  # fmt: skip
    if both:
        name, a, b = both[0]
        others = [f"{c} ({x}, {y})" for c, x, y in both[1:]]
        raise MamlrunError(
            f"class {name} is in the {a} and the {b} split ({where(name, a, b)}"
            f"{f'; also {named(others)}' if others else ''}): a class belongs to one split; "
            "rename or remove one of them"
        )


def _from_lists(root: Path, classes: Mapping[str, list[Path]]) -> Layout:
    lists: dict[str, list[str]] = {}
    for s in SPLITS:
        path = root / f"{s}.txt"
        if not path.is_file():
            there = ", ".join(f"{t}.txt" for t in SPLITS if (root / f"{t}.txt").is_file())
            raise MamlrunError(
                f"{root} has {there} but no {s}.txt: write one class name a line for every "
                "split, or remove the lists to have the classes split by dataset.split_fractions"
            )
        lists[s] = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            name = line.strip()
            if not name:
                continue
            if name not in classes:
                raise MamlrunError(
                    f"{path}, line {number}: class {name} is not a folder of images in {root}; "
                    "fix the name or add the folder"
                )
            lists[s].append(name)
    in_two({s: dict.fromkeys(v) for s, v in lists.items()}, lambda c, a, b: f"{a}.txt, {b}.txt")
    listed = {c for v in lists.values() for c in v}
    if left := sorted(set(classes) - listed):
        log.warning("%d class folders are in no list and left out: %s", len(left), named(left))
    rule = "the class lists train.txt, val.txt and test.txt"
    return Layout("class folders", rule, {s: {c: classes[c] for c in lists[s]} for s in SPLITS})


def seeded_split(
    classes: Sequence[str], fractions: Sequence[float], seed: int
) -> dict[str, list[str]]:
    """The classes (in the given order) shuffled with ``seed`` and cut by ``fractions``, each
    split's count rounded and the test split taking the rest; each split's classes sorted."""
    order = torch.randperm(len(classes), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [classes[i] for i in order]
    train = round(fractions[0] * len(classes))
    val = min(round(fractions[1] * len(classes)), len(classes) - train)
    parts = (shuffled[:train], shuffled[train : train + val], shuffled[train + val :])
    return {s: sorted(p) for s, p in zip(SPLITS, parts, strict=True)}


def seeded_rule(count: int, fractions: Sequence[float], seed: int) -> str:
    shares = "/".join(f"{100 * f:g}" for f in fractions)
    return f"seeded, {shares}% of the {count} classes (dataset.split_fractions, split_seed={seed})"


def _from_csv(root: Path, path: Path, fractions: Sequence[float], seed: int) -> Layout:
    if not path.is_file():
        raise MamlrunError(
            f"dataset.csv: {path} does not exist; name a CSV of filename,label[,split]"
        )
    rows = _csv_rows(path)
    if not rows:
        raise MamlrunError(f"{path} has no rows; write one filename,label[,split] row per image")
    by_split: dict[str, dict[str, list[Path]]] = {s: {} for s in SPLITS}
    by_class: dict[str, list[Path]] = {}
    for number, (filename, label, split) in rows:
        file = root / filename
        if not file.is_file():
            raise MamlrunError(
                f"{path}, line {number}: {filename} is not a file in {root}; fix the row or add "
                "the file (filenames are relative to dataset.root)"
            )
        by_class.setdefault(label, []).append(file)
        if split is not None:
            by_split[split].setdefault(label, []).append(file)
    if rows[0][1][2] is None:
        assigned = seeded_split(sorted(by_class), fractions, seed)
        files = {s: {c: by_class[c] for c in assigned[s]} for s in SPLITS}
        return Layout("csv", seeded_rule(len(by_class), fractions, seed), files)
    in_two(by_split, lambda c, a, b: f"rows of {path.name}")
    return Layout("csv", f"the split column of {path.name}", by_split)


def _csv_rows(path: Path) -> list[tuple[int, tuple[str, str, str | None]]]:
    """``(line, (filename, label, split or None))`` of every row; the header, if any, skipped.
    Every row has two columns or every row three."""
    with open(path, newline="") as f:
        rows = [(n, [c.strip() for c in r]) for n, r in enumerate(csv_module.reader(f), 1) if r]
    if rows and rows[0][1][0].lower() in ("filename", "file", "path", "image"):
        rows = rows[1:]
    width = len(rows[0][1]) if rows else 2
    out = []
    for number, cells in rows:
        if len(cells) != width or width not in (2, 3):
            raise MamlrunError(
                f"{path}, line {number}: {len(cells)} columns, expected filename,label or "
                f"filename,label,split in every row"
            )
        split = cells[2] if width == 3 else None
        if split is not None and split not in SPLITS:
            raise MamlrunError(
                f"{path}, line {number}: split {split!r} is not one of {', '.join(SPLITS)}"
            )
        out.append((number, (cells[0], cells[1], split)))
    return out

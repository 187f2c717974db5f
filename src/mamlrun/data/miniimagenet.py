"""miniImageNet (Vinyals et al. 2016) with the split of Ravi & Larochelle (2017): 64 training,
16 validation and 20 test classes of 600 images each, 84×84 RGB, as in the MAML paper.

There is no stable official download, so mamlrun reads the two layouts users hold, from
``<root>/miniimagenet/`` (``dataset.root``, else ``$MAMLRUN_DATA``, else ``~/.cache/mamlrun``):

* **pickles** (Ren et al. 2018, as learn2learn and others fetch them):
  ``mini-imagenet-cache-{train,val,test}.pkl`` (``...-validation.pkl`` also accepted), each a
  dict with ``image_data`` (uint8 N×84×84×3) and ``class_dict`` (class → indices). They are
  already 84×84 and are read with an unpickler that only builds numpy arrays (a pickle can run
  any code it names, and these files come from file-sharing links).
* **the Ravi layout**: ``images/*.jpg`` and ``train.csv``, ``val.csv``, ``test.csv``
  (``filename,label``). The images are resized to 84×84 with Lanczos (Pillow), as the MAML
  code's preprocessing script did.

Either layout is written once into ``cache_84.u8`` beside the files (or, where that folder is
read-only, ``~/.cache/mamlrun/miniimagenet/cache_84-<hash of the folder>.u8``), with the
training split's channel statistics in its header; later runs memory-map it, so a run holds in
memory only the images it samples, not the 1.27 GB of the three splits (unpickling them every
run held 2.44 GB at its peak). The build holds one split at a time. The cache's key is the
size and mtime of the pickles (or of the CSVs and every listed image) and the class lists:
replacing or touching a file rebuilds it.

Either way the classes found must be exactly the split's published ones (``SPLIT_CLASSES``),
which makes a wrong or mixed-up copy an error instead of a silently different benchmark. Class
``i`` of a split is ``SPLIT_CLASSES[split][i]`` in both layouts, and its images keep the
published order, so the two layouts give the same tasks for the same seed.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from mamlrun.data.decode import one_line, resize_files
from mamlrun.data.download import resolve_root
from mamlrun.data.pickles import read_pickle
from mamlrun.data.sources import Delivery, ImageData, Reading, cached_images, image_tasks
from mamlrun.data.sources import check_classes as check_class_set
from mamlrun.data.tasks import SPLITS
from mamlrun.data.u8cache import (
    fingerprint,
)
from mamlrun.errors import MamlrunError

IMAGE_SIZE = 84

#: The Ravi & Larochelle (2017) split, class ids (ImageNet wnids) sorted within each split.
#: Source: the CSVs that define it, twitter-research/meta-learning-lstm,
#: data/miniImagenet/{train,val,test}.csv (column ``label``); cross-checked against copies in
#: several public repositories, one of which asserts it against the pickles' ``class_dict``.
SPLIT_CLASSES: dict[str, tuple[str, ...]] = {
    "train": (
        "n01532829", "n01558993", "n01704323", "n01749939", "n01770081",
        "n01843383", "n01910747", "n02074367", "n02089867", "n02091831",
        "n02101006", "n02105505", "n02108089", "n02108551", "n02108915",
        "n02111277", "n02113712", "n02120079", "n02165456", "n02457408",
        "n02606052", "n02687172", "n02747177", "n02795169", "n02823428",
        "n02966193", "n03017168", "n03047690", "n03062245", "n03207743",
        "n03220513", "n03337140", "n03347037", "n03400231", "n03476684",
        "n03527444", "n03676483", "n03838899", "n03854065", "n03888605",
        "n03908618", "n03924679", "n03998194", "n04067472", "n04243546",
        "n04251144", "n04258138", "n04275548", "n04296562", "n04389033",
        "n04435653", "n04443257", "n04509417", "n04515003", "n04596742",
        "n04604644", "n04612504", "n06794110", "n07584110", "n07697537",
        "n07747607", "n09246464", "n13054560", "n13133613",
    ),
    "val": (
        "n01855672", "n02091244", "n02114548", "n02138441", "n02174001",
        "n02950826", "n02971356", "n02981792", "n03075370", "n03417042",
        "n03535780", "n03584254", "n03770439", "n03773504", "n03980874",
        "n09256479",
    ),
    "test": (
        "n01930112", "n01981276", "n02099601", "n02110063", "n02110341",
        "n02116738", "n02129165", "n02219486", "n02443484", "n02871525",
        "n03127925", "n03146219", "n03272010", "n03544143", "n03775546",
        "n04146614", "n04149813", "n04418357", "n04522168", "n07613480",
    ),
}  # fmt: skip

PICKLES = {
    "train": ("mini-imagenet-cache-train.pkl",),
    "val": ("mini-imagenet-cache-val.pkl", "mini-imagenet-cache-validation.pkl"),
    "test": ("mini-imagenet-cache-test.pkl",),
}
CSVS = {split: f"{split}.csv" for split in SPLITS}
IMAGES = "images"
LAYOUTS = (
    "either the pickles mini-imagenet-cache-{train,val,test}.pkl (Ren et al.; learn2learn) or "
    "images/*.jpg with train.csv, val.csv and test.csv (Ravi & Larochelle)"
)

CACHE = f"cache_{IMAGE_SIZE}.u8"
_CACHE_FORMAT = 2  # 1: the Ravi layout alone, in a torch.save file (cache_84.pt)
_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)
#: Ravi-layout images decoded per batch: a multiple of ``ChannelMoments``' chunk, so that the
#: statistics are summed in the same chunks as ``channel_stats`` of the whole split.
_RESIZE_BATCH = 4096


def load_miniimagenet(
    root: str | os.PathLike[str] | None = None,
    split_classes: Mapping[str, Sequence[str]] | None = None,
) -> ImageData:
    """Find the layout in ``<root>/miniimagenet/`` (pickles win when both are there: they need
    no decoding) and map its cache, writing it first where the files changed. ``split_classes``
    defaults to ``SPLIT_CLASSES``; tests pass small lists so their fixtures stay small."""
    directory = resolve_root(root) / "miniimagenet"
    expected = {s: tuple((split_classes or SPLIT_CLASSES)[s]) for s in SPLITS}
    pickles = {s: _first_existing(directory, PICKLES[s]) for s in SPLITS}
    found = {s: p for s, p in pickles.items() if p is not None}
    if len(found) == len(SPLITS):
        return cached_images(_load_pickles(found, expected))
    csvs = [directory / CSVS[s] for s in SPLITS]
    if all(p.is_file() for p in csvs) and (directory / IMAGES).is_dir():
        return cached_images(_load_ravi(directory, expected))
    if found:
        missing = next(s for s in SPLITS if s not in found)
        raise MamlrunError(
            f"{directory}: {PICKLES[missing][0]} is missing (the other pickles are there); "
            f"put it beside them"
        )
    needed = [IMAGES, *CSVS.values()]
    absent = [name for name in needed if not (directory / name).exists()]
    if len(absent) < len(needed):
        raise MamlrunError(
            f"{directory}: the Ravi layout needs images/, train.csv, val.csv and test.csv; "
            f"missing: {', '.join(absent) or 'images/ as a folder'}"
        )
    raise MamlrunError(
        f"miniImageNet is not in {directory}: put {LAYOUTS} there, or point dataset.root "
        "(or $MAMLRUN_DATA) at the folder that holds miniimagenet/ (there is no official "
        "download to fetch it from)"
    )


#: The ``_target_`` of ``conf/dataset/miniimagenet.yaml``.
miniimagenet_tasks = image_tasks("miniimagenet", load_miniimagenet, "ravi_larochelle")


def _first_existing(directory: Path, names: Sequence[str]) -> Path | None:
    return next((directory / n for n in names if (directory / n).is_file()), None)


def check_classes(where: str, split: str, found: Sequence[str], expected: Sequence[str]) -> None:
    """The classes found must be the split's published ones (see ``images.check_classes``)."""
    check_class_set(where, split, found, expected, "Ravi & Larochelle")


# ---------------------------------------------------------------------------------------------
# Pickles (Ren et al.), read by data/pickles.py: arrays only


def _load_pickles(paths: dict[str, Path], expected: dict[str, tuple[str, ...]]) -> Reading:
    key = _key("pickle", expected, [paths[s] for s in SPLITS])
    files = [paths[s].name for s in SPLITS]

    def deliver(into: Delivery) -> None:
        build_from_pickles(into, paths, expected)

    return _reading(paths["train"].parent, key, "pickle", files, deliver)


def build_from_pickles(
    into: Delivery, paths: Mapping[str, Path], expected: Mapping[str, tuple[str, ...]]
) -> None:
    """The pickles' images, split after split: each pickle is read, checked, delivered class
    by class and dropped before the next is read (its locals die with ``_append_pickle``), so
    the build holds one split at most, the training split's 813 MB (a protocol-2 pickle
    briefly two or three copies of it, which unpickling makes)."""
    for s in SPLITS:
        into.classes(s, *_append_pickle(into, paths[s], s, expected[s]))


def _append_pickle(
    into: Delivery, path: Path, split: str, expected: tuple[str, ...]
) -> tuple[list[str], list[int]]:
    """One pickle's images delivered class by class in the published class order; returns
    the classes and their counts."""
    images, members = read_pickle_split(path, split, expected)
    for indices in members:
        into.append(split, _class_images(images, indices))
    return list(expected), [len(m) for m in members]


def _class_images(images: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """One class's images: a view where its indices run consecutively, as they do in the
    published files; otherwise gathered, which copies this class alone."""
    first = indices[0]
    if indices == list(range(first, first + len(indices))):
        return images[first : first + len(indices)]
    return images[torch.tensor(indices, dtype=torch.long)]


def read_pickle_split(
    path: Path, split: str, expected: tuple[str, ...]
) -> tuple[torch.Tensor, list[list[int]]]:
    """One pickle, checked: its images as they are stored (the array itself, not a copy) and
    the indices of each of ``expected``'s classes, in the published class order."""
    import numpy as np  # only this layout needs numpy (a dependency of tensorboard)

    blob = read_pickle(path)
    shape = f"uint8 N×{IMAGE_SIZE}×{IMAGE_SIZE}×3"
    if not isinstance(blob, dict) or not {"image_data", "class_dict"} <= blob.keys():
        raise MamlrunError(
            f"{path} is not a miniImageNet pickle: expected a dict with image_data ({shape}) "
            "and class_dict (class → indices)"
        )
    data, class_dict = blob["image_data"], blob["class_dict"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 4:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise MamlrunError(f"{path}: image_data is {got}, expected {shape}")
    if data.shape[1:] != _SHAPE:
        raise MamlrunError(f"{path}: image_data is {data.shape}, expected {shape}")
    if not isinstance(class_dict, dict):
        raise MamlrunError(f"{path}: class_dict is a {type(class_dict).__name__}, not a dict")
    check_classes(str(path), split, list(class_dict), expected)
    try:
        members = [[int(i) for i in class_dict[c]] for c in expected]
    except (TypeError, ValueError) as e:
        raise MamlrunError(f"{path}: class_dict holds something other than indices") from e
    if empty := next((c for c, m in zip(expected, members, strict=True) if not m), None):
        raise MamlrunError(f"{path}: class_dict lists no images for {empty}")
    if min(min(m) for m in members) < 0 or max(max(m) for m in members) >= len(data):
        raise MamlrunError(f"{path}: class_dict indexes beyond the {len(data)} images")
    with warnings.catch_warnings():  # read-only arrays (protocol 5) are fine: never written
        warnings.filterwarnings("ignore", ".*not writable.*", UserWarning)
        return torch.from_numpy(data), members


# ---------------------------------------------------------------------------------------------
# The Ravi layout: images/ and three CSVs, resized once into a cache


def read_csv(path: Path) -> list[tuple[str, str]]:
    """``(filename, label)`` rows of one split's CSV, header checked."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise MamlrunError(f"{path}: cannot read it as CSV ({one_line(e)})") from e
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        header = ",".join(rows[0]) if rows else "nothing"
        raise MamlrunError(f"{path}: starts with {header!r}, expected the header filename,label")
    pairs = []
    for number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2:
            raise MamlrunError(f"{path}: line {number} has {len(row)} fields, expected 2")
        pairs.append((row[0].strip(), row[1].strip()))
    return pairs


def _ravi_files(
    directory: Path, expected: dict[str, tuple[str, ...]]
) -> tuple[dict[str, list[Path]], dict[str, list[int]]]:
    """Every split's image paths in class order (published order within a class)."""
    files, counts = {}, {}
    for split in SPLITS:
        by_class: dict[str, list[Path]] = {}
        for name, label in read_csv(directory / CSVS[split]):
            by_class.setdefault(label, []).append(directory / IMAGES / name)
        check_classes(str(directory / CSVS[split]), split, list(by_class), expected[split])
        files[split] = [p for c in expected[split] for p in by_class[c]]
        counts[split] = [len(by_class[c]) for c in expected[split]]
    return files, counts


def _load_ravi(directory: Path, expected: dict[str, tuple[str, ...]]) -> Reading:
    files, counts = _ravi_files(directory, expected)
    listed = [directory / CSVS[s] for s in SPLITS] + [p for s in SPLITS for p in files[s]]
    try:
        key = _key("ravi", expected, listed)
    except FileNotFoundError as e:
        raise MamlrunError(
            f"{e.filename} is listed in a CSV but missing; the Ravi layout needs every image "
            f"of train.csv, val.csv and test.csv in {directory / IMAGES}"
        ) from e

    def deliver(into: Delivery) -> None:
        build_ravi(into, files, counts, expected)

    named = [CSVS[s] for s in SPLITS] + [IMAGES]
    return _reading(directory, key, "ravi", named, deliver)


def build_ravi(
    into: Delivery,
    files: Mapping[str, list[Path]],
    counts: Mapping[str, list[int]],
    expected: Mapping[str, tuple[str, ...]],
) -> None:
    """Decode and resize every listed image (the slow path the cache avoids), a batch of
    images at a time."""
    for s in SPLITS:
        for start in range(0, len(files[s]), _RESIZE_BATCH):
            into.append(s, resize_files(files[s][start : start + _RESIZE_BATCH], IMAGE_SIZE))
        into.classes(s, expected[s], counts[s])


# ---------------------------------------------------------------------------------------------
# The cache both layouts are written into


def _key(layout: str, expected: Mapping[str, tuple[str, ...]], files: list[Path]) -> dict:
    """What a cache was built from: the layout, the class lists and every raw file's name,
    size and mtime (``FileNotFoundError`` where one is missing)."""
    return {
        "format": _CACHE_FORMAT,
        "layout": layout,
        "image_size": IMAGE_SIZE,
        "classes": {s: list(expected[s]) for s in SPLITS},
        "files": fingerprint(files),
    }


def _reading(directory: Path, key: dict, layout: str, files: list[str], deliver) -> Reading:
    return Reading("miniimagenet", directory, CACHE, key, _SHAPE, layout, files, deliver)

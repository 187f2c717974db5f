"""miniImageNet (Vinyals et al. 2016) with the split of Ravi & Larochelle (2017): 64 training,
16 validation and 20 test classes of 600 images each, 84×84 RGB, as in the MAML paper.

There is no stable official download, so mamlrun reads the two layouts users hold, from
``<root>/miniimagenet/`` (``dataset.root``, else ``$MAMLRUN_DATA``, else ``~/.cache/mamlrun``):

* **pickles** (Ren et al. 2018, as learn2learn and others fetch them):
  ``mini-imagenet-cache-{train,val,test}.pkl`` (``...-validation.pkl`` also accepted), each a
  dict with ``image_data`` (uint8 N×84×84×3) and ``class_dict`` (class → indices). They are
  already 84×84 and are read as they are, with an unpickler that only builds numpy arrays (a
  pickle can run any code it names, and these files come from file-sharing links).
* **the Ravi layout**: ``images/*.jpg`` and ``train.csv``, ``val.csv``, ``test.csv``
  (``filename,label``). The images are resized once to 84×84 with Lanczos (Pillow), as the MAML
  code's preprocessing script did, into ``cache_84.pt`` beside them (or, where that folder is
  read-only, ``~/.cache/mamlrun/miniimagenet/cache_84-<hash of the folder>.pt``), which later
  runs memory-map. Its key is the size and mtime of every listed file and of the CSVs, so
  replacing or touching one rebuilds it.

Either way the classes found must be exactly the split's published ones (``SPLIT_CLASSES``),
which makes a wrong or mixed-up copy an error instead of a silently different benchmark. Class
``i`` of a split is ``SPLIT_CLASSES[split][i]`` in both layouts, and its images keep the
published order, so the two layouts give the same tasks for the same seed.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mamlrun.data.download import is_writable_dir, resolve_root, user_cache_dir
from mamlrun.data.images import (
    EpisodicImages,
    ImageSplit,
    channel_stats,
    fingerprint,
    load_mapped,
    one_line,
    resize_files,
    save_atomic,
)
from mamlrun.data.images import check_classes as check_class_set
from mamlrun.data.pickles import read_pickle
from mamlrun.data.tasks import SPLITS
from mamlrun.errors import MamlrunError

log = logging.getLogger(__name__)

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

_CACHE_FORMAT = 1


@dataclass(frozen=True)
class MiniImageNetData:
    """The three splits as loaded, the layout they came from, and (Ravi layout) the training
    split's channel statistics, cached with the images so they are computed once."""

    splits: dict[str, ImageSplit]
    layout: str  # "pickle" | "ravi"
    files: list[str]
    stats: tuple[list[float], list[float]] | None = field(default=None)


def miniimagenet_tasks(
    root: str | None = None,
    ways: int = 5,
    shots: int = 1,
    query: int = 15,
    storage: str = "device",
    mean: list[float] | None = None,
    std: list[float] | None = None,
    device: str | torch.device = "cpu",
) -> EpisodicImages:
    """The task source ``conf/dataset/miniimagenet.yaml`` builds: the data as loaded, served
    by the dataset-independent episodic sampler."""
    data = load_miniimagenet(root)
    if data.stats is not None:
        mean = data.stats[0] if mean is None else mean
        std = data.stats[1] if std is None else std
    info = {"layout": data.layout, "files": data.files, "split": "ravi_larochelle"}
    return EpisodicImages(
        "miniimagenet", data.splits, ways, shots, query, storage, mean, std, device, info
    )


def load_miniimagenet(
    root: str | os.PathLike[str] | None = None,
    split_classes: Mapping[str, Sequence[str]] | None = None,
) -> MiniImageNetData:
    """Find the layout in ``<root>/miniimagenet/`` and load it (pickles win when both are there:
    they need no decoding). ``split_classes`` defaults to ``SPLIT_CLASSES``; tests pass small
    lists so their fixtures stay small."""
    directory = resolve_root(root) / "miniimagenet"
    expected = {s: tuple((split_classes or SPLIT_CLASSES)[s]) for s in SPLITS}
    pickles = {s: _first_existing(directory, PICKLES[s]) for s in SPLITS}
    found = {s: p for s, p in pickles.items() if p is not None}
    if len(found) == len(SPLITS):
        return _load_pickles(found, expected)
    csvs = [directory / CSVS[s] for s in SPLITS]
    if all(p.is_file() for p in csvs) and (directory / IMAGES).is_dir():
        return _load_ravi(directory, expected)
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


def _first_existing(directory: Path, names: Sequence[str]) -> Path | None:
    return next((directory / n for n in names if (directory / n).is_file()), None)


def check_classes(where: str, split: str, found: Sequence[str], expected: Sequence[str]) -> None:
    """The classes found must be the split's published ones (see ``images.check_classes``)."""
    check_class_set(where, split, found, expected, "Ravi & Larochelle")


# ---------------------------------------------------------------------------------------------
# Pickles (Ren et al.), read by data/pickles.py: arrays only


def _load_pickles(paths: dict[str, Path], expected: dict[str, tuple[str, ...]]) -> MiniImageNetData:
    start = time.perf_counter()
    splits = {s: _split_from_pickle(paths[s], s, expected[s]) for s in SPLITS}
    log.info("read the miniImageNet pickles in %.1f s", time.perf_counter() - start)
    return MiniImageNetData(splits, "pickle", [paths[s].name for s in SPLITS])


def _split_from_pickle(path: Path, split: str, expected: tuple[str, ...]) -> ImageSplit:
    """One pickle as an ``ImageSplit`` in the published class order; the array is used in place
    (no copy) when the classes' indices already run in that order, as they do in the
    published files."""
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
    if data.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise MamlrunError(f"{path}: image_data is {data.shape}, expected {shape}")
    if not isinstance(class_dict, dict):
        raise MamlrunError(f"{path}: class_dict is a {type(class_dict).__name__}, not a dict")
    check_classes(str(path), split, list(class_dict), expected)
    try:
        members = [[int(i) for i in class_dict[c]] for c in expected]
    except (TypeError, ValueError) as e:
        raise MamlrunError(f"{path}: class_dict holds something other than indices") from e
    order = torch.tensor([i for indices in members for i in indices], dtype=torch.long)
    if len(order) and (order.min() < 0 or order.max() >= len(data)):
        raise MamlrunError(f"{path}: class_dict indexes beyond the {len(data)} images")
    with warnings.catch_warnings():  # read-only arrays (protocol 5) are fine: never written
        warnings.filterwarnings("ignore", ".*not writable.*", UserWarning)
        images = torch.from_numpy(data)
    if not torch.equal(order, torch.arange(len(data))):
        images = images[order]
    return ImageSplit(images, [len(m) for m in members], list(expected))


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


def cache_paths(directory: Path) -> tuple[Path, Path]:
    """Beside the raw files, or in the user cache (tagged by folder) if that is read-only."""
    name = f"cache_{IMAGE_SIZE}"
    tag = hashlib.sha1(str(directory.resolve()).encode()).hexdigest()[:10]
    return directory / f"{name}.pt", user_cache_dir() / "miniimagenet" / f"{name}-{tag}.pt"


def _load_ravi(directory: Path, expected: dict[str, tuple[str, ...]]) -> MiniImageNetData:
    files, counts = _ravi_files(directory, expected)
    listed = [directory / CSVS[s] for s in SPLITS] + [p for s in SPLITS for p in files[s]]
    try:
        key = {
            "format": _CACHE_FORMAT,
            "image_size": IMAGE_SIZE,
            "classes": {s: list(expected[s]) for s in SPLITS},
            "files": fingerprint(listed),
        }
    except FileNotFoundError as e:
        raise MamlrunError(
            f"{e.filename} is listed in a CSV but missing; the Ravi layout needs every image "
            f"of train.csv, val.csv and test.csv in {directory / IMAGES}"
        ) from e
    primary, fallback = cache_paths(directory)
    for candidate in (primary, fallback):
        data = _from_cache(load_mapped(candidate), key, counts)
        if data is not None:
            return data
    log.info("building the miniImageNet cache from %s (once; takes minutes)", directory)
    start = time.perf_counter()
    data = build_ravi(files, counts, expected)
    log.info("built in %.1f s", time.perf_counter() - start)
    blob = {"key": key, "stats": list(data.stats), **_blob(data)}
    targets = (primary, fallback) if is_writable_dir(directory) else (fallback,)
    if not any(save_atomic(target, blob) for target in targets):
        log.warning("no cache written; the next run will resize the images again")
    return data


def build_ravi(
    files: dict[str, list[Path]], counts: dict[str, list[int]], expected: dict[str, tuple]
) -> MiniImageNetData:
    """Decode and resize every listed image (the slow path the cache avoids)."""
    splits = {
        s: ImageSplit(resize_files(files[s], IMAGE_SIZE), counts[s], list(expected[s]))
        for s in SPLITS
    }
    stats = channel_stats(splits["train"].images)
    return MiniImageNetData(splits, "ravi", [CSVS[s] for s in SPLITS] + [IMAGES], stats)


def _blob(data: MiniImageNetData) -> dict:
    return {
        "splits": {
            s: {"images": d.images, "counts": d.counts, "classes": d.classes}
            for s, d in data.splits.items()
        },
        "layout": data.layout,
        "files": data.files,
    }


def _from_cache(
    blob: dict | None, key: dict, counts: dict[str, list[int]]
) -> MiniImageNetData | None:
    """The cached data if its key matches and its content has the expected shapes."""
    if blob is None or blob.get("key") != key:
        return None
    try:
        splits = {s: ImageSplit(**blob["splits"][s]) for s in SPLITS}
        for s in SPLITS:
            splits[s].check(f"cache {s}")
            if splits[s].counts != counts[s]:
                raise MamlrunError("counts differ from the CSVs")
        mean, std = blob["stats"]
        return MiniImageNetData(splits, blob["layout"], list(blob["files"]), (mean, std))
    except (KeyError, TypeError, ValueError, MamlrunError) as e:
        log.warning("ignoring a malformed miniImageNet cache (%s)", one_line(e))
        return None

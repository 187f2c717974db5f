"""tieredImageNet (Ren et al. 2018): 608 ImageNet classes grouped into 34 categories, split by
category so that test classes are far from training ones: 351 training classes from 20
categories, 97 validation classes from 6, 160 test classes from 8; 84×84 RGB, 779,165 images.

There is no stable official download (the authors' Google Drive archive ``tiered-imagenet.tar``
is what everyone copies), so mamlrun reads its files from ``<root>/tieredimagenet/`` (or the
``tiered-imagenet/`` folder the archive extracts to, inside it):

* ``{train,val,test}_images_png.pkl``: a pickled list of PNG images, one per image (bytes,
  or the uint8 arrays ``cv2.imencode`` returns, as in the published Python 2 files);
* ``{train,val,test}_labels.pkl``: a Python 2 pickle, a dict with ``label_specific`` (class
  index per image), ``label_general`` (category index per image) and usually
  ``label_specific_str`` / ``label_general_str`` (their names).

The PNGs are decoded once into ``cache_84.u8`` beside them (or, where that folder is read-only,
``~/.cache/mamlrun/tieredimagenet/cache_84-<hash of the folder>.u8``), which later runs
memory-map. The training split alone is 448,695 images, 9.5 GB as uint8: the cache is written
image batch by image batch as the pickle is read (``pickles.stream_list``), the images never
held in memory at once, and read back memory-mapped, so only what is sampled is paged in.
``storage: cpu`` (the default here) keeps it that way during training. The cache's key is the
size and mtime of the six files: replacing or touching one rebuilds it.

Checks: each split has its published number of classes and categories (351/97/160 from
20/6/8), every class has images, and no class or category name appears in two splits. The
published class lists name ImageNet synsets (renmengye/few-shot-ssl-public,
``fewshot/data/tiered_imagenet_split/{train,val,test}.csv``), while the pickles carry the
human-readable names the authors' ``class_names.txt`` gave them, which is not published: the
names themselves cannot be checked against a list, only their number and disjointness.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mamlrun.data.decode import DecodePool
from mamlrun.data.download import resolve_root
from mamlrun.data.pickles import read_pickle, stream_list
from mamlrun.data.sources import Delivery, ImageData, Reading, cached_images, image_tasks
from mamlrun.data.tasks import SPLITS
from mamlrun.data.u8cache import (
    fingerprint,
)
from mamlrun.errors import MamlrunError

log = logging.getLogger(__name__)

IMAGE_SIZE = 84
FOLDER = "tieredimagenet"
NESTED = "tiered-imagenet"  # what the authors' tiered-imagenet.tar extracts to

#: (classes, categories) per split, Ren et al. (2018), section 5 and Table 7.
SPLIT_SIZES: dict[str, tuple[int, int]] = {"train": (351, 20), "val": (97, 6), "test": (160, 8)}

LAYOUT = (
    "{train,val,test}_images_png.pkl and {train,val,test}_labels.pkl (Ren et al.'s "
    "tiered-imagenet.tar, extracted)"
)
_CACHE_FORMAT = 1
CACHE = f"cache_{IMAGE_SIZE}.u8"
LAYOUT_NAME = "png_pickles"  # Ren et al.'s pickles are the one layout read


@dataclass(frozen=True)
class Labels:
    """One split's labels file, checked: class names, and where each image goes in the cache
    (class after class, each class's images in file order)."""

    path: Path
    classes: list[str]
    categories: list[str]
    counts: list[int]
    position: np.ndarray  # image i of the file → its index in the split's cache segment


def find_files(root: str | os.PathLike[str] | None) -> dict[str, tuple[Path, Path]]:
    """Each split's (images, labels) pickles, or one line naming what is missing and where."""
    base = resolve_root(root) / FOLDER
    names = {s: (f"{s}_images_png.pkl", f"{s}_labels.pkl") for s in SPLITS}
    for directory in (base, base / NESTED):
        files = {s: (directory / a, directory / b) for s, (a, b) in names.items()}
        present = [p for pair in files.values() for p in pair if p.is_file()]
        if len(present) == 2 * len(SPLITS):
            return files
        if present:
            missing = next(p for pair in files.values() for p in pair if not p.is_file())
            raise MamlrunError(f"{missing} is missing (other tieredImageNet files are there)")
    raise MamlrunError(
        f"tieredImageNet is not in {base}: put {LAYOUT} there, or point dataset.root (or "
        f"$MAMLRUN_DATA) at the folder that holds {FOLDER}/ (there is no official download)"
    )


def load_tieredimagenet(
    root: str | os.PathLike[str] | None = None,
    split_sizes: Mapping[str, tuple[int, int]] | None = None,
) -> ImageData:
    """The three splits from the cache, building it from the pickles when they changed.
    ``split_sizes`` ((classes, categories) per split) defaults to the published ones; tests
    pass small ones so their fixtures stay small."""
    files = find_files(root)
    sizes = {s: tuple((split_sizes or SPLIT_SIZES)[s]) for s in SPLITS}
    directory = files["train"][0].parent
    listed = [p for s in SPLITS for p in files[s]]
    key = {"format": _CACHE_FORMAT, "sizes": sizes, "files": fingerprint(listed)}

    def deliver(into: Delivery) -> None:
        build_cache(into, files, sizes)

    names = [p.name for p in listed]
    shape = (IMAGE_SIZE, IMAGE_SIZE, 3)
    reading = Reading(FOLDER, directory, CACHE, key, shape, LAYOUT_NAME, names, deliver)
    return cached_images(reading)


#: The ``_target_`` of ``conf/dataset/tieredimagenet.yaml``.
tieredimagenet_tasks = image_tasks("tieredimagenet", load_tieredimagenet, "ren2018")


def build_cache(
    into: Delivery, files: Mapping[str, tuple[Path, Path]], sizes: Mapping[str, tuple[int, int]]
) -> None:
    """Decode every PNG into the cache, split after split, streaming: the slow path (minutes
    for the full dataset) that the cache exists to avoid."""
    labels = {s: read_labels(files[s][1], s, sizes[s]) for s in SPLITS}
    check_disjoint(labels)
    into.reserve(sum(len(labels[s].position) for s in SPLITS))
    base = 0
    for s in SPLITS:
        stream_images(files[s][0], labels[s], into, s, base)
        into.classes(s, labels[s].classes, labels[s].counts)
        base += len(labels[s].position)


def stream_images(path: Path, labels: Labels, into: Delivery, split: str, base: int) -> None:
    """The PNGs of one split, decoded in parallel and written to their class-ordered places."""
    total = len(labels.position)

    def deliver(start: int, pixels: torch.Tensor) -> None:
        places = labels.position[start : start + len(pixels)]
        if len(places) and places[-1] - places[0] == len(places) - 1 and _rising(places):
            into.write(split, base + int(places[0]), pixels)  # the usual case: in order
        else:
            for place, image in zip(places, pixels, strict=True):
                into.write(split, base + int(place), image[None])

    with DecodePool(IMAGE_SIZE, deliver, str(path), expected=total) as pool:

        def receive(start: int, items: list) -> None:
            if start + len(items) > total:
                raise MamlrunError(
                    f"{path} holds more than the {total} images {labels.path.name} labels"
                )
            pool.submit(start, [_png(item, path, start + i) for i, item in enumerate(items)])

        count = stream_list(path, receive)
    if count != total:
        raise MamlrunError(
            f"{path} holds {count} images but {labels.path.name} labels {total}; the two files "
            "must come from the same copy"
        )


def _rising(places: np.ndarray) -> bool:
    return bool(np.all(np.diff(places) == 1))


def _png(item: object, path: Path, index: int) -> bytes:
    """One list item as encoded bytes: Python 3 bytes, a Python 2 string (loaded as latin1
    text), or the uint8 array ``cv2.imencode`` returns (the published files)."""
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("latin1")
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        return item.tobytes()
    raise MamlrunError(f"{path}: item {index} is a {type(item).__name__}, not an encoded image")


# ---------------------------------------------------------------------------------------------
# Labels


def read_labels(path: Path, split: str, size: tuple[int, int]) -> Labels:
    """One ``{split}_labels.pkl``, checked against the split's published size."""
    blob = read_pickle(path)
    if isinstance(blob, dict):
        blob = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in blob.items()}
    if not isinstance(blob, dict) or "label_specific" not in blob:
        raise MamlrunError(
            f"{path} is not a tieredImageNet labels file: expected a dict with label_specific "
            "(class per image), label_general (category per image) and their names"
        )
    specific = _indices(blob["label_specific"], path, "label_specific")
    general = _indices(blob.get("label_general", []), path, "label_general")
    classes = _names(blob.get("label_specific_str"), specific, f"{split}_class")
    categories = _names(blob.get("label_general_str"), general, f"{split}_category")
    counts = np.bincount(specific, minlength=len(classes)) if len(specific) else np.zeros(0)
    expected_classes, expected_categories = size
    if len(classes) != expected_classes or len(counts) != expected_classes:
        raise MamlrunError(
            f"{path}: {max(len(classes), len(counts))} classes, but tieredImageNet's {split} "
            f"split has {expected_classes} (Ren et al. 2018: 351/97/160 classes from 20/6/8 "
            "categories); check that this is the right file"
        )
    if len(general) and len(set(general.tolist())) != expected_categories:
        raise MamlrunError(
            f"{path}: {len(set(general.tolist()))} categories, but tieredImageNet's {split} "
            f"split has {expected_categories} (20/6/8); check that this is the right file"
        )
    if counts.min(initial=1) < 1:
        raise MamlrunError(f"{path}: class {classes[int(np.argmin(counts))]} has no images")
    order = np.argsort(specific, kind="stable")
    position = np.empty(len(specific), dtype=np.int64)
    position[order] = np.arange(len(specific))
    return Labels(path, classes, categories, counts.tolist(), position)


def _indices(value: object, path: Path, name: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise MamlrunError(f"{path}: {name} is not a list of indices") from e
    if len(array) and array.min() < 0:
        raise MamlrunError(f"{path}: {name} holds negative indices")
    return array


def _names(value: object, indices: np.ndarray, fallback: str) -> list[str]:
    """The names of the indices' classes, or made-up ones where the file has none."""
    if value is not None:
        return [v.decode("latin1") if isinstance(v, bytes) else str(v) for v in value]
    count = int(indices.max()) + 1 if len(indices) else 0
    return [f"{fallback}_{i:03d}" for i in range(count)]


def check_disjoint(labels: Mapping[str, Labels]) -> None:
    """No class and no category in two splits: the point of tieredImageNet's split. (Names a
    file lacks are made up per split, so they never clash.)"""
    for field in ("classes", "categories"):
        seen: dict[str, str] = {}
        for split in SPLITS:
            for name in getattr(labels[split], field):
                other = seen.setdefault(name, split)
                if other != split:
                    raise MamlrunError(
                        f"{labels[split].path}: {name!r} is in the {other} and the {split} "
                        f"split; tieredImageNet's splits share no {field}"
                    )

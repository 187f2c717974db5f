"""CIFAR-FS (Bertinetto et al. 2019) and FC100 (Oreshkin et al. 2018): two few-shot splits of
CIFAR-100's 100 classes of 600 32×32 RGB images (the official training and test sets merged).

* **CIFAR-FS**: 64 / 16 / 20 classes drawn at random from the 100.
* **FC100**: split by superclass, 12 / 4 / 4 superclasses (60 / 20 / 20 classes), so that
  test classes share no superclass with training ones.

Two sources are read:

* **the official archive** ``<root>/cifar100/cifar-100-python.tar.gz`` (downloaded, md5
  checked, when it is missing and no pickles are there). Its ``meta`` names the classes, its
  ``train`` and ``test`` pickles hold the images (``data``: N×3072 uint8, channel-planes) and
  ``fine_labels``/``coarse_labels``. Each benchmark's classes are cut out of it once into a
  memory-mapped cache beside it (``cache_<name>_32.u8``), rebuilt when the archive changes.
* **the pickles of MetaOptNet** (which learn2learn downloads too):
  ``<root>/cifarfs/CIFAR_FS_{train,val,test}.pickle`` and
  ``<root>/fc100/FC100_{train,val,test}.pickle``, dicts with ``data`` (N×32×32×3 uint8) and
  ``labels`` (CIFAR-100 fine-label indices). Read as they are, arrays only.

Either way the classes found must be exactly the split's published ones (below). Class ``i``
of a split is ``SPLITS[split][i]`` (alphabetical), its images in file order (archive: the
official training images, then the test ones).
"""

from __future__ import annotations

import functools
import logging
import os
import tarfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mamlrun.data.download import (
    ensure_file,
    looks_like_html,
    md5sum,
    resolve_root,
    tar_gz_files,
)
from mamlrun.data.pickles import read_pickle, unpickle
from mamlrun.data.sources import (
    Delivery,
    ImageData,
    Reading,
    cached_images,
    check_classes,
    image_tasks,
)
from mamlrun.data.tasks import SPLITS
from mamlrun.data.u8cache import ImageSplit, fingerprint
from mamlrun.errors import MamlrunError

log = logging.getLogger(__name__)

IMAGE_SIZE = 32
ARCHIVE = "cifar-100-python.tar.gz"
URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
ARCHIVE_FOLDER = "cifar100"

#: CIFAR-100's fine labels in label-index order (its ``meta``: alphabetical), and its 20
#: superclasses with their five classes each (Krizhevsky 2009; the archive's ``meta`` and
#: ``coarse_labels``). Cross-checked against the archive on every build.
FINE_LABELS: tuple[str, ...] = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed",
    "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud",
    "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl",
    "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower",
    "leopard", "lion", "lizard", "lobster", "man", "maple_tree",
    "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange",
    "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit",
    "raccoon", "ray", "road", "rocket", "rose", "sea",
    "seal", "shark", "shrew", "skunk", "skyscraper", "snail",
    "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper",
    "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip
SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
SUPERCLASS_OF = {fine: coarse for coarse, fines in SUPERCLASSES.items() for fine in fines}

#: The CIFAR-FS split of Bertinetto et al. (2019), class names sorted within each split.
#: Source: the split files of bertinetto/r2d2 (data/cifar-fs-splits/{train,val,test}.txt) as
#: packaged by torchmeta, tristandeleu/pytorch-meta,
#: torchmeta/datasets/assets/cifar100/cifar-fs/{train,val,test}.json ([superclass, class]
#: pairs); learn2learn's CIFARFS copies the same r2d2 files ("splits/bertinetto").
CIFARFS_SPLITS: dict[str, tuple[str, ...]] = {
    "train": (
        "apple", "aquarium_fish", "bear", "bee", "bottle", "bowl",
        "boy", "bridge", "bus", "can", "castle", "caterpillar",
        "chair", "clock", "cloud", "cockroach", "couch", "cup",
        "dinosaur", "dolphin", "elephant", "forest", "girl", "hamster",
        "house", "kangaroo", "keyboard", "lawn_mower", "lion", "lizard",
        "lobster", "mountain", "mouse", "mushroom", "oak_tree", "orange",
        "orchid", "palm_tree", "pear", "pine_tree", "plate", "porcupine",
        "possum", "rabbit", "raccoon", "ray", "road", "seal",
        "shrew", "skunk", "skyscraper", "snake", "spider", "squirrel",
        "streetcar", "sunflower", "tank", "tiger", "train", "trout",
        "tulip", "turtle", "willow_tree", "wolf",
    ),
    "val": (
        "beaver", "beetle", "butterfly", "camel", "cattle", "crab",
        "crocodile", "flatfish", "lamp", "maple_tree", "motorcycle", "otter",
        "sea", "shark", "television", "tractor",
    ),
    "test": (
        "baby", "bed", "bicycle", "chimpanzee", "fox", "leopard",
        "man", "pickup_truck", "plain", "poppy", "rocket", "rose",
        "snail", "sweet_pepper", "table", "telephone", "wardrobe", "whale",
        "woman", "worm",
    ),
}  # fmt: skip

#: FC100's superclass split (Oreshkin et al. 2018, supplementary material). Source: torchmeta,
#: torchmeta/datasets/assets/cifar100/fc100/{train,test}.json; validation holds the four
#: superclasses left (12 + 4 + 4 = 20). As coarse-label indices: train 1-6, 9, 10, 15, 17-19;
#: val 8, 11, 13, 16; test 0, 7, 12, 14.
FC100_SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "train": (
        "fish", "flowers", "food_containers", "fruit_and_vegetables",
        "household_electrical_devices", "household_furniture",
        "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "reptiles", "trees",
        "vehicles_1", "vehicles_2",
    ),
    "val": (
        "large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates",
        "small_mammals",
    ),
    "test": ("aquatic_mammals", "insects", "medium_mammals", "people"),
}  # fmt: skip
FC100_SPLITS: dict[str, tuple[str, ...]] = {
    split: tuple(sorted(f for coarse in supers for f in SUPERCLASSES[coarse]))
    for split, supers in FC100_SUPERCLASSES.items()
}


@dataclass(frozen=True)
class Benchmark:
    name: str
    splits: Mapping[str, tuple[str, ...]]
    pickle_name: str  # MetaOptNet's file name, {} = split
    source: str  # whose split, for messages


BENCHMARKS = {
    "cifarfs": Benchmark("cifarfs", CIFARFS_SPLITS, "CIFAR_FS_{}.pickle", "Bertinetto et al."),
    "fc100": Benchmark("fc100", FC100_SPLITS, "FC100_{}.pickle", "Oreshkin et al. (FC100)"),
}


def load_cifar(
    name: str,
    root: str | os.PathLike[str] | None = None,
    split_classes: Mapping[str, Sequence[str]] | None = None,
) -> ImageData:
    """``name`` (``cifarfs`` or ``fc100``) from its pickles in ``<root>/<name>/`` if all three
    are there, else from the official archive in ``<root>/cifar100/`` (downloaded if missing).
    ``split_classes`` defaults to the published split; tests pass small lists."""
    benchmark = BENCHMARKS[name]
    expected = {s: tuple((split_classes or benchmark.splits)[s]) for s in SPLITS}
    base = resolve_root(root)
    pickles = {s: base / name / benchmark.pickle_name.format(s) for s in SPLITS}
    found = [s for s in SPLITS if pickles[s].is_file()]
    if len(found) == len(SPLITS):
        splits = {s: _split_from_pickle(pickles[s], s, expected[s], benchmark) for s in SPLITS}
        return ImageData(splits, "pickle", [p.name for p in pickles.values()])
    if found:
        missing = next(pickles[s] for s in SPLITS if s not in found)
        raise MamlrunError(f"{missing} is missing (the other pickles are there); add it")
    folder = base / ARCHIVE_FOLDER
    manual = (
        f"download {URL} (md5 {MD5}) by hand into {folder}, or put MetaOptNet's "
        f"{benchmark.pickle_name.format('{train,val,test}')} in {base / name}"
    )
    archive = ensure_file(folder / ARCHIVE, URL, MD5, manual)
    return cached_images(_from_archive(benchmark, archive, expected, manual))


#: The ``_target_``s of ``conf/dataset/{cifarfs,fc100}.yaml``.
cifarfs_tasks = image_tasks("cifarfs", functools.partial(load_cifar, "cifarfs"), "cifarfs")
fc100_tasks = image_tasks("fc100", functools.partial(load_cifar, "fc100"), "fc100")


# ---------------------------------------------------------------------------------------------
# MetaOptNet's pickles


def _split_from_pickle(
    path: Path, split: str, expected: tuple[str, ...], benchmark: Benchmark
) -> ImageSplit:
    """One pickle as an ``ImageSplit``, its images regrouped class by class in the split's
    order (they are stored in CIFAR's order, classes interleaved)."""
    blob = read_pickle(path)
    shape = f"uint8 N×{IMAGE_SIZE}×{IMAGE_SIZE}×3"
    if not isinstance(blob, dict) or not {"data", "labels"} <= blob.keys():
        raise MamlrunError(
            f"{path} is not a {benchmark.name} pickle: expected a dict with data ({shape}) "
            "and labels (CIFAR-100 class indices)"
        )
    data = blob["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape[1:] != (32, 32, 3):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise MamlrunError(f"{path}: data is {got}, expected {shape}")
    try:
        labels = np.asarray(blob["labels"], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise MamlrunError(f"{path}: labels are not class indices") from e
    if len(labels) != len(data) or (len(labels) and not 0 <= labels.min() <= labels.max() < 100):
        raise MamlrunError(
            f"{path}: {len(labels)} labels in 0..{labels.max() if len(labels) else '-'} for "
            f"{len(data)} images; expected one CIFAR-100 class index (0-99) per image"
        )
    names = [FINE_LABELS[i] for i in np.unique(labels)]
    check_classes(str(path), split, names, expected, f"{benchmark.source}")
    return _grouped(torch.from_numpy(np.ascontiguousarray(data)), labels, expected)


def _grouped(images: torch.Tensor, labels: np.ndarray, classes: tuple[str, ...]) -> ImageSplit:
    """The images of ``classes`` (CIFAR-100 fine-label indices in ``labels``), class after
    class, each class's in their original order."""
    wanted = [FINE_LABELS.index(c) for c in classes]
    members = [np.flatnonzero(labels == label) for label in wanted]
    order = torch.from_numpy(np.concatenate(members)) if members else torch.zeros(0)
    return ImageSplit(images[order.long()], [len(m) for m in members], list(classes))


# ---------------------------------------------------------------------------------------------
# The official archive, cut into the benchmark's splits once, into a memory-mapped cache

_CACHE_FORMAT = 1


def _from_archive(
    benchmark: Benchmark, archive: Path, expected: dict[str, tuple[str, ...]], manual: str
) -> Reading:
    key = {
        "format": _CACHE_FORMAT,
        "dataset": benchmark.name,
        "classes": {s: list(expected[s]) for s in SPLITS},
        "files": fingerprint([archive]),
    }

    def deliver(into: Delivery) -> None:
        if md5sum(archive) != MD5:  # a re-compressed copy is fine once its content checks out
            log.warning("%s is not byte for byte the official archive (md5 %s)", archive, MD5)
        images, labels = read_archive(archive, manual)
        for s in SPLITS:
            into.split(s, _grouped(images, labels, expected[s]))

    name = f"cache_{benchmark.name}_{IMAGE_SIZE}.u8"
    shape = (IMAGE_SIZE, IMAGE_SIZE, 3)
    files = [archive.name]
    return Reading(benchmark.name, archive.parent, name, key, shape, "archive", files, deliver)


def read_archive(path: Path, manual: str) -> tuple[torch.Tensor, np.ndarray]:
    """All 60,000 images (training set, then test set) as uint8 ``[N, 32, 32, 3]`` and their
    fine labels, after checking that the archive's classes and superclasses are CIFAR-100's."""
    members = _archive_members(path, manual)
    again = f"delete {path} and run again to download it, or {manual}"
    meta = _as_str_keys(unpickle(members["meta"], f"{path}: meta", again), f"{path}: meta")
    names = [_text(n) for n in meta.get("fine_label_names", [])]
    if names != list(FINE_LABELS):
        pairs = zip(names, FINE_LABELS, strict=False)
        wrong = [f"class {i} is {a!r}, not {b!r}" for i, (a, b) in enumerate(pairs) if a != b]
        first = wrong[0] if wrong else f"{len(names)} classes, not 100"
        raise MamlrunError(f"{path}: meta does not name CIFAR-100's classes ({first}); {again}")
    parts = [_images_of(members[s], f"{path}: {s}", again) for s in ("train", "test")]
    images = torch.cat([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return images, labels


def _archive_members(path: Path, manual: str) -> dict[str, bytes]:
    """The pickles ``meta``, ``train`` and ``test`` of the archive, read in one pass."""
    again = f"delete it and run again to download it, or {manual}"
    with open(path, "rb") as f:
        if looks_like_html(f.read(2048)):
            raise MamlrunError(f"{path} is an HTML page, not the CIFAR-100 archive; {again}")
    wanted = {f"cifar-100-python/{m}": m for m in ("meta", "train", "test")}
    found: dict[str, bytes] = {}
    try:
        for name, read in tar_gz_files(path):
            if name in wanted:
                found[wanted[name]] = read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise MamlrunError(f"{path} is truncated or corrupt ({detail}); {again}") from e
    absent = [f"cifar-100-python/{m}" for m in ("meta", "train", "test") if m not in found]
    if absent:
        raise MamlrunError(f"{path} has no {absent[0]}: not the CIFAR-100 python archive; {again}")
    return found


def _images_of(blob: bytes, where: str, again: str) -> tuple[torch.Tensor, np.ndarray]:
    part = _as_str_keys(unpickle(blob, where, again), where)
    data, fine = part.get("data"), part.get("fine_labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise MamlrunError(f"{where}: no uint8 N×3072 data; {again}")
    if data.shape[1] != 3 * IMAGE_SIZE * IMAGE_SIZE or fine is None or len(fine) != len(data):
        raise MamlrunError(f"{where}: data {data.shape} and {len(fine or [])} labels; {again}")
    fine = np.asarray(fine, dtype=np.int64)
    coarse = part.get("coarse_labels")
    if coarse is not None:
        _check_superclasses(fine, np.asarray(coarse, dtype=np.int64), where, again)
    planes = data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
    return torch.from_numpy(np.ascontiguousarray(planes)), fine


def _check_superclasses(fine: np.ndarray, coarse: np.ndarray, where: str, again: str) -> None:
    """Each class's superclass as CIFAR-100 defines it: FC100's split depends on it."""
    coarse_names = sorted(SUPERCLASSES)
    for label in np.unique(fine):
        got = coarse_names[int(coarse[np.argmax(fine == label)])]
        if got != SUPERCLASS_OF[FINE_LABELS[label]]:
            raise MamlrunError(
                f"{where}: class {FINE_LABELS[label]} is in superclass {got}, CIFAR-100 puts it "
                f"in {SUPERCLASS_OF[FINE_LABELS[label]]}; {again}"
            )


def _as_str_keys(blob: object, where: str) -> dict:
    """Python 2 pickles have byte-string keys under some encodings, str under latin1."""
    if not isinstance(blob, dict):
        raise MamlrunError(f"{where} holds a {type(blob).__name__}, not CIFAR-100's dict")
    return {_text(k): v for k, v in blob.items()}


def _text(value: object) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)

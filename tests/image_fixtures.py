"""Small copies of the few-shot image datasets in their published on-disk formats, written by
the tests (the real data is not needed): tieredImageNet's PNG pickles, CIFAR-100's python
archive and MetaOptNet's CIFAR-FS / FC100 pickles, CUB-200-2011's folder and archive.

Every image is one flat colour that encodes its class (red) and its index within the class
(green), as in ``test_miniimagenet``, so a test can read back where a sampled image came from.
Python 2 pickles (tieredImageNet's labels, CIFAR-100's archive) are written as Python 2 wrote
them: byte strings as ``BINSTRING`` opcodes, numpy under its old module name ``numpy.core``.
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from test_miniimagenet import colour

from mamlrun.data import cifar, cub

SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------------------------------------
# Pickles as Python 2 wrote them


class _Python2Pickler(pickle._Pickler):
    """Protocol 2 with ``bytes`` written as Python 2's ``str`` (BINSTRING), which Python 3
    reads back according to the unpickler's ``encoding``."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def py2_pickle(obj: object) -> bytes:
    out = io.BytesIO()
    _Python2Pickler(out, protocol=2).dump(obj)
    return out.getvalue().replace(b"numpy._core", b"numpy.core")


def encoded(colour_: tuple[int, int, int], size: tuple[int, int], task_type: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour_).save(out, task_type)
    return out.getvalue()


def counts_of(classes: Sequence[str], per_class: int | Callable[[int], int]) -> list[int]:
    return [per_class(i) if callable(per_class) else per_class for i in range(len(classes))]


# ---------------------------------------------------------------------------------------------
# tieredImageNet: {split}_images_png.pkl and {split}_labels.pkl

#: A few real tieredImageNet classes (ImageNet synsets) and their categories, per split, from
#: renmengye/few-shot-ssl-public's split CSVs (the pickles name them in words; any names do).
TIERED_SMALL = {
    "train": (["n01530575", "n01531178", "n01532829", "n01534433"], ["n01503061", "n01661091"]),
    "val": (["n02099267", "n02099429", "n03207941"], ["n02098550", "n03257877"]),
    "test": (["n02110063", "n02110185", "n02110341"], ["n02084071"]),
}
TIERED_SMALL_SIZES = {s: (len(c), len(g)) for s, (c, g) in TIERED_SMALL.items()}


def full_tiered_classes() -> dict[str, tuple[list[str], list[str]]]:
    """351 / 97 / 160 classes in 20 / 6 / 8 categories, made-up names, for the full-size run."""
    sizes = {"train": (351, 20), "val": (97, 6), "test": (160, 8)}
    return {
        s: ([f"{s} class {i}" for i in range(n)], [f"{s} category {j}" for j in range(m)])
        for s, (n, m) in sizes.items()
    }


def write_tiered(
    root: Path,
    classes: Mapping[str, tuple[list[str], list[str]]] = TIERED_SMALL,
    per_class: int | Callable[[int], int] = 3,
    python2: bool = True,
    interleave: bool = False,
    folder: str = "tieredimagenet",
) -> Path:
    """The six pickles: images as a list of PNGs (Python 2: the uint8 arrays ``cv2.imencode``
    returns; else bytes), labels as a dict of index arrays and name lists. ``interleave``
    stores the images round-robin over classes instead of class after class."""
    directory = root / folder
    directory.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        names, categories = classes[split]
        counts = counts_of(names, per_class)
        pairs = [(c, i) for c, n in enumerate(counts) for i in range(n)]
        if interleave:
            pairs.sort(key=lambda p: (p[1], p[0]))
        pngs = [encoded(colour(c, i), (84, 84), "PNG") for c, i in pairs]
        specific = np.array([c for c, _ in pairs], dtype=np.int32)
        general = np.array([c % len(categories) for c, _ in pairs], dtype=np.int32)
        if python2:
            images = [np.frombuffer(p, np.uint8).reshape(-1, 1) for p in pngs]
            labels = {
                b"label_specific": specific,
                b"label_general": general,
                b"label_specific_str": [n.encode() for n in names],
                b"label_general_str": [g.encode() for g in categories],
            }
            (directory / f"{split}_images_png.pkl").write_bytes(py2_pickle(images))
            (directory / f"{split}_labels.pkl").write_bytes(py2_pickle(labels))
        else:
            labels = {"label_specific": specific, "label_general": general}
            (directory / f"{split}_images_png.pkl").write_bytes(pickle.dumps(pngs, protocol=4))
            (directory / f"{split}_labels.pkl").write_bytes(pickle.dumps(labels, protocol=4))
    return directory


# ---------------------------------------------------------------------------------------------
# CIFAR-100: the python archive, and MetaOptNet's pickles


def cifar_images(labels: Sequence[int], first_index: Sequence[int]) -> np.ndarray:
    """uint8 [N, 32, 32, 3]: image ``k`` has its class's colour for index ``first_index[k]``."""
    return np.stack(
        [
            np.full((32, 32, 3), colour(label, i), np.uint8)
            for label, i in zip(labels, first_index, strict=True)
        ]
    )


def write_cifar_archive(
    root: Path, train_per_class: int = 2, test_per_class: int = 1, folder: str = "cifar100"
) -> Path:
    """``cifar-100-python.tar.gz`` with all 100 classes: ``meta`` (class names), ``train`` and
    ``test`` (``data`` N×3072 in channel planes, fine and coarse labels), Python 2 pickles.
    Class ``c``'s test images continue its index after its training images."""
    path = root / folder / cifar.ARCHIVE
    path.parent.mkdir(parents=True, exist_ok=True)
    coarse_names = sorted(cifar.SUPERCLASSES)
    members = {
        "meta": {
            b"fine_label_names": [n.encode() for n in cifar.FINE_LABELS],
            b"coarse_label_names": [n.encode() for n in coarse_names],
        }
    }
    for part, per_class, first in (("train", train_per_class, 0), ("test", test_per_class, 1)):
        labels = [c for i in range(per_class) for c in range(100)]  # classes interleaved
        indices = [i + first * train_per_class for i in range(per_class) for _ in range(100)]
        pixels = cifar_images(labels, indices).transpose(0, 3, 1, 2).reshape(len(labels), -1)
        coarse = [coarse_names.index(cifar.SUPERCLASS_OF[cifar.FINE_LABELS[c]]) for c in labels]
        members[part] = {
            b"data": np.ascontiguousarray(pixels),
            b"fine_labels": labels,
            b"coarse_labels": coarse,
            b"filenames": [f"{part}_{k}.png".encode() for k in range(len(labels))],
        }
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            data = py2_pickle(blob)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_cifar_pickles(
    root: Path,
    name: str,
    splits: Mapping[str, Sequence[str]],
    per_class: int = 3,
    python2: bool = True,
) -> Path:
    """MetaOptNet's ``CIFAR_FS_{split}.pickle`` / ``FC100_{split}.pickle``: ``data``
    (N×32×32×3 uint8, classes interleaved as in CIFAR) and ``labels`` (fine-label indices)."""
    benchmark = cifar.BENCHMARKS[name]
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        fine = [cifar.FINE_LABELS.index(c) for c in splits[split]]
        labels = [f for i in range(per_class) for f in fine]
        index = [i for i in range(per_class) for _ in fine]
        data = cifar_images(labels, index)
        key = (lambda k: k.encode()) if python2 else (lambda k: k)
        blob = {key("data"): data, key("labels"): labels}
        body = py2_pickle(blob) if python2 else pickle.dumps(blob, protocol=4)
        (directory / benchmark.pickle_name.format(split)).write_bytes(body)
    return directory


# ---------------------------------------------------------------------------------------------
# CUB-200-2011: CUB_200_2011/ and CUB_200_2011.tgz


def write_cub_folder(
    root: Path,
    species: Sequence[str] = cub.CLASSES,
    per_class: int | Callable[[int], int] = 2,
) -> Path:
    """``CUB_200_2011/`` with ``images/<species>/*.jpg`` (small, varied sizes) for ``species``
    and the three listings; ``classes.txt`` names all 200 species, as the real one does.
    Image ids run over the species in order; images get the colour of their species' index
    among ``species``."""
    folder = root / "cub" / cub.EXTRACTED
    (folder / "images").mkdir(parents=True, exist_ok=True)
    ids = {name: i + 1 for i, name in enumerate(cub.CLASSES)}
    (folder / "classes.txt").write_text("".join(f"{i} {n}\n" for n, i in ids.items()))
    images, labels, image_id = [], [], 0
    for c, (name, count) in enumerate(zip(species, counts_of(species, per_class), strict=True)):
        (folder / "images" / name).mkdir(exist_ok=True)
        for i in range(count):
            image_id += 1
            path = f"{name}/{name.split('.', 1)[1]}_{i + 1:04d}_{700000 + image_id}.jpg"
            size = (10 + 3 * i, 12 + c % 5)
            (folder / "images" / path).write_bytes(encoded(colour(c, i), size, "JPEG"))
            images.append(f"{image_id} {path}\n")
            labels.append(f"{image_id} {ids[name]}\n")
    (folder / "images.txt").write_text("".join(images))
    (folder / "image_class_labels.txt").write_text("".join(labels))
    return folder


def write_cub_archive(root: Path, **folder_settings) -> Path:
    """``CUB_200_2011.tgz`` as published: the folder above under ``CUB_200_2011/``, plus the
    top-level ``attributes.txt`` the real archive has; the folder itself is removed."""
    staging = root / "staging"
    folder = write_cub_folder(staging, **folder_settings)
    path = root / "cub" / cub.ARCHIVE
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        attributes = b"1 has_bill_shape::curved\n"
        info = tarfile.TarInfo("attributes.txt")
        info.size = len(attributes)
        tar.addfile(info, io.BytesIO(attributes))
        tar.add(folder, arcname=cub.EXTRACTED)
    _remove(staging)
    return path


def _remove(path: Path) -> None:
    for child in sorted(path.rglob("*"), reverse=True):
        child.rmdir() if child.is_dir() else child.unlink()
    path.rmdir()

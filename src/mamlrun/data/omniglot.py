"""Omniglot as a task source: N-way K-shot classification of handwritten characters.

Preprocessing follows the MAML paper (Finn et al., 2017, after Santoro et al., 2016) so that
results are comparable with published numbers:

* every 105×105 drawing is resized to 28×28 with Lanczos antialiasing, applied to the 8-bit
  version of the 1-bit image (Pillow resizes 1-bit images with nearest neighbour only);
* strokes are 1 and the background 0 (the PNGs have black strokes on white), so that the mostly
  empty background is zero input;
* each of the four rotations by 90° of a character is a class of its own.

The cache holds one uint8 tensor ``[1623, 20, size, size]`` (0..255, strokes 255; the division
by 255 happens on the device, which keeps the cache 4× smaller than floats), the character
names ``Alphabet/characterNN`` (sorted within each zip, background first) and the zip each one
came from. It is the ``.u8`` cache every image dataset uses (``data/u8cache.py``: the images
mapped, not read, names and zips in its header), written atomically next to the zips as
``cache_<size>.u8``; where that folder is not writable (a shared read-only copy) it goes to
``$XDG_CACHE_HOME/mamlrun/omniglot/`` (or ``~/.cache/mamlrun/omniglot/``) instead, as
``cache_<size>-<hash of the zips' folder>.u8`` so
that two read-only copies do not overwrite each other's cache. Its key is the zips' sizes and
mtimes and the image size: touching or replacing a zip rebuilds it, and an unreadable cache
file is rebuilt rather than reported.

The zips are verified whenever the cache is (re)built, because that reads every image anyway. A
download must match the official md5. A local copy whose md5 differs (such as a re-zipped copy)
is accepted because its content is right: the expected alphabets and characters per zip, 20
drawings each, every PNG readable and 105×105 with an intact CRC. Official zips pass the same
checks, so one code path serves both.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from mamlrun.data.decode import forked_map, one_line
from mamlrun.data.download import (
    ensure_file,
    md5sum,
    resolve_root,
)
from mamlrun.data.episodic import EpisodicImages
from mamlrun.data.tasks import SPLITS, TaskBatch
from mamlrun.data.u8cache import ImageCacheWriter, ImageSplit, MappedCache, cached_file
from mamlrun.errors import MamlrunError

log = logging.getLogger(__name__)

SETS = ("images_background", "images_evaluation")
URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{}.zip"
OFFICIAL_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
# (alphabets, characters) per zip; tests shrink these to validate small fixture zips.
EXPECTED_COUNTS = {"images_background": (30, 964), "images_evaluation": (20, 659)}
DRAWINGS = 20
RAW_SIZE = 105

SPLIT_NAMES = ("maml", "background_evaluation")
MAML_META_TRAIN = 1200  # the MAML paper's meta-training characters, validation included
MAML_VAL = 100
VAL_ALPHABETS = 5

_CACHE_FORMAT = 2  # 1: a torch.save file, cache_<size>.pt
_ENTRY = re.compile(r"(?P<set>[^/]+)/(?P<alphabet>[^/]+)/(?P<character>[^/]+)/[^/]+\.png")


@dataclass(frozen=True)
class OmniglotData:
    """Preprocessed characters: ``images[i]`` holds the 20 drawings of ``names[i]``."""

    images: torch.Tensor  # uint8 [characters, DRAWINGS, size, size], strokes 255
    names: list[str]  # "Alphabet/characterNN"
    sources: list[str]  # the zip (an entry of SETS) each character came from
    md5: dict[str, str]  # of the zips the cache was built from, for the results record
    cache: str | None = None  # the cache file it was read from or written to, if any


# ---------------------------------------------------------------------------------------------
# Reading and validating the zips


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except FileNotFoundError as e:
        raise MamlrunError(f"{path}: file not found") from e
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise MamlrunError(f"{path}: not a readable zip file ({one_line(e)})") from e


def list_characters(path: Path, set_name: str) -> dict[str, list[str]]:
    """Map each ``Alphabet/characterNN`` of one zip to its sorted PNG entries.

    Checking the counts here, before any image is decoded, turns an incomplete download or a
    wrong zip into an immediate error naming what is missing.
    """
    with _open_zip(path) as zf:
        entries = zf.namelist()
    characters: dict[str, list[str]] = {}
    for entry in entries:
        match = _ENTRY.fullmatch(entry)
        if match and match["set"] == set_name:
            name = f"{match['alphabet']}/{match['character']}"
            characters.setdefault(name, []).append(entry)
    _check_counts(path, set_name, characters)
    return {name: sorted(characters[name]) for name in sorted(characters)}


def _check_counts(path: Path, set_name: str, characters: dict[str, list[str]]) -> None:
    if not characters:
        raise MamlrunError(f"{path}: no {set_name}/<alphabet>/<character>/*.png entries")
    want_alphabets, want_characters = EXPECTED_COUNTS[set_name]
    alphabets = {name.split("/")[0] for name in characters}
    if (len(alphabets), len(characters)) != (want_alphabets, want_characters):
        raise MamlrunError(
            f"{path}: {len(alphabets)} alphabets with {len(characters)} characters, "
            f"expected {want_alphabets} with {want_characters}"
        )
    for name in sorted(characters):
        if len(characters[name]) != DRAWINGS:
            raise MamlrunError(
                f"{path}: {name} has {len(characters[name])} drawings, expected {DRAWINGS}"
            )


def _load_png(zf: zipfile.ZipFile, path: str, entry: str, size: int) -> bytes:
    """One drawing resized to ``size`` (not yet inverted), as raw 8-bit pixels."""
    try:
        raw = zf.read(entry)  # checks the CRC
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
        raise MamlrunError(f"{path}: cannot read {entry} ({one_line(e)})") from e
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            if image.size != (RAW_SIZE, RAW_SIZE):
                w, h = image.size
                raise MamlrunError(f"{path}: {entry} is {w}x{h}, expected {RAW_SIZE}x{RAW_SIZE}")
            small = image.convert("L").resize((size, size), Image.Resampling.LANCZOS)
    except UnidentifiedImageError as e:  # its message holds the repr of our BytesIO
        raise MamlrunError(f"{path}: {entry} is not a readable PNG (not an image)") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise MamlrunError(f"{path}: {entry} is not a readable PNG ({one_line(e)})") from e
    return small.tobytes()


def _decode_chunk(path: str, entries: list[str], size: int) -> bytes:
    with _open_zip(Path(path)) as zf:
        return b"".join(_load_png(zf, path, entry, size) for entry in entries)


def _chunks(items: list[str], parts: int) -> list[list[str]]:
    step = -(-len(items) // parts)
    return [items[i : i + step] for i in range(0, len(items), step)]


def _decode_all(jobs: list[tuple[str, list[str]]], size: int, workers: int) -> bytes:
    """Decode the jobs' images in order, in ``workers`` forked processes where fork is
    available (``decode.forked_map``)."""
    paths, entries = zip(*jobs, strict=True)
    return b"".join(forked_map(_decode_chunk, paths, entries, [size] * len(jobs), workers=workers))


def build_omniglot(
    paths: dict[str, Path], image_size: int = 28, workers: int | None = None
) -> OmniglotData:
    """Validate both zips and preprocess every drawing (the slow path the cache avoids)."""
    workers = workers or min(4, os.cpu_count() or 1)
    names: list[str] = []
    sources: list[str] = []
    jobs: list[tuple[str, list[str]]] = []
    for set_name in SETS:
        characters = list_characters(paths[set_name], set_name)
        names += characters
        sources += [set_name] * len(characters)
        entries = [entry for drawings in characters.values() for entry in drawings]
        jobs += [(str(paths[set_name]), chunk) for chunk in _chunks(entries, workers)]
    if len(set(names)) != len(names):
        raise MamlrunError(f"{paths[SETS[1]]}: repeats alphabet names of {paths[SETS[0]]}")
    pixels = bytearray(_decode_all(jobs, image_size, workers))
    images = torch.frombuffer(pixels, dtype=torch.uint8)
    images = 255 - images.view(len(names), DRAWINGS, image_size, image_size)
    md5 = {set_name: md5sum(paths[set_name]) for set_name in SETS}
    for set_name in SETS:
        if md5[set_name] != OFFICIAL_MD5[set_name]:
            log.info(
                "%s differs from the official zip (md5); its content is valid", paths[set_name]
            )
    return OmniglotData(images, names, sources, md5)


# ---------------------------------------------------------------------------------------------
# Cache


def _cache_key(paths: dict[str, Path], image_size: int) -> dict:
    key: dict = {"format": _CACHE_FORMAT, "image_size": image_size}
    for set_name in SETS:
        stat = paths[set_name].stat()
        key[set_name] = [stat.st_size, stat.st_mtime_ns]
    return key


def _write_cache(path: Path, key: dict, data: OmniglotData) -> None:
    """The ``.u8`` cache every image dataset uses: the drawings as ``[characters * 20, s, s,
    1]``, the names, zips and md5s in its header."""
    size = data.images.shape[-1]
    header = {"key": key, "names": data.names, "sources": data.sources, "md5": data.md5}
    with ImageCacheWriter(path, data.images.shape[0] * DRAWINGS, (size, size, 1)) as writer:
        writer.write(0, data.images.reshape(-1, size, size, 1))
        writer.commit(header)


def _from_cache(cache: MappedCache, path: Path, size: int) -> OmniglotData:
    names, sources = list(cache.header["names"]), list(cache.header["sources"])
    if tuple(cache.images.shape) != (len(names) * DRAWINGS, size, size, 1):
        raise MamlrunError(f"{path} is not the cache its header describes; delete it")
    images = cache.images.view(len(names), DRAWINGS, size, size)
    return OmniglotData(images, names, sources, dict(cache.header["md5"]), str(path))


def ensure_zips(directory: Path) -> dict[str, Path]:
    """The two zips in ``directory``, downloading (and md5-checking) any that is missing.

    When both are missing and cannot be fetched, one error names both, so that a user
    without network fixes the data root once instead of once per zip.
    """
    paths, failed = {}, []
    for set_name in SETS:
        try:
            paths[set_name] = ensure_file(
                directory / f"{set_name}.zip", URL.format(set_name), OFFICIAL_MD5[set_name]
            )
        except MamlrunError as e:
            failed.append((set_name, e))
    if len(failed) == 1:
        raise failed[0][1]
    if failed:
        names = " and ".join(f"{name}.zip" for name, _ in failed)
        urls = " and ".join(URL.format(name) for name, _ in failed)
        raise MamlrunError(
            f"{names} are missing from {directory} and could not be downloaded "
            f"({one_line(failed[0][1]).split(';')[0]}); download {urls} by hand into "
            f"{directory}, or set "
            "dataset.root (or $MAMLRUN_DATA) to a folder that holds omniglot/"
        )
    return paths


def load_omniglot(root: str | os.PathLike[str] | None = None, image_size: int = 28) -> OmniglotData:
    """The preprocessed dataset from the cache, building (and validating) it if needed."""
    directory = resolve_root(root) / "omniglot"
    paths = ensure_zips(directory)
    key = _cache_key(paths, image_size)

    def build(target: Path) -> None:
        _write_cache(target, key, build_omniglot(paths, image_size))

    name = f"cache_{image_size}.u8"
    cache, path = cached_file(directory, "omniglot", name, key, build)
    return _from_cache(cache, path, image_size)


# ---------------------------------------------------------------------------------------------
# Splits


def character_splits(
    names: Sequence[str], sources: Sequence[str], split: str = "maml", seed: int = 0
) -> dict[str, list[int]]:
    """Indices of the characters in train / val / test.

    ``maml``: the MAML paper's split: 1,200 characters drawn at random for meta-training (the
    last 100 of them held out for validation), the other 423 for testing. ``background_evaluation``:
    Lake et al.'s split (background zip for training, evaluation zip for testing), validating on
    a seeded choice of whole background alphabets so validation measures transfer to new
    alphabets as the test does.
    """
    if split == "maml":
        return _maml_split(len(names), seed)
    if split == "background_evaluation":
        return _background_evaluation_split(names, sources, seed)
    raise MamlrunError(
        f"unknown Omniglot split {split!r}; expected one of {', '.join(SPLIT_NAMES)}"
    )


def _maml_split(count: int, seed: int) -> dict[str, list[int]]:
    if count <= MAML_META_TRAIN:
        raise MamlrunError(f"the maml split needs over {MAML_META_TRAIN} characters, got {count}")
    order = list(range(count))
    random.Random(seed).shuffle(order)  # stable across torch versions, unlike randperm
    train_end = MAML_META_TRAIN - MAML_VAL
    return {
        "train": sorted(order[:train_end]),
        "val": sorted(order[train_end:MAML_META_TRAIN]),
        "test": sorted(order[MAML_META_TRAIN:]),
    }


def _background_evaluation_split(
    names: Sequence[str], sources: Sequence[str], seed: int
) -> dict[str, list[int]]:
    alphabet = [name.split("/")[0] for name in names]
    background = sorted({a for a, s in zip(alphabet, sources, strict=True) if s == SETS[0]})
    if len(background) <= VAL_ALPHABETS:
        raise MamlrunError(
            f"the background_evaluation split needs over {VAL_ALPHABETS} background alphabets, "
            f"got {len(background)}"
        )
    held_out = set(random.Random(seed).sample(background, VAL_ALPHABETS))
    splits: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, (a, s) in enumerate(zip(alphabet, sources, strict=True)):
        splits["test" if s != SETS[0] else "val" if a in held_out else "train"].append(i)
    return splits


# ---------------------------------------------------------------------------------------------
# Task source


def _check_task_size(shots: int, query: int) -> None:
    """Omniglot's data holds 20 drawings per character: K+Q cannot be more."""
    if shots + query > DRAWINGS:
        raise MamlrunError(
            f"omniglot: shots+query K+Q={shots + query} exceeds the {DRAWINGS} drawings per "
            f"character"
        )


def _check_ways(ways: int, classes: dict[str, list[str]]) -> None:
    split, count = min(((s, len(c)) for s, c in classes.items()), key=lambda item: item[1])
    if ways > count:
        raise MamlrunError(
            f"omniglot: {ways}-way tasks need {ways} classes but the {split!r} split has {count}"
        )


def _split_images(
    images: torch.Tensor, index: list[int], turns: range, classes: list[str]
) -> ImageSplit:
    """The characters ``index`` as an ``ImageSplit``: uint8 ``[classes * 20, s, s, 1]``, class
    ``len(turns)*i + k`` being character ``index[i]`` rotated ``k`` times by 90°
    counterclockwise.

    The rotations are materialised here, in the class order the sampler has always used
    (character-major, then rotation), because the class index a random draw lands on must name
    the same images as before for the task stream, and so every published number, to stay
    bitwise the same.
    """
    characters = images[torch.as_tensor(index, dtype=torch.long)]  # [chars, 20, s, s]
    rotated = torch.stack([torch.rot90(characters, k, dims=(-2, -1)) for k in turns], dim=1)
    size = images.shape[-1]
    return ImageSplit(rotated.reshape(-1, size, size, 1), [DRAWINGS] * len(classes), classes)


class OmniglotTasks:
    """N-way K-shot Omniglot tasks: the characters (and their rotations) of each split as an
    ``ImageSplit``, sampled by the ``EpisodicImages`` every image dataset uses.

    What is Omniglot's own is the data (zips, cache, splits, rotations as classes) and its
    description; the storage and the seeded on-device sampling are the shared layer's, with
    mean 0 and std 1 so that the network sees pixels/255 (strokes 1, background 0) as before.
    ``storage="cpu"`` keeps the splits in host memory on a GPU run (``EpisodicImages``).
    """

    task_type = "classification"

    def __init__(
        self,
        *,
        root: str | os.PathLike[str] | None,
        ways: int,
        shots: int,
        query: int,
        split: str,
        split_seed: int,
        rotations: bool,
        image_size: int,
        device: str | torch.device = "cpu",
        storage: str,
    ) -> None:
        _check_task_size(shots, query)  # before the dataset is loaded
        self.ways, self.shots, self.query = ways, shots, query
        self.split, self.split_seed, self.rotations = split, split_seed, rotations
        self.image_size = image_size
        self.input_shape = (1, image_size, image_size)
        self.output_size = ways
        self.device = torch.device(device)

        data = load_omniglot(root, image_size)
        index = character_splits(data.names, data.sources, split, split_seed)
        turns = range(4) if rotations else range(1)
        self.characters = {s: [data.names[i] for i in index[s]] for s in SPLITS}
        #: class names ``Alphabet/characterNN/rot<degrees>``, in class-index order
        self.classes = {
            s: [f"{name}/rot{90 * k}" for name in self.characters[s] for k in turns] for s in SPLITS
        }
        _check_ways(ways, self.classes)
        self.md5, self.cache = data.md5, data.cache
        #: each split's images on the host, uint8 ``[classes * 20, s, s, 1]`` in class order;
        #: with storage=device the sampler holds its own copy on the device
        self.splits = {
            s: _split_images(data.images, index[s], turns, self.classes[s]) for s in SPLITS
        }
        self.episodes = EpisodicImages(
            "omniglot",
            self.splits,
            ways=ways,
            shots=shots,
            query=query,
            storage=storage,
            mean=[0.0],
            std=[1.0],
            device=self.device,
            augment=False,  # the MAML paper's Omniglot has none
            crop_padding=0,
        )

    def sample(self, split: str, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        """Draw tasks by indexing (``EpisodicImages.sample``): random classes, random distinct
        drawings, shuffled labels; support and query ordered by class slot."""
        return self.episodes.sample(split, num_tasks, generator)

    def describe(self) -> dict:
        """Task shape, split sizes and the zips' md5, enough to tell two runs' data apart."""
        return {
            "name": "omniglot",
            "ways": self.ways,
            "shots": self.shots,
            "query": self.query,
            "split": self.split,
            "split_seed": self.split_seed,
            "rotations": self.rotations,
            "image_size": self.image_size,
            "characters": {s: len(c) for s, c in self.characters.items()},
            "classes": {s: len(c) for s, c in self.classes.items()},
            "images": {s: int(stored.images.shape[0]) for s, stored in self.splits.items()},
            "input_shape": list(self.input_shape),
            "zip_md5": dict(self.md5),
            "official_zips": self.md5 == OFFICIAL_MD5,
            **({"cache": self.cache} if self.cache else {}),
        }

    def fingerprint(self) -> dict:
        """Every split's classes (character and rotation) and their image counts."""
        return self.episodes.fingerprint()

    def save_splits(self, directory: Path) -> None:
        """Write ``splits.json``: every split's classes in class-index order, so a result can be
        traced to exactly the characters (and rotations) it was trained and tested on."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        document = {
            "dataset": "omniglot",
            "split": self.split,
            "split_seed": self.split_seed,
            "rotations": [90 * k for k in (range(4) if self.rotations else range(1))],
            "class_format": "Alphabet/characterNN/rot<degrees, counterclockwise>",
            "classes": self.classes,
        }
        (directory / "splits.json").write_text(json.dumps(document, indent=1) + "\n")

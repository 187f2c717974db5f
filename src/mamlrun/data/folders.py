"""``dataset=images``: a user's own folder of images as a few-shot dataset.

The folder's layout (split folders, class folders with lists or a seeded split, or a CSV) is
read by ``data/folder_layouts.py``; here the files are decoded, in parallel with a progress
bar, into the memory-mapped ``.u8`` cache the benchmarks use, and served by ``EpisodicImages``.

* Every image becomes ``image_size``×``image_size``: ``resize=crop`` scales the shorter side to
  it and cuts the middle (nothing stretched, the edges of the longer side lost), ``pad`` scales
  the longer side to it and fills the rest with black (nothing lost). Either with Lanczos.
* ``channels`` 1 or 3: every image is converted to it (grayscale, RGB, RGBA, palette and
  CMYK files can be mixed in one folder); a GIF gives its first frame.
* The cache lives in the user cache (``$XDG_CACHE_HOME/mamlrun/images/``, one file per folder
  and image settings), never in the user's folder, which is only read. Its key is a digest of
  every file's path, size and modification time and of the split, so a changed folder
  rebuilds it and an unchanged one does not. Beside it, ``<cache>.splits.json`` lists every
  split's classes and the rule that split them.
* Before anything is decoded, the layout and the counts are checked against the task shape
  (N-way, K-shot plus query), so a folder that cannot serve the tasks fails in a second, not
  after the decoding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import warnings
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from mamlrun.data.decode import one_line
from mamlrun.data.episodic import EpisodicImages
from mamlrun.data.folder_layouts import Layout, counted, named, read_layout
from mamlrun.data.sources import Delivery, served
from mamlrun.data.tasks import SPLITS
from mamlrun.data.u8cache import (
    ImageCacheWriter,
    ImageSplit,
    cache_locations,
    read_image_cache,
    splits_header,
    splits_of,
)
from mamlrun.errors import MamlrunError

log = logging.getLogger(__name__)

NAME = "images"
_CACHE_FORMAT = 2  # 2: EXIF orientation applied
#: Images per decoding job; below ``_PARALLEL_FROM`` images one process decodes them all.
_CHUNK = 64
_PARALLEL_FROM = 256


def images_tasks(
    *,
    root: str | None,
    csv: str | None,
    split_fractions: list[float],
    split_seed: int,
    image_size: int,
    resize: str,
    channels: int,
    skip_unreadable: bool,
    ways: int,
    shots: int,
    query: int,
    storage: str,
    mean: list[float] | None,
    std: list[float] | None,
    device: str | torch.device,
    augment: bool,
    crop_padding: int,
) -> EpisodicImages:
    """The task source of ``conf/dataset/images.yaml``: the folder ``root`` read, checked,
    cached and served as N-way K-shot tasks."""
    if root is None:
        raise MamlrunError(
            "dataset=images needs dataset.root=DIR, your folder of images (README: Your own data)"
        )
    folder = Path(root).expanduser().resolve()
    layout = read_layout(folder, csv, split_fractions, split_seed)
    check_counts(layout_counts(layout), ways, shots + query, layout.rule)
    look = Look(image_size, resize, channels)
    data = load_folder(folder, layout, look, skip_unreadable, (ways, shots + query))
    kept = {
        s: dict(zip(data.splits[s].classes, data.splits[s].counts, strict=True)) for s in SPLITS
    }
    check_counts(kept, ways, shots + query, layout.rule)  # a cache may have left files out
    info = {"layout": layout.kind, "split_rule": layout.rule, "root": str(folder),
            "resize": resize, "cache": str(data.cache), "split_file": str(splits_file(data.cache)),
            "unreadable": data.unreadable}  # fmt: skip
    task = {"ways": ways, "shots": shots, "query": query, "storage": storage, "device": device,
            "augment": augment, "crop_padding": crop_padding}  # fmt: skip
    return served(NAME, data.splits, data.stats, (mean, std), info, **task)


@dataclass(frozen=True)
class Look:
    """What every image is made into."""

    size: int
    resize: str  # "crop" | "pad"
    channels: int  # 1 | 3


@dataclass(frozen=True)
class FolderData:
    splits: dict[str, ImageSplit]
    stats: tuple[list[float], list[float]]
    cache: Path
    unreadable: list[str]


# ---------------------------------------------------------------------------------------------
# What the task shape needs of the folder


def layout_counts(layout: Layout) -> dict[str, dict[str, int]]:
    return {s: {c: len(f) for c, f in layout.files[s].items()} for s in SPLITS}


def check_counts(counts: Mapping[str, Mapping[str, int]], ways: int, per_class: int, rule: str):
    """Every split needs ``ways`` classes and every class ``per_class`` images (K-shot plus
    query): all the classes that fall short are named in one line, with their counts."""
    seeded = rule.startswith("seeded")
    for s in SPLITS:
        if len(counts[s]) < ways:
            have = named(list(counts[s])) or "none"
            raise MamlrunError(
                f"the {s} split has {len(counts[s])} classes ({have}), {ways}-way tasks need "
                f"{ways} (split rule: {rule}): add classes to it, or lower dataset.ways"
                + (", or give it a larger share in dataset.split_fractions" if seeded else "")
            )
    short = [f"{c} in {s} has {n}" for s in SPLITS for c, n in counts[s].items() if n < per_class]
    if short:
        raise MamlrunError(
            f"{counted(len(short), 'class')} {'has' if len(short) == 1 else 'have'} fewer than "
            f"the {per_class} images a task takes from each (dataset.shots + dataset.query): "
            f"{named(short, 20)}; add images, or lower dataset.shots or dataset.query"
        )


# ---------------------------------------------------------------------------------------------
# The cache


def load_folder(
    folder: Path, layout: Layout, look: Look, skip: bool, task: tuple[int, int]
) -> FolderData:
    """The splits from the cache that matches the folder as it is now, built when there is
    none (or the folder changed), always in the user cache."""
    path = cache_locations(folder, NAME, f"cache_{look.size}x{look.channels}_{look.resize}.u8")[1]
    key = cache_key(layout, look, skip)
    cache = read_image_cache(path, key)
    log.info("%s: %s; split rule: %s", folder, layout.kind, layout.rule)
    if cache is None:
        log.info("building the images cache %s", path)
        build_cache(path, key, layout, look, skip, task)
        cache = read_image_cache(path, key)
        if cache is None:
            raise MamlrunError(f"{path}: the cache just written cannot be read back; delete it")
    header = cache.header
    if header["unreadable"]:
        warn_unreadable(header["unreadable"])
    log.info("%s: %s", folder, ", ".join(
        f"{s} {len(header['splits'][s]['classes'])} classes" for s in SPLITS))  # fmt: skip
    log.info("the classes of each split: %s", splits_file(path))
    stats = tuple(header["stats"])
    return FolderData(splits_of(cache, path), stats, path, list(header["unreadable"]))


def splits_file(cache: Path) -> Path:
    return cache.with_name(cache.name.removesuffix(".u8") + ".splits.json")


def cache_key(layout: Layout, look: Look, skip: bool) -> dict:
    """What the cache was built from: every file's place (split, class, path), size and
    modification time, and how the images were made; one ``stat`` a file to recompute."""
    digest = hashlib.sha1()
    for s in SPLITS:
        for name, files in layout.files[s].items():
            for file in files:
                stat = file.stat()
                digest.update(f"{s}\0{name}\0{file}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {"format": _CACHE_FORMAT, "layout": layout.kind, "rule": layout.rule,
            "size": look.size, "resize": look.resize, "channels": look.channels,
            "skip_unreadable": skip, "files": digest.hexdigest()}  # fmt: skip


def build_cache(
    path: Path, key: dict, layout: Layout, look: Look, skip: bool, task: tuple[int, int]
) -> None:
    """Decode every file into a new cache at ``path``, split after split; files that do not
    decode fail the build (or, with ``skip``, are left out with a warning)."""
    jobs = [(s, c, f) for s in SPLITS for c, files in layout.files[s].items() for f in files]
    counts = {s: dict.fromkeys(layout.files[s], 0) for s in SPLITS}
    unreadable: list[str] = []
    shape = (look.size, look.size, look.channels)
    with ImageCacheWriter(path, 0, shape) as writer:
        delivery = Delivery(writer)  # the layer's writes and training-split statistics
        batch: list[bytes] = []
        current = "train"  # the split of the images in ``batch``
        for (split, name, file), pixels in decoded(jobs, look):
            if isinstance(pixels, str):
                unreadable.append(f"{file} ({pixels})")
                continue
            if split != current or len(batch) == _CHUNK:
                _flush(delivery, current, batch, shape)
                current = split
            counts[split][name] += 1
            batch.append(pixels)
        _flush(delivery, current, batch, shape)
        if unreadable and not skip:
            raise MamlrunError(
                f"{counted(len(unreadable), 'file')} {'does' if len(unreadable) == 1 else 'do'} "
                f"not decode as an image: {named(unreadable, 20)}; "
                f"replace or remove {'it' if len(unreadable) == 1 else 'them'}, or set "
                "dataset.skip_unreadable=true to leave such files out"
            )
        check_counts(counts, task[0], task[1], layout.rule)
        splits = {s: (list(counts[s]), list(counts[s].values())) for s in SPLITS}
        writer.commit(splits_header(key, splits, stats=list(delivery.moments.result()),
                                    unreadable=unreadable))  # fmt: skip
    write_split_file(splits_file(path), layout, counts)


def _flush(delivery: Delivery, split: str, batch: list[bytes], shape) -> None:
    """The decoded images of ``split`` in ``batch`` delivered to the cache; the batch is
    emptied."""
    if batch:
        images = torch.frombuffer(bytearray(b"".join(batch)), dtype=torch.uint8)
        delivery.append(split, images.view(len(batch), *shape))
        batch.clear()


def warn_unreadable(unreadable: Sequence[str]) -> None:
    log.warning(
        "%s that do%s not decode %s left out (dataset.skip_unreadable=true): %s",
        counted(len(unreadable), "file"),
        "es" if len(unreadable) == 1 else "",
        "is" if len(unreadable) == 1 else "are",
        named(list(unreadable)),
    )


def write_split_file(path: Path, layout: Layout, counts: Mapping[str, Mapping[str, int]]):
    """Which classes each split holds and why, beside the cache, so the split of a folder can
    be read without a run."""
    document = {"layout": layout.kind, "rule": layout.rule,
                "classes": {s: list(counts[s]) for s in SPLITS},
                "images_per_class": {s: list(counts[s].values()) for s in SPLITS}}  # fmt: skip
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # two builds never share one
    tmp.write_text(json.dumps(document, indent=1) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Decoding


def decode(path: str, look: Look) -> bytes:
    """One file as ``look`` says: its first frame, turned upright (a camera's EXIF orientation,
    as every image viewer shows it), converted, fitted, raw bytes in HWC order."""
    with Image.open(path) as image:
        image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("P", "PA", "LA", "RGBA", "La", "RGBa"):
            image = image.convert("RGBA")  # palette transparency resolved before dropping it
        image = image.convert("L" if look.channels == 1 else "RGB")
    square = (look.size, look.size)
    lanczos = Image.Resampling.LANCZOS
    if look.resize == "crop":
        image = ImageOps.fit(image, square, lanczos)
    else:
        image = ImageOps.pad(image, square, lanczos, color=0)
    return image.tobytes()


def _decode_chunk(paths: list[str], look: Look) -> list[bytes | str]:
    """Each file's pixels, or why it does not decode (a string)."""
    out: list[bytes | str] = []
    for path in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Pillow's notes on palettes and EXIF
                out.append(decode(path, look))
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
            out.append(one_line(e).replace(f" '{path}'", ""))  # the path is named once
    return out


def decoded(jobs: list[tuple[str, str, Path]], look: Look) -> Iterator[tuple[tuple, bytes | str]]:
    """``(job, pixels or the reason it failed)`` in the order of ``jobs``, decoded in forked
    processes (a few chunks ahead, so memory stays bounded at any folder size), with a
    progress bar on a terminal."""
    chunks = [jobs[i : i + _CHUNK] for i in range(0, len(jobs), _CHUNK)]
    workers = min(4, os.cpu_count() or 1)
    parallel = workers > 1 and len(jobs) >= _PARALLEL_FROM
    parallel = parallel and "fork" in multiprocessing.get_all_start_methods()
    with tqdm(total=len(jobs), unit="img", desc="decoding", disable=None, leave=False) as bar:
        if not parallel:
            for chunk in chunks:
                yield from zip(chunk, _decode_chunk([str(j[2]) for j in chunk], look), strict=True)
                bar.update(len(chunk))
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*fork.*", DeprecationWarning)
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        pending: deque = deque()
        try:
            for chunk in chunks:
                paths = [str(j[2]) for j in chunk]
                pending.append((chunk, pool.submit(_decode_chunk, paths, look)))
                while len(pending) > 2 * workers or (chunk is chunks[-1] and pending):
                    done, future = pending.popleft()
                    yield from zip(done, future.result(), strict=True)
                    bar.update(len(done))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

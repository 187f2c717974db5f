"""Episodic N-way K-shot tasks over any dataset of labelled images, and the preprocessing
helpers such datasets share: parallel resize and decode, cache fingerprint, atomic save, the
published-class check, and a memory-mapped image cache written piece by piece.

A dataset module only has to produce, per split, one uint8 tensor of its images grouped by
class (``ImageSplit``); ``EpisodicImages`` does the rest and implements the ``TaskSource``
Protocol (``data/tasks.py``), so the runner needs no change for a new image dataset.

Why the images are stored the way they are:

* **uint8, channels last** ``[images, H, W, C]``: the layout of the published pickles and of
  Pillow, so loading needs no transposed copy of a split (miniImageNet's training split is
  813 MB as uint8 and would be 3.3 GB as float32). Conversion to float, the channel
  permutation and the per-channel normalisation happen per meta-batch, on its few images.
* **one tensor per split, classes one after another** (offsets and counts beside it): a
  meta-batch is then drawn by indexing alone (Omniglot's own sampler did it this way first,
  and Omniglot now samples through this class with the same draws), with every random number
  from the seeded ``torch.Generator`` on the device, which is what keeps a resumed run bitwise
  equal to an uninterrupted one. Classes may hold different numbers of images.
* ``storage="device"`` keeps the split on the training device (fastest: no host transfer);
  ``storage="cpu"`` keeps it in host memory and copies each meta-batch's images to the device,
  through pinned memory where the device is CUDA so the copy is asynchronous. Pinning the whole
  split would gain nothing, since indexing it makes a new tensor anyway, and would lock
  hundreds of MB in RAM.
* **a raw ``.u8`` cache** (``ImageCacheWriter``, ``read_image_cache``) for every image
  dataset: the images at byte 0, a JSON header at the end. Unlike ``torch.save``, which needs
  the whole tensor in memory, it can be filled image batch by image batch as a dataset is
  decoded or read (tieredImageNet's 16.5 GB could not be held; miniImageNet's pickles are read
  one split at a time), and it is mapped back without being read.
* **a cached split is sampled by reading the file**, not by indexing the mapping
  (``ImageSplit.file``, ``_ImageReader``): each meta-batch's images are read with ``pread``
  into a fresh buffer, so the data stays in the kernel's page cache, shared and reclaimable,
  and the process holds only the current meta-batch; indexing the mapping would leave every
  image ever drawn in its resident memory. This is the host-memory case (``storage=cpu``, and
  any storage on a CPU); ``storage=device`` on an accelerator reads the split in order and
  copies it over once (``read_split``). Only where the pixels come from differs: the random
  numbers, and so the tasks, are the same bit for bit.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import mmap
import multiprocessing
import os
import tempfile
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from mamlrun.data.download import is_writable_dir, user_cache_dir
from mamlrun.data.fingerprint import Fingerprint, of_classes
from mamlrun.data.tasks import SPLITS, TaskBatch, check_split
from mamlrun.errors import MamlrunError

log = logging.getLogger(__name__)

#: Below this many images a process pool costs more than it saves.
_PARALLEL_FROM = 256


@dataclass(frozen=True)
class ImageFile:
    """Where a split's images lie in a cache file: image ``i`` is the ``image_bytes`` bytes at
    ``offset + i * image_bytes`` of ``path``. Knowing it, ``EpisodicImages`` reads the drawn
    images with ``pread`` rather than through the mapping, which would keep every image ever
    drawn in the process's resident memory."""

    path: Path
    offset: int
    image_bytes: int


@dataclass(frozen=True)
class ImageSplit:
    """One split's images grouped by class: ``images[offset_i : offset_i + counts[i]]`` are the
    images of ``classes[i]``, in the order the dataset publishes them. ``file`` is set when
    ``images`` is a mapped view of a cache file (``splits_of``), None for a split built in
    memory (Omniglot, tests), which is then sampled by indexing ``images``."""

    images: torch.Tensor  # uint8 [images, H, W, C]
    counts: list[int]
    classes: list[str]
    file: ImageFile | None = None

    def check(self, where: str) -> None:
        """One-line errors for a split a loader got wrong, before anything indexes it."""
        images = self.images
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise MamlrunError(
                f"{where}: images must be uint8 [images, H, W, C], got "
                f"{images.dtype} {tuple(images.shape)}"
            )
        if self.file is not None and self.file.image_bytes != math.prod(images.shape[1:]):
            raise MamlrunError(
                f"{where}: {self.file.image_bytes} bytes per image in {self.file.path}, but "
                f"the images are {tuple(images.shape[1:])}"
            )
        if len(self.counts) != len(self.classes) or not self.classes:
            raise MamlrunError(f"{where}: {len(self.classes)} classes, {len(self.counts)} counts")
        if min(self.counts) < 1 or sum(self.counts) != images.shape[0]:
            raise MamlrunError(
                f"{where}: class counts add up to {sum(self.counts)} (smallest "
                f"{min(self.counts)}), but there are {images.shape[0]} images"
            )


class ChannelMoments:
    """Running per-channel sums of uint8 ``[n, H, W, C]`` images, in float64, so that a
    split's statistics can be taken chunk by chunk while it is written, never converted whole."""

    def __init__(self, channels: int) -> None:
        self.total = torch.zeros(channels, dtype=torch.float64)
        self.squares = torch.zeros(channels, dtype=torch.float64)
        self.count = 0

    def add(self, images: torch.Tensor, chunk: int = 256) -> None:
        """In chunks of ``chunk`` images: the float64 copy of a whole class (600 images of
        miniImageNet: 100 MB) would cost more memory than the class itself."""
        for start in range(0, images.shape[0], chunk):
            part = images[start : start + chunk].reshape(-1, images.shape[-1]).to(torch.float64)
            self.total += part.sum(0)
            self.squares += part.square().sum(0)
            self.count += part.shape[0]

    def result(self) -> tuple[list[float], list[float]]:
        """Mean and standard deviation on the [0, 1] scale. A channel that never varies gets
        std 1/255 (one grey level) rather than a division by zero."""
        mean = self.total / max(self.count, 1)
        std = (self.squares / max(self.count, 1) - mean.square()).clamp_min(0).sqrt()
        return [float(m) / 255 for m in mean], [max(float(s), 1.0) / 255 for s in std]


def normalisation(
    stats: tuple[list[float], list[float]] | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> tuple[Sequence[float] | None, Sequence[float] | None]:
    """The configured per-channel mean and std, each that is not set taken from ``stats`` (the
    training split's, cached with the images so they are computed once)."""
    if stats is None:
        return mean, std
    return (stats[0] if mean is None else mean), (stats[1] if std is None else std)


def channel_stats(images: torch.Tensor, chunk: int = 256) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 ``[n, H, W, C]`` images, on the [0, 1]
    scale, accumulated in float64 over chunks so a split is never converted whole."""
    moments = ChannelMoments(images.shape[-1])
    moments.add(images, chunk)
    return moments.result()


# ---------------------------------------------------------------------------------------------
# The task source


@dataclass(frozen=True)
class _Stored:
    images: torch.Tensor  # uint8 [images, H, W, C], on the device or the host (or mapped)
    offsets: torch.Tensor  # long [classes], on the sampling device
    counts: torch.Tensor  # long [classes], on the sampling device
    most: int  # the largest class
    reader: _ImageReader | None = None  # set: the images are read from the file, not indexed


class EpisodicImages:
    """N-way K-shot (+ query) classification tasks drawn from per-class image storage.

    ``splits`` maps ``train``/``val``/``test`` to their ``ImageSplit``; ``mean``/``std`` are
    per-channel on the [0, 1] scale (None: the training split's own statistics); ``info`` is
    merged into ``describe()`` (the dataset's format, files, ...). ``augment`` gives every
    training image a random crop after ``crop_padding`` pixels of zero padding and a
    horizontal flip with probability 1/2 (``augment_pixels``); val and test never are.
    """

    task_type = "classification"

    def __init__(
        self,
        name: str,
        splits: Mapping[str, ImageSplit],
        *,
        ways: int,
        shots: int,
        query: int,
        storage: str,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        device: str | torch.device = "cpu",
        info: Mapping | None = None,
        augment: bool,
        crop_padding: int,
    ) -> None:
        self.name = name
        _check_settings(name, splits, ways, shots, query)
        _check_augmentation(name, augment, crop_padding, splits["train"].images.shape[1:3])
        self.ways, self.shots, self.query, self.storage = ways, shots, query, storage
        self.augment, self.crop_padding = augment, crop_padding
        self.device = torch.device(device)
        height, width, channels = splits["train"].images.shape[1:]
        self.input_shape = (channels, height, width)
        self.output_size = ways
        self.classes = {s: list(splits[s].classes) for s in SPLITS}
        self.counts = {s: list(splits[s].counts) for s in SPLITS}
        if mean is None or std is None:
            stats = channel_stats(splits["train"].images)
            mean = stats[0] if mean is None else mean
            std = stats[1] if std is None else std
        self.mean, self.std = _check_normalisation(name, mean, std, channels)
        self._shift = torch.tensor(self.mean, device=self.device).view(-1, 1, 1)
        self._scale = torch.tensor(self.std, device=self.device).view(-1, 1, 1)
        self.info = dict(info or {})
        #: storage=cpu with an accelerator: each meta-batch's images are copied over
        self._copies = storage == "cpu" and not host_is_device(self.device)
        self._splits = {s: self._store(splits[s]) for s in SPLITS}

    def _store(self, split: ImageSplit) -> _Stored:
        """Where each meta-batch's images will come from.

        A split from a cache file is read with ``pread`` wherever it stays in host memory
        (``storage=cpu``, or any storage on a CPU, where "device" is that same memory), so its
        pages stay in the kernel's page cache instead of this process; ``storage=device`` on an
        accelerator reads it in order and copies it over once. A split built in memory is
        indexed (after one copy to the device, for ``storage=device``).
        """
        counts = torch.tensor(split.counts, dtype=torch.long, device=self.device)
        offsets = counts.cumsum(0) - counts
        images, reader = split.images, None
        if split.file is not None and (self.storage == "cpu" or host_is_device(self.device)):
            reader = _ImageReader(split.file)
        elif split.file is not None:
            images = read_split(split.file, split.images.shape, self.device)
        elif self.storage == "device":
            images = split.images.to(self.device)
        else:
            images = split.images.cpu()
        return _Stored(images, offsets, counts, max(split.counts), reader)

    def sample(self, split: str, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        """Draw tasks by indexing: random classes, random distinct images, shuffled labels.

        Support and query are ordered by class slot; the slots' labels are a random
        permutation per task, so the order carries no information. Images beyond a smaller
        class's count get a key no draw can beat, so they are never chosen. Augmentation
        (training split only) draws its numbers after all of these, so turning it off leaves
        the stream, and every run made without it, exactly as it was.
        """
        check_split(split)
        if num_tasks < 1:
            raise MamlrunError(f"{self.name}: num_tasks must be positive, got {num_tasks}")
        stored = self._splits[split]
        n, k, kq = self.ways, self.shots, self.shots + self.query

        def ranks(*shape: int) -> torch.Tensor:
            noise = torch.rand(*shape, generator=generator, device=self.device)
            return noise.argsort(dim=-1, stable=True)

        classes = ranks(num_tasks, stored.counts.shape[0])[:, :n]  # [B, N]
        noise = torch.rand(num_tasks, n, stored.most, generator=generator, device=self.device)
        beyond = torch.arange(stored.most, device=self.device) >= stored.counts[classes, None]
        picks = noise.masked_fill(beyond, 2.0).argsort(dim=-1, stable=True)[..., :kq]
        labels = ranks(num_tasks, n)  # [B, N]: the label of each class slot
        pixels = self._gather(stored, stored.offsets[classes, None] + picks)
        if self.augment and split == "train":
            pixels = augment_pixels(pixels, self.crop_padding, generator)
        x = self._to_input(pixels)
        y = labels.unsqueeze(-1).expand(-1, -1, kq)
        return TaskBatch(
            x[:, :, :k].reshape(num_tasks, n * k, *self.input_shape),
            y[:, :, :k].reshape(num_tasks, n * k),
            x[:, :, k:].reshape(num_tasks, n * self.query, *self.input_shape),
            y[:, :, k:].reshape(num_tasks, n * self.query),
        )

    def _gather(self, stored: _Stored, index: torch.Tensor) -> torch.Tensor:
        """uint8 ``[*index.shape, H, W, C]`` on the device: the images indexed where they are
        stored, or read from the cache file, or gathered on the host and copied over (through
        pinned memory on CUDA, so the copy is asynchronous)."""
        if stored.reader is None and not self._copies:
            return stored.images[index]
        flat = index.flatten().cpu()
        shape = stored.images.shape[1:]
        pinned = self.device.type == "cuda"
        out = torch.empty((flat.shape[0], *shape), dtype=torch.uint8, pin_memory=pinned)
        if stored.reader is not None:
            stored.reader.read(flat.tolist(), out)
        else:
            torch.index_select(stored.images, 0, flat, out=out)
        return out.to(self.device, non_blocking=pinned).view(*index.shape, *shape)

    def _to_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``[..., H, W, C]`` → normalised float ``[..., C, H, W]``."""
        x = pixels.movedim(-1, -3).contiguous().float().div_(255)
        return x.sub_(self._shift).div_(self._scale)

    def describe(self) -> dict:
        """Task shape, split sizes and normalisation, enough to tell two runs' data apart."""
        return {
            "name": self.name,
            "ways": self.ways,
            "shots": self.shots,
            "query": self.query,
            "storage": self.storage,
            "input_shape": list(self.input_shape),
            "classes": {s: len(c) for s, c in self.classes.items()},
            "images": {s: sum(c) for s, c in self.counts.items()},
            "mean": self.mean,
            "std": self.std,
            "augment": self.augment,
            "crop_padding": self.crop_padding,
            **self.info,
        }

    def fingerprint(self) -> Fingerprint:
        """Every split's classes and image counts: what a test checks it reads the same of."""
        return of_classes(self.classes, self.counts)

    def save_splits(self, directory: Path) -> None:
        """Write ``splits.json``: every split's classes in class-index order and their image
        counts, so a result can be traced to exactly the classes it was trained and tested on."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        document = {
            "dataset": self.name,
            "classes": self.classes,
            "images_per_class": self.counts,
        }
        (directory / "splits.json").write_text(json.dumps(document, indent=1) + "\n")


def _check_settings(
    name: str, splits: Mapping[str, ImageSplit], ways: int, shots: int, query: int
) -> None:
    """Task shapes these splits cannot serve, as one line each naming the split. (That the
    settings are in range at all was checked with the config, ``config.ranges``.)"""
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise MamlrunError(f"{name}: no {missing[0]!r} split")
    shape = splits["train"].images.shape[1:]
    for s in SPLITS:
        splits[s].check(f"{name} {s} split")
        if splits[s].images.shape[1:] != shape:
            raise MamlrunError(
                f"{name}: the {s} images are {tuple(splits[s].images.shape[1:])}, "
                f"the train images {tuple(shape)}"
            )
    split = min(SPLITS, key=lambda s: len(splits[s].classes))
    if ways > len(splits[split].classes):
        raise MamlrunError(
            f"{name}: {ways}-way tasks need {ways} classes but the {split!r} split has "
            f"{len(splits[split].classes)}"
        )
    split = min(SPLITS, key=lambda s: min(splits[s].counts))
    fewest = min(splits[split].counts)
    if shots + query > fewest:
        smallest = splits[split].classes[splits[split].counts.index(fewest)]
        raise MamlrunError(
            f"{name}: shots+query K+Q={shots + query} exceeds the {fewest} images of class "
            f"{smallest} in the {split!r} split; lower dataset.shots or dataset.query"
        )


def _check_augmentation(name: str, augment: bool, crop_padding: int, size: Sequence[int]) -> None:
    """The padding must leave some of the image in every crop; it is held against the image
    size only when it will be used (an Omniglot of 8×8 pixels need not know about it)."""
    if augment and crop_padding >= min(size):
        raise MamlrunError(
            f"{name}: crop_padding={crop_padding} must be smaller than the {size[0]}×{size[1]} "
            "images, or a crop could be all padding"
        )


def augment_pixels(pixels: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Each uint8 ``[..., H, W, C]`` image cropped at random from itself padded by ``padding``
    black pixels on each side, then mirrored left to right with probability 1/2: torchvision's
    ``RandomCrop(size, padding)`` followed by ``RandomHorizontalFlip()``, as MetaOptNet trains.

    Done on the raw pixels, before normalisation, so the padding is black as in torchvision,
    and for the whole meta-batch at once on its device: one gather whose row and column
    indices carry each image's offset, and whose column index runs backwards for a flipped
    image. Draws the offsets (rows, then columns) and then the flips from ``generator``.
    """
    height, width, channels = pixels.shape[-3:]
    images = pixels.reshape(-1, height, width, channels)
    count, device = images.shape[0], images.device
    offsets = torch.randint(0, 2 * padding + 1, (2, count, 1), generator=generator, device=device)
    flips = torch.rand(count, 1, generator=generator, device=device) < 0.5
    padded = torch.nn.functional.pad(images, (0, 0, padding, padding, padding, padding))
    rows = offsets[0] + torch.arange(height, device=device)  # [count, H]
    columns = torch.arange(width, device=device).expand(count, width)
    columns = offsets[1] + torch.where(flips, width - 1 - columns, columns)  # [count, W]
    which = torch.arange(count, device=device)[:, None, None]
    return padded[which, rows[:, :, None], columns[:, None, :]].view(pixels.shape)


def _check_normalisation(
    name: str, mean: Sequence[float], std: Sequence[float], channels: int
) -> tuple[list[float], list[float]]:
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) != channels or len(std) != channels:
        raise MamlrunError(
            f"{name}: mean and std need one value per channel ({channels}), got "
            f"{len(mean)} and {len(std)}"
        )
    return mean, std


# ---------------------------------------------------------------------------------------------
# Preprocessing helpers: image files → one uint8 tensor, cached beside the raw files


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def resize_file(path: str, size: int) -> bytes:
    """One image file as RGB ``size``×``size`` pixels (Lanczos), raw bytes in HWC order."""
    return decode_image(path, size, str(path))


def decode_image(source: str | bytes, size: int, where: str) -> bytes:
    """One image (a path, or the bytes of an encoded PNG/JPEG) as RGB ``size``×``size``
    pixels, raw bytes in HWC order; ``where`` names it in the error.

    RGB conversion first because ImageNet and CUB hold some greyscale and CMYK JPEGs; Lanczos
    because the MAML code (and the miniImageNet scripts it used) resized with Pillow's
    antialiasing filter, which is Lanczos. An image already at ``size`` is not resampled.
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.load()
            rgb = image.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
    except UnidentifiedImageError as e:  # its message holds the repr of our BytesIO
        raise MamlrunError(
            f"{where}: not a readable image (no image format Pillow knows); replace it with the "
            "file from your copy of the dataset"
        ) from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise MamlrunError(
            f"{where}: not a readable image ({one_line(e)}); replace it with the file from your "
            "copy of the dataset"
        ) from e
    return rgb.tobytes()


def _resize_chunk(paths: list[str], size: int) -> bytes:
    return b"".join(resize_file(path, size) for path in paths)


def resize_files(paths: Sequence[str], size: int, workers: int | None = None) -> torch.Tensor:
    """uint8 ``[len(paths), size, size, 3]``: every image resized, in order.

    Decoded in forked processes (not spawned: the workers need only Pillow, and re-importing
    torch in each would cost more than it saves); the children never call into torch, which
    is what makes forking a process with torch's threads safe here.
    """
    workers = workers or min(4, os.cpu_count() or 1)
    paths = [str(p) for p in paths]
    if workers > 1 and len(paths) >= _PARALLEL_FROM and "fork" in _start_methods():
        step = -(-len(paths) // (workers * 4))
        chunks = [paths[i : i + step] for i in range(0, len(paths), step)]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*fork.*", DeprecationWarning)
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                pixels = b"".join(pool.map(_resize_chunk, chunks, [size] * len(chunks)))
    else:
        pixels = _resize_chunk(paths, size)
    return torch.frombuffer(bytearray(pixels), dtype=torch.uint8).view(-1, size, size, 3)


def _start_methods() -> list[str]:
    return multiprocessing.get_all_start_methods()


def fingerprint(paths: Sequence[Path]) -> str:
    """A digest of the files' names, sizes and mtimes: cheap to recompute on every run (one
    ``stat`` per file), and it changes when any file is replaced, touched or removed."""
    digest = hashlib.sha1()
    for path in paths:
        stat = Path(path).stat()
        digest.update(f"{Path(path).name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def save_atomic(path: Path, blob: dict) -> bool:
    """``torch.save`` to a temporary file, then rename: a reader never sees half a cache, and
    a reader that memory-mapped the old file keeps a valid mapping. False (with a warning) when
    the folder cannot be written."""
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(tmp_name)
        with os.fdopen(fd, "wb") as f:
            torch.save(blob, f)
        tmp.chmod(0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, path)
        return True
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        log.warning("could not write cache %s (%s)", path, one_line(e))
        return False


# ---------------------------------------------------------------------------------------------
# Encoded images (PNG/JPEG bytes from a pickle or an archive) decoded in order, in bounded memory


def _decode_chunk(blobs: list[bytes], size: int, label: str, start: int) -> bytes:
    return b"".join(
        decode_image(blob, size, f"{label}, image {start + i}") for i, blob in enumerate(blobs)
    )


class DecodePool:
    """Decodes batches of encoded images to uint8 ``[n, size, size, 3]`` and hands each to
    ``deliver(start, pixels)`` in submission order.

    With ``expected`` images or more (a large dataset, not a test fixture) the batches go to
    forked worker processes, at most two per worker in flight, so a dataset of any size passes
    through in bounded memory; fewer are decoded in this process. ``label`` names the source
    in errors (``<file>, image <i>``).
    """

    def __init__(
        self,
        size: int,
        deliver: Callable[[int, torch.Tensor], None],
        label: str,
        expected: int = 0,
        workers: int | None = None,
    ) -> None:
        self.size, self.deliver, self.label = size, deliver, label
        workers = workers or min(4, os.cpu_count() or 1)
        parallel = workers > 1 and expected >= _PARALLEL_FROM and "fork" in _start_methods()
        self._pool = _fork_pool(workers) if parallel else None
        self._ahead = 2 * workers
        self._pending: deque[tuple[int, Future]] = deque()

    def submit(self, start: int, blobs: list[bytes]) -> None:
        if self._pool is None:
            self._hand_on(start, _decode_chunk(blobs, self.size, self.label, start))
            return
        self._pending.append(
            (start, self._pool.submit(_decode_chunk, blobs, self.size, self.label, start))
        )
        while len(self._pending) > self._ahead:
            self._next()

    def _next(self) -> None:
        start, future = self._pending.popleft()
        self._hand_on(start, future.result())

    def _hand_on(self, start: int, pixels: bytes) -> None:
        tensor = torch.frombuffer(bytearray(pixels), dtype=torch.uint8)
        self.deliver(start, tensor.view(-1, self.size, self.size, 3))

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, exc_type, error, trace) -> None:
        try:
            while self._pending and exc_type is None:
                self._next()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)


def _fork_pool(workers: int) -> ProcessPoolExecutor:
    """Forked, not spawned, for the reason ``resize_files`` gives."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*fork.*", DeprecationWarning)
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))


# ---------------------------------------------------------------------------------------------
# A cache of uint8 images written piece by piece and read memory-mapped
#
# Layout: the images, uint8 [count, H, W, C], from byte 0 (so they are mapped without an
# offset), then a JSON header, then its length (8 bytes, little-endian) and a magic number.
# The header holds the key (what the cache was built from), the shape and the dataset's own
# fields (classes and counts per split, statistics). Written under a temporary name and renamed
# once complete, so a reader sees a whole cache or none; an interrupted build leaves nothing.

_MAGIC = b"MAMLU8\x00\x01"
_TRAILER = 16


@dataclass(frozen=True)
class MappedCache:
    images: torch.Tensor  # uint8 [count, H, W, C], memory-mapped
    header: dict


class ImageCacheWriter:
    """Fills a cache of ``count`` images of ``shape`` (H, W, C) at any positions, in any order,
    without holding them: each ``write`` goes straight to the file; ``append`` adds images
    after the last one, for a source whose size is known only as it is read. ``commit(header)``
    makes it appear under ``path``; leaving the ``with`` block without committing removes it."""

    def __init__(self, path: Path, count: int, shape: Sequence[int]) -> None:
        self.path, self.count, self.shape = Path(path), count, tuple(shape)
        self._bytes = math.prod(self.shape)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        except OSError as e:
            raise self._failed(e) from e
        self._tmp, self._file = Path(name), os.fdopen(fd, "r+b")
        self._guard(self._file.truncate, count * self._bytes)

    def write(self, index: int, pixels: torch.Tensor) -> None:
        """Images ``index .. index + len(pixels) - 1``."""
        if pixels.dtype != torch.uint8 or tuple(pixels.shape[1:]) != self.shape:
            raise ValueError(f"expected uint8 [n, {self.shape}], got {pixels.dtype} {pixels.shape}")
        if index < 0 or index + pixels.shape[0] > self.count:
            raise IndexError(f"images {index}+{pixels.shape[0]} beyond {self.count}")
        view = memoryview(pixels.contiguous().numpy()).cast("B")
        self._guard(_pwrite_all, self._file.fileno(), view, index * self._bytes)

    def append(self, pixels: torch.Tensor) -> int:
        """Images after the last one, the cache growing by ``len(pixels)`` (miniImageNet's
        pickles reveal a split's size only once read); returns the index of the first."""
        start = self.count
        self.count += pixels.shape[0]
        try:
            self.write(start, pixels)
        except (ValueError, MamlrunError):
            self.count = start
            raise
        return start

    def commit(self, header: Mapping) -> None:
        document = {**header, "count": self.count, "shape": list(self.shape)}
        blob = json.dumps(document).encode()
        tail = blob + len(blob).to_bytes(8, "little") + _MAGIC
        self._guard(_pwrite_all, self._file.fileno(), tail, self.count * self._bytes)
        self._guard(_flush, self._file.fileno())
        self._file.close()
        self._tmp.chmod(0o644)  # mkstemp's 0600 would hide a shared cache from other users
        self._guard(os.replace, self._tmp, self.path)

    def _guard(self, call: Callable, *args) -> object:
        try:
            return call(*args)
        except OSError as e:
            raise self._failed(e) from e

    def _failed(self, error: OSError) -> MamlrunError:
        return MamlrunError(
            f"cannot write the cache {self.path} ({one_line(error)}); it needs "
            f"{self.count * self._bytes / 1e9:.2f} GB there (or set $XDG_CACHE_HOME to a folder "
            "with room when the data folder is read-only)"
        )

    def __enter__(self) -> ImageCacheWriter:
        return self

    def __exit__(self, exc_type, error, trace) -> None:
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _flush(fd: int) -> None:
    """A finished cache goes to the disk before it is renamed, so that after a crash the cache
    is whole or absent, never a header over images that never reached the disk. It stays in the
    page cache: sampling reads the drawn images with ``pread`` (``_ImageReader``), which keeps
    them there and not in the process, so the first meta-batches of the run that built it read
    from memory."""
    getattr(os, "fdatasync", os.fsync)(fd)  # macOS has no fdatasync


def read_image_cache(path: Path, key: Mapping) -> MappedCache | None:
    """The cache at ``path`` memory-mapped, if it is complete and was built with ``key`` (a
    JSON-able dict); None otherwise, which means: build it again."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(size - _TRAILER, 0))
            trailer = f.read(_TRAILER)
            if len(trailer) != _TRAILER or trailer[8:] != _MAGIC:
                return None
            length = int.from_bytes(trailer[:8], "little")
            f.seek(size - _TRAILER - length)
            header = json.loads(f.read(length))
        if header.get("key") != json.loads(json.dumps(key)):
            return None
        shape = tuple(header["shape"])
        data = header["count"] * math.prod(shape)
        if data + length + _TRAILER != size:
            return None
        return MappedCache(map_for_sampling(path, data).view(header["count"], *shape), header)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        if path.exists():
            log.warning("ignoring unreadable cache %s (%s)", path, one_line(e))
        return None


def map_for_sampling(path: Path, size: int) -> torch.Tensor:
    """The first ``size`` bytes of ``path`` as a uint8 tensor, memory-mapped, advised as random
    access.

    Without the advice the kernel reads ahead around every page a draw touches, so sampled
    images page in their neighbours as well (docs/PERFORMANCE.md, tieredImageNet-sized
    storage, 200 meta-batches: 4 GB of file pages without it, 1.5 GB with it, the drawn
    images' own pages). The mapping is
    private (copy on write, like ``torch.from_file(shared=False)``): a write to the tensor
    never reaches the file. The tensor holds the mapping: it is unmapped when the tensor and
    every view of it are gone.
    """
    if size == 0:  # mmap cannot map nothing
        return torch.empty(0, dtype=torch.uint8)
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    if hasattr(mmap, "MADV_RANDOM"):  # POSIX; elsewhere the mapping works without advice
        mapping.madvise(mmap.MADV_RANDOM)
    return torch.frombuffer(mapping, dtype=torch.uint8)


class _ImageReader:
    """Reads chosen images of one split from its cache file with ``pread``, into a buffer the
    caller owns.

    Read, not indexed through the mapping: a mapped page an image was drawn from stays in the
    process's resident memory, so over a long run RSS grows towards the whole cache (441 MiB
    after 58 miniImageNet meta-batches, docs/PERFORMANCE.md). Read pages live in the kernel's
    page cache, shared and reclaimable, and the process holds only the meta-batch it draws.
    The descriptor is advised as random access (no read-ahead around the drawn images) and
    opened at once, so a missing file fails at start-up. A forked child opens its own on its
    first read, so it never depends on a descriptor whose lifetime the parent manages (the
    inherited copy is closed). The descriptor is closed with the reader.
    """

    def __init__(self, file: ImageFile) -> None:
        self.file = file
        self._pid, self._fd, self._closer = -1, -1, None
        self._descriptor()

    def read(self, images: Sequence[int], out: torch.Tensor) -> None:
        """Images ``images`` (indices into the split) into the uint8 ``out`` [len, H, W, C]."""
        fd, size, start = self._descriptor(), self.file.image_bytes, self.file.offset
        buffer = memoryview(out.numpy()).cast("B")
        for slot, image in enumerate(images):
            target = buffer[slot * size : (slot + 1) * size]
            _pread_exactly(fd, target, start + image * size, self.file.path)

    def _descriptor(self) -> int:
        if self._pid == os.getpid():
            return self._fd
        if self._closer is not None:
            self._closer()  # the descriptor inherited from the parent, this process's copy
        self._fd = _open_cache(self.file.path, "POSIX_FADV_RANDOM")
        self._pid, self._closer = os.getpid(), weakref.finalize(self, os.close, self._fd)
        return self._fd


def host_is_device(device: torch.device) -> bool:
    """Whether ``device`` is host memory, so ``storage=cpu`` and ``storage=device`` are one
    place. The tests replace it to run the accelerator's copying paths on a CPU."""
    return device.type == "cpu"


def read_split(file: ImageFile, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """A whole split (uint8 ``shape``) from its cache file onto ``device``, read in order in
    chunks of about 64 MiB through one host buffer of that size.

    Not copied from the mapping: its random-access advice makes a cold copy read page by page
    (the 813 MB miniImageNet training split took 19.5 s that way, 3.3 s read in order).
    """
    out = torch.empty(tuple(shape), dtype=torch.uint8, device=device)
    per_chunk = max(1, _READ_CHUNK // file.image_bytes)
    staging = torch.empty((min(per_chunk, shape[0]), *shape[1:]), dtype=torch.uint8)
    fd = _open_cache(file.path, "POSIX_FADV_SEQUENTIAL")
    try:
        for first in range(0, shape[0], per_chunk):
            part = staging[: min(per_chunk, shape[0] - first)]
            buffer = memoryview(part.numpy()).cast("B")
            _pread_exactly(fd, buffer, file.offset + first * file.image_bytes, file.path)
            out[first : first + part.shape[0]].copy_(part)
    finally:
        os.close(fd)
    return out


#: How much of a split ``read_split`` reads at a time.
_READ_CHUNK = 64 * 2**20


def _open_cache(path: Path, advice: str) -> int:
    """A read-only descriptor of the cache, advised as ``advice`` where the system can."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise _damaged(path, e) from e
    if hasattr(os, advice):  # Linux; elsewhere the reads work without advice
        os.posix_fadvise(fd, 0, 0, getattr(os, advice))
    return fd


def _pread_exactly(fd: int, buffer: memoryview, offset: int, path: Path) -> None:
    """Fill ``buffer`` from ``offset``, or fail: a short read means the file is not the cache
    that was opened (truncated, or damaged), and a partly filled image must not be trained on."""
    while buffer:
        try:
            got = _pread_into(fd, buffer, offset)
        except OSError as e:
            raise _damaged(path, e) from e
        if got == 0:
            raise _damaged(path, f"it ends at byte {offset}, short of the images its header lists")
        buffer, offset = buffer[got:], offset + got


def _pread_into(fd: int, buffer: memoryview, offset: int) -> int:
    if hasattr(os, "preadv"):  # Linux, macOS 11+: straight into the buffer
        return os.preadv(fd, [buffer], offset)
    data = os.pread(fd, len(buffer), offset)
    buffer[: len(data)] = data
    return len(data)


def _damaged(path: Path, reason: object) -> MamlrunError:
    reason = one_line(reason) if isinstance(reason, BaseException) else reason
    return MamlrunError(
        f"cannot read images from the cache {path} ({reason}); delete it, or run `mamlrun data "
        "prepare dataset=NAME`, to build it again"
    )


def cache_locations(directory: Path, dataset: str, name: str) -> tuple[Path, Path]:
    """Beside the raw files, or in the user cache (tagged by folder) if that is read-only."""
    tag = hashlib.sha1(str(directory.resolve()).encode()).hexdigest()[:10]
    stem, dot, suffix = name.partition(".")
    return directory / name, user_cache_dir() / dataset / f"{stem}-{tag}{dot}{suffix}"


@dataclass(frozen=True)
class CachedSplits:
    """What ``cached_splits`` found or built: the splits (views of the mapped cache), the
    cache's header (the dataset's own fields: statistics, files, ...) and where it is."""

    splits: dict[str, ImageSplit]
    header: dict
    path: Path


def cached_splits(
    directory: Path, dataset: str, name: str, key: Mapping, build: Callable[[Path], None]
) -> CachedSplits:
    """The splits from the cache ``name`` that matches ``key``, beside the raw files or in the
    user cache; when there is none, ``build(path)`` writes one (``write_splits`` or an
    ``ImageCacheWriter``, header from ``splits_header``) where it may."""
    primary, fallback = cache_locations(directory, dataset, name)
    for candidate in (primary, fallback):
        cache = read_image_cache(candidate, key)
        if cache is not None:
            return CachedSplits(splits_of(cache, candidate), cache.header, candidate)
    target = primary if is_writable_dir(directory) else fallback
    log.info("building the %s cache %s (once)", dataset, target)
    start = time.perf_counter()
    build(target)
    log.info("built in %.1f s", time.perf_counter() - start)
    cache = read_image_cache(target, key)
    if cache is None:
        raise MamlrunError(f"{target}: the cache just written cannot be read back; delete it")
    return CachedSplits(splits_of(cache, target), cache.header, target)


def splits_header(key: Mapping, splits: Mapping[str, ImageSplit | tuple], **fields) -> dict:
    """The header a cache of ``splits`` (train, val, test, one after another) carries: its key,
    each split's classes and counts, and the dataset's own ``fields``."""
    described = {
        s: {"classes": list(v.classes), "counts": list(v.counts)}
        if isinstance(v, ImageSplit)
        else {"classes": list(v[0]), "counts": list(v[1])}
        for s, v in splits.items()
    }
    return {"key": dict(key), "splits": described, **fields}


def write_splits(path: Path, key: Mapping, splits: Mapping[str, ImageSplit], **fields) -> None:
    """A cache of splits held in memory (CIFAR, CUB: a few hundred MB at most)."""
    total = sum(splits[s].images.shape[0] for s in SPLITS)
    shape = splits["train"].images.shape[1:]
    with ImageCacheWriter(path, total, shape) as writer:
        start = 0
        for s in SPLITS:
            writer.write(start, splits[s].images)
            start += splits[s].images.shape[0]
        writer.commit(splits_header(key, splits, **fields))


def splits_of(cache: MappedCache, where: Path) -> dict[str, ImageSplit]:
    """The cache's images cut into its splits (views: nothing is read until sampled), each
    with its place in the file ``where``, from which ``EpisodicImages`` reads them."""
    splits, start = {}, 0
    size = math.prod(cache.images.shape[1:])
    for s in SPLITS:
        meta = cache.header["splits"][s]
        end = start + sum(meta["counts"])
        file = ImageFile(Path(where), start * size, size)
        images = cache.images[start:end]
        splits[s] = ImageSplit(images, list(meta["counts"]), list(meta["classes"]), file)
        splits[s].check(f"{where} ({s})")
        start = end
    return splits


def check_classes(
    where: str, split: str, found: Sequence[str], expected: Sequence[str], benchmark: str
) -> None:
    """The classes found must be the split's published ones: the first missing or extra one
    named, so a wrong file or a mixed-up copy is recognised at once."""
    present = set(found)
    missing = [c for c in expected if c not in present]
    extra = sorted(set(found) - set(expected))
    if not missing and not extra:
        return
    first = f"{missing[0]} is missing" if missing else f"{extra[0]} does not belong to it"
    raise MamlrunError(
        f"{where}: not the {split} split of {benchmark} ({len(expected)} classes): "
        f"{first} ({len(missing)} missing, {len(extra)} extra); check that this is the right file"
    )

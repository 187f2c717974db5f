"""The ``.u8`` image cache every image dataset shares: uint8 images written piece by piece,
read back memory-mapped, and the drawn images read with ``pread``.

Unlike ``torch.save``, which needs the whole tensor in memory, the cache can be filled image
batch by image batch as a dataset is decoded or read (tieredImageNet's 16.5 GB could not be
held; miniImageNet's pickles are read one split at a time), and it is mapped back without
being read. Here too: a split's place in the file (``ImageFile``), from which the sampler
reads each meta-batch (``ImageReader``, ``read_split``); where a cache lives
(``cache_locations``: beside the raw files, else in the user cache) and what it was built
from (``fingerprint``); and ``save_atomic`` for the ``torch.save`` files kept elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mamlrun.data.decode import one_line
from mamlrun.data.download import is_writable_dir, user_cache_dir
from mamlrun.data.tasks import SPLITS
from mamlrun.errors import MamlrunError

log = logging.getLogger(__name__)


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

    def reserve(self, count: int) -> None:
        """Room for ``count`` images in all, to be filled with ``write`` at any positions: for
        a source that knows its size only once it starts reading (tieredImageNet's labels)."""
        self.count = max(self.count, count)
        self._guard(self._file.truncate, self.count * self._bytes)

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
    page cache: sampling reads the drawn images with ``pread`` (``ImageReader``), which keeps
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


class ImageReader:
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


def cached_file(
    directory: Path, dataset: str, name: str, key: Mapping, build: Callable[[Path], None]
) -> tuple[MappedCache, Path]:
    """The cache ``name`` that matches ``key``, mapped, and where it is: beside the raw files
    or in the user cache; when there is none, ``build(path)`` writes one (an
    ``ImageCacheWriter``) where it may."""
    primary, fallback = cache_locations(directory, dataset, name)
    for candidate in (primary, fallback):
        cache = read_image_cache(candidate, key)
        if cache is not None:
            return cache, candidate
    target = primary if is_writable_dir(directory) else fallback
    log.info("building the %s cache %s (once)", dataset, target)
    start = time.perf_counter()
    build(target)
    log.info("built in %.1f s", time.perf_counter() - start)
    cache = read_image_cache(target, key)
    if cache is None:
        raise MamlrunError(f"{target}: the cache just written cannot be read back; delete it")
    return cache, target


def cached_splits(
    directory: Path, dataset: str, name: str, key: Mapping, build: Callable[[Path], None]
) -> CachedSplits:
    """The splits from the cache ``name`` that matches ``key`` (``cached_file``; ``build``
    writes it with ``write_splits`` or an ``ImageCacheWriter``, header from
    ``splits_header``)."""
    cache, path = cached_file(directory, dataset, name, key, build)
    return CachedSplits(splits_of(cache, path), cache.header, path)


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

"""Episodic N-way K-shot tasks over any dataset of labelled images, and the preprocessing
helpers (parallel resize, cache fingerprint, atomic save) such datasets share.

A dataset module only has to produce, per split, one uint8 tensor of its images grouped by
class (``ImageSplit``); ``EpisodicImages`` does the rest and implements the ``TaskSource``
Protocol (``data/tasks.py``), so the runner needs no change for a new image dataset.

Why the images are stored the way they are:

* **uint8, channels last** ``[images, H, W, C]``: the layout of the published pickles and of
  Pillow, so loading needs no transposed copy of a split (miniImageNet's training split is
  813 MB as uint8 and would be 3.3 GB as float32). Conversion to float, the channel
  permutation and the per-channel normalisation happen per meta-batch, on its few images.
* **one tensor per split, classes one after another** (offsets and counts beside it): a
  meta-batch is then drawn by indexing alone, as ``OmniglotTasks.sample`` does, with every
  random number from the seeded ``torch.Generator`` on the device, which is what keeps a resumed
  run bitwise equal to an uninterrupted one. Classes may hold different numbers of images.
* ``storage="device"`` keeps the split on the training device (fastest: no host transfer);
  ``storage="cpu"`` keeps it in host memory (or memory-mapped from the cache file) and copies
  each meta-batch's images to the device, through pinned memory where the device is CUDA so the
  copy is asynchronous. Pinning the whole split would gain nothing, since indexing it makes a
  new tensor anyway, and would lock hundreds of MB of a memory-mapped cache in RAM.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from mamlrun.data.tasks import SPLITS, TaskBatch, check_split
from mamlrun.errors import MamlrunError

log = logging.getLogger(__name__)

STORAGE = ("device", "cpu")

#: Below this many images a process pool costs more than it saves.
_PARALLEL_FROM = 256


@dataclass(frozen=True)
class ImageSplit:
    """One split's images grouped by class: ``images[offset_i : offset_i + counts[i]]`` are the
    images of ``classes[i]``, in the order the dataset publishes them."""

    images: torch.Tensor  # uint8 [images, H, W, C]
    counts: list[int]
    classes: list[str]

    def check(self, where: str) -> None:
        """One-line errors for a split a loader got wrong, before anything indexes it."""
        images = self.images
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise MamlrunError(
                f"{where}: images must be uint8 [images, H, W, C], got "
                f"{images.dtype} {tuple(images.shape)}"
            )
        if len(self.counts) != len(self.classes) or not self.classes:
            raise MamlrunError(f"{where}: {len(self.classes)} classes, {len(self.counts)} counts")
        if min(self.counts) < 1 or sum(self.counts) != images.shape[0]:
            raise MamlrunError(
                f"{where}: class counts add up to {sum(self.counts)} (smallest "
                f"{min(self.counts)}), but there are {images.shape[0]} images"
            )


def channel_stats(images: torch.Tensor, chunk: int = 256) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 ``[n, H, W, C]`` images, on the [0, 1]
    scale, accumulated in float64 over chunks so a split is never converted whole. A channel
    that never varies gets std 1/255 (one grey level) rather than a division by zero."""
    channels = images.shape[-1]
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        part = images[start : start + chunk].reshape(-1, channels).to(torch.float64)
        total += part.sum(0)
        squares += part.square().sum(0)
    count = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    return [float(m) / 255 for m in mean], [max(float(s), 1.0) / 255 for s in std]


# ---------------------------------------------------------------------------------------------
# The task source


@dataclass(frozen=True)
class _Stored:
    images: torch.Tensor  # uint8 [images, H, W, C], on the device or the host
    offsets: torch.Tensor  # long [classes], on the sampling device
    counts: torch.Tensor  # long [classes], on the sampling device
    most: int  # the largest class


class EpisodicImages:
    """N-way K-shot (+ query) classification tasks drawn from per-class image storage.

    ``splits`` maps ``train``/``val``/``test`` to their ``ImageSplit``; ``mean``/``std`` are
    per-channel on the [0, 1] scale (None: the training split's own statistics); ``info`` is
    merged into ``describe()`` (the dataset's format, files, ...).
    """

    kind = "classification"

    def __init__(
        self,
        name: str,
        splits: Mapping[str, ImageSplit],
        ways: int = 5,
        shots: int = 1,
        query: int = 15,
        storage: str = "device",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        device: str | torch.device = "cpu",
        info: Mapping | None = None,
    ) -> None:
        self.name = name
        _check_settings(name, splits, ways, shots, query, storage)
        self.ways, self.shots, self.query, self.storage = ways, shots, query, storage
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
        self._copies = storage == "cpu" and self.device.type != "cpu"
        self._splits = {s: self._store(splits[s]) for s in SPLITS}

    def _store(self, split: ImageSplit) -> _Stored:
        images = split.images.to(self.device) if self.storage == "device" else split.images.cpu()
        counts = torch.tensor(split.counts, dtype=torch.long, device=self.device)
        offsets = counts.cumsum(0) - counts
        return _Stored(images, offsets, counts, max(split.counts))

    def sample(self, split: str, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        """Draw tasks by indexing: random classes, random distinct images, shuffled labels.

        Support and query are ordered by class slot; the slots' labels are a random
        permutation per task, so the order carries no information. Images beyond a smaller
        class's count get a key no draw can beat, so they are never chosen.
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
        x = self._to_input(self._gather(stored.images, stored.offsets[classes, None] + picks))
        y = labels.unsqueeze(-1).expand(-1, -1, kq)
        return TaskBatch(
            x[:, :, :k].reshape(num_tasks, n * k, *self.input_shape),
            y[:, :, :k].reshape(num_tasks, n * k),
            x[:, :, k:].reshape(num_tasks, n * self.query, *self.input_shape),
            y[:, :, k:].reshape(num_tasks, n * self.query),
        )

    def _gather(self, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """uint8 ``[*index.shape, H, W, C]`` on the device."""
        if not self._copies:
            return images[index]
        flat = index.flatten().cpu()
        pinned = self.device.type == "cuda"
        out = torch.empty((flat.shape[0], *images.shape[1:]), dtype=torch.uint8, pin_memory=pinned)
        torch.index_select(images, 0, flat, out=out)
        return out.to(self.device, non_blocking=pinned).view(*index.shape, *images.shape[1:])

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
            **self.info,
        }

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
    name: str, splits: Mapping[str, ImageSplit], ways: int, shots: int, query: int, storage: str
) -> None:
    """Impossible task shapes as one line each, naming the split that cannot serve them."""
    for key, value in (("ways", ways), ("shots", shots), ("query", query)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise MamlrunError(f"{name}: {key} must be a positive integer, got {value!r}")
    if storage not in STORAGE:
        raise MamlrunError(f"{name}: storage={storage!r}; expected one of {', '.join(STORAGE)}")
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


def _check_normalisation(
    name: str, mean: Sequence[float], std: Sequence[float], channels: int
) -> tuple[list[float], list[float]]:
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) != channels or len(std) != channels:
        raise MamlrunError(
            f"{name}: mean and std need one value per channel ({channels}), got "
            f"{len(mean)} and {len(std)}"
        )
    if not all(math.isfinite(s) and s > 0 for s in std) or not all(map(math.isfinite, mean)):
        raise MamlrunError(f"{name}: std must be positive and mean finite, got {mean}, {std}")
    return mean, std


# ---------------------------------------------------------------------------------------------
# Preprocessing helpers: image files → one uint8 tensor, cached beside the raw files


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def resize_file(path: str, size: int) -> bytes:
    """One image as RGB ``size``×``size`` pixels (Lanczos), raw bytes in HWC order.

    RGB conversion first because ImageNet holds some greyscale and CMYK JPEGs; Lanczos because
    the MAML code (and the miniImageNet scripts it used) resized with Pillow's antialiasing
    filter, which is Lanczos.
    """
    try:
        with Image.open(path) as image:
            image.load()
            small = image.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise MamlrunError(
            f"{path}: not a readable image ({one_line(e)}); replace it with the file from your "
            "copy of the dataset"
        ) from e
    return small.tobytes()


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


def load_mapped(path: Path) -> dict | None:
    """A cache written by ``save_atomic``, its tensors memory-mapped (read on demand, shared
    between processes through the page cache); None if it is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # whatever is wrong with a cache, rebuilding it fixes it
        log.warning("ignoring unreadable cache %s (%s)", path, one_line(e))
        return None

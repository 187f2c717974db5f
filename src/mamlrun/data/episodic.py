"""Episodic N-way K-shot tasks over any dataset of labelled images: the sampler, its
per-channel normalisation and its augmentation.

A dataset only has to produce, per split, one uint8 tensor of its images grouped by class
(``ImageSplit``, ``data/u8cache.py``); ``EpisodicImages`` does the rest and implements the
``TaskSource`` Protocol (``data/tasks.py``), so the runner needs no change for a new image
dataset.

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
* **a cached split is sampled by reading the file**, not by indexing the mapping
  (``ImageSplit.file``, ``u8cache.ImageReader``): each meta-batch's images are read with
  ``pread`` into a fresh buffer, so the data stays in the kernel's page cache, shared and
  reclaimable, and the process holds only the current meta-batch; indexing the mapping would
  leave every image ever drawn in its resident memory. This is the host-memory case
  (``storage=cpu``, and any storage on a CPU); ``storage=device`` on an accelerator reads the
  split in order and copies it over once (``read_split``). Only where the pixels come from
  differs: the random numbers, and so the tasks, are the same bit for bit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mamlrun.data.fingerprint import Fingerprint, of_classes
from mamlrun.data.tasks import SPLITS, TaskBatch, check_split
from mamlrun.data.u8cache import ImageReader, ImageSplit, read_split
from mamlrun.errors import MamlrunError


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
    reader: ImageReader | None = None  # set: the images are read from the file, not indexed


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
            reader = ImageReader(split.file)
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

    def pool_labels(self, split: str) -> torch.Tensor:
        """The class index of every image of ``split``, in storage order (long, on the device):
        the split as one labelled pool, for supervised pre-training over all its classes."""
        check_split(split)
        stored = self._splits[split]
        classes = torch.arange(stored.counts.shape[0], device=self.device)
        return classes.repeat_interleave(stored.counts)

    def pool_images(
        self, split: str, index: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Images ``index`` (positions in ``pool_labels``' order) of ``split``, read from where
        the split is stored and normalised as tasks are, augmented as training tasks are
        (``augment``, training split only; the numbers drawn from ``generator``)."""
        check_split(split)
        pixels = self._gather(self._splits[split], index.to(self.device))
        if self.augment and split == "train":
            pixels = augment_pixels(pixels, self.crop_padding, generator)
        return self._to_input(pixels)

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


def host_is_device(device: torch.device) -> bool:
    """Whether ``device`` is host memory, so ``storage=cpu`` and ``storage=device`` are one
    place. The tests replace it to run the accelerator's copying paths on a CPU."""
    return device.type == "cpu"

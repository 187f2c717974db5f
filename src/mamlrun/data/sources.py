"""The one data layer of the image benchmarks: what a benchmark's reader delivers, the cache
it is delivered into, and the one ``_target_`` signature of their task sources.

CIFAR-FS, FC100, CUB, miniImageNet and tieredImageNet differ only in how their published files
are read and which classes form each split (their own modules, the readers). A reader hands
this layer class names and uint8 images: held in memory (``ImageData`` of ``ImageSplit``s), or
delivered into a cache (``Reading``: what identifies the files, and a ``deliver(into)`` that
``cached_images`` calls only when no cache of that key exists). The layer writes the cache
(``Delivery``: the images in split order, the classes and counts, the training split's
statistics), maps it back, and ``image_tasks`` serves the splits through ``EpisodicImages``
(normalisation, storage, augmentation, sampling). The settings of the tasks are the same ten
for every benchmark: ``image_tasks`` writes that signature once, without values; the values
live in ``conf/dataset/base/images.yaml`` and what each ``conf/dataset/<name>.yaml`` changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mamlrun.data.episodic import ChannelMoments, EpisodicImages, normalisation
from mamlrun.data.tasks import SPLITS
from mamlrun.data.u8cache import ImageCacheWriter, ImageSplit, cached_splits, splits_header
from mamlrun.errors import MamlrunError


@dataclass(frozen=True)
class ImageData:
    """What a benchmark's loader returns: the three splits, the layout and files they came
    from (recorded in ``describe()``), the training split's statistics when the cache holds
    them (None: computed from the split) and the cache file, if any."""

    splits: Mapping[str, ImageSplit]
    layout: str
    files: list[str]
    stats: tuple[list[float], list[float]] | None = None
    cache: Path | None = None


class Delivery:
    """Where a reader delivers its images as the layer builds a cache: ``append`` (images after
    the last, split after split in train, val, test order) or ``reserve`` and ``write`` (at
    their place, for a reader that reads the images out of class order), and
    ``classes`` (each split's class names and image counts, in class order). The training
    split's images are added to its statistics as they pass."""

    def __init__(self, writer: ImageCacheWriter) -> None:
        self.writer = writer
        self.moments = ChannelMoments(writer.shape[-1])
        self.parts: dict[str, tuple[list[str], list[int]]] = {}

    def append(self, split: str, pixels: torch.Tensor) -> None:
        self.writer.append(pixels)
        self._count(split, pixels)

    def reserve(self, count: int) -> None:
        self.writer.reserve(count)

    def write(self, split: str, index: int, pixels: torch.Tensor) -> None:
        self.writer.write(index, pixels)
        self._count(split, pixels)

    def classes(self, split: str, names: Sequence[str], counts: Sequence[int]) -> None:
        self.parts[split] = (list(names), [int(c) for c in counts])

    def split(self, name: str, split: ImageSplit) -> None:
        """A whole split held in memory."""
        self.append(name, split.images)
        self.classes(name, split.classes, split.counts)

    def _count(self, split: str, pixels: torch.Tensor) -> None:
        if split == "train":
            self.moments.add(pixels)


@dataclass(frozen=True)
class Reading:
    """A benchmark's files, found and identified, not yet read: ``key`` identifies what the
    cache is built from (the reader's layout, class lists and file fingerprint), ``deliver``
    reads the files into a ``Delivery``. The cache ``name`` goes beside the files in
    ``directory``, or in the user cache's ``dataset`` folder where that is read-only."""

    dataset: str
    directory: Path
    name: str
    key: dict
    shape: tuple[int, int, int]  # H, W, C of every image
    layout: str
    files: list[str]
    deliver: Callable[[Delivery], None]


def cached_images(reading: Reading) -> ImageData:
    """The reading's splits from its cache, the files read into it first where there is none
    built from ``reading.key``."""

    def build(target: Path) -> None:
        with ImageCacheWriter(target, 0, reading.shape) as writer:
            delivery = Delivery(writer)
            reading.deliver(delivery)
            missing = [s for s in SPLITS if s not in delivery.parts]
            if missing:
                raise MamlrunError(f"{reading.dataset}: the reader delivered no {missing[0]} split")
            parts = {s: delivery.parts[s] for s in SPLITS}
            stats = list(delivery.moments.result())
            layout, files = reading.layout, reading.files
            writer.commit(
                splits_header(reading.key, parts, stats=stats, layout=layout, files=files)
            )

    cached = cached_splits(reading.directory, reading.dataset, reading.name, reading.key, build)
    stats = cached.header.get("stats")
    stats = (list(stats[0]), list(stats[1])) if stats is not None else None
    return ImageData(cached.splits, reading.layout, reading.files, stats, cached.path)


def served(
    name: str,
    splits: Mapping[str, ImageSplit],
    stats: tuple[list[float], list[float]] | None,
    normalise: tuple[list[float] | None, list[float] | None],
    info: Mapping,
    **task: object,
) -> EpisodicImages:
    """A dataset's splits served as tasks: normalised by the setting ``normalise`` (mean, std)
    or, where null, the training split's ``stats``, and sampled by ``EpisodicImages`` with the
    ``task`` settings (ways, shots, query, storage, device, augmentation): the one place every
    image dataset, the benchmarks and ``dataset=images`` alike, becomes a task source."""
    mean, std = normalisation(stats, *normalise)
    return EpisodicImages(name, splits, mean=mean, std=std, info=info, **task)


def image_tasks(
    name: str, load: Callable[[str | None], ImageData], split: str
) -> Callable[..., EpisodicImages]:
    """The task source of benchmark ``name``: ``load(root)``'s splits served by
    ``EpisodicImages``; ``split`` names whose class split it is, for ``describe()``."""

    def tasks(
        *,
        root: str | None,
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
        data = load(root)
        info = {"layout": data.layout, "files": data.files, "split": split}
        if data.cache is not None:
            info["cache"] = str(data.cache)
        task = {"ways": ways, "shots": shots, "query": query, "storage": storage,
                "device": device, "augment": augment, "crop_padding": crop_padding}  # fmt: skip
        return served(name, data.splits, data.stats, (mean, std), info, **task)

    tasks.__name__ = tasks.__qualname__ = f"{name}_tasks"
    tasks.__doc__ = f"The task source ``conf/dataset/{name}.yaml`` builds."
    return tasks


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

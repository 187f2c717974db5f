"""The one ``_target_`` signature the image benchmarks share.

CIFAR-FS, FC100, CUB, miniImageNet and tieredImageNet differ only in how their images are read
(their own modules); the settings of their tasks (N-way K-shot, storage, normalisation,
augmentation) are the same ten. ``image_tasks`` writes that signature once, without values:
the values live in ``conf/dataset/<name>.yaml``, which ``config.validate`` checks against this
signature and ``--help`` documents.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import torch

from mamlrun.data.episodic import EpisodicImages, normalisation
from mamlrun.data.u8cache import ImageSplit
from mamlrun.errors import MamlrunError


class ImageData(Protocol):
    """What a benchmark's loader returns: the three splits, the layout and files they came
    from (recorded in ``describe()``), the training split's statistics when the cache holds
    them (None: computed from the split) and the cache file, if any."""

    splits: Mapping[str, ImageSplit]
    layout: str
    files: list[str]
    stats: tuple[list[float], list[float]] | None
    cache: Path | None


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
        mean, std = normalisation(data.stats, mean, std)
        info = {"layout": data.layout, "files": data.files, "split": split}
        if data.cache is not None:
            info["cache"] = str(data.cache)
        return EpisodicImages(
            name,
            data.splits,
            ways=ways,
            shots=shots,
            query=query,
            storage=storage,
            mean=mean,
            std=std,
            device=device,
            info=info,
            augment=augment,
            crop_padding=crop_padding,
        )

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

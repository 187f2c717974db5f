"""Specification of the layer the image benchmarks are readers on (``data/sources.py``): a
reader finds and identifies its files (``Reading``) and delivers class names and uint8 images
(``Delivery``); the layer writes the cache once, with the training split's statistics, and
maps it back for every later load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mamlrun.data.episodic import channel_stats
from mamlrun.data.sources import Delivery, Reading, cached_images
from mamlrun.errors import MamlrunError

SHAPE = (6, 6, 3)


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def pixels(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, *SHAPE), generator=generator, dtype=torch.uint8)


IMAGES = {"train": pixels(5, 0), "val": pixels(4, 1), "test": pixels(3, 2)}
CLASSES = {"train": (["a", "b"], [2, 3]), "val": (["c", "d"], [2, 2]), "test": (["e"], [3])}


def reading(directory: Path, deliver, key: str = "v1") -> Reading:
    files = ["listing.txt"]
    return Reading("toy", directory, "cache.u8", {"files": key}, SHAPE, "toy", files, deliver)


def in_order(into: Delivery, calls: list[int]) -> None:
    calls.append(1)
    for split, images in IMAGES.items():
        into.append(split, images[:2])
        into.append(split, images[2:])
        into.classes(split, *CLASSES[split])


def test_a_reader_delivers_once_and_later_loads_map_the_cache(tmp_path):
    calls: list[int] = []
    first = cached_images(reading(tmp_path, lambda into: in_order(into, calls)))
    again = cached_images(reading(tmp_path, lambda into: in_order(into, calls)))

    assert calls == [1] and first.cache == again.cache == tmp_path / "cache.u8"
    for split, images in IMAGES.items():
        assert torch.equal(again.splits[split].images, images)
        assert (again.splits[split].classes, again.splits[split].counts) == CLASSES[split]
    mean, std = channel_stats(IMAGES["train"])
    assert again.stats == (pytest.approx(mean), pytest.approx(std))
    assert (again.layout, again.files) == ("toy", ["listing.txt"])
    cached_images(reading(tmp_path, lambda into: in_order(into, calls), key="v2"))
    assert calls == [1, 1], "another key (changed files) builds again"


def test_images_written_at_their_places_out_of_order_land_in_class_order(tmp_path):
    def scattered(into: Delivery) -> None:
        into.reserve(12)
        base = 0
        for split, images in IMAGES.items():
            for i in reversed(range(len(images))):
                into.write(split, base + i, images[i : i + 1])
            into.classes(split, *CLASSES[split])
            base += len(images)

    data = cached_images(reading(tmp_path, scattered))
    assert all(torch.equal(data.splits[s].images, IMAGES[s]) for s in IMAGES)
    mean, std = channel_stats(IMAGES["train"])
    assert data.stats == (pytest.approx(mean), pytest.approx(std))


def test_a_reader_that_delivers_no_val_split_is_one_line_and_leaves_no_cache(tmp_path):
    def no_val(into: Delivery) -> None:
        for split in ("train", "test"):
            into.append(split, IMAGES[split])
            into.classes(split, *CLASSES[split])

    with pytest.raises(MamlrunError, match="^toy: the reader delivered no val split$"):
        cached_images(reading(tmp_path, no_val))
    assert list(tmp_path.glob("*cache.u8*")) == []

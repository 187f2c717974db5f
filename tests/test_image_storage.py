"""Specification of what the image datasets share below their loaders: a pickled list read in
batches without keeping its items, a cache of uint8 images written piece by piece and read
memory-mapped, and encoded images decoded in order (in forked workers for large datasets)."""

from __future__ import annotations

import gc
import pickle
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from image_fixtures import encoded, py2_pickle
from test_miniimagenet import colour, one_line_error

from mamlrun.data import images
from mamlrun.data.images import DecodePool, ImageCacheWriter, read_image_cache
from mamlrun.data.pickles import stream_list
from mamlrun.errors import MamlrunError


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


# ---------------------------------------------------------------------------------------------
# Streaming a pickled list


@pytest.mark.parametrize("write", [py2_pickle, lambda x: pickle.dumps(x, protocol=4)])
def test_a_pickled_list_arrives_in_the_picklers_batches_and_in_order(tmp_path, write):
    items = [np.full((300,), i % 256, np.uint8) for i in range(2500)]
    path = tmp_path / "list.pkl"
    path.write_bytes(write(items))
    batches: list[tuple[int, int]] = []
    seen: list[int] = []

    def receive(start, batch):
        batches.append((start, len(batch)))
        seen.extend(int(item[0]) for item in batch)

    assert stream_list(path, receive) == 2500
    assert batches == [(0, 1000), (1000, 1000), (2000, 500)]
    assert seen == [i % 256 for i in range(2500)]


def test_a_streamed_list_keeps_no_item_once_its_batch_is_handed_on(tmp_path):
    path = tmp_path / "list.pkl"
    path.write_bytes(py2_pickle([np.full((4000,), i % 256, np.uint8) for i in range(2100)]))
    alive: list[weakref.ref] = []

    def receive(start, batch):
        gc.collect()
        alive.extend(weakref.ref(item) for item in batch)
        earlier = alive[: max(start - 1000, 0)]  # every batch before the previous one
        assert all(ref() is None for ref in earlier)

    stream_list(path, receive)


def test_a_streamed_file_that_is_not_a_list_or_names_code_is_refused(tmp_path):
    path = tmp_path / "dict.pkl"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    assert "holds a dict, not a list" in one_line_error(stream_list, path, lambda *_: None)
    path.write_bytes(pickle.dumps([Path("x")], protocol=2))
    message = one_line_error(stream_list, path, lambda *_: None)
    assert "holds objects other than arrays (pathlib" in message


# ---------------------------------------------------------------------------------------------
# The cache


def pixels(n: int, first: int = 0) -> torch.Tensor:
    return torch.arange(first, first + n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 2, 3, 3)


def test_a_cache_written_out_of_order_reads_back_memory_mapped_with_its_header(tmp_path):
    path = tmp_path / "cache.u8"
    with ImageCacheWriter(path, 10, (2, 3, 3)) as writer:
        writer.write(6, pixels(4, 6))
        writer.write(0, pixels(6))
        writer.commit({"key": {"v": 1}, "note": "x"})
    cache = read_image_cache(path, {"v": 1})

    assert cache.images.dtype == torch.uint8 and cache.images.shape == (10, 2, 3, 3)
    assert cache.images[:, 0, 0, 0].tolist() == list(range(10))
    assert cache.header["note"] == "x" and cache.header["count"] == 10
    assert str(path) in Path("/proc/self/maps").read_text()


def test_a_cache_grows_by_appending_when_its_size_is_known_only_as_it_is_read(tmp_path):
    path = tmp_path / "cache.u8"
    with ImageCacheWriter(path, 0, (2, 3, 3)) as writer:
        assert (writer.append(pixels(3)), writer.append(pixels(4, 3))) == (0, 3)
        with pytest.raises(ValueError):
            writer.append(torch.zeros(1, 2, 3, 1, dtype=torch.uint8))
        writer.commit({"key": {"v": 1}})
    cache = read_image_cache(path, {"v": 1})

    assert cache.header["count"] == 7
    assert cache.images[:, 1, 2, 0].tolist() == list(range(7))


def smaps(path: Path, field: str) -> list[str]:
    """Linux: ``field`` (``Rss``, ``VmFlags``, ...) of each mapping of ``path`` in this process."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.endswith(str(path))]
    found = [next(x for x in lines[i:] if x.startswith(f"{field}:")) for i in starts]
    return [line.split(":", 1)[1].strip() for line in found]


def smaps_flags(path: Path) -> list[list[str]]:
    return [flags.split() for flags in smaps(path, "VmFlags")]


def test_a_cache_is_mapped_for_random_access_privately_and_lives_as_long_as_its_tensor(tmp_path):
    path = tmp_path / "cache.u8"
    with ImageCacheWriter(path, 10, (2, 3, 3)) as writer:
        writer.write(0, pixels(10))
        writer.commit({"key": {"v": 1}})
    view = read_image_cache(path, {"v": 1}).images[4:6]  # nothing else keeps the mapping
    gc.collect()

    assert view[:, 0, 0, 0].tolist() == [4, 5]
    assert [flags for flags in smaps_flags(path) if "rr" in flags]  # MADV_RANDOM: no read-ahead
    view[0] = 99  # copy on write: the file keeps its images
    reopened = read_image_cache(path, {"v": 1}).images
    assert reopened[:, 1, 2, 2].tolist() == list(range(10))
    del view, reopened
    gc.collect()
    assert smaps_flags(path) == []  # unmapped with the last tensor that used it


def test_drawing_one_image_of_a_fresh_cache_makes_that_image_resident_not_the_file(tmp_path):
    """The finished cache is flushed and dropped from the page cache: otherwise the kernel
    keeps it in large folios (2 MB) and maps a whole one for each image drawn."""
    path = tmp_path / "cache.u8"
    with ImageCacheWriter(path, 800, (84, 84, 3)) as writer:  # 17 MB
        for start in range(0, 800, 100):
            writer.write(start, torch.full((100, 84, 84, 3), start // 100, dtype=torch.uint8))
        writer.commit({"key": {}})
    images = read_image_cache(path, {}).images

    assert images[450].flatten().unique().tolist() == [4]
    resident_kib = [int(rss.split()[0]) for rss in smaps(path, "Rss")]
    assert sum(resident_kib) <= 128  # the image's 21 KB, and the neighbours mapped around it


def test_a_cache_is_not_used_when_its_key_differs_or_it_is_incomplete(tmp_path):
    path = tmp_path / "cache.u8"
    with ImageCacheWriter(path, 3, (2, 3, 3)) as writer:
        writer.write(0, pixels(3))
        writer.commit({"key": {"files": "a"}})
    assert read_image_cache(path, {"files": "b"}) is None
    path.write_bytes(path.read_bytes()[:-5])
    assert read_image_cache(path, {"files": "a"}) is None


def test_an_uncommitted_cache_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError), ImageCacheWriter(tmp_path / "c.u8", 4, (2, 3, 3)) as w:
        w.write(0, pixels(2))
        raise RuntimeError("the build failed")
    assert list(tmp_path.iterdir()) == []


def test_a_cache_that_cannot_be_written_says_where_and_how_much_room_it_needs(tmp_path):
    (tmp_path / "not_a_folder").write_text("")
    path = tmp_path / "not_a_folder" / "c.u8"
    message = one_line_error(ImageCacheWriter, path, 1000, (84, 84, 3))
    assert f"cannot write the cache {path}" in message and "0.02 GB" in message


# ---------------------------------------------------------------------------------------------
# Decoding


@pytest.mark.parametrize("parallel", [False, True])
def test_encoded_images_are_decoded_in_submission_order(parallel, monkeypatch):
    if parallel:
        monkeypatch.setattr(images, "_PARALLEL_FROM", 1)
    got: list[tuple[int, torch.Tensor]] = []
    blobs = [encoded(colour(c, 0), (84, 84) if c % 2 else (20, 30), "PNG") for c in range(12)]
    with DecodePool(84, lambda start, px: got.append((start, px)), "x", 12, workers=2) as pool:
        for start in range(0, 12, 3):
            pool.submit(start, blobs[start : start + 3])

    assert [start for start, _ in got] == [0, 3, 6, 9]
    decoded = torch.cat([px for _, px in got])
    assert decoded.shape == (12, 84, 84, 3)
    assert [tuple(decoded[c, 5, 5].tolist()) for c in range(12)] == [
        colour(c, 0) for c in range(12)
    ]


def test_an_unreadable_encoded_image_is_named_by_source_and_index(monkeypatch):
    with pytest.raises(MamlrunError) as error, DecodePool(8, lambda *_: None, "f.pkl") as p:
        p.submit(5, [encoded((1, 2, 3), (8, 8), "PNG"), b"\x89PNG broken"])
    assert "f.pkl, image 6: not a readable image" in str(error.value)

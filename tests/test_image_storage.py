"""Specification of what the image datasets share below their loaders: a pickled list read in
batches without keeping its items, a cache of uint8 images written piece by piece and read
memory-mapped, tasks sampled from such a cache by reading the drawn images from the file (not
through the mapping), and encoded images decoded in order (in forked workers for large
datasets)."""

from __future__ import annotations

import dataclasses
import gc
import os
import pickle
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from image_fixtures import encoded, py2_pickle
from test_miniimagenet import colour, one_line_error

from mamlrun.data import decode, u8cache
from mamlrun.data.decode import DecodePool
from mamlrun.data.episodic import EpisodicImages
from mamlrun.data.pickles import stream_list
from mamlrun.data.u8cache import (
    ImageCacheWriter,
    ImageSplit,
    read_image_cache,
    read_split,
    splits_of,
    write_splits,
)
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
# Sampling from a cache file


def cached(tmp_path: Path, size: int = 12) -> dict[str, ImageSplit]:
    """Three splits of random images, classes of different sizes, written to a cache and cut
    from it as the datasets' loaders do (``splits_of``): each split knows its place in the file."""
    g = torch.Generator().manual_seed(0)
    counts = {"train": [5, 7, 6, 9], "val": [5, 6, 5], "test": [8, 5, 5]}
    splits = {
        s: ImageSplit(
            torch.randint(0, 256, (sum(c), size, size, 3), generator=g, dtype=torch.uint8),
            c,
            [f"{s}{i}" for i in range(len(c))],
        )
        for s, c in counts.items()
    }
    path = tmp_path / "cache.u8"
    write_splits(path, {"v": 1}, splits)
    return splits_of(read_image_cache(path, {"v": 1}), path)


def source_of(splits: dict[str, ImageSplit], **settings) -> EpisodicImages:
    settings = {"ways": 3, "shots": 2, "query": 2, "storage": "device", "mean": [0.5] * 3,
                "std": [0.25] * 3, "augment": False, "crop_padding": 2, **settings}  # fmt: skip
    return EpisodicImages("x", splits, **settings)


def in_memory(splits: dict[str, ImageSplit]) -> dict[str, ImageSplit]:
    """The same splits without their file: sampled by indexing the mapping, as before."""
    return {s: dataclasses.replace(split, file=None) for s, split in splits.items()}


def resident_kib(path: Path) -> int:
    """Linux: how much of ``path`` this process's mappings hold resident."""
    return sum(int(rss.split()[0]) for rss in smaps(path, "Rss"))


def descriptors_of(path: Path) -> int:
    """Linux: how many of this process's open descriptors are ``path``."""
    found = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            found += os.readlink(f"/proc/self/fd/{fd}") == str(path)
        except OSError:  # the descriptor listdir itself used, closed by now
            pass
    return found


def test_splits_cut_from_a_cache_know_where_their_images_lie_in_the_file(tmp_path):
    splits = cached(tmp_path)
    image = 12 * 12 * 3

    assert [splits[s].file.offset for s in ("train", "val", "test")] == [0, 27 * image, 43 * image]
    assert {splits[s].file.path for s in splits} == {tmp_path / "cache.u8"}
    assert {splits[s].file.image_bytes for s in splits} == {image}


#: The three paths from storage to a meta-batch: host memory (a CPU, where both storages are
#: one place), and on an accelerator ``storage=cpu`` (copied per meta-batch) or ``device``.
PATHS = [("device", "host"), ("cpu", "accelerator"), ("device", "accelerator")]


def placed(request, where: str) -> None:
    if where == "accelerator":
        request.getfixturevalue("as_on_an_accelerator")


def copies(storage: str, where: str) -> bool:
    """Whether each meta-batch is gathered on the host and copied over."""
    return storage == "cpu" and where == "accelerator"


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("storage,where", PATHS)
def test_tasks_read_from_the_cache_file_are_bitwise_those_indexing_its_mapping_gives(
    tmp_path, storage, where, augment, request
):
    placed(request, where)
    splits = cached(tmp_path)
    read = source_of(splits, storage=storage, augment=augment)
    indexed = source_of(in_memory(splits), storage=storage, augment=augment)
    assert read._copies == indexed._copies == copies(storage, where)
    whole = storage == "device" and where == "accelerator"  # read into the device at once
    assert all((stored.reader is None) == whole for stored in read._splits.values())
    assert all(stored.reader is None for stored in indexed._splits.values())

    g, h = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for split in ("train", "val", "test", "train"):
        a, b = read.sample(split, 5, g), indexed.sample(split, 5, h)
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert read.describe() == indexed.describe()


@pytest.mark.parametrize("storage,where", PATHS)
def test_any_images_in_any_order_and_repeated_are_read_as_indexing_would_give_them(
    tmp_path, storage, where, request
):
    placed(request, where)
    splits = cached(tmp_path)
    source = source_of(splits, storage=storage)
    assert source._copies == copies(storage, where)
    index = torch.tensor([[[26, 0, 26], [3, 3, 3]], [[13, 1, 0], [25, 7, 14]]])

    for split in ("train", "val", "test"):
        within = index % splits[split].images.shape[0]
        gathered = source._gather(source._splits[split], within)
        assert gathered.shape == (2, 2, 3, 12, 12, 3)
        assert torch.equal(gathered, splits[split].images[within])


def test_a_meta_batch_read_from_the_cache_leaves_none_of_it_resident_in_the_process(tmp_path):
    """The drawn images pass through the kernel's page cache, not through this process's
    mapping of the cache; indexing that mapping would keep them (which is checked too, so the
    measure is known to see them)."""
    splits = cached(tmp_path, size=84)  # 21 KB per image
    path = tmp_path / "cache.u8"
    if not Path("/proc/self/smaps").exists():
        pytest.skip("needs Linux's /proc/self/smaps")
    source = source_of(splits)
    before = resident_kib(path)
    batch = source.sample("train", 4, torch.Generator().manual_seed(1))

    assert resident_kib(path) == before
    reference = source_of(in_memory(splits)).sample("train", 4, torch.Generator().manual_seed(1))
    assert all(torch.equal(u, v) for u, v in zip(batch, reference, strict=True))
    assert resident_kib(path) >= before + 21 * 4  # the mapping indexed: the images are resident


def test_a_cache_cut_short_while_in_use_is_a_one_line_error_saying_to_rebuild_it(tmp_path):
    splits = cached(tmp_path)
    path = tmp_path / "cache.u8"
    source = source_of(splits, storage="cpu")
    os.truncate(path, 100)  # inside the first training image: no draw can be read whole
    message = one_line_error(source.sample, "train", 1, torch.Generator().manual_seed(0))

    assert f"cannot read images from the cache {path}" in message
    assert "delete it, or run `mamlrun data prepare" in message


def test_each_split_opens_the_cache_once_and_closes_it_with_the_source(tmp_path):
    splits = cached(tmp_path)
    path = tmp_path / "cache.u8"
    if not Path("/proc/self/fd").exists():
        pytest.skip("needs Linux's /proc/self/fd")
    mapped = descriptors_of(path)  # the mapping keeps one of its own
    source = source_of(splits)
    for _ in range(3):
        source.sample("val", 2, torch.Generator().manual_seed(0))
    assert descriptors_of(path) == mapped + 3

    del source
    gc.collect()
    assert descriptors_of(path) == mapped


def test_a_forked_process_reads_through_its_own_descriptor_and_draws_the_same(tmp_path):
    source = source_of(cached(tmp_path))
    expected = source.sample("train", 3, torch.Generator().manual_seed(5))
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports, then leaves without running pytest's teardown
        try:
            batch = source.sample("train", 3, torch.Generator().manual_seed(5))
            same = all(torch.equal(u, v) for u, v in zip(batch, expected, strict=True))
            own = source._splits["train"].reader._pid == os.getpid()  # opened here, again
            os.write(write_end, f"same={same} own={own}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as report:
        answer = report.read()
    os.waitpid(pid, 0)
    assert answer == "same=True own=True"


def test_a_split_for_an_accelerator_is_read_in_order_chunk_by_chunk_and_whole(
    tmp_path, monkeypatch
):
    """What ``storage=device`` does on CUDA, here onto the CPU: sequential reads of a few
    images at a time, never through the mapping (whose random-access advice would make a cold
    copy read page by page)."""
    splits = cached(tmp_path)
    monkeypatch.setattr(u8cache, "_READ_CHUNK", 4 * 12 * 12 * 3 + 1)  # 4 images per read
    path = tmp_path / "cache.u8"
    before = resident_kib(path)
    read = {
        s: read_split(split.file, split.images.shape, torch.device("cpu"))
        for s, split in splits.items()
    }
    assert resident_kib(path) == before
    assert all(torch.equal(read[s], splits[s].images) for s in splits)


# ---------------------------------------------------------------------------------------------
# Decoding


@pytest.mark.parametrize("parallel", [False, True])
def test_encoded_images_are_decoded_in_submission_order(parallel, monkeypatch):
    if parallel:
        monkeypatch.setattr(decode, "_PARALLEL_FROM", 1)
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

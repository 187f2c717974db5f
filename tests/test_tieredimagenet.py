"""Specification of the tieredImageNet task source: Ren et al.'s PNG pickles decoded, once and
in bounded memory, into a memory-mapped cache; the split's sizes and disjointness checked.

The real data is not needed: the tests write the six pickles as published (Python 2 pickles,
PNGs as the uint8 arrays ``cv2.imencode`` returns) or as Python 3 would (PNG bytes), with a
few classes per split (``TIERED_SMALL``), and pass those sizes as ``split_sizes``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import adapts_after_training, count_calls, run_cli
from image_fixtures import (
    SPLITS,
    TIERED_SMALL,
    TIERED_SMALL_SIZES,
    full_tiered_classes,
    py2_pickle,
    write_tiered,
)
from test_miniimagenet import colour, one_line_error, origin, task_settings

from mamlrun.data import tieredimagenet
from mamlrun.data.episodic import EpisodicImages
from mamlrun.data.tieredimagenet import SPLIT_SIZES, load_tieredimagenet


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path):
    """Each test gets its own user cache and no data-root override."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("MAMLRUN_DATA", raising=False)


def load(root: Path, **kwargs):
    return load_tieredimagenet(root, split_sizes=kwargs.pop("sizes", TIERED_SMALL_SIZES))


@pytest.fixture
def count_builds(monkeypatch) -> list[int]:
    """Each call of the expensive build (which still runs)."""
    return count_calls(monkeypatch, tieredimagenet, "build_cache")


def settings(**changes) -> dict:
    """``conf/dataset/tieredimagenet.yaml``'s task settings with ``changes``."""
    return task_settings("tieredimagenet", **changes)


def test_split_sizes_are_ren_et_als_351_97_160_classes_from_20_6_8_categories():
    assert SPLIT_SIZES == {"train": (351, 20), "val": (97, 6), "test": (160, 8)}


# ---------------------------------------------------------------------------------------------
# Loading


def test_python2_pickles_of_png_arrays_load_as_uint8_84x84_class_after_class(tmp_path):
    write_tiered(tmp_path, per_class=lambda c: 2 + c)
    data = load(tmp_path)

    for split in SPLITS:
        images = data.splits[split]
        assert images.classes == TIERED_SMALL[split][0]
        assert images.counts == [2 + c for c in range(len(images.classes))]
        assert images.images.dtype == torch.uint8
        assert images.images.shape == (sum(images.counts), 84, 84, 3)
    second_class_third_image = data.splits["train"].images[2 + 2, 40, 40]
    assert second_class_third_image.tolist() == list(colour(1, 2))


def test_python3_pickles_of_png_bytes_stored_interleaved_give_the_same_splits(tmp_path):
    write_tiered(tmp_path / "py2")
    write_tiered(tmp_path / "py3", python2=False, interleave=True)
    py2, py3 = load(tmp_path / "py2"), load(tmp_path / "py3")

    for split in SPLITS:
        assert torch.equal(py2.splits[split].images, py3.splits[split].images)
        assert py3.splits[split].counts == py2.splits[split].counts
    assert py3.splits["val"].classes == ["val_class_000", "val_class_001", "val_class_002"]


def test_the_folder_the_published_archive_extracts_to_is_read_too(tmp_path):
    write_tiered(tmp_path, folder="tieredimagenet/tiered-imagenet")
    data = load(tmp_path)
    assert data.splits["test"].classes == TIERED_SMALL["test"][0]
    assert (tmp_path / "tieredimagenet" / "tiered-imagenet" / "cache_84.u8").is_file()


def test_splits_are_disjoint_and_describe_themselves_in_splits_json(tmp_path):
    write_tiered(tmp_path)
    data = load(tmp_path)
    source = EpisodicImages("tieredimagenet", data.splits, **settings(ways=3, shots=1, query=2))
    source.save_splits(tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "splits.json").read_text())

    assert saved["classes"] == {s: TIERED_SMALL[s][0] for s in SPLITS}
    every = [c for s in SPLITS for c in saved["classes"][s]]
    assert len(every) == len(set(every))
    assert source.describe()["images"] == {"train": 12, "val": 9, "test": 9}


def test_tasks_sampled_from_the_memory_mapped_cache_come_from_their_own_classes(tmp_path):
    write_tiered(tmp_path, per_class=4)
    data = load(tmp_path)
    chosen = settings(ways=3, shots=1, query=2, storage="cpu", mean=[0.0] * 3, std=[1.0] * 3)
    source = EpisodicImages("tieredimagenet", data.splits, **chosen)
    batch = source.sample("train", 8, torch.Generator().manual_seed(0))

    assert batch.x_support.shape == (8, 3, 3, 84, 84) and batch.x_query.shape == (8, 6, 3, 84, 84)
    classes, _ = origin(torch.cat([batch.x_support, batch.x_query], dim=1))
    labels = torch.cat([batch.y_support, batch.y_query], dim=1)
    for t in range(8):
        pairs = set(zip(labels[t].tolist(), classes[t].tolist(), strict=True))
        assert len(pairs) == 3  # one class per label


# ---------------------------------------------------------------------------------------------
# The cache


def test_cache_is_written_beside_the_pickles_and_reused_memory_mapped(tmp_path, count_builds):
    directory = write_tiered(tmp_path)
    first, second = load(tmp_path), load(tmp_path)

    assert count_builds == [1]
    for split in SPLITS:
        assert torch.equal(first.splits[split].images, second.splits[split].images)
    assert first.stats == second.stats and first.stats is not None
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(directory / "cache_84.u8") in maps.read_text()


def test_cache_is_rebuilt_when_a_pickle_changes(tmp_path, count_builds):
    directory = write_tiered(tmp_path)
    load(tmp_path)
    write_tiered(tmp_path, per_class=lambda c: 3 + (c == 0))  # val's first class gains one
    labels = directory / "val_labels.pkl"
    stat = labels.stat()
    os.utime(labels, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    data = load(tmp_path)

    assert count_builds == [1, 1]
    assert data.splits["val"].counts == [4, 3, 3]


def test_read_only_data_folder_gets_its_cache_in_the_user_cache(tmp_path, count_builds):
    directory = write_tiered(tmp_path)
    directory.chmod(0o555)
    try:
        load(tmp_path)
        load(tmp_path)
    finally:
        directory.chmod(0o755)
    assert not (directory / "cache_84.u8").exists()
    assert list((tmp_path / "xdg" / "mamlrun" / "tieredimagenet").glob("cache_84-*.u8"))
    assert count_builds == [1]


def test_a_failed_build_leaves_no_cache_and_no_partial_file(tmp_path):
    directory = write_tiered(tmp_path)
    blob = py2_pickle([np.frombuffer(b"\x89PNG\r\n\x1a\n broken", np.uint8).reshape(-1, 1)] * 9)
    (directory / "test_images_png.pkl").write_bytes(blob)
    message = one_line_error(load, tmp_path)

    assert "test_images_png.pkl, image 0: not a readable image (no image format Pillow" in message
    assert "object at 0x" not in message
    assert sorted(p.name for p in directory.iterdir() if not p.name.endswith(".pkl")) == []


# ---------------------------------------------------------------------------------------------
# Each bad input is one line that says which file and what to do


def test_missing_data_names_the_layout_and_that_there_is_no_download(tmp_path):
    message = one_line_error(load, tmp_path)
    assert str(tmp_path / "tieredimagenet") in message
    assert "{train,val,test}_images_png.pkl and {train,val,test}_labels.pkl" in message
    assert "dataset.root" in message and "no official download" in message


def test_a_missing_pickle_is_named(tmp_path):
    directory = write_tiered(tmp_path)
    (directory / "val_labels.pkl").unlink()
    assert "val_labels.pkl is missing" in one_line_error(load, tmp_path)


def test_an_html_page_saved_as_the_images_pickle_is_recognised(tmp_path):
    directory = write_tiered(tmp_path)
    page = b"<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title>"
    (directory / "train_images_png.pkl").write_bytes(page)
    message = one_line_error(load, tmp_path)
    assert "train_images_png.pkl is an HTML page, not a pickle" in message


def test_a_truncated_images_pickle_is_reported_with_its_file(tmp_path):
    directory = write_tiered(tmp_path)
    path = directory / "val_images_png.pkl"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    message = one_line_error(load, tmp_path)
    assert "val_images_png.pkl is truncated or corrupt" in message
    assert "download it again" in message


@pytest.mark.parametrize(
    "sizes,expected",
    [
        ({**TIERED_SMALL_SIZES, "val": (4, 2)}, "3 classes, but tieredImageNet's val split has 4"),
        ({**TIERED_SMALL_SIZES, "train": (4, 3)}, "2 categories, but tieredImageNet's train"),
    ],
)
def test_a_split_of_the_wrong_size_is_refused(tmp_path, sizes, expected):
    write_tiered(tmp_path)
    message = one_line_error(load, tmp_path, sizes=sizes)
    assert expected in message and "20/6/8" in message


def test_a_class_in_two_splits_is_refused(tmp_path):
    classes = {**TIERED_SMALL, "test": (["n02110063", "n01531178", "n02110341"], ["n02084071"])}
    write_tiered(tmp_path, classes=classes)
    message = one_line_error(load, tmp_path)
    assert "'n01531178' is in the train and the test split" in message


def test_images_and_labels_from_different_copies_are_refused(tmp_path):
    directory = write_tiered(tmp_path)
    other = write_tiered(tmp_path / "other", per_class=2)
    (directory / "test_images_png.pkl").write_bytes((other / "test_images_png.pkl").read_bytes())
    message = one_line_error(load, tmp_path)
    assert "test_images_png.pkl holds 6 images but test_labels.pkl labels 9" in message


# ---------------------------------------------------------------------------------------------
# A real run


@pytest.mark.slow
def test_training_the_1_shot_preset_on_a_full_size_fixture_writes_results(tmp_path):
    write_tiered(tmp_path / "data", classes=full_tiered_classes(), per_class=2)
    out = run_cli(
        "train", "experiment=tieredimagenet_5w1s", f"dataset.root={tmp_path / 'data'}",
        "dataset.query=1", "iterations=2", "val_every=2", "val_tasks=2", "eval_batch_size=2",
        "checkpoint_every=2", "final_test=true", "test_tasks=2",
        "meta_optimizer.task_batching=loop", "device=cpu", "hydra.run.dir=run",
        cwd=tmp_path, env={"OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "xdg")},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert results["steps"] == 2 and results["dataset"]["name"] == "tieredimagenet"
    assert results["preset"] == "tieredimagenet_5w1s" and results["reference"]["value"] == 0.5167
    assert {s: len(c) for s, c in splits["classes"].items()} == {
        "train": 351,
        "val": 97,
        "test": 160,
    }
    assert (tmp_path / "data" / "tieredimagenet" / "cache_84.u8").is_file()
    adapts_after_training(tmp_path, {"XDG_CACHE_HOME": str(tmp_path / "xdg")})

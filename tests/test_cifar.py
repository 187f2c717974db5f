"""Specification of the CIFAR-FS and FC100 task sources: CIFAR-100's official archive (read,
downloaded when missing, cut into each benchmark's splits once into a memory-mapped cache) and
MetaOptNet's pickles, both checked against the published class splits.

The real data is not needed: the archive fixture holds all 100 classes with three images each
(two from the official training set, one from its test set), written as the real one is
(Python 2 pickles, images in channel planes, classes interleaved).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import pytest
import torch
from conftest import adapts_after_training, count_calls, run_cli
from image_fixtures import (
    CIFARFS_SPLITS,
    FC100_SPLITS,
    FC100_SUPERCLASSES,
    FINE_LABELS,
    SPLITS,
    SUPERCLASSES,
    py2_pickle,
    write_cifar_archive,
    write_cifar_pickles,
)
from test_miniimagenet import colour, one_line_error

from mamlrun import config
from mamlrun.data import cifar, download
from mamlrun.data.cifar import load_cifar
from mamlrun.data.episodic import channel_stats

REAL_OPEN_URL = download._open_url


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path):
    """Each test gets its own user cache, no data-root override and no network."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("MAMLRUN_DATA", raising=False)

    def refuse(url):
        raise AssertionError(f"test tried to download {url}")

    monkeypatch.setattr(download, "_open_url", refuse)


@pytest.fixture
def count_builds(monkeypatch) -> list[int]:
    """Each call of the expensive build (which still runs)."""
    return count_calls(monkeypatch, cifar, "read_archive")


# ---------------------------------------------------------------------------------------------
# The published splits


def test_the_loaders_tables_are_the_published_ones():
    """The fixtures write the published lists (image_fixtures.py), not the loader's: this
    names the table that went wrong before the archive's cross-check would."""
    assert cifar.FINE_LABELS == FINE_LABELS and cifar.SUPERCLASSES == SUPERCLASSES
    assert cifar.CIFARFS_SPLITS == CIFARFS_SPLITS
    assert cifar.FC100_SUPERCLASSES == FC100_SUPERCLASSES and cifar.FC100_SPLITS == FC100_SPLITS


def test_cifar100_has_100_classes_in_20_superclasses_of_five():
    assert len(set(FINE_LABELS)) == 100
    assert len(SUPERCLASSES) == 20 and all(len(f) == 5 for f in SUPERCLASSES.values())


@pytest.mark.parametrize(
    "splits,sizes", [(CIFARFS_SPLITS, (64, 16, 20)), (FC100_SPLITS, (60, 20, 20))]
)
def test_each_benchmark_splits_all_100_classes_disjointly(splits, sizes):
    assert tuple(len(splits[s]) for s in SPLITS) == sizes
    assert sorted(c for s in SPLITS for c in splits[s]) == list(FINE_LABELS)


# ---------------------------------------------------------------------------------------------
# Loading the archive and the pickles


@pytest.mark.parametrize("name,splits", [("cifarfs", CIFARFS_SPLITS), ("fc100", FC100_SPLITS)])
def test_the_archive_gives_each_split_its_classes_train_and_test_images_merged(
    tmp_path, name, splits
):
    write_cifar_archive(tmp_path)
    data = load_cifar(name, tmp_path)

    assert data.layout == "archive"
    for split in SPLITS:
        part = data.splits[split]
        assert part.classes == list(splits[split])
        assert part.counts == [3] * len(splits[split])
        assert part.images.dtype == torch.uint8
        assert part.images.shape == (3 * len(splits[split]), 32, 32, 3)
    label = FINE_LABELS.index(splits["test"][1])
    test_image_of_second_class = data.splits["test"].images[3 + 2, 7, 7]  # after 2 train ones
    assert test_image_of_second_class.tolist() == list(colour(label, 2))


@pytest.mark.parametrize("name,python2", [("cifarfs", True), ("fc100", False)])
def test_metaoptnets_pickles_give_the_same_splits_as_the_archive(tmp_path, name, python2):
    splits = {"cifarfs": CIFARFS_SPLITS, "fc100": FC100_SPLITS}[name]
    write_cifar_archive(tmp_path / "archive")
    write_cifar_pickles(tmp_path / "pickles", name, splits, per_class=3, python2=python2)
    archive = load_cifar(name, tmp_path / "archive")
    pickles = load_cifar(name, tmp_path / "pickles")

    assert pickles.layout == "pickle"
    for split in SPLITS:
        assert pickles.splits[split].classes == archive.splits[split].classes
        assert torch.equal(pickles.splits[split].images, archive.splits[split].images)


def test_tasks_are_32x32_and_normalised_with_the_training_splits_statistics(tmp_path):
    write_cifar_archive(tmp_path)
    chosen = config.settings("dataset", "cifarfs", root=str(tmp_path), query=2, device="cpu")
    source = cifar.cifarfs_tasks(**chosen)
    batch = source.sample("val", 3, torch.Generator().manual_seed(0))

    assert batch.x_support.shape == (3, 5, 3, 32, 32) and batch.x_query.shape == (3, 10, 3, 32, 32)
    stats = channel_stats(load_cifar("cifarfs", tmp_path).splits["train"].images)
    assert source.mean == pytest.approx(stats[0]) and source.std == pytest.approx(stats[1])
    assert source.describe()["classes"] == {"train": 64, "val": 16, "test": 20}


# ---------------------------------------------------------------------------------------------
# The cache and the download


def test_the_archive_is_read_once_and_its_cache_reused_memory_mapped(tmp_path, count_builds):
    archive = write_cifar_archive(tmp_path)
    first, second = load_cifar("fc100", tmp_path), load_cifar("fc100", tmp_path)

    assert count_builds == [1]
    assert (archive.parent / "cache_fc100_32.u8").is_file()
    assert first.stats == second.stats
    assert str(archive.parent / "cache_fc100_32.u8") in open("/proc/self/maps").read()


def test_the_cache_is_rebuilt_when_the_archive_changes(tmp_path, count_builds):
    archive = write_cifar_archive(tmp_path)
    load_cifar("cifarfs", tmp_path)
    write_cifar_archive(tmp_path, train_per_class=3)
    stat = archive.stat()
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    data = load_cifar("cifarfs", tmp_path)

    assert count_builds == [1, 1]
    assert data.splits["train"].counts == [4] * 64


def test_a_missing_archive_is_downloaded_md5_checked_then_used(tmp_path, monkeypatch):
    served = write_cifar_archive(tmp_path / "server")
    monkeypatch.setattr(cifar, "URL", served.as_uri())
    monkeypatch.setattr(cifar, "MD5", hashlib.md5(served.read_bytes()).hexdigest())
    monkeypatch.setattr(download, "_open_url", REAL_OPEN_URL)  # file:// only
    data = load_cifar("cifarfs", tmp_path / "data")

    assert (tmp_path / "data" / "cifar100" / cifar.ARCHIVE).read_bytes() == served.read_bytes()
    assert data.splits["val"].counts == [3] * 16


def test_a_download_with_the_wrong_md5_names_the_file_and_the_manual_routes(tmp_path, monkeypatch):
    served = write_cifar_archive(tmp_path / "server")
    monkeypatch.setattr(cifar, "URL", served.as_uri())
    monkeypatch.setattr(download, "_open_url", REAL_OPEN_URL)  # file:// only
    message = one_line_error(load_cifar, "fc100", tmp_path / "data")

    assert "downloaded cifar-100-python.tar.gz has md5" in message
    assert f"expected {cifar.MD5}; discarded" in message
    assert "by hand into" in message and "FC100_{train,val,test}.pickle" in message
    assert not (tmp_path / "data").exists(), "no file, and no folder made for it"


# ---------------------------------------------------------------------------------------------
# Each bad input is one line that says which file and what to do


def test_an_html_page_saved_as_the_archive_is_recognised(tmp_path):
    path = tmp_path / "cifar100" / cifar.ARCHIVE
    path.parent.mkdir()
    path.write_bytes(b"<!doctype html><html><body>Quota exceeded</body></html>")
    message = one_line_error(load_cifar, "cifarfs", tmp_path)
    assert f"{path} is an HTML page, not the CIFAR-100 archive" in message
    assert "delete it and run again to download it" in message


def test_a_truncated_archive_is_reported_with_its_file(tmp_path):
    path = write_cifar_archive(tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    message = one_line_error(load_cifar, "cifarfs", tmp_path)
    assert f"{path} is truncated or corrupt" in message
    assert not list(path.parent.glob("*.u8*")) and not list(path.parent.glob(".cache*"))


def test_an_archive_of_other_classes_is_refused(tmp_path):
    path = tmp_path / "cifar100" / cifar.ARCHIVE
    path.parent.mkdir()
    meta = py2_pickle({b"fine_label_names": [b"airplane", b"automobile"]})
    with tarfile.open(path, "w:gz") as tar:
        for name in ("meta", "train", "test"):
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(meta)
            tar.addfile(info, io.BytesIO(meta))
    message = one_line_error(load_cifar, "cifarfs", tmp_path)
    assert "meta does not name CIFAR-100's classes (class 0 is 'airplane', not 'apple')" in message


def test_an_archive_whose_superclasses_are_not_cifar_100s_is_refused(tmp_path):
    write_cifar_archive(tmp_path, relabelled={"whale": "fish"})
    message = one_line_error(load_cifar, "fc100", tmp_path)
    assert "class whale is in superclass fish, CIFAR-100 puts it in aquatic_mammals" in message


def test_an_html_page_saved_as_a_pickle_is_recognised(tmp_path):
    directory = write_cifar_pickles(tmp_path, "cifarfs", CIFARFS_SPLITS)
    page = b"<html><head><title>Google Drive - Virus scan warning</title></head></html>"
    (directory / "CIFAR_FS_val.pickle").write_bytes(page)
    message = one_line_error(load_cifar, "cifarfs", tmp_path)
    assert "CIFAR_FS_val.pickle is an HTML page, not a pickle" in message


def test_a_missing_pickle_is_named(tmp_path):
    directory = write_cifar_pickles(tmp_path, "fc100", FC100_SPLITS)
    (directory / "FC100_test.pickle").unlink()
    assert "FC100_test.pickle is missing" in one_line_error(load_cifar, "fc100", tmp_path)


def test_a_pickle_of_the_wrong_split_names_the_first_missing_or_extra_class(tmp_path):
    splits = {**CIFARFS_SPLITS, "val": ("whale", *CIFARFS_SPLITS["val"][1:])}  # beaver → whale
    write_cifar_pickles(tmp_path, "cifarfs", splits)
    message = one_line_error(load_cifar, "cifarfs", tmp_path)
    assert "CIFAR_FS_val.pickle: not the val split of Bertinetto et al. (16 classes)" in message
    assert "beaver is missing (1 missing, 1 extra)" in message


def test_fc100_pickles_holding_a_class_of_another_superclass_are_refused(tmp_path):
    splits = {**FC100_SPLITS, "test": (*FC100_SPLITS["test"][:-1], "bear")}  # woman → bear
    write_cifar_pickles(tmp_path, "fc100", splits, python2=False)
    message = one_line_error(load_cifar, "fc100", tmp_path)
    assert "FC100_test.pickle: not the test split of Oreshkin et al. (FC100)" in message
    assert "woman is missing" in message


# ---------------------------------------------------------------------------------------------
# Config and real runs


def test_each_dataset_alone_picks_its_maml_preset():
    from conftest import compose_train

    from mamlrun.cli.overrides import CommandLine, with_dataset_preset

    for name in ("cifarfs", "fc100"):
        line = with_dataset_preset(CommandLine([], [f"dataset={name}"]))
        assert line.overrides[0] == f"experiment={name}_5w1s"
        cfg = compose_train(*line.overrides)
        assert (cfg.backbone.filters, cfg.backbone.downsample, cfg.meta_batch_size) == (
            32,
            "max_pool",
            4,
        )
        assert "Table" in cfg.reference.source and cfg.reference.inner_steps == 10


def run_preset(tmp_path, preset: str, root):
    return run_cli(
        "train", f"experiment={preset}", f"dataset.root={root}", "dataset.query=1",
        "iterations=2", "val_every=2", "val_tasks=2", "eval_batch_size=2",
        "checkpoint_every=2", "final_test=true", "test_tasks=2",
        "meta_optimizer.task_batching=loop", "device=cpu", "hydra.run.dir=run",
        cwd=tmp_path, env={"OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "xdg")},
    )  # fmt: skip


@pytest.mark.slow
def test_training_the_cifar_fs_preset_from_the_archive_writes_results(tmp_path):
    write_cifar_archive(tmp_path / "data")
    out = run_preset(tmp_path, "cifarfs_5w1s", tmp_path / "data")
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["steps"] == 2 and results["dataset"]["layout"] == "archive"
    assert results["preset"] == "cifarfs_5w1s" and results["reference"]["value"] == 0.589
    test = json.loads((tmp_path / "run" / "test" / "results.json").read_text())
    assert (test["test_tasks"], test["inner_steps"]) == (2, 10)
    adapts_after_training(tmp_path, {"XDG_CACHE_HOME": str(tmp_path / "xdg")})


@pytest.mark.slow
def test_training_the_fc100_preset_from_the_pickles_writes_results(tmp_path):
    write_cifar_pickles(tmp_path / "data", "fc100", FC100_SPLITS, per_class=6)
    out = run_preset(tmp_path, "fc100_5w5s", tmp_path / "data")
    assert out.returncode == 0, out.stderr
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert splits["classes"] == {s: list(FC100_SPLITS[s]) for s in SPLITS}
    adapts_after_training(tmp_path)

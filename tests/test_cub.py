"""Specification of the CUB task source: CUB-200-2011 with Chen et al.'s (2019) 100/50/50
split, from the extracted folder or the official archive (read in one pass, downloaded when
missing), resized to 84×84 once into a memory-mapped cache.

The real data is not needed: the fixtures hold the real listings (``classes.txt`` names all
200 species) and a few tiny JPEGs for the species a test uses, with varying counts per species.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from conftest import adapts_after_training, count_calls, run_cli
from image_fixtures import CUB_CLASSES, SPLITS, write_cub_archive, write_cub_folder
from test_miniimagenet import colour, one_line_error, task_settings

from mamlrun.data import cub, download, sources
from mamlrun.data.cub import CLASSES, SPLIT_CLASSES, load_cub, split_of
from mamlrun.data.episodic import EpisodicImages

REAL_OPEN_URL = download._open_url
#: Two species per split, in name order within each split.
SMALL = {
    "train": ("001.Black_footed_Albatross", "003.Sooty_Albatross"),
    "val": ("002.Laysan_Albatross", "006.Least_Auklet"),
    "test": ("004.Groove_billed_Ani", "008.Rhinoceros_Auklet"),
}
SMALL_SPECIES = sorted(c for s in SPLITS for c in SMALL[s])


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path):
    """Each test gets its own user cache, no data-root override and no network."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("MAMLRUN_DATA", raising=False)

    def refuse(url):
        raise AssertionError(f"test tried to download {url}")

    monkeypatch.setattr(download, "_open_url", refuse)


def load(root, **kwargs):
    return load_cub(root, split_classes=kwargs.pop("split_classes", SMALL))


def per_species(c: int) -> int:
    return 3 + c % 3  # 3, 4 or 5 images: species differ in size, as in CUB


@pytest.fixture
def count_builds(monkeypatch) -> list[int]:
    """Each call of the expensive build (which still runs)."""
    return count_calls(monkeypatch, sources, "Delivery")


# ---------------------------------------------------------------------------------------------
# The split


def test_the_loaders_species_are_those_of_the_published_classes_txt():
    """The fixtures write ``classes.txt`` from the published list (image_fixtures.py), not from
    the loader's table, so the loader's cross-check compares two sources."""
    assert cub.CLASSES == CUB_CLASSES


def test_chen_et_als_rule_splits_the_200_species_100_50_50():
    assert len(CLASSES) == 200 and [int(c[:3]) for c in CLASSES] == list(range(1, 201))
    assert {s: len(SPLIT_CLASSES[s]) for s in SPLITS} == {"train": 100, "val": 50, "test": 50}
    assert sorted(c for s in SPLITS for c in SPLIT_CLASSES[s]) == list(CLASSES)
    assert [split_of(i) for i in range(8)] == ["train", "val", "train", "test"] * 2


def test_the_rule_gives_the_class_lists_torchmeta_ships():
    """torchmeta/datasets/assets/cub/{val,test}.json: their first and last species."""
    assert SPLIT_CLASSES["val"][:2] == ("002.Laysan_Albatross", "006.Least_Auklet")
    assert SPLIT_CLASSES["val"][-1] == "198.Rock_Wren"
    assert SPLIT_CLASSES["test"][:2] == ("004.Groove_billed_Ani", "008.Rhinoceros_Auklet")
    assert SPLIT_CLASSES["test"][-1] == "200.Common_Yellowthroat"
    assert SPLIT_CLASSES["train"][-1] == "199.Winter_Wren"


# ---------------------------------------------------------------------------------------------
# Loading the folder and the archive


def test_the_folder_loads_as_84x84_uint8_with_each_species_own_count(tmp_path):
    write_cub_folder(tmp_path, species=SMALL_SPECIES, per_class=per_species)
    data = load(tmp_path)

    assert data.layout == "folder"
    for split in SPLITS:
        part = data.splits[split]
        assert part.classes == list(SMALL[split])
        assert part.counts == [per_species(SMALL_SPECIES.index(c)) for c in SMALL[split]]
        assert part.images.dtype == torch.uint8
        assert part.images.shape == (sum(part.counts), 84, 84, 3)
    third_image_of_first_test_species = data.splits["test"].images[2, 42, 42].int()
    expected = torch.tensor(colour(SMALL_SPECIES.index(SMALL["test"][0]), 2))
    assert (third_image_of_first_test_species - expected).abs().max() <= 3  # JPEG rounding


def test_the_archive_gives_the_same_splits_as_the_folder(tmp_path):
    write_cub_folder(tmp_path / "folder", species=SMALL_SPECIES, per_class=per_species)
    write_cub_archive(tmp_path / "archive", species=SMALL_SPECIES, per_class=per_species)
    folder, archive = load(tmp_path / "folder"), load(tmp_path / "archive")

    assert archive.layout == "archive"
    assert sorted(p.name for p in (tmp_path / "archive" / "cub").iterdir()) == [
        "CUB_200_2011.tgz",
        "cache_84.u8",
    ]
    for split in SPLITS:
        assert archive.splits[split].counts == folder.splits[split].counts
        assert torch.equal(archive.splits[split].images, folder.splits[split].images)


def test_tasks_draw_species_of_different_sizes_and_normalise_per_channel(tmp_path):
    write_cub_folder(tmp_path, species=SMALL_SPECIES, per_class=per_species)
    data = load(tmp_path)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    chosen = task_settings("cub", ways=2, shots=1, query=2, mean=mean, std=std)
    source = EpisodicImages("cub", data.splits, **chosen)
    batch = source.sample("test", 4, torch.Generator().manual_seed(0))

    assert batch.x_support.shape == (4, 2, 3, 84, 84) and batch.x_query.shape == (4, 4, 3, 84, 84)
    assert source.describe()["images"] == {
        s: sum(per_species(SMALL_SPECIES.index(c)) for c in SMALL[s]) for s in SPLITS
    }


# ---------------------------------------------------------------------------------------------
# The cache and the download


def test_the_cache_is_reused_and_rebuilt_when_an_image_changes(tmp_path, count_builds):
    folder = write_cub_folder(tmp_path, species=SMALL_SPECIES)
    load(tmp_path)
    load(tmp_path)
    image = next((folder / "images" / SMALL["val"][1]).iterdir())
    image.write_bytes(image.read_bytes() + b"\0")
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load(tmp_path)

    assert count_builds == [1, 1]
    assert (tmp_path / "cub" / "cache_84.u8").is_file()


def test_a_missing_archive_is_downloaded_md5_checked_then_used(tmp_path, monkeypatch):
    served = write_cub_archive(tmp_path / "server", species=SMALL_SPECIES)
    monkeypatch.setattr(cub, "URL", served.as_uri())
    monkeypatch.setattr(cub, "MD5", hashlib.md5(served.read_bytes()).hexdigest())
    monkeypatch.setattr(download, "_open_url", REAL_OPEN_URL)  # file:// only
    data = load(tmp_path / "data")

    assert (tmp_path / "data" / "cub" / cub.ARCHIVE).read_bytes() == served.read_bytes()
    assert data.splits["train"].counts == [2, 2]


def test_a_download_with_the_wrong_md5_leaves_nothing_and_names_both_routes(tmp_path, monkeypatch):
    served = write_cub_archive(tmp_path / "server", species=SMALL_SPECIES)
    monkeypatch.setattr(cub, "URL", served.as_uri())
    monkeypatch.setattr(download, "_open_url", REAL_OPEN_URL)
    message = one_line_error(load, tmp_path / "data")

    got = hashlib.md5(served.read_bytes()).hexdigest()
    assert f"downloaded CUB_200_2011.tgz has md5 {got}" in message
    assert f"expected {cub.MD5}; discarded, download" in message
    assert "or extract it there (CUB_200_2011/ with images/" in message
    assert not (tmp_path / "data").exists(), "no file, and no folder made for it"


# ---------------------------------------------------------------------------------------------
# Each bad input is one line that says which file and what to do


def test_an_html_page_saved_as_the_archive_is_recognised(tmp_path):
    path = tmp_path / "cub" / cub.ARCHIVE
    path.parent.mkdir()
    path.write_bytes(b"\n<!DOCTYPE html>\n<html><title>Caltech DATA</title></html>")
    message = one_line_error(load, tmp_path)
    assert f"{path} is an HTML page, not the CUB-200-2011 archive" in message


def test_a_truncated_archive_is_reported_with_its_file_and_leaves_no_cache(tmp_path):
    path = write_cub_archive(tmp_path, species=SMALL_SPECIES)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    message = one_line_error(load, tmp_path)
    assert f"{path} is truncated or corrupt" in message and "download it" in message
    assert sorted(p.name for p in path.parent.iterdir()) == ["CUB_200_2011.tgz"]


def test_an_image_listed_but_absent_is_named(tmp_path):
    folder = write_cub_folder(tmp_path, species=SMALL_SPECIES)
    image = next((folder / "images" / SMALL["train"][1]).iterdir())
    image.unlink()
    message = one_line_error(load, tmp_path)
    assert f"{image} is listed in images.txt but missing" in message


def test_a_corrupt_image_is_named(tmp_path):
    folder = write_cub_folder(tmp_path, species=SMALL_SPECIES)
    image = next((folder / "images" / SMALL["test"][0]).iterdir())
    image.write_bytes(image.read_bytes()[:30])
    assert f"{image}: not a readable image" in one_line_error(load, tmp_path)


def test_listings_that_disagree_are_refused(tmp_path):
    folder = write_cub_folder(tmp_path, species=SMALL_SPECIES)
    labels = (folder / "image_class_labels.txt").read_text().replace("1 1\n", "1 5\n", 1)
    (folder / "image_class_labels.txt").write_text(labels)
    message = one_line_error(load, tmp_path)
    assert "images.txt puts image 1 in 001.Black_footed_Albatross" in message
    assert "image_class_labels.txt in 005.Crested_Auklet" in message


def test_a_classes_txt_with_two_ids_swapped_is_refused(tmp_path):
    folder = write_cub_folder(tmp_path, species=SMALL_SPECIES)
    text = (folder / "classes.txt").read_text()
    first, second = "1 001.Black_footed_Albatross\n", "2 002.Laysan_Albatross\n"
    assert text.startswith(first + second)
    swapped = text.replace(first + second, "1 002.Laysan_Albatross\n2 001.Black_footed_Albatross\n")
    (folder / "classes.txt").write_text(swapped)
    message = one_line_error(load, tmp_path)
    assert "images.txt puts image 1 in 001.Black_footed_Albatross" in message
    assert "image_class_labels.txt in 002.Laysan_Albatross" in message


def test_a_split_missing_a_species_names_it(tmp_path):
    write_cub_folder(tmp_path, species=[c for c in SMALL_SPECIES if c != "006.Least_Auklet"])
    message = one_line_error(load, tmp_path)
    assert "not the val split of Chen et al. 2019 (CUB) (2 classes)" in message
    assert "006.Least_Auklet is missing (1 missing, 0 extra)" in message


def test_a_species_that_is_not_cubs_is_refused(tmp_path):
    folder = write_cub_folder(tmp_path, species=SMALL_SPECIES)
    text = (folder / "classes.txt").read_text().replace("Sooty_Albatross", "Dodo")
    (folder / "classes.txt").write_text(text)
    message = one_line_error(load, tmp_path)
    assert "classes.txt: 003.Dodo is not a CUB-200-2011 species" in message


# ---------------------------------------------------------------------------------------------
# Config and a real run


def test_dataset_cub_alone_trains_chen_et_als_maml_setup():
    from conftest import compose_train

    from mamlrun.cli.overrides import CommandLine, with_dataset_preset

    line = with_dataset_preset(CommandLine([], ["dataset=cub"]))
    assert line.overrides[0] == "experiment=cub_5w1s"
    cfg = compose_train(*line.overrides)
    assert (cfg.backbone.filters, cfg.dataset.query, cfg.meta_batch_size) == (64, 16, 4)
    mo = cfg.meta_optimizer
    assert (mo.inner_steps, mo.inner_steps_test, mo.loss_normalization) == (5, 5, "mean")
    assert cfg.reference.inner_steps == 5 and "Table 1" in cfg.reference.source
    assert compose_train("experiment=cub_5w5s").iterations == 40000


@pytest.mark.slow
def test_training_the_1_shot_preset_from_the_archive_writes_results(tmp_path):
    write_cub_archive(tmp_path / "data", per_class=2)
    out = run_cli(
        "train", "experiment=cub_5w1s", f"dataset.root={tmp_path / 'data'}", "dataset.query=1",
        "iterations=2", "val_every=2", "val_tasks=2", "eval_batch_size=2",
        "checkpoint_every=2", "final_test=true", "test_tasks=2",
        "meta_optimizer.task_batching=loop", "device=cpu", "hydra.run.dir=run",
        cwd=tmp_path, env={"OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "xdg")},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert results["dataset"]["layout"] == "archive" and results["reference"]["value"] == 0.5592
    assert {s: len(c) for s, c in splits["classes"].items()} == {
        "train": 100,
        "val": 50,
        "test": 50,
    }
    adapts_after_training(tmp_path, {"XDG_CACHE_HOME": str(tmp_path / "xdg")})

"""Specification of the miniImageNet task source and the episodic image layer under it.

The real data is not needed: every test writes small fixtures in the two published on-disk
layouts (Ren et al.'s pickles, Ravi & Larochelle's ``images/`` + CSVs) under ``tmp_path``. Most
use a few real class ids per split (``SMALL``, passed as ``split_classes``); the end-to-end run
uses all 100 published ones with two images each. Every fixture image is one flat colour that
encodes its class (red) and its index within the class (green), so a test can read back where a
sampled image came from.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import adapts_after_training, compose_train, count_calls, run_cli
from PIL import Image

from mamlrun import config
from mamlrun.cli.overrides import CommandLine, with_dataset_preset
from mamlrun.data import miniimagenet
from mamlrun.data.episodic import EpisodicImages, channel_stats
from mamlrun.data.miniimagenet import SPLIT_CLASSES, load_miniimagenet
from mamlrun.errors import MamlrunError

SMALL = {
    "train": ("n01532829", "n01558993", "n01704323", "n01749939"),
    "val": ("n01855672", "n02091244", "n02114548"),
    "test": ("n01930112", "n01981276", "n02099601"),
}
SPLITS = ("train", "val", "test")


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path):
    """Each test gets its own user cache and no data-root override."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("MAMLRUN_DATA", raising=False)


def colour(class_number: int, index: int) -> tuple[int, int, int]:
    return (20 * class_number + 10, 10 * index + 5, 200 - 7 * (class_number + index))


def class_images(class_number: int, count: int, size: int = 84) -> np.ndarray:
    pixels = [np.full((size, size, 3), colour(class_number, i), np.uint8) for i in range(count)]
    return np.stack(pixels)


def counts_of(classes, per_class) -> list[int]:
    return [per_class(i) if callable(per_class) else per_class for i in range(len(classes))]


def write_pickles(
    root: Path,
    classes=SMALL,
    per_class=4,
    protocol: int = 4,
    val_name: str = "mini-imagenet-cache-val.pkl",
    shuffle: bool = False,
) -> Path:
    """``mini-imagenet-cache-{split}.pkl`` as Ren et al. publish them: a dict of ``image_data``
    (uint8 N×84×84×3, classes one after another) and ``class_dict`` (class → indices)."""
    directory = root / "miniimagenet"
    directory.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        counts = counts_of(classes[split], per_class)
        data = np.concatenate([class_images(c, n) for c, n in enumerate(counts)])
        starts = np.cumsum([0, *counts[:-1]])
        pairs = zip(classes[split], starts, counts, strict=True)
        class_dict = {w: list(range(start, start + n)) for w, start, n in pairs}
        if shuffle:  # same content, images stored in another order
            order = np.random.default_rng(0).permutation(len(data))
            data = data[np.argsort(order)]
            class_dict = {w: [int(order[i]) for i in idx] for w, idx in class_dict.items()}
        name = val_name if split == "val" else f"mini-imagenet-cache-{split}.pkl"
        blob = {"image_data": data, "class_dict": class_dict}
        (directory / name).write_bytes(pickle.dumps(blob, protocol=protocol))
    return directory


def write_ravi(root: Path, classes=SMALL, per_class=4) -> Path:
    """The Ravi layout: ``images/<wnid><8 digits>.jpg`` at their original (here: tiny, varied)
    sizes, and ``{split}.csv`` with the header ``filename,label``."""
    directory = root / "miniimagenet"
    (directory / "images").mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        lines = ["filename,label"]
        counts = counts_of(classes[split], per_class)
        for c, (wnid, n) in enumerate(zip(classes[split], counts, strict=True)):
            for i in range(n):
                name = f"{wnid}{i + 1:08d}.jpg"
                size = (12 + 3 * i, 10 + 2 * c)
                Image.new("RGB", size, colour(c, i)).save(directory / "images" / name, "JPEG")
                lines.append(f"{name},{wnid}")
        (directory / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return directory


def tasks(root: Path, classes=SMALL, **settings) -> EpisodicImages:
    """The source ``miniimagenet_tasks`` builds, on the small class lists."""
    data = load_miniimagenet(root, split_classes=classes)
    settings = task_settings("miniimagenet", **{"ways": 3, "shots": 1, "query": 2, **settings})
    return EpisodicImages("miniimagenet", data.splits, **settings)


def task_settings(dataset: str, **changes) -> dict:
    """``conf/dataset/<dataset>.yaml``'s settings of ``EpisodicImages`` with ``changes``."""
    settings = config.settings("dataset", dataset, **changes)
    del settings["root"]  # the loader's, not the sampler's
    return settings


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(MamlrunError) as error:
        call(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message, message
    return message


def origin(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class number, index in class) of normalised images ``[..., 3, H, W]`` with mean 0 and
    std 1, read back from their colour."""
    pixel = (x[..., :, 0, 0] * 255).round().long()
    return (pixel[..., 0] - 10) // 20, (pixel[..., 1] - 5) // 10


# ---------------------------------------------------------------------------------------------
# The published split


def test_split_classes_are_ravi_and_larochelles_64_16_20_disjoint_wnids():
    sizes = {s: len(SPLIT_CLASSES[s]) for s in SPLITS}
    every = [c for s in SPLITS for c in SPLIT_CLASSES[s]]
    assert sizes == {"train": 64, "val": 16, "test": 20}
    assert len(set(every)) == 100
    assert all(c.startswith("n") and len(c) == 9 and c[1:].isdigit() for c in every)
    assert SPLIT_CLASSES["val"][0] == "n01855672" and SPLIT_CLASSES["test"][-1] == "n07613480"


# ---------------------------------------------------------------------------------------------
# Loading both layouts


@pytest.mark.parametrize(
    "protocol,val_name",
    [(2, "mini-imagenet-cache-val.pkl"), (4, "mini-imagenet-cache-validation.pkl")],
)
def test_pickles_load_as_uint8_in_the_published_class_order(tmp_path, protocol, val_name):
    write_pickles(tmp_path, protocol=protocol, val_name=val_name)
    data = load_miniimagenet(tmp_path, split_classes=SMALL)

    assert data.layout == "pickle"
    for split in SPLITS:
        images = data.splits[split]
        assert images.classes == list(SMALL[split])
        assert images.images.dtype == torch.uint8
        assert images.images.shape == (4 * len(SMALL[split]), 84, 84, 3)
    second_class_third_image = data.splits["train"].images[4 + 2, 40, 40]
    assert second_class_third_image.tolist() == list(colour(1, 2))


def test_pickles_written_by_numpy_1_load_under_numpy_2(tmp_path):
    """The published pickles predate numpy 2, which renamed ``numpy.core`` to ``numpy._core``."""
    directory = write_pickles(tmp_path, protocol=2)
    for path in directory.glob("*.pkl"):
        blob = path.read_bytes()
        assert b"numpy._core" in blob
        path.write_bytes(blob.replace(b"numpy._core", b"numpy.core"))  # as numpy 1 wrote them
    data = load_miniimagenet(tmp_path, split_classes=SMALL)
    assert data.splits["test"].images[4 * 2 + 1, 0, 0].tolist() == list(colour(2, 1))


def test_pickle_whose_images_are_not_stored_class_by_class_is_regrouped(tmp_path):
    write_pickles(tmp_path, shuffle=True)
    train = load_miniimagenet(tmp_path, split_classes=SMALL).splits["train"]
    expected = np.concatenate([class_images(c, 4) for c in range(4)])
    assert torch.equal(train.images, torch.from_numpy(expected))


def test_ravi_layout_is_resized_to_84x84_with_the_same_classes_as_the_pickles(tmp_path):
    write_ravi(tmp_path / "ravi", per_class=lambda c: 3 + c)
    write_pickles(tmp_path / "pkl", per_class=lambda c: 3 + c)
    ravi = load_miniimagenet(tmp_path / "ravi", split_classes=SMALL)
    pkl = load_miniimagenet(tmp_path / "pkl", split_classes=SMALL)

    assert ravi.layout == "ravi"
    for split in SPLITS:
        a, b = ravi.splits[split], pkl.splits[split]
        assert (a.classes, a.counts) == (b.classes, b.counts)
        assert a.images.dtype == torch.uint8 and a.images.shape == b.images.shape
        difference = (a.images.int() - b.images.int()).abs().max()
        assert difference <= 3  # JPEG's rounding of a flat colour


# ---------------------------------------------------------------------------------------------
# The cache both layouts are written into


@pytest.fixture
def pickle_builds(monkeypatch) -> list[int]:
    """Each build of the cache from the pickles (which still runs)."""
    return count_calls(monkeypatch, miniimagenet, "build_from_pickles")


@pytest.fixture
def ravi_builds(monkeypatch) -> list[int]:
    """Each build of the cache from the Ravi layout, decoding every image (which still runs)."""
    return count_calls(monkeypatch, miniimagenet, "build_ravi")


def mapped_files() -> str:
    """Linux: the files this process has memory-mapped ('' elsewhere)."""
    maps = Path("/proc/self/maps")
    return maps.read_text() if maps.exists() else ""


def pickled_content(directory: Path, split: str) -> tuple[list[str], np.ndarray]:
    """What a pickle holds: its classes and their images, class after class."""
    blob = pickle.loads(next(directory.glob(f"mini-imagenet-cache-{split}*.pkl")).read_bytes())
    classes = list(blob["class_dict"])
    images = [blob["image_data"][blob["class_dict"][c]] for c in classes]
    return classes, np.concatenate(images)


def touch_later(path: Path) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def test_pickles_are_written_once_into_a_cache_beside_them_and_reused_memory_mapped(
    tmp_path, pickle_builds
):
    directory = write_pickles(tmp_path)
    first = load_miniimagenet(tmp_path, split_classes=SMALL)
    second = load_miniimagenet(tmp_path, split_classes=SMALL)

    assert pickle_builds == [1]
    assert first.cache == second.cache == directory / "cache_84.u8"
    assert second.layout == "pickle"
    assert second.files == [f"mini-imagenet-cache-{s}.pkl" for s in SPLITS]
    for split in SPLITS:
        assert torch.equal(first.splits[split].images, second.splits[split].images)
    assert first.stats == second.stats
    if mapped_files():
        assert str(directory / "cache_84.u8") in mapped_files()


@pytest.mark.parametrize("protocol", [2, 4])
def test_the_cache_holds_what_the_pickles_hold_in_the_published_class_order(tmp_path, protocol):
    shuffled = {s: tuple(reversed(SMALL[s])) for s in SPLITS}  # class_dict in another order
    directory = write_pickles(tmp_path, shuffled, per_class=lambda c: 3 + c, protocol=protocol,
                              shuffle=True)  # fmt: skip
    data = load_miniimagenet(tmp_path, split_classes=SMALL)

    for split in SPLITS:
        classes, images = pickled_content(directory, split)
        order = [classes.index(c) for c in SMALL[split]]
        counts = [3 + c for c in range(len(classes))]
        starts = np.cumsum([0, *counts])
        expected = np.concatenate([images[starts[i] : starts[i + 1]] for i in order])
        assert data.splits[split].classes == list(SMALL[split])
        assert data.splits[split].counts == [counts[i] for i in order]
        assert torch.equal(data.splits[split].images, torch.from_numpy(expected))
    mean, std = channel_stats(data.splits["train"].images)  # taken while the cache was written
    assert [*data.stats[0], *data.stats[1]] == pytest.approx([*mean, *std], abs=1e-12)


def test_the_cache_is_rebuilt_when_a_pickle_changes(tmp_path, pickle_builds):
    directory = write_pickles(tmp_path)
    load_miniimagenet(tmp_path, split_classes=SMALL)
    write_pickles(tmp_path / "other", per_class=5)  # the same classes, five images each
    replacement = directory / "mini-imagenet-cache-val.pkl"
    replacement.write_bytes((tmp_path / "other" / "miniimagenet" / replacement.name).read_bytes())
    touch_later(replacement)
    data = load_miniimagenet(tmp_path, split_classes=SMALL)

    assert pickle_builds == [1, 1]
    assert data.splits["val"].counts == [5, 5, 5] and data.splits["train"].counts == [4] * 4


def test_a_failed_build_leaves_no_cache_and_no_partial_file(tmp_path, pickle_builds):
    directory = write_pickles(tmp_path)
    val = directory / "mini-imagenet-cache-val.pkl"
    whole = val.read_bytes()
    val.write_bytes(whole[: len(whole) // 2])  # the training split is written before val fails
    message = one_line_error(load_miniimagenet, tmp_path, split_classes=SMALL)

    assert f"{val} is truncated or corrupt" in message
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        f"mini-imagenet-cache-{s}.pkl" for s in SPLITS
    )
    assert not (tmp_path / "xdg").exists()
    val.write_bytes(whole)
    assert load_miniimagenet(tmp_path, split_classes=SMALL).splits["val"].counts == [4, 4, 4]
    assert pickle_builds == [1, 1]


def test_ravi_cache_is_written_beside_the_raw_files_and_reused_memory_mapped(tmp_path, ravi_builds):
    directory = write_ravi(tmp_path)
    first = load_miniimagenet(tmp_path, split_classes=SMALL)
    second = load_miniimagenet(tmp_path, split_classes=SMALL)

    assert ravi_builds == [1]
    assert first.cache == second.cache == directory / "cache_84.u8"
    assert (second.layout, second.files) == ("ravi", ["train.csv", "val.csv", "test.csv", "images"])
    for split in SPLITS:
        assert torch.equal(first.splits[split].images, second.splits[split].images)
    assert first.stats == second.stats == channel_stats(first.splits["train"].images)
    if mapped_files():
        assert str(directory / "cache_84.u8") in mapped_files()


def test_ravi_cache_is_rebuilt_when_a_raw_file_changes(tmp_path, ravi_builds):
    directory = write_ravi(tmp_path)
    load_miniimagenet(tmp_path, split_classes=SMALL)
    image = directory / "images" / f"{SMALL['val'][1]}00000002.jpg"
    Image.new("RGB", (30, 30), (0, 0, 0)).save(image, "JPEG")
    touch_later(image)
    data = load_miniimagenet(tmp_path, split_classes=SMALL)

    assert ravi_builds == [1, 1]
    assert data.splits["val"].images[4 + 1].max() <= 3  # the new, black image


@pytest.mark.parametrize("write", [write_pickles, write_ravi])
def test_read_only_data_folder_gets_its_cache_in_the_user_cache(
    tmp_path, write, pickle_builds, ravi_builds
):
    directory = write(tmp_path)
    directory.chmod(0o555)
    try:
        load_miniimagenet(tmp_path, split_classes=SMALL)
        data = load_miniimagenet(tmp_path, split_classes=SMALL)
    finally:
        directory.chmod(0o755)
    assert not (directory / "cache_84.u8").exists()
    assert data.cache.parent == tmp_path / "xdg" / "mamlrun" / "miniimagenet"
    assert data.cache.name.startswith("cache_84-") and data.cache.suffix == ".u8"
    assert pickle_builds + ravi_builds == [1]


# ---------------------------------------------------------------------------------------------
# Sampling


@pytest.fixture
def pickled(tmp_path) -> Path:
    write_pickles(tmp_path, per_class=lambda c: 3 + c)  # classes of 3, 4, 5, 6 images
    return tmp_path


def plain(root: Path, **settings) -> EpisodicImages:
    """Pixels / 255 as inputs, so ``origin`` can read the colours back."""
    return tasks(root, mean=[0.0] * 3, std=[1.0] * 3, **settings)


def test_tasks_have_n_way_k_shot_shapes_and_each_label_is_one_class(pickled):
    source = plain(pickled, ways=3, shots=2, query=1)
    batch = source.sample("train", 6, torch.Generator().manual_seed(0))

    assert batch.x_support.shape == (6, 6, 3, 84, 84) and batch.x_query.shape == (6, 3, 3, 84, 84)
    assert batch.x_support.dtype == torch.float32 and batch.y_support.dtype == torch.int64
    assert (source.input_shape, source.output_size) == ((3, 84, 84), 3)
    classes, indices = origin(torch.cat([batch.x_support, batch.x_query], dim=1))
    labels = torch.cat([batch.y_support, batch.y_query], dim=1)
    for t in range(6):
        assert sorted(batch.y_support[t].tolist()) == [0, 0, 1, 1, 2, 2]
        class_of = {}
        for c, label in zip(classes[t].tolist(), labels[t].tolist(), strict=True):
            assert class_of.setdefault(label, c) == c  # one class per label
        assert len(set(zip(classes[t].tolist(), indices[t].tolist(), strict=True))) == 9


def test_classes_of_different_sizes_are_drawn_from_all_and_only_their_own_images(pickled):
    source = plain(pickled, ways=3, shots=1, query=2)
    batch = source.sample("train", 200, torch.Generator().manual_seed(1))
    classes, indices = origin(torch.cat([batch.x_support, batch.x_query], dim=1))

    for c in range(4):
        drawn = set(indices[classes == c].tolist())
        assert drawn == set(range(3 + c))  # every image of class c, none beyond its count


def test_the_same_seed_draws_the_same_tasks_bitwise_whatever_the_storage(
    pickled, as_on_an_accelerator
):
    on_device = tasks(pickled, storage="device")
    on_host = tasks(pickled, storage="cpu")
    assert on_host._copies and not on_device._copies  # the accelerator's two paths
    a = on_device.sample("val", 5, torch.Generator().manual_seed(7))
    b = on_host.sample("val", 5, torch.Generator().manual_seed(7))
    c = on_device.sample("val", 5, torch.Generator().manual_seed(8))

    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a.x_query, c.x_query)


def test_images_are_stored_as_uint8_and_normalised_per_channel_per_meta_batch(pickled):
    mean, std = [0.1, 0.5, 0.9], [0.2, 0.25, 0.5]
    source = tasks(pickled, mean=mean, std=std, storage="cpu")
    raw = plain(pickled)
    g = torch.Generator().manual_seed(3)
    batch, reference = source.sample("test", 2, g), raw.sample("test", 2, g.manual_seed(3))

    assert all(s.images.dtype == torch.uint8 for s in source._splits.values())
    shift, scale = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(batch.x_support, (reference.x_support - shift) / scale, atol=1e-5)


def test_without_mean_and_std_the_training_splits_statistics_are_used(pickled):
    source = tasks(pickled)
    train = load_miniimagenet(pickled, split_classes=SMALL).splits["train"]
    stats = channel_stats(train.images)
    flat = train.images.reshape(-1, 3).double() / 255

    assert (source.mean, source.std) == stats
    assert stats[0] == pytest.approx(flat.mean(0).tolist())
    assert stats[1] == pytest.approx(flat.std(0, unbiased=False).tolist())


def test_describe_and_splits_json_name_the_classes(pickled, tmp_path):
    source = tasks(pickled)
    source.save_splits(tmp_path / "run")
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())

    assert splits["classes"] == {s: list(SMALL[s]) for s in SPLITS}
    assert splits["images_per_class"]["train"] == [3, 4, 5, 6]
    assert source.describe()["classes"] == {"train": 4, "val": 3, "test": 3}


# ---------------------------------------------------------------------------------------------
# Each bad input is one line that says which file and what to do


def test_missing_data_names_both_layouts_and_where_to_put_them(tmp_path):
    message = one_line_error(load_miniimagenet, tmp_path)
    assert str(tmp_path / "miniimagenet") in message
    assert "mini-imagenet-cache-{train,val,test}.pkl" in message
    assert "images/*.jpg with train.csv, val.csv and test.csv" in message
    assert "dataset.root" in message and "$MAMLRUN_DATA" in message


def test_a_missing_pickle_is_named(tmp_path):
    directory = write_pickles(tmp_path)
    (directory / "mini-imagenet-cache-test.pkl").unlink()
    message = one_line_error(load_miniimagenet, tmp_path, split_classes=SMALL)
    assert "mini-imagenet-cache-test.pkl is missing" in message


def test_an_html_page_saved_as_a_pickle_is_recognised(tmp_path):
    directory = write_pickles(tmp_path)
    page = b"<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title>"
    (directory / "mini-imagenet-cache-train.pkl").write_bytes(page)
    message = one_line_error(load_miniimagenet, tmp_path, split_classes=SMALL)
    assert "mini-imagenet-cache-train.pkl is an HTML page, not a pickle" in message
    assert "download it again" in message


def test_a_truncated_pickle_is_reported_with_its_file(tmp_path):
    directory = write_pickles(tmp_path)
    path = directory / "mini-imagenet-cache-val.pkl"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    message = one_line_error(load_miniimagenet, tmp_path, split_classes=SMALL)
    assert "mini-imagenet-cache-val.pkl is truncated or corrupt" in message
    assert "download it again" in message


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    directory = write_pickles(tmp_path)

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(tmp_path / "code_ran"),))

    blob = {"image_data": Payload(), "class_dict": {}}
    (directory / "mini-imagenet-cache-test.pkl").write_bytes(pickle.dumps(blob))
    message = one_line_error(load_miniimagenet, tmp_path, split_classes=SMALL)
    assert "mini-imagenet-cache-test.pkl holds objects other than arrays" in message
    assert "mkdir" in message and not (tmp_path / "code_ran").exists()


def test_a_wrong_class_set_names_the_first_missing_or_extra_class(tmp_path):
    wrong = {**SMALL, "val": ("n01855672", "n03535780", "n02114548")}
    write_pickles(tmp_path, classes=wrong)
    message = one_line_error(load_miniimagenet, tmp_path, split_classes=SMALL)
    assert "mini-imagenet-cache-val.pkl" in message
    assert "n02091244 is missing (1 missing, 1 extra)" in message


def test_a_corrupt_image_of_the_ravi_layout_is_reported_with_its_file(tmp_path):
    directory = write_ravi(tmp_path)
    image = directory / "images" / f"{SMALL['test'][0]}00000003.jpg"
    image.write_bytes(image.read_bytes()[:40])
    message = one_line_error(load_miniimagenet, tmp_path, split_classes=SMALL)
    assert f"{image}: not a readable image" in message and "replace it" in message


def test_an_image_listed_in_a_csv_but_absent_is_reported(tmp_path):
    directory = write_ravi(tmp_path)
    (directory / "images" / f"{SMALL['train'][2]}00000001.jpg").unlink()
    message = one_line_error(load_miniimagenet, tmp_path, split_classes=SMALL)
    assert f"{SMALL['train'][2]}00000001.jpg is listed in a CSV but missing" in message


@pytest.mark.parametrize(
    "settings,expected",
    [
        ({"ways": 4}, "4-way tasks need 4 classes but the 'val' split has 3"),
        # The one check of K+Q for every image dataset (they all sample through EpisodicImages).
        (
            {"shots": 2, "query": 2},
            "K+Q=4 exceeds the 3 images of class n01532829 in the 'train' "
            "split; lower dataset.shots or dataset.query",
        ),
        ({"mean": [0.5]}, "mean and std need one value per channel (3)"),
    ],
)
def test_impossible_settings_are_one_line_errors(pickled, settings, expected):
    message = one_line_error(tasks, pickled, **settings)
    assert expected in message


# ---------------------------------------------------------------------------------------------
# Config and a real run


def test_dataset_miniimagenet_alone_trains_the_maml_papers_1_shot_setup():
    line = with_dataset_preset(CommandLine([], ["dataset=miniimagenet"]))
    assert line.overrides[0] == "experiment=miniimagenet_5w1s"
    cfg = compose_train(*line.overrides)
    assert (cfg.backbone.filters, cfg.backbone.downsample, cfg.backbone.head) == (
        32,
        "max_pool",
        "flatten",
    )
    mo = cfg.meta_optimizer
    assert (mo.inner_lr, mo.inner_steps, mo.inner_steps_test) == (0.01, 5, 10)
    assert (cfg.meta_batch_size, cfg.dataset.query, cfg.iterations) == (4, 15, 60000)
    assert cfg.reference.value == 0.487 and cfg.reference.ci95 == 0.0184
    five_shot = compose_train("experiment=miniimagenet_5w5s")
    assert (five_shot.meta_batch_size, five_shot.dataset.shots) == (2, 5)
    assert five_shot.reference.value == 0.6311 and "Table 2" in five_shot.reference.source


@pytest.mark.slow
def test_training_the_1_shot_preset_on_a_fixture_root_writes_results(tmp_path):
    write_pickles(tmp_path / "data", classes=SPLIT_CLASSES, per_class=2)
    out = run_cli(
        "train",
        "experiment=miniimagenet_5w1s",
        f"dataset.root={tmp_path / 'data'}",
        "dataset.query=1",
        "iterations=2",
        "val_every=2",
        "val_tasks=2",
        "eval_batch_size=2",
        "checkpoint_every=2",
        "final_test=true",
        "test_tasks=2",
        "meta_optimizer.task_batching=loop",
        "device=cpu",
        "hydra.run.dir=run",
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert results["steps"] == 2 and results["metric"] == "accuracy"
    assert results["best_val"] == max(h["mean"] for h in results["val_history"])
    assert results["dataset"]["name"] == "miniimagenet" and results["dataset"]["layout"] == "pickle"
    assert results["preset"] == "miniimagenet_5w1s" and results["reference"]["value"] == 0.487
    assert {s: len(c) for s, c in splits["classes"].items()} == {"train": 64, "val": 16, "test": 20}
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()
    test = json.loads((tmp_path / "run" / "test" / "results.json").read_text())
    assert (test["test_tasks"], test["inner_steps"]) == (2, 10)
    adapts_after_training(tmp_path)

"""Specification of every image preset's task stream, bit for bit.

Each preset's task source is built as the preset configures it (its dataset settings composed
as `train` composes them), on the fixtures the dataset tests generate, and the first
meta-batches of each split (support and query, images and labels; the training split also
with augmentation on) are hashed from a fixed generator seed. The digests were recorded on the
code before the data layer was reorganised (issue 23): a refactor of reading, caching,
normalisation, storage, augmentation or sampling that changes any stream changes a digest.

Fixtures are small: five classes per split (a 5-way task needs five) and enough images per
class for one support and the preset's query images.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import pytest
import torch
from conftest import HAS_OMNIGLOT, OMNIGLOT_MISSING, compose_train, data_root
from image_fixtures import (
    CIFARFS_SPLITS,
    SPLITS,
    write_cifar_archive,
    write_cifar_pickles,
    write_cub_folder,
    write_tiered,
)
from omegaconf import OmegaConf
from omniglot_fixtures import synthetic_data
from test_miniimagenet import write_pickles, write_ravi

from mamlrun.data import cifar, cub, miniimagenet, omniglot, tieredimagenet
from mamlrun.data.omniglot import OmniglotTasks
from mamlrun.data.sources import image_tasks

#: Meta-batches hashed per split, tasks per meta-batch, and the generator's seed.
BATCHES, TASKS, SEED = 3, 2, 1234


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path):
    """Each test gets its own user cache and no data-root override."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("MAMLRUN_DATA", raising=False)


def preset_settings(preset: str, **changes) -> dict:
    """The dataset settings the preset hands its ``_target_`` (the root left to the caller)."""
    node = compose_train(f"experiment={preset}").dataset
    settings = OmegaConf.to_container(node, resolve=True)
    for key in ("_target_", "_preset_", "root"):
        settings.pop(key, None)
    return {**settings, "device": "cpu", **changes}


def digest(source, augment_too: bool = True) -> str:
    """sha256 (its first 128 bits) of the first ``BATCHES`` meta-batches of train, val, test."""
    h = hashlib.sha256()
    generator = torch.Generator().manual_seed(SEED)
    for split in SPLITS:
        for _ in range(BATCHES):
            batch = source.sample(split, TASKS, generator)
            for part in batch:
                h.update(str(part.dtype).encode() + str(tuple(part.shape)).encode())
                h.update(part.contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def first(classes, n: int = 5) -> dict[str, tuple[str, ...]]:
    return {s: tuple(classes[s][:n]) for s in SPLITS}


def miniimagenet_source(root: Path, layout: str, **settings):
    classes = first(miniimagenet.SPLIT_CLASSES)
    (write_pickles if layout == "pickles" else write_ravi)(root, classes=classes, per_class=16)
    load = functools.partial(miniimagenet.load_miniimagenet, split_classes=classes)
    return image_tasks("miniimagenet", load, "ravi_larochelle")(root=str(root), **settings)


def tiered_source(root: Path, **settings):
    names = {s: ([f"n0{s}{i}" for i in range(5)], [f"{s} a", f"{s} b"]) for s in SPLITS}
    write_tiered(root, classes=names, per_class=16)
    load = functools.partial(
        tieredimagenet.load_tieredimagenet, split_sizes={s: (5, 2) for s in SPLITS}
    )
    return image_tasks("tieredimagenet", load, "ren2018")(root=str(root), **settings)


def cifar_source(root: Path, name: str, **settings):
    classes = first(CIFARFS_SPLITS if name == "cifarfs" else cifar.FC100_SPLITS)
    if name == "cifarfs":
        write_cifar_archive(root, train_per_class=15, test_per_class=1)
    else:
        write_cifar_pickles(root, name, classes, per_class=16)
    load = functools.partial(cifar.load_cifar, name, split_classes=classes)
    return image_tasks(name, load, name)(root=str(root), **settings)


def cub_source(root: Path, **settings):
    classes = first(cub.SPLIT_CLASSES)
    write_cub_folder(root, species=sorted(c for s in SPLITS for c in classes[s]), per_class=17)
    load = functools.partial(cub.load_cub, split_classes=classes)
    return image_tasks("cub", load, "chen2019")(root=str(root), **settings)


BUILDERS = {
    "miniimagenet_5w1s": functools.partial(miniimagenet_source, layout="pickles"),
    "miniimagenet_5w1s@ravi": functools.partial(miniimagenet_source, layout="ravi"),
    "tieredimagenet_5w1s": tiered_source,
    "cifarfs_5w1s": functools.partial(cifar_source, name="cifarfs"),
    "fc100_5w1s": functools.partial(cifar_source, name="fc100"),
    "cub_5w1s": cub_source,
}

#: Recorded on the code before the data layer was reorganised (see the module docstring).
DIGESTS = {
    "cifarfs_5w1s:plain": "7dc172ef50e5b79b5c43cb79a831d88f",
    "cifarfs_5w1s:augmented": "aa92b596a3e38977a01b31a812cd1388",
    "cub_5w1s:plain": "f960e4bd6873b7be061d4aa469f6506f",
    "cub_5w1s:augmented": "cf5e736593eb8ecaca132cc8e886a065",
    "fc100_5w1s:plain": "dcee5e99a5aa75d47f4f8cbbff5d4e5a",
    "fc100_5w1s:augmented": "446a45a17bffc6251a4c6001f63f240e",
    "miniimagenet_5w1s:plain": "016564519a98e30eafd4d2cd4743f422",
    "miniimagenet_5w1s:augmented": "8dc14141e7c098de287ea8130c6c1a28",
    "miniimagenet_5w1s@ravi:plain": "5b7c9cb26cdd464546433c205e2461ac",
    "miniimagenet_5w1s@ravi:augmented": "84d5f19935bdd377ee1370ea7c55daa6",
    # the same pixels as miniImageNet's pickles (both fixtures colour image i of class c alike)
    "tieredimagenet_5w1s:plain": "016564519a98e30eafd4d2cd4743f422",
    "tieredimagenet_5w1s:augmented": "8dc14141e7c098de287ea8130c6c1a28",
    "omniglot_5w1s:synthetic": "572667200ea13956f40959ac8a81119e",
    "omniglot_20w5s:synthetic": "67e6aa9297db44ba55ea2785c279b874",
    "omniglot_5w1s:real": "e7a13ce49a5487630d41d175825558e3",
}


@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augmented"])
@pytest.mark.parametrize("case", sorted(BUILDERS))
def test_every_image_presets_task_stream_is_the_recorded_one(tmp_path, case, augment):
    preset = case.split("@")[0]
    source = BUILDERS[case](tmp_path / "data", **preset_settings(preset, augment=augment))
    key = f"{case}:{'augmented' if augment else 'plain'}"
    assert digest(source) == DIGESTS.get(key), key


@pytest.mark.parametrize("preset", ["omniglot_5w1s", "omniglot_20w5s"])
def test_omniglots_task_stream_on_the_synthetic_dataset_is_the_recorded_one(monkeypatch, preset):
    monkeypatch.setattr(omniglot, "load_omniglot", lambda root, image_size: _fake())
    source = OmniglotTasks(root=None, **preset_settings(preset))
    assert digest(source) == DIGESTS.get(f"{preset}:synthetic"), preset


@functools.cache
def _fake():
    return synthetic_data()


@pytest.mark.slow  # the real zips, preprocessed once (~15 s)
@pytest.mark.skipif(not HAS_OMNIGLOT, reason=OMNIGLOT_MISSING)
def test_omniglots_task_stream_on_the_real_data_is_the_recorded_one():
    source = OmniglotTasks(root=str(data_root()), **preset_settings("omniglot_5w1s"))
    assert digest(source) == DIGESTS.get("omniglot_5w1s:real"), "real"

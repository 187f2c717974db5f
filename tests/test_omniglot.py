"""Specification of the Omniglot task source: data root, download, validation, cache, splits,
rotations and the task sampler.

Most tests run on small fixture zips or on a synthetic full-size dataset; the tests marked
``real`` use the Omniglot zips in ``$MAMLRUN_DATA`` or ``../shared/data`` and are skipped when
those are absent. No test touches the network: ``_open_url`` fails unless a test serves bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import urllib.error
from pathlib import Path

import pytest
import torch
from conftest import HAS_OMNIGLOT, OMNIGLOT_MISSING, count_calls, data_root
from omegaconf import OmegaConf
from omniglot_fixtures import (
    SMALL_COUNTS,
    STROKE_BOX,
    png_bytes,
    synthetic_data,
    write_small_dataset,
)

from mamlrun import config
from mamlrun.data import download, omniglot
from mamlrun.data.omniglot import OmniglotTasks, character_splits, load_omniglot
from mamlrun.errors import MamlrunError


def omniglot_tasks(**changes) -> OmniglotTasks:
    """``conf/dataset/omniglot.yaml``'s task source with ``changes``, checked as ``train``
    checks it before building it."""
    settings = config.settings("dataset", "omniglot", **changes)
    given = {k: v for k, v in settings.items() if k != "device"}  # mamlrun's own, not a setting
    node = OmegaConf.create({"_target_": "mamlrun.data.omniglot.OmniglotTasks", **given})
    config.validate_component("dataset", node)
    return OmniglotTasks(**settings)


@pytest.fixture(autouse=True)
def no_network_and_private_cache(monkeypatch, tmp_path):
    """Every test gets its own user cache dir and no data-root override, and fails if it would
    reach the network."""

    def refuse(url):
        raise AssertionError(f"test tried to download {url}")

    monkeypatch.setattr(download, "_open_url", refuse)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("MAMLRUN_DATA", raising=False)


@pytest.fixture
def small_counts(monkeypatch):
    """Let the small fixture zips pass the count validation."""
    monkeypatch.setattr(omniglot, "EXPECTED_COUNTS", SMALL_COUNTS)


@pytest.fixture
def small_root(tmp_path, small_counts) -> Path:
    write_small_dataset(tmp_path / "data")
    return tmp_path / "data"


@pytest.fixture
def count_builds(monkeypatch) -> list[int]:
    """Each call of the expensive build (which still runs)."""
    return count_calls(monkeypatch, omniglot, "build_omniglot")


def forbid_builds(monkeypatch) -> None:
    def build(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(omniglot, "build_omniglot", build)


def files_in(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


# ---------------------------------------------------------------------------------------------
# Data root


def test_data_root_is_explicit_value_then_env_then_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert download.resolve_root(None) == tmp_path / "xdg" / "mamlrun"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert download.resolve_root(None) == tmp_path / "home" / ".cache" / "mamlrun"
    monkeypatch.setenv("MAMLRUN_DATA", str(tmp_path / "env"))
    assert download.resolve_root(None) == tmp_path / "env"
    assert download.resolve_root(str(tmp_path / "explicit")) == tmp_path / "explicit"


# ---------------------------------------------------------------------------------------------
# Validation and preprocessing (small fixture zips)


def test_valid_zips_with_non_official_md5_are_preprocessed(small_root):
    data = load_omniglot(small_root)

    assert data.images.dtype == torch.uint8
    assert data.images.shape == (10, 20, 28, 28)
    assert data.names[:3] == ["Alpha/character01", "Alpha/character02", "Beta/character01"]
    assert data.names == sorted(data.names[:6]) + sorted(data.names[6:])
    assert data.sources == ["images_background"] * 6 + ["images_evaluation"] * 4
    # black strokes on white become 255 on 0: the square's centre is bright, a corner is empty
    centre = (STROKE_BOX[0] + STROKE_BOX[2]) // 2 * 28 // 105
    assert (data.images[:, :, centre, centre] == 255).all()
    assert (data.images[:, :, 0, 0] == 0).all()
    assert data.md5["images_background"] != omniglot.OFFICIAL_MD5["images_background"]


def test_wrong_character_counts_are_rejected(tmp_path):
    write_small_dataset(tmp_path)  # without small_counts: the real counts are expected
    with pytest.raises(MamlrunError) as error:
        load_omniglot(tmp_path)
    message = str(error.value)
    assert "images_background.zip" in message
    assert "3 alphabets with 6 characters, expected 30 with 964" in message


def test_missing_drawing_is_reported_with_its_character(tmp_path, small_counts):
    write_small_dataset(tmp_path, images_background={"drop": "Beta/character02/0004_20.png"})
    with pytest.raises(MamlrunError, match=r"images_background\.zip: Beta/character02 has 19 "):
        load_omniglot(tmp_path)


def test_truncated_zip_is_reported_with_its_file(tmp_path, small_counts):
    directory = write_small_dataset(tmp_path)
    path = directory / "images_evaluation.zip"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(MamlrunError, match=r"images_evaluation\.zip: not a readable zip"):
        load_omniglot(tmp_path)


def test_corrupted_entry_fails_its_crc_check(tmp_path, small_counts):
    directory = write_small_dataset(tmp_path, images_evaluation={"stored": True})
    path = directory / "images_evaluation.zip"
    blob = bytearray(path.read_bytes())
    at = blob.find(png_bytes()) + len(png_bytes()) // 2
    blob[at] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(MamlrunError, match=r"images_evaluation\.zip: cannot read .*CRC"):
        load_omniglot(tmp_path)


def test_unreadable_png_is_reported_with_its_entry(tmp_path, small_counts):
    bad = {"Gamma/character01/0005_03.png": b"not a png"}
    write_small_dataset(tmp_path, images_background={"replace": bad})
    with pytest.raises(MamlrunError, match=r"Gamma/character01/0005_03\.png is not a readable PNG"):
        load_omniglot(tmp_path)


def test_image_of_wrong_size_is_rejected(tmp_path, small_counts):
    bad = {"Delta/character02/0002_07.png": png_bytes(size=100, box=(10, 10, 20, 20))}
    write_small_dataset(tmp_path, images_evaluation={"replace": bad})
    with pytest.raises(MamlrunError, match=r"0002_07\.png is 100x100, expected 105x105"):
        load_omniglot(tmp_path)


# ---------------------------------------------------------------------------------------------
# Cache


def test_second_load_reads_only_the_cache(small_root, monkeypatch):
    first = load_omniglot(small_root)
    assert (small_root / "omniglot" / "cache_28.u8").is_file()
    forbid_builds(monkeypatch)
    second = load_omniglot(small_root)
    assert torch.equal(first.images, second.images)
    assert (second.names, second.sources, second.md5) == (first.names, first.sources, first.md5)


def test_changed_zip_mtime_rebuilds_the_cache(small_root, count_builds):
    load_omniglot(small_root)
    load_omniglot(small_root)
    assert len(count_builds) == 1
    zip_path = small_root / "omniglot" / "images_evaluation.zip"
    stat = zip_path.stat()
    os.utime(zip_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load_omniglot(small_root)
    assert len(count_builds) == 2


def test_corrupt_cache_is_rebuilt_not_an_error(small_root, count_builds):
    load_omniglot(small_root)
    cache = small_root / "omniglot" / "cache_28.u8"
    cache.write_bytes(cache.read_bytes()[:1000])
    data = load_omniglot(small_root)
    assert data.images.shape == (10, 20, 28, 28)
    assert len(count_builds) == 2
    load_omniglot(small_root)  # and the rewritten cache is good again
    assert len(count_builds) == 2


def test_other_image_size_gets_its_own_cache(small_root):
    small = load_omniglot(small_root, image_size=14)
    assert small.images.shape == (10, 20, 14, 14)
    assert {"cache_14.u8"} <= files_in(small_root / "omniglot")
    assert load_omniglot(small_root).images.shape == (10, 20, 28, 28)


def test_read_only_data_dir_caches_in_the_user_cache_dir(small_root, tmp_path, monkeypatch):
    directory = small_root / "omniglot"
    before = files_in(directory)
    directory.chmod(0o555)
    try:
        load_omniglot(small_root)
        assert files_in(directory) == before
        caches = list((tmp_path / "xdg" / "mamlrun" / "omniglot").glob("cache_28-*.u8"))
        assert len(caches) == 1
        forbid_builds(monkeypatch)
        assert load_omniglot(small_root).images.shape == (10, 20, 28, 28)
    finally:
        directory.chmod(0o755)


# ---------------------------------------------------------------------------------------------
# Download (``_open_url`` serves fixture bytes; nothing leaves the machine)


@pytest.fixture
def served_zips(tmp_path, monkeypatch) -> dict[str, bytes]:
    """Fixture zips served in place of the official URLs; returns what each URL serves."""
    source = write_small_dataset(tmp_path / "server")
    served = {omniglot.URL.format(s): (source / f"{s}.zip").read_bytes() for s in omniglot.SETS}

    def open_url(url):
        body = served[url]
        return io.BytesIO(body), len(body)

    monkeypatch.setattr(download, "_open_url", open_url)
    return served


def test_download_with_matching_md5_is_accepted(tmp_path, served_zips, small_counts, monkeypatch):
    for set_name in omniglot.SETS:
        body = served_zips[omniglot.URL.format(set_name)]
        monkeypatch.setitem(omniglot.OFFICIAL_MD5, set_name, hashlib.md5(body).hexdigest())
    root = tmp_path / "fresh"

    data = load_omniglot(root)

    assert data.images.shape == (10, 20, 28, 28)
    directory = root / "omniglot"
    assert files_in(directory) == {
        "images_background.zip",
        "images_evaluation.zip",
        "cache_28.u8",
    }
    for set_name in omniglot.SETS:
        body = served_zips[omniglot.URL.format(set_name)]
        assert (directory / f"{set_name}.zip").read_bytes() == body


def test_download_with_wrong_md5_is_rejected_and_leaves_no_file(tmp_path, served_zips):
    root = tmp_path / "fresh"
    with pytest.raises(MamlrunError, match=r"md5 [0-9a-f]{32}, expected 68d2efa1"):
        load_omniglot(root)
    assert not root.exists(), "no file, and no folder made for it"


def test_network_failure_says_where_to_put_the_files(tmp_path, monkeypatch):
    def offline(url):
        raise urllib.error.URLError("[Errno -3] Temporary failure\nin name resolution")

    monkeypatch.setattr(download, "_open_url", offline)
    with pytest.raises(MamlrunError) as error:
        load_omniglot(tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert "could not download https://raw.githubusercontent.com/brendenlake/omniglot" in message
    assert "images_background.zip and images_evaluation.zip are missing" in message
    assert str(tmp_path / "omniglot") in message
    assert not (tmp_path / "omniglot").exists(), "no file, and no folder made for it"


# ---------------------------------------------------------------------------------------------
# Splits (names of the synthetic full-size dataset)


@pytest.fixture(scope="module")
def fake() -> omniglot.OmniglotData:
    return synthetic_data()


def character_sets(fake, splits) -> dict[str, set[str]]:
    return {s: {fake.names[i] for i in index} for s, index in splits.items()}


def test_maml_split_is_1100_100_423_disjoint_and_seeded(fake):
    splits = character_splits(fake.names, fake.sources, "maml", seed=0)
    sets = character_sets(fake, splits)

    assert {s: len(c) for s, c in sets.items()} == {"train": 1100, "val": 100, "test": 423}
    assert sets["train"].isdisjoint(sets["val"])
    assert sets["train"].isdisjoint(sets["test"])
    assert sets["val"].isdisjoint(sets["test"])
    assert set.union(*sets.values()) == set(fake.names)
    assert character_splits(fake.names, fake.sources, "maml", seed=0) == splits
    assert character_splits(fake.names, fake.sources, "maml", seed=1) != splits


def test_background_evaluation_split_validates_on_five_whole_alphabets(fake):
    splits = character_splits(fake.names, fake.sources, "background_evaluation", seed=0)
    sets = character_sets(fake, splits)
    alphabets = {s: {name.split("/")[0] for name in c} for s, c in sets.items()}

    background = {
        n for n, s in zip(fake.names, fake.sources, strict=True) if s == "images_background"
    }
    assert sets["train"] | sets["val"] == background and len(background) == 964
    assert len(sets["test"]) == 659 and sets["test"].isdisjoint(background)
    assert len(alphabets["val"]) == 5
    assert alphabets["train"].isdisjoint(alphabets["val"])
    other = character_splits(fake.names, fake.sources, "background_evaluation", seed=3)
    assert other != splits


def test_unknown_split_name_is_an_error(fake):
    with pytest.raises(MamlrunError, match="unknown Omniglot split 'lake'"):
        character_splits(fake.names, fake.sources, "lake")
    with pytest.raises(MamlrunError, match="dataset.split must be one of maml, background_"):
        omniglot_tasks(split="lake")


# ---------------------------------------------------------------------------------------------
# Task source on the synthetic full-size dataset


@pytest.fixture(scope="module")
def tasks(fake) -> OmniglotTasks:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(omniglot, "load_omniglot", lambda root, image_size: fake)
        return omniglot_tasks(ways=5, shots=2, query=3)


@pytest.fixture
def use_fake(monkeypatch, fake):
    monkeypatch.setattr(omniglot, "load_omniglot", lambda root, image_size: fake)


def test_interface_attributes(tasks):
    assert tasks.task_type == "classification"
    assert tasks.input_shape == (1, 28, 28)
    assert tasks.output_size == 5
    assert tasks.device == torch.device("cpu")
    description = tasks.describe()
    assert json.loads(json.dumps(description)) == description
    assert description["classes"] == {"train": 4400, "val": 400, "test": 1692}
    assert description["characters"] == {"train": 1100, "val": 100, "test": 423}


def class_images(tasks: OmniglotTasks, split: str) -> torch.Tensor:
    """A split's images as the network sees them, float ``[classes, 20, 1, s, s]`` in [0, 1]."""
    size = tasks.image_size
    pixels = tasks.splits[split].images.view(-1, 20, size, size, 1).movedim(-1, 2)
    return pixels.float() / 255


def test_each_rotation_of_a_character_is_a_class_of_the_same_split(tasks, fake):
    for split in ("train", "val", "test"):
        stored = tasks.splits[split]
        assert stored.images.shape == (4 * len(tasks.characters[split]) * 20, 28, 28, 1)
        assert stored.images.dtype == torch.uint8
        assert stored.counts == [20] * len(tasks.classes[split])
        assert stored.classes == tasks.classes[split]
        images = class_images(tasks, split)
        upright = images[0::4]
        for k in (1, 2, 3):
            assert torch.equal(images[k::4], torch.rot90(upright, k, dims=(-2, -1)))
    assert tasks.classes["val"][:2] == [
        f"{tasks.characters['val'][0]}/rot0",
        f"{tasks.characters['val'][0]}/rot90",
    ]
    first = fake.names.index(tasks.characters["train"][0])
    assert torch.equal(tasks.splits["train"].images[:20, :, :, 0], fake.images[first])


def test_without_rotations_each_character_is_one_class(use_fake):
    plain = omniglot_tasks(rotations=False)
    assert {s: len(c) for s, c in plain.classes.items()} == {"train": 1100, "val": 100, "test": 423}
    assert plain.classes["train"][0].endswith("/rot0")


def test_sample_shapes_and_dtypes(tasks):
    batch = tasks.sample("train", 4, torch.Generator().manual_seed(0))
    assert batch.x_support.shape == (4, 10, 1, 28, 28)
    assert batch.y_support.shape == (4, 10)
    assert batch.x_query.shape == (4, 15, 1, 28, 28)
    assert batch.y_query.shape == (4, 15)
    assert batch.x_support.dtype == batch.x_query.dtype == torch.float32
    assert batch.y_support.dtype == batch.y_query.dtype == torch.int64
    assert 0.0 <= batch.x_query.min() and batch.x_query.max() <= 1.0


def trace(images: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (class, drawing) each image of ``x`` was taken from, found by its first pixels."""

    def fingerprint(t: torch.Tensor) -> torch.Tensor:
        pixels = (t.flatten(-3)[..., :7] * 255).round().long()
        return (pixels * 256 ** torch.arange(7)).sum(-1)

    table = fingerprint(images).flatten()
    assert table.unique().numel() == table.numel(), "fixture images must be distinct"
    order = table.argsort()
    keys = fingerprint(x)
    position = torch.searchsorted(table[order], keys)
    assert torch.equal(table[order][position], keys), "sampled an image not in the split"
    flat = order[position]
    return flat // images.shape[1], flat % images.shape[1]


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_labels_name_the_same_class_in_support_and_query(tasks, split):
    batch = tasks.sample(split, 8, torch.Generator().manual_seed(1))
    cls_s, draw_s = trace(class_images(tasks, split), batch.x_support)
    cls_q, draw_q = trace(class_images(tasks, split), batch.x_query)
    for b in range(8):
        label_to_class = {}
        for classes, labels in ((cls_s[b], batch.y_support[b]), (cls_q[b], batch.y_query[b])):
            for c, y in zip(classes.tolist(), labels.tolist(), strict=True):
                assert label_to_class.setdefault(y, c) == c, "one label, two classes"
        assert sorted(label_to_class) == [0, 1, 2, 3, 4]
        assert len(set(label_to_class.values())) == 5, "one class, two labels"
        for y in range(5):
            assert (batch.y_support[b] == y).sum() == 2 and (batch.y_query[b] == y).sum() == 3
            drawings = torch.cat(
                [draw_s[b][batch.y_support[b] == y], draw_q[b][batch.y_query[b] == y]]
            )
            assert drawings.unique().numel() == 5, "a drawing used twice in one task"


def test_labels_are_shuffled_per_task(tasks):
    batch = tasks.sample("train", 200, torch.Generator().manual_seed(2))
    slot_labels = batch.y_support[:, ::2]  # support is [slot0 x K, slot1 x K, ...]
    assert (slot_labels.sort(dim=1).values == torch.arange(5)).all()
    assert set(slot_labels[:, 0].tolist()) == {0, 1, 2, 3, 4}
    assert slot_labels.unique(dim=0).shape[0] > 50


def test_same_generator_seed_gives_the_same_batch(tasks):
    one = tasks.sample("val", 6, torch.Generator().manual_seed(7))
    two = tasks.sample("val", 6, torch.Generator().manual_seed(7))
    other = tasks.sample("val", 6, torch.Generator().manual_seed(8))
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))
    assert not torch.equal(one.x_support, other.x_support)


def stored_as_before(fake, split_name, rotations, split, device) -> torch.Tensor:
    """A split as OmniglotTasks stored it before the shared image layer: float
    ``[classes, 20, 1, s, s]`` in [0, 1] on the device, class ``4i + k`` being character ``i``
    rotated ``k`` times."""
    index = character_splits(fake.names, fake.sources, split_name)[split]
    characters = fake.images[torch.as_tensor(index)].to(device)
    turns = range(4) if rotations else range(1)
    rotated = torch.stack([torch.rot90(characters, k, dims=(-2, -1)) for k in turns], dim=1)
    return rotated.flatten(0, 1).unsqueeze(2).float().div_(255)


def sample_as_before(images, settings, num_tasks, generator) -> tuple[torch.Tensor, ...]:
    """The task stream as OmniglotTasks drew it before the shared image layer, by ranks of
    uniform noise. The long reproduction run and the published numbers depend on this stream,
    so it is the specification, kept here in its original few lines."""
    ways, shots, query = settings

    def ranks(*shape):
        noise = torch.rand(*shape, generator=generator, device=images.device)
        return noise.argsort(dim=-1, stable=True)

    classes = ranks(num_tasks, images.shape[0])[:, :ways]
    drawings = ranks(num_tasks, ways, images.shape[1])[..., : shots + query]
    labels = ranks(num_tasks, ways)
    x = images[classes.unsqueeze(-1), drawings]
    y = labels.unsqueeze(-1).expand(-1, -1, shots + query)
    shape = images.shape[-3:]
    return (
        x[:, :, :shots].reshape(num_tasks, ways * shots, *shape),
        y[:, :, :shots].reshape(num_tasks, ways * shots),
        x[:, :, shots:].reshape(num_tasks, ways * query, *shape),
        y[:, :, shots:].reshape(num_tasks, ways * query),
    )


needs_cuda = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize(
    ("split_name", "rotations", "settings", "device", "storage"),
    [
        ("maml", True, (5, 1, 15), "cpu", "device"),
        ("maml", True, (20, 5, 5), "cpu", "cpu"),
        ("maml", False, (5, 5, 15), "cpu", "device"),
        ("background_evaluation", True, (20, 1, 19), "cpu", "device"),
        pytest.param("maml", True, (5, 1, 15), "cuda", "device", marks=needs_cuda),
        pytest.param("maml", True, (20, 5, 5), "cuda", "cpu", marks=needs_cuda),
    ],
)
def test_task_stream_is_bitwise_the_one_before_the_shared_image_layer(
    use_fake, fake, split_name, rotations, settings, device, storage
):
    ways, shots, query = settings
    tasks = omniglot_tasks(
        ways=ways,
        shots=shots,
        query=query,
        split=split_name,
        rotations=rotations,
        device=device,
        storage=storage,
    )
    for split in ("train", "val", "test"):
        images = stored_as_before(fake, split_name, rotations, split, device)
        for seed in (0, 1, 2002):
            ours = torch.Generator(device).manual_seed(seed)
            before = torch.Generator(device).manual_seed(seed)
            for num_tasks in (4, 1, 4):  # consecutive batches: the generator advances alike
                batch = tasks.sample(split, num_tasks, ours)
                expected = sample_as_before(images, settings, num_tasks, before)
                for got, want in zip(batch, expected, strict=True):
                    assert got.dtype == want.dtype and got.device == want.device
                    assert torch.equal(got, want), f"{split}, seed {seed}"


def test_storage_cpu_reaches_the_sampler(use_fake):
    assert omniglot_tasks(storage="cpu").episodes.storage == "cpu"
    assert omniglot_tasks().episodes.storage == "device"


def test_unknown_sample_split_is_an_error(tasks):
    with pytest.raises(MamlrunError, match="unknown split 'validation'"):
        tasks.sample("validation", 1, torch.Generator())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ways": 0}, "ways must be a positive integer"),
        ({"shots": 0}, "shots must be a positive integer"),
        ({"query": 0}, "query must be a positive integer"),
        ({"shots": 5, "query": 16}, r"K\+Q=21 exceeds the 20 drawings per character"),
        ({"ways": 401}, "401-way tasks need 401 classes but the 'val' split has 400"),
        ({"ways": 101, "rotations": False}, "the 'val' split has 100"),
        ({"storage": "gpu"}, "dataset.storage must be one of device, cpu, got 'gpu'"),
    ],
)
def test_impossible_tasks_are_rejected(use_fake, kwargs, message):
    with pytest.raises(MamlrunError, match=message):
        omniglot_tasks(**kwargs)


def test_largest_possible_task_is_accepted(use_fake):
    tasks = omniglot_tasks(ways=400, shots=10, query=10, split="maml")
    batch = tasks.sample("val", 1, torch.Generator().manual_seed(0))
    assert batch.y_query.unique().numel() == 400


def test_save_splits_writes_every_class_list(tasks, tmp_path):
    tasks.save_splits(tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert saved["split"] == "maml" and saved["split_seed"] == 0
    assert saved["classes"] == tasks.classes
    characters = {
        s: {name.rsplit("/", 1)[0] for name in classes} for s, classes in saved["classes"].items()
    }
    assert characters["train"].isdisjoint(characters["val"] | characters["test"])
    assert characters["val"].isdisjoint(characters["test"])


# ---------------------------------------------------------------------------------------------
# The real Omniglot zips


@pytest.fixture(scope="session")
def real(tmp_path_factory):
    """The real dataset, preprocessed once per session into a private user cache dir (the
    shared data directory may be read-only)."""
    if not HAS_OMNIGLOT:
        pytest.skip(OMNIGLOT_MISSING)
    root = data_root()
    cache_home = tmp_path_factory.mktemp("real-xdg")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(cache_home))
        start = time.perf_counter()
        data = load_omniglot(root)
        seconds = time.perf_counter() - start
        tasks = omniglot_tasks(root=root)
    return {"root": root, "cache_home": cache_home, "data": data, "tasks": tasks, "s": seconds}


@pytest.mark.slow  # the real zips, preprocessed once a session (~15 s)
def test_real_data_has_1623_characters_of_20_drawings(real):
    data = real["data"]
    assert data.images.shape == (1623, 20, 28, 28)
    assert len(set(data.names)) == 1623
    assert data.sources.count("images_background") == 964
    assert len({name.split("/")[0] for name in data.names}) == 50


@pytest.mark.slow  # the real zips, preprocessed once a session (~15 s)
def test_real_strokes_are_one_and_background_zero(real):
    images = class_images(real["tasks"], "test")
    assert images.min() == 0.0 and images.max() == 1.0
    assert images.mean() < 0.15  # mostly background
    assert (images[..., 0, 0] == 0).float().mean() > 0.99  # corners are background


@pytest.mark.slow  # the real zips, preprocessed once a session (~15 s)
def test_real_maml_split_sizes_with_and_without_rotations(real):
    tasks = real["tasks"]
    assert {s: len(c) for s, c in tasks.characters.items()} == {
        "train": 1100,
        "val": 100,
        "test": 423,
    }
    assert {s: len(c) for s, c in tasks.classes.items()} == {
        "train": 4400,
        "val": 400,
        "test": 1692,
    }
    sets = {s: set(c) for s, c in tasks.characters.items()}
    assert sets["train"].isdisjoint(sets["val"] | sets["test"])
    assert sets["val"].isdisjoint(sets["test"])


@pytest.mark.slow  # the real zips, preprocessed once a session (~15 s)
def test_real_background_evaluation_sizes(real):
    data = real["data"]
    splits = character_splits(data.names, data.sources, "background_evaluation")
    assert len(splits["train"]) + len(splits["val"]) == 964
    assert len(splits["test"]) == 659
    val_alphabets = {data.names[i].split("/")[0] for i in splits["val"]}
    train_alphabets = {data.names[i].split("/")[0] for i in splits["train"]}
    assert len(val_alphabets) == 5 and len(train_alphabets) == 25


@pytest.mark.slow  # the real zips, preprocessed once a session (~15 s)
def test_real_rotation_classes(real):
    images = class_images(real["tasks"], "val")
    assert torch.equal(images[1::4], torch.rot90(images[0::4], 1, dims=(-2, -1)))
    assert not torch.equal(images[1::4], images[0::4])


@pytest.mark.slow  # the real zips, preprocessed once a session (~15 s)
def test_real_sampling(real):
    batch = real["tasks"].sample("train", 3, torch.Generator().manual_seed(0))
    assert batch.x_support.shape == (3, 5, 1, 28, 28)
    assert batch.x_query.shape == (3, 75, 1, 28, 28)


@pytest.mark.slow  # the real zips, preprocessed once a session (~15 s)
def test_real_second_load_reads_only_the_cache(real, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(real["cache_home"]))
    forbid_builds(monkeypatch)
    data = load_omniglot(real["root"])
    assert torch.equal(data.images, real["data"].images)

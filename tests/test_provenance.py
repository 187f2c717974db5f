"""A test measures the model on the data it was trained on, and says so.

The checkpoint records the data root the run read and the fingerprint of that data (every
split's classes and image counts); ``test`` and ``adapt`` read from that root whatever
``$MAMLRUN_DATA`` says today, and refuse data that differs unless asked for a cross-domain
test. Nothing is created on disk until there is something to put in it.
"""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from image_fixtures import write_cifar_archive

from mamlrun.data import download, fingerprint
from mamlrun.errors import MamlrunError
from mamlrun.training.provenance import choose_root

EVAL = ("test_tasks=2", "eval_batch_size=2", "device=cpu")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """A download fails at once, as it would offline (and never reaches the network)."""

    def refuse(url):
        raise urllib.error.URLError("no network in the tests")

    monkeypatch.setattr(download, "_open_url", refuse)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A CIFAR-FS run trained from ``dataset.root=<base>/data``: ``<base>/run``."""
    base = tmp_path_factory.mktemp("trained")
    write_cifar_archive(base / "data")
    out = run_cli(
        "train", "experiment=cifarfs_5w1s", f"dataset.root={base / 'data'}", "dataset.query=1",
        "iterations=2", "val_every=2", "val_tasks=2", "eval_batch_size=2", "checkpoint_every=2",
        "meta_optimizer.task_batching=loop", "device=cpu", "hydra.run.dir=run",
        cwd=base, env={"OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(base / "xdg")},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return base


def test_the_checkpoint_records_the_root_read_and_every_splits_classes_and_counts(trained):
    saved = torch.load(trained / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert saved["data"]["root"] == str(trained / "data")
    counts = {s: list(c.values()) for s, c in saved["data"]["fingerprint"].items()}
    assert {s: len(c) for s, c in counts.items()} == {"train": 64, "val": 16, "test": 20}
    assert all(n == 3 for c in counts.values() for n in c)  # 2 train + 1 test image a class


@pytest.mark.parametrize("command", ["test", "adapt"])
def test_a_test_reads_the_runs_data_root_not_mamlrun_data(
    command, trained, tmp_path, monkeypatch, cli_here
):
    elsewhere = tmp_path / "another-data-folder"
    elsewhere.mkdir()
    monkeypatch.setenv("MAMLRUN_DATA", str(elsewhere))
    monkeypatch.setenv("XDG_CACHE_HOME", str(trained / "xdg"))
    out = cli_here(command, f"checkpoint={trained / 'run'}", *EVAL, "hydra.run.dir=t")
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "t" / "results.json").read_text())
    assert results["data_root"] == str(trained / "data")
    assert results["data_differences"] == []
    assert list(elsewhere.iterdir()) == [], "nothing downloaded into $MAMLRUN_DATA"


def test_other_classes_or_counts_are_one_line_unless_a_cross_domain_test(
    trained, tmp_path, monkeypatch, cli_here
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    write_cifar_archive(tmp_path / "other", train_per_class=3)  # every class one image more
    args = (f"checkpoint={trained / 'run'}", f"data_root={tmp_path / 'other'}", *EVAL)
    out = cli_here("test", *args, "hydra.run.dir=refused")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(
        f"mamlrun: error: the data in {tmp_path / 'other'} is not what the run trained on "
        "(test: 20 classes with other image counts (baby: 3 → 4, bed: 3 → 4, bicycle: 3 → 4, …); "
    )
    assert "add cross_domain=true to test on this data" in out.stderr
    assert not (tmp_path / "refused").exists()

    out = cli_here("test", *args, "cross_domain=true", "hydra.run.dir=crossed")
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "crossed" / "results.json").read_text())
    assert results["data_root"] == str(tmp_path / "other")
    assert [d.split(":")[0] for d in results["data_differences"]] == ["test", "train", "val"]


def test_the_same_data_elsewhere_is_accepted_when_named(trained, tmp_path, monkeypatch, cli_here):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    write_cifar_archive(tmp_path / "copy")
    out = cli_here(
        "test", f"checkpoint={trained / 'run'}", f"data_root={tmp_path / 'copy'}", *EVAL,
        "hydra.run.dir=t",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr


ROOT_CASES = {
    # (data_root=, recorded root, configured dataset.root, $MAMLRUN_DATA) → root read
    "an explicit data_root= first": ("given", "recorded", "configured", "env", "given"),
    "then the root the run recorded": (None, "recorded", "configured", "env", "recorded"),
    "an old checkpoint: its dataset.root": (None, None, "configured", "env", "configured"),
    "then $MAMLRUN_DATA": (None, None, None, "env", "env"),
    "then the user cache": (None, None, None, None, "xdg/mamlrun"),
}


@pytest.mark.parametrize("case", ROOT_CASES, ids=list(ROOT_CASES))
def test_the_root_a_test_reads(case, tmp_path, monkeypatch):
    given, recorded, configured, env, expected = ROOT_CASES[case]
    for name in ("recorded", "env"):
        (tmp_path / name).mkdir()
    at = {None: None} | {n: str(tmp_path / n) for n in ("given", "recorded", "configured", "env")}
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("MAMLRUN_DATA", at[env] or "")
    saved = {"data": {"root": at[recorded]}} if recorded else {}
    chosen = choose_root(saved, {"root": at[configured]}, at[given])
    assert chosen.root == str(tmp_path / expected)


def test_a_relative_data_root_is_recorded_as_the_folder_it_named(tmp_path, monkeypatch):
    from mamlrun.training.provenance import record

    class Files:
        input_shape = (3, 8, 8)

        def fingerprint(self):
            return {}

    monkeypatch.chdir(tmp_path)
    assert record({"root": "data"}, Files())["root"] == str(tmp_path / "data")


def test_a_recorded_root_missing_here_asks_for_data_root(tmp_path):
    saved = {"data": {"root": str(tmp_path / "cluster" / "data")}}
    with pytest.raises(MamlrunError, match="is not on this machine; pass data_root=DIR"):
        choose_root(saved, {"root": None}, None)


def test_a_fingerprint_names_classes_missing_added_recounted_and_reordered():
    run = {"test": {"a": 3, "b": 3, "c": 3}}
    assert fingerprint.differences(run, {"test": {"a": 3, "b": 3, "c": 3}}) == []
    assert fingerprint.differences(run, {"test": {"a": 3, "b": 2, "d": 3}}) == [
        "test: 1 of its 3 classes missing (c), 1 classes the run did not have (d), "
        "1 classes with other image counts (b: 3 → 2)"
    ]
    assert fingerprint.differences(run, {"test": {"c": 3, "b": 3, "a": 3}}) == [
        "test: the same classes in another order (other tasks for the same seed)"
    ]


@pytest.mark.parametrize(
    ("dataset", "folder"),
    [("omniglot", "omniglot"), ("cifarfs", "cifar100"), ("fc100", "cifar100"), ("cub", "cub")],
)
def test_a_failed_download_leaves_no_folder(dataset, folder, tmp_path, monkeypatch, cli_here):
    monkeypatch.delenv("MAMLRUN_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    out = cli_here("train", f"dataset={dataset}", "iterations=1")
    assert out.returncode == 2 and "could not download" in out.stderr, out.stderr
    assert not (tmp_path / "xdg").exists(), "no ~/.cache/mamlrun/<dataset> without data"
    out = cli_here("train", f"dataset={dataset}", f"dataset.root={tmp_path / 'root'}")
    assert out.returncode == 2 and not (tmp_path / "root").exists(), f"{folder}/ left behind"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_no_object_repr_reaches_a_message(monkeypatch):
    """Libraries put ``<_io.BytesIO object at 0x7f…>`` into their messages; the error helper
    turns it into the type's name, and under the tests' strict mode fails instead, so that
    every message a test provokes is checked."""
    from mamlrun import errors

    text = "cannot identify image file <_io.BytesIO object at 0x7f8d2c1b3e20>"
    with pytest.raises(AssertionError, match="a Python object's repr"):
        MamlrunError(text)
    monkeypatch.delenv(errors.STRICT)
    assert str(MamlrunError(text)) == "cannot identify image file a BytesIO"

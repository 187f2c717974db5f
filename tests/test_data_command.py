"""`mamlrun data prepare|check`: a dataset made ready, or checked, before a run needs it."""

from __future__ import annotations

import pytest
from conftest import data_root, needs_omniglot, run_cli
from image_fixtures import write_cifar_archive
from test_miniimagenet import write_pickles

from mamlrun.data.miniimagenet import SPLIT_CLASSES


def table(stdout: str) -> dict[str, list[str]]:
    """The rows of the printed table by split."""
    rows = [line.split() for line in stdout.splitlines() if line.startswith("  ")]
    return {r[0]: r[1:] for r in rows if r[0] in ("train", "val", "test")}


@pytest.mark.slow  # builds the real Omniglot cache
@needs_omniglot
def test_prepare_builds_omniglot_as_train_does_and_says_what_each_split_holds(tmp_path):
    out = run_cli("data", "prepare", "dataset=omniglot", f"dataset.root={data_root()}",
                  cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("omniglot: ready")
    # 1,100 / 100 / 423 characters of 20 drawings, each in 4 rotations (the MAML split)
    assert table(out.stdout) == {
        "train": ["4,400", "88,000", "1×28×28"],
        "val": ["400", "8,000", "1×28×28"],
        "test": ["1,692", "33,840", "1×28×28"],
    }
    assert "verified: " in out.stdout
    cache = next(line for line in out.stdout.splitlines() if line.strip().startswith("cache: "))
    assert "cache_28" in cache and " MB)" in cache  # where it is and what it takes on disk


def test_prepare_reads_miniimagenet_pickles_checks_the_classes_and_shows_the_cache(
    tmp_path, cli_here
):
    write_pickles(tmp_path / "data", classes=SPLIT_CLASSES, per_class=2)
    out = cli_here(
        "data",
        "prepare",
        "dataset=miniimagenet",
        f"dataset.root={tmp_path / 'data'}",
        "dataset.query=1",
    )  # fixtures: 2 images per class; fmt: skip
    assert out.returncode == 0, out.stderr
    assert table(out.stdout) == {
        "train": ["64", "128", "3×84×84"],
        "val": ["16", "32", "3×84×84"],
        "test": ["20", "40", "3×84×84"],
    }
    assert "layout pickle" in out.stdout and "ravi_larochelle split" in out.stdout
    cache = tmp_path / "data" / "miniimagenet" / "cache_84.u8"
    assert f"  cache: {cache} (4.2 MB)" in out.stdout.splitlines()  # 200 images of 84×84×3


def test_check_verifies_what_is_there_and_never_downloads(tmp_path, cli_here):
    empty = tmp_path / "empty"
    out = cli_here("data", "check", "dataset=cifarfs", f"dataset.root={empty}")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert (
        f"cifar-100-python.tar.gz is missing from {empty}/cifar100 (a check downloads nothing); "
        f"`mamlrun data prepare dataset=cifarfs dataset.root={empty}` downloads and verifies it"
    ) in out.stderr
    assert not empty.exists()
    write_cifar_archive(tmp_path / "data")
    out = cli_here(
        "data",
        "check",
        "dataset=cifarfs",
        f"dataset.root={tmp_path / 'data'}",
        "dataset.query=1",
    )  # fixtures: 3 images per class; fmt: skip
    assert out.returncode == 0, out.stderr
    assert [row[0] for row in table(out.stdout).values()] == ["64", "16", "20"]
    assert f"cache: {tmp_path / 'data' / 'cifar100' / 'cache_cifarfs_32.u8'} (" in out.stdout


def test_a_generated_dataset_has_nothing_to_prepare(cli_here):
    out = cli_here("data", "prepare", "dataset=sinusoid")
    assert out.returncode == 0 and "generated on the fly, nothing to prepare" in out.stdout


@pytest.mark.parametrize(
    "args,expected",
    [([], "data needs prepare or check, got nothing"),
     (["fetch", "dataset=omniglot"], "data needs prepare or check, got 'fetch'"),
     (["prepare"], "data prepare needs dataset=NAME"),
     (["prepare", "dataset=omniglot", "iterations=3"], "takes only dataset=NAME and dataset."),
     (["prepare", "dataset=omniglt"], "did you mean dataset=omniglot?"),
     (["check", "dataset=omniglot", "dataset.wayz=3"], "dataset has no wayz")],
)  # fmt: skip
def test_data_mistakes_are_one_line_with_exit_status_2(cli_here, args, expected):
    out = cli_here("data", *args)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("mamlrun: error: ") and expected in out.stderr

"""``dataset=images``: a user's own folder of images is a few-shot dataset, in the three layouts
people have (split folders, class folders, a CSV), and every way such a folder can be wrong is
one line that names the file or class and says what to do.

The folders are written by the tests: images of odd sizes, in every mode (L, RGB, RGBA, P) and
format (PNG, JPEG, BMP, WebP, GIF) mixed within a class, plus a file that does not decode. The
user's folder is only ever read: every test that runs a command compares a listing of it
(names, sizes, modification times) before and after.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import adapts_after_training, run_cli
from PIL import Image

from mamlrun import config
from mamlrun.data import folders
from mamlrun.data.folder_layouts import seeded_split
from mamlrun.errors import MamlrunError

#: Mode and format of the i-th image of a class, in turn: every mode and format mixed.
KINDS = (("RGB", "jpg"), ("L", "png"), ("RGBA", "png"), ("P", "gif"), ("RGB", "bmp"),
         ("L", "jpg"), ("RGBA", "webp"), ("P", "png"))  # fmt: skip
TINY = ("dataset.ways=2", "dataset.shots=1", "dataset.query=1", "dataset.image_size=28",
        "backbone.filters=8")  # fmt: skip
QUICK = ("iterations=2", "val_every=2", "val_tasks=2", "eval_batch_size=2", "checkpoint_every=2",
         "test_tasks=2", "meta_optimizer.task_batching=loop", "device=cpu")  # fmt: skip


def write_class(folder: Path, label: int, count: int, start: int = 0) -> list[Path]:
    """``count`` images of one flat colour per class (red encodes the class), each of another
    odd size, mode and format."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        mode, ext = KINDS[(label + i) % len(KINDS)]
        image = Image.new("RGB", (29 + 6 * i, 37 - 2 * (label % 5)), (10 * label, 40 * i, 90))
        path = folder / f"img{i}.{ext}"
        image.convert(mode).save(path)
        paths.append(path)
    return paths


def corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8 not a JPEG at all")
    return path


def split_folders(root: Path, per_class: int = 3) -> Path:
    for s, first, count in (("train", 0, 4), ("val", 10, 2), ("test", 20, 2)):
        for c in range(first, first + count):
            write_class(root / s / f"{s}_class{c}", c, per_class)
    return root


def class_folders(root: Path, classes: int = 12, per_class: int = 3) -> Path:
    for c in range(classes):
        write_class(root / f"class{c:02d}", c, per_class)
    return root


def csv_layout(root: Path, with_split: bool = True) -> Path:
    """``root/labels.csv`` naming images in ``root/pictures/`` (and a header row)."""
    rows = ["filename,label,split" if with_split else "filename,label"]
    for c, s in enumerate(("train",) * 4 + ("val",) * 2 + ("test",) * 2):
        for path in write_class(root / "pictures", c, 3, start=3 * c):
            name = path.relative_to(root).as_posix()
            rows.append(f"{name},label{c},{s}" if with_split else f"{name},label{c}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


LAYOUTS = {"split folders": split_folders, "class folders": class_folders, "csv": csv_layout}


def listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root`` with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}  # fmt: skip


def source(root: Path, **changes):
    settings = {**config.settings("dataset", "images"), "root": str(root), "ways": 2,
                "shots": 1, "query": 1, "image_size": 28, **changes}  # fmt: skip
    settings.pop("_preset_", None)
    settings.pop("_target_", None)
    return folders.images_tasks(**settings, device="cpu")


# ------------------------------------------------------------------- each layout, end to end


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_trains_tests_and_adapts_in_one_command_each(layout, tmp_path):
    root = LAYOUTS[layout](tmp_path / "mine")
    folder = {"split folders": "train/train_class0", "class folders": "class00", "csv": "pictures"}
    corrupt(root / folder[layout] / "broken.jpg")
    if layout == "csv":
        with open(root / "labels.csv", "a") as f:
            f.write("pictures/broken.jpg,label0,train\n")
    before = listing(root)
    csv = ["dataset.csv=labels.csv"] if layout == "csv" else []
    env = {"OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    out = run_cli("train", "dataset=images", f"dataset.root={root}", *csv, *TINY, *QUICK,
                  "dataset.skip_unreadable=true", "final_test=true", "hydra.run.dir=run",
                  cwd=tmp_path, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    log = (tmp_path / "run" / "train.log").read_text()
    assert "1 files do not decode and are left out (dataset.skip_unreadable=true): " in log
    assert "broken.jpg" in log and "split rule: " in log
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["dataset"]["layout"] == layout
    assert results["dataset"]["input_shape"] == [3, 28, 28]
    assert (tmp_path / "run" / "test" / "results.json").is_file()  # the final test
    tested = run_cli("test", "checkpoint=run", "test_tasks=2", "eval_batch_size=2",
                     "hydra.run.dir=tested", cwd=tmp_path, env=env)  # fmt: skip
    assert tested.returncode == 0, tested.stderr
    assert json.loads((tmp_path / "tested" / "results.json").read_text())["test_tasks"] == 2
    adapts_after_training(tmp_path, env=env)
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    train_classes = 8 if layout == "class folders" else 4  # 12 split 64/16/20, or as given
    assert {s: len(c) for s, c in splits["classes"].items()} == {
        "train": train_classes, "val": 2, "test": 2}  # fmt: skip
    assert listing(root) == before  # nothing written into the user's folder, nothing deleted

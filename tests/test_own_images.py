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


def source(root: Path | None, **changes):
    settings = {**config.settings("dataset", "images"), "root": root and str(root), "ways": 2,
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
    assert "1 file that does not decode is left out (dataset.skip_unreadable=true): " in log
    assert log.count("broken.jpg") == log.count("split rule: ") > 0  # once each time it is read
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


# ------------------------------------------------------------------------------ the images


def stripes(size: tuple[int, int]) -> Image.Image:
    """Red, green and blue thirds, left to right."""
    image = Image.new("RGB", size, (255, 0, 0))
    third = size[0] // 3
    image.paste((0, 255, 0), (third, 0, 2 * third, size[1]))
    image.paste((0, 0, 255), (2 * third, 0, size[0], size[1]))
    return image


def pixels(path: Path, size: int, resize: str, channels: int) -> torch.Tensor:
    raw = folders.decode(str(path), folders.Look(size, resize, channels))
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(size, size, channels)


def test_crop_keeps_the_middle_of_the_longer_side_and_pad_keeps_everything_on_black(tmp_path):
    stripes((90, 30)).save(tmp_path / "wide.png")
    cropped = pixels(tmp_path / "wide.png", 15, "crop", 3)
    green = torch.tensor([0, 255, 0])
    assert (cropped[:, 3:-3].int() - green).abs().max() < 16  # Lanczos rings a little at edges
    padded = pixels(tmp_path / "wide.png", 15, "pad", 3)
    assert (padded[0] == 0).all() and (padded[-1] == 0).all()  # black bars above and below
    middle = padded[7]
    assert middle[0, 0] > 200 and middle[7, 1] > 200 and middle[-1, 2] > 200  # all three kept


def test_every_mode_and_format_is_converted_to_the_channels_asked_for(tmp_path):
    paths = write_class(tmp_path, 3, len(KINDS))
    assert {Image.open(p).mode for p in paths} == {"RGB", "L", "RGBA", "P"}
    assert {p.suffix for p in paths} == {".jpg", ".png", ".gif", ".bmp", ".webp"}
    for channels in (1, 3):
        for path in paths:
            assert pixels(path, 20, "crop", channels).shape == (20, 20, channels)


def test_a_photo_is_turned_upright_as_its_exif_orientation_says(tmp_path):
    image = Image.new("RGB", (40, 20), (250, 0, 0))
    image.paste((0, 0, 250), (20, 0, 40, 20))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90° clockwise: red on top, blue below
    image.save(tmp_path / "phone.jpg", exif=exif)
    upright = pixels(tmp_path / "phone.jpg", 40, "pad", 3).int()
    assert upright[2, 20, 0] > 200 and upright[-3, 20, 2] > 200  # red top, blue bottom
    assert (upright[:, :5] == 0).all()  # black bars left and right of the tall image


def test_a_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((250, 0, 0), (0, 0, 250))]
    frames[0].save(tmp_path / "moving.gif", save_all=True, append_images=frames[1:])
    first = pixels(tmp_path / "moving.gif", 16, "crop", 3).float().mean((0, 1))
    assert first[0] > 200 and first[2] < 50


# ------------------------------------------------------------------------- splits and cache


def test_without_lists_the_classes_are_split_64_16_20_by_a_seed_and_the_split_is_saved(tmp_path):
    root = class_folders(tmp_path / "mine", classes=25)
    first = source(root)
    assert {s: len(c) for s, c in first.classes.items()} == {"train": 16, "val": 4, "test": 5}
    assert first.classes == source(root).classes  # the same seed, the same split
    assert seeded_split([f"class{c:02d}" for c in range(25)], [0.64, 0.16, 0.2], 0) == {
        s: sorted(c) for s, c in first.classes.items()}  # fmt: skip
    saved = json.loads(Path(first.describe()["split_file"]).read_text())  # beside the cache
    assert saved["classes"] == first.classes and saved["rule"].startswith("seeded, 64/16/20% of")
    other = source(root, split_seed=1, split_fractions=[0.6, 0.2, 0.2])
    assert {s: len(c) for s, c in other.classes.items()} == {"train": 15, "val": 5, "test": 5}
    assert other.classes["test"] != first.classes["test"]


def test_class_lists_split_the_class_folders_and_unlisted_classes_are_left_out(tmp_path, caplog):
    root = class_folders(tmp_path / "mine", classes=7)
    for s, names in (("train", "class00\nclass01\nclass02\n"), ("val", "class03\nclass04"),
                     ("test", "\nclass05\nclass06\n")):  # fmt: skip
        (root / f"{s}.txt").write_text(names)
    (root / "class07").mkdir()
    write_class(root / "class07", 7, 3)
    tasks = source(root)
    assert tasks.classes == {
        "train": ["class00", "class01", "class02"],
        "val": ["class03", "class04"],
        "test": ["class05", "class06"],
    }
    assert "1 class folders are in no list and left out: class07" in caplog.text
    assert tasks.describe()["split_rule"] == "the class lists train.txt, val.txt and test.txt"


def test_the_cache_is_rebuilt_when_a_file_changes_and_reused_otherwise(tmp_path):
    root = class_folders(tmp_path / "mine")
    before = listing(root)
    cache = Path(source(root).describe()["cache"])
    assert cache.is_relative_to(tmp_path.parent) and not cache.is_relative_to(root)
    built = cache.stat()
    source(root)
    assert (cache.stat().st_ino, cache.stat().st_mtime_ns) == (built.st_ino, built.st_mtime_ns)
    image = root / "class04" / "img1.jpg"
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: rebuilt
    source(root)
    assert cache.stat().st_ino != built.st_ino
    write_class(root / "class04", 4, 1, start=3)  # a file added: rebuilt, with it
    assert source(root).counts["train" if "class04" in source(root).classes["train"] else "val"]
    assert sum(sum(c) for c in source(root).counts.values()) == 12 * 3 + 1
    assert set(listing(root)) == set(before) | {"class04/img3.png"}


def test_data_check_shows_the_table_the_split_rule_and_the_files_left_out(tmp_path, cli_here):
    root = class_folders(tmp_path / "mine")
    corrupt(root / "class02" / "broken.png")
    out = cli_here("data", "check", "dataset=images", f"dataset.root={root}", *TINY[:4],
                   "dataset.skip_unreadable=true")  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:5] == [
        "images: checked",
        "  split  classes  images  image size",
        "  train  8        24      3×28×28",
        "  val    2        6       3×28×28",
        "  test   2        6       3×28×28",
    ]
    assert lines[5] == (
        f"  read: {root}, layout class folders; split rule: seeded, 64/16/20% of the 12 "
        "classes (dataset.split_fractions, split_seed=0)"
    )
    assert lines[6].startswith("  classes of each split: ") and lines[6].endswith(".splits.json")
    assert lines[7] == "  left out, 1 file that does not decode (skip_unreadable):"
    assert lines[8] == f"    {root}/class02/broken.png (cannot identify image file)"


# ------------------------------------------------------------------------------ bad input


def duplicated(root: Path) -> Path:
    split_folders(root)
    write_class(root / "val" / "train_class1", 1, 3)
    write_class(root / "test" / "train_class2", 2, 3)
    return root


def listed_but_absent(root: Path) -> Path:
    class_folders(root)
    for s, names in (("train", "class00\nclass01\nclass99"), ("val", "class02\nclass03"),
                     ("test", "class04\nclass05")):  # fmt: skip
        (root / f"{s}.txt").write_text(names)
    return root


def short_class(root: Path) -> Path:
    class_folders(root)
    for path in sorted((root / "class05").iterdir())[1:]:
        path.unlink()
    return root


def missing_row(root: Path) -> Path:
    csv_layout(root)
    with open(root / "labels.csv", "a") as f:
        f.write("pictures/gone.png,label0,train\n")
    return root


BAD = {
    "a missing folder": (lambda root: root, (),
        "dataset.root={root} does not exist; point it at your folder of images"),
    "an empty folder": (lambda root: root.mkdir() or root, (),
        "{root} holds no class folders of images (.png, .jpg, .jpeg, .bmp, .webp, .gif); put "
        "each class's images in {root}/<class>/ or {root}/{{train,val,test}}/<class>/, or name "
        "a CSV of filename,label[,split] rows with dataset.csv"),
    "a split with fewer classes than N-way": (class_folders, ("dataset.ways=3",),
        "the val split has 2 classes (class01, class03), 3-way tasks need 3 (split rule: seeded,"
        " 64/16/20% of the 12 classes (dataset.split_fractions, split_seed=0)): add classes to "
        "it, or lower dataset.ways"),
    "a class with fewer images than K-shot plus query": (short_class, (),
        "1 class has fewer than the 2 images a task takes from each (dataset.shots + "
        "dataset.query): class05 in train has 1; add images, or lower dataset.shots or "
        "dataset.query"),
    "a file that does not decode": (lambda root: corrupt(class_folders(root) / "class00" / "x.jpg")
                                    and root, (),
        "1 file does not decode as an image: {root}/class00/x.jpg (cannot identify image "
        "file); replace or remove it, or set dataset.skip_unreadable=true to leave such files "
        "out"),
    "a CSV row naming a missing file": (missing_row, ("dataset.csv=labels.csv",),
        "{root}/labels.csv, line 26: pictures/gone.png is not a file in {root}; fix the row or "
        "add the file (filenames are relative to dataset.root)"),
    "the same class in two splits": (duplicated, (),
        "class train_class1 is in the train and the val split ({root}/train/train_class1 and "
        "{root}/val/train_class1; also train_class2 (train, test)): a class belongs to one split; "
        "rename or remove one of them"),
    "a class list naming a class that is not there": (listed_but_absent, (),
        "{root}/train.txt, line 3: class class99 is not a folder of images in {root}; fix the "
        "name or add the folder"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_naming_the_file_or_class_and_leaves_nothing(
    case, tmp_path, cli_here
):
    make, extra, expected = BAD[case]
    root = make(tmp_path / "mine")
    before = listing(root) if root.exists() else None
    out = cli_here("train", "dataset=images", f"dataset.root={root}", *TINY, *extra, *QUICK,
                   "hydra.run.dir=run")  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("mamlrun: error: ") and out.stderr.count("\n") == 1, out.stderr
    assert expected.format(root=root) in out.stderr
    assert not (tmp_path / "run").exists()  # no run folder left behind
    assert (listing(root) if root.exists() else None) == before  # the folder untouched
    check = cli_here("data", "check", "dataset=images", f"dataset.root={root}", *TINY[:4], *extra)
    assert check.returncode == 2 and expected.format(root=root) in check.stderr


def test_a_csv_without_a_split_column_is_split_by_the_seeded_rule(tmp_path):
    root = csv_layout(tmp_path / "mine", with_split=False)
    tasks = source(root, csv="labels.csv", split_fractions=[0.5, 0.25, 0.25])
    assert {s: len(c) for s, c in tasks.classes.items()} == {"train": 4, "val": 2, "test": 2}
    assert tasks.describe()["split_rule"].startswith("seeded, 50/25/25% of the 8 classes")
    absolute = source(root, csv=str(root / "labels.csv"), split_fractions=[0.5, 0.25, 0.25])
    assert absolute.classes == tasks.classes


def test_one_channel_and_padding_reach_the_network_as_asked(tmp_path):
    root = class_folders(tmp_path / "mine")
    tasks = source(root, channels=1, resize="pad", image_size=20)
    assert tasks.input_shape == (1, 20, 20) and len(tasks.mean) == 1
    batch = tasks.sample("test", 2, torch.Generator().manual_seed(0))
    assert batch[0].shape == (2, 2, 1, 20, 20)


@pytest.mark.parametrize(
    "make,changes,expected",
    [(lambda root: None, {}, "dataset=images needs dataset.root=DIR"),
     (lambda root: split_folders(root) and __import__("shutil").rmtree(root / "val") or root, {},
      "{root} has train/ and test/ but no val/: give every split its folder"),
     (lambda root: csv_layout(root) and (root / "labels.csv").write_text("a.png,x,train,9\n")
      and root, {"csv": "labels.csv"}, "{root}/labels.csv, line 1: 4 columns, expected"),
     (lambda root: csv_layout(root), {"csv": "nothing.csv"},
      "dataset.csv: {root}/nothing.csv does not exist")],
)  # fmt: skip
def test_more_folder_mistakes_are_one_line_too(make, changes, expected, tmp_path):
    root = make(tmp_path / "mine")
    with pytest.raises(MamlrunError) as raised:
        source(root, **changes)
    assert expected.format(root=root) in str(raised.value)


@pytest.mark.parametrize(
    "setting,expected",
    [("dataset.channels=2", "dataset.channels must be 1 or 3, got 2"),
     ("dataset.resize=stretch", "dataset.resize must be one of crop, pad, got 'stretch'"),
     ("dataset.split_fractions=[0.5,0.5,0.5]", "dataset.split_fractions must be three shares "
      "(train, val, test) adding up to 1, got [0.5, 0.5, 0.5]")],
)  # fmt: skip
def test_settings_out_of_range_are_refused_before_the_folder_is_read(setting, expected, cli_here):
    out = cli_here("train", "dataset=images", "dataset.root=/nowhere", setting)
    assert out.returncode == 2 and out.stderr == f"mamlrun: error: {expected}\n"


def test_a_class_short_once_unreadable_files_are_left_out_is_named_from_the_cache_too(tmp_path):
    root = class_folders(tmp_path / "mine", per_class=4)
    sorted((root / "class00").iterdir())[0].unlink()
    corrupt(root / "class00" / "broken.jpg")  # class00: 4 files, 3 of them images
    source(root, skip_unreadable=True)  # builds the cache, 1 + 1 images a task
    for _ in range(2):  # the first reads the cache; a build would say the same
        with pytest.raises(MamlrunError, match="1 class has fewer than the 4 images .*: class00 "
                           "in train has 3; add images"):  # fmt: skip
            source(root, skip_unreadable=True, query=3)

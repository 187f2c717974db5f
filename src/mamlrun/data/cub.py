"""CUB-200-2011 (Wah et al. 2011) birds with the few-shot split of Chen et al. (2019, "A Closer
Look at Few-shot Classification"): 200 species, 11,788 photos (41 to 60 per species), 100
training, 50 validation and 50 test species, resized to 84×84 RGB.

The split, as ``filelists/CUB/write_CUB_filelist.py`` of wyharveychen/CloserLookFewShot writes
it: the image folders sorted by name, folder ``i`` (from 0) goes to training if ``i % 2 == 0``,
to validation if ``i % 4 == 1`` and to testing if ``i % 4 == 3``. torchmeta's class lists
(``torchmeta/datasets/assets/cub/{train,val,test}.json``) are exactly what this rule gives.

Two layouts are read from ``<root>/cub/``:

* **the extracted dataset** ``CUB_200_2011/`` with ``images/<class>/*.jpg``, ``classes.txt``,
  ``images.txt`` and ``image_class_labels.txt``;
* **the official archive** ``CUB_200_2011.tgz`` (downloaded, md5 checked, when neither is
  there), read in one pass without extracting it.

Either way the images are resized once with Lanczos into ``cache_84.u8`` beside them (or, where
that folder is read-only, ``~/.cache/mamlrun/cub/cache_84-<hash of the folder>.u8``), which later
runs memory-map; it is rebuilt when the archive, a listing or an image changes. Chen et al.
resized to 96×96 and centre-cropped 84×84 at test time (and augmented in training); a plain
resize keeps each image whole, as the other 84×84 benchmarks here do. Class ``i`` of a split is
the ``i``-th of its species in name order; a class's images are in ``images.txt`` order.
"""

from __future__ import annotations

import logging
import os
import tarfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from mamlrun.data.decode import DecodePool, one_line, resize_files
from mamlrun.data.download import (
    ensure_file,
    looks_like_html,
    md5sum,
    resolve_root,
    tar_gz_files,
)
from mamlrun.data.sources import (
    Delivery,
    ImageData,
    Reading,
    cached_images,
    check_classes,
    image_tasks,
)
from mamlrun.data.tasks import SPLITS
from mamlrun.data.u8cache import ImageSplit, fingerprint
from mamlrun.errors import MamlrunError

log = logging.getLogger(__name__)

IMAGE_SIZE = 84
FOLDER = "cub"
EXTRACTED = "CUB_200_2011"
ARCHIVE = "CUB_200_2011.tgz"
URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
MD5 = "97eceeb196236b17998738112f37df78"
LISTINGS = ("classes.txt", "images.txt", "image_class_labels.txt")
#: Bytes of archive per photo (1.15 GB for 11,788): how many images to expect from its size.
_BYTES_PER_IMAGE = 90_000

#: The 200 species, as the image folders and ``classes.txt`` name them, in order. Source:
#: CUB_200_2011/classes.txt; the same names as torchmeta's split lists (above).
CLASSES: tuple[str, ...] = (
    "001.Black_footed_Albatross",
    "002.Laysan_Albatross",
    "003.Sooty_Albatross",
    "004.Groove_billed_Ani",
    "005.Crested_Auklet",
    "006.Least_Auklet",
    "007.Parakeet_Auklet",
    "008.Rhinoceros_Auklet",
    "009.Brewer_Blackbird",
    "010.Red_winged_Blackbird",
    "011.Rusty_Blackbird",
    "012.Yellow_headed_Blackbird",
    "013.Bobolink",
    "014.Indigo_Bunting",
    "015.Lazuli_Bunting",
    "016.Painted_Bunting",
    "017.Cardinal",
    "018.Spotted_Catbird",
    "019.Gray_Catbird",
    "020.Yellow_breasted_Chat",
    "021.Eastern_Towhee",
    "022.Chuck_will_Widow",
    "023.Brandt_Cormorant",
    "024.Red_faced_Cormorant",
    "025.Pelagic_Cormorant",
    "026.Bronzed_Cowbird",
    "027.Shiny_Cowbird",
    "028.Brown_Creeper",
    "029.American_Crow",
    "030.Fish_Crow",
    "031.Black_billed_Cuckoo",
    "032.Mangrove_Cuckoo",
    "033.Yellow_billed_Cuckoo",
    "034.Gray_crowned_Rosy_Finch",
    "035.Purple_Finch",
    "036.Northern_Flicker",
    "037.Acadian_Flycatcher",
    "038.Great_Crested_Flycatcher",
    "039.Least_Flycatcher",
    "040.Olive_sided_Flycatcher",
    "041.Scissor_tailed_Flycatcher",
    "042.Vermilion_Flycatcher",
    "043.Yellow_bellied_Flycatcher",
    "044.Frigatebird",
    "045.Northern_Fulmar",
    "046.Gadwall",
    "047.American_Goldfinch",
    "048.European_Goldfinch",
    "049.Boat_tailed_Grackle",
    "050.Eared_Grebe",
    "051.Horned_Grebe",
    "052.Pied_billed_Grebe",
    "053.Western_Grebe",
    "054.Blue_Grosbeak",
    "055.Evening_Grosbeak",
    "056.Pine_Grosbeak",
    "057.Rose_breasted_Grosbeak",
    "058.Pigeon_Guillemot",
    "059.California_Gull",
    "060.Glaucous_winged_Gull",
    "061.Heermann_Gull",
    "062.Herring_Gull",
    "063.Ivory_Gull",
    "064.Ring_billed_Gull",
    "065.Slaty_backed_Gull",
    "066.Western_Gull",
    "067.Anna_Hummingbird",
    "068.Ruby_throated_Hummingbird",
    "069.Rufous_Hummingbird",
    "070.Green_Violetear",
    "071.Long_tailed_Jaeger",
    "072.Pomarine_Jaeger",
    "073.Blue_Jay",
    "074.Florida_Jay",
    "075.Green_Jay",
    "076.Dark_eyed_Junco",
    "077.Tropical_Kingbird",
    "078.Gray_Kingbird",
    "079.Belted_Kingfisher",
    "080.Green_Kingfisher",
    "081.Pied_Kingfisher",
    "082.Ringed_Kingfisher",
    "083.White_breasted_Kingfisher",
    "084.Red_legged_Kittiwake",
    "085.Horned_Lark",
    "086.Pacific_Loon",
    "087.Mallard",
    "088.Western_Meadowlark",
    "089.Hooded_Merganser",
    "090.Red_breasted_Merganser",
    "091.Mockingbird",
    "092.Nighthawk",
    "093.Clark_Nutcracker",
    "094.White_breasted_Nuthatch",
    "095.Baltimore_Oriole",
    "096.Hooded_Oriole",
    "097.Orchard_Oriole",
    "098.Scott_Oriole",
    "099.Ovenbird",
    "100.Brown_Pelican",
    "101.White_Pelican",
    "102.Western_Wood_Pewee",
    "103.Sayornis",
    "104.American_Pipit",
    "105.Whip_poor_Will",
    "106.Horned_Puffin",
    "107.Common_Raven",
    "108.White_necked_Raven",
    "109.American_Redstart",
    "110.Geococcyx",
    "111.Loggerhead_Shrike",
    "112.Great_Grey_Shrike",
    "113.Baird_Sparrow",
    "114.Black_throated_Sparrow",
    "115.Brewer_Sparrow",
    "116.Chipping_Sparrow",
    "117.Clay_colored_Sparrow",
    "118.House_Sparrow",
    "119.Field_Sparrow",
    "120.Fox_Sparrow",
    "121.Grasshopper_Sparrow",
    "122.Harris_Sparrow",
    "123.Henslow_Sparrow",
    "124.Le_Conte_Sparrow",
    "125.Lincoln_Sparrow",
    "126.Nelson_Sharp_tailed_Sparrow",
    "127.Savannah_Sparrow",
    "128.Seaside_Sparrow",
    "129.Song_Sparrow",
    "130.Tree_Sparrow",
    "131.Vesper_Sparrow",
    "132.White_crowned_Sparrow",
    "133.White_throated_Sparrow",
    "134.Cape_Glossy_Starling",
    "135.Bank_Swallow",
    "136.Barn_Swallow",
    "137.Cliff_Swallow",
    "138.Tree_Swallow",
    "139.Scarlet_Tanager",
    "140.Summer_Tanager",
    "141.Artic_Tern",
    "142.Black_Tern",
    "143.Caspian_Tern",
    "144.Common_Tern",
    "145.Elegant_Tern",
    "146.Forsters_Tern",
    "147.Least_Tern",
    "148.Green_tailed_Towhee",
    "149.Brown_Thrasher",
    "150.Sage_Thrasher",
    "151.Black_capped_Vireo",
    "152.Blue_headed_Vireo",
    "153.Philadelphia_Vireo",
    "154.Red_eyed_Vireo",
    "155.Warbling_Vireo",
    "156.White_eyed_Vireo",
    "157.Yellow_throated_Vireo",
    "158.Bay_breasted_Warbler",
    "159.Black_and_white_Warbler",
    "160.Black_throated_Blue_Warbler",
    "161.Blue_winged_Warbler",
    "162.Canada_Warbler",
    "163.Cape_May_Warbler",
    "164.Cerulean_Warbler",
    "165.Chestnut_sided_Warbler",
    "166.Golden_winged_Warbler",
    "167.Hooded_Warbler",
    "168.Kentucky_Warbler",
    "169.Magnolia_Warbler",
    "170.Mourning_Warbler",
    "171.Myrtle_Warbler",
    "172.Nashville_Warbler",
    "173.Orange_crowned_Warbler",
    "174.Palm_Warbler",
    "175.Pine_Warbler",
    "176.Prairie_Warbler",
    "177.Prothonotary_Warbler",
    "178.Swainson_Warbler",
    "179.Tennessee_Warbler",
    "180.Wilson_Warbler",
    "181.Worm_eating_Warbler",
    "182.Yellow_Warbler",
    "183.Northern_Waterthrush",
    "184.Louisiana_Waterthrush",
    "185.Bohemian_Waxwing",
    "186.Cedar_Waxwing",
    "187.American_Three_toed_Woodpecker",
    "188.Pileated_Woodpecker",
    "189.Red_bellied_Woodpecker",
    "190.Red_cockaded_Woodpecker",
    "191.Red_headed_Woodpecker",
    "192.Downy_Woodpecker",
    "193.Bewick_Wren",
    "194.Cactus_Wren",
    "195.Carolina_Wren",
    "196.House_Wren",
    "197.Marsh_Wren",
    "198.Rock_Wren",
    "199.Winter_Wren",
    "200.Common_Yellowthroat",
)


def split_of(index: int) -> str:
    """Chen et al.'s split of the species sorted by name, by index (from 0)."""
    if index % 2 == 0:
        return "train"
    return "val" if index % 4 == 1 else "test"


SPLIT_CLASSES: dict[str, tuple[str, ...]] = {
    s: tuple(c for i, c in enumerate(CLASSES) if split_of(i) == s) for s in SPLITS
}
BENCHMARK = "Chen et al. 2019 (CUB)"
_CACHE_FORMAT = 1
_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)


def load_cub(
    root: str | os.PathLike[str] | None = None,
    split_classes: Mapping[str, Sequence[str]] | None = None,
) -> ImageData:
    """CUB from ``<root>/cub/``: the extracted folder if it is there, else the archive
    (downloaded when missing). ``split_classes`` defaults to Chen et al.'s split; tests pass
    small lists."""
    directory = resolve_root(root) / FOLDER
    expected = {s: tuple((split_classes or SPLIT_CLASSES)[s]) for s in SPLITS}
    extracted = directory / EXTRACTED
    if (extracted / "images").is_dir() or any((extracted / n).is_file() for n in LISTINGS):
        return cached_images(_from_folder(extracted, expected))
    manual = (
        f"download {URL} (md5 {MD5}) by hand into {directory}, or extract it there "
        f"({EXTRACTED}/ with images/, {', '.join(LISTINGS)})"
    )
    archive = ensure_file(directory / ARCHIVE, URL, MD5, manual)
    return cached_images(_from_archive(archive, expected, manual))


#: The ``_target_`` of ``conf/dataset/cub.yaml``.
cub_tasks = image_tasks("cub", load_cub, "chen2019")


# ---------------------------------------------------------------------------------------------
# The listings: which image is which species


def class_files(
    texts: Mapping[str, str], where: str, expected: Mapping[str, tuple[str, ...]]
) -> dict[str, list[str]]:
    """Each species' images (paths under ``images/``, in ``images.txt`` order), after checking
    that the listings agree with each other and that every split has exactly its species."""
    names = dict(_rows(texts, "classes.txt", where))
    unknown = sorted(set(names.values()) - set(CLASSES))
    if unknown:
        raise MamlrunError(f"{where}/classes.txt: {unknown[0]} is not a CUB-200-2011 species")
    labels = dict(_rows(texts, "image_class_labels.txt", where))
    files: dict[str, list[str]] = {}
    for image_id, path in _rows(texts, "images.txt", where):
        species = path.split("/", 1)[0]
        listed = names.get(labels.get(image_id, ""), "")
        if species != listed:
            raise MamlrunError(
                f"{where}: images.txt puts image {image_id} in {species}, "
                f"image_class_labels.txt in {listed or 'no class'}; use the published listings"
            )
        files.setdefault(species, []).append(path)
    for split in SPLITS:
        found = [c for c in files if split_of(CLASSES.index(c)) == split]
        check_classes(f"{where}/images.txt", split, found, expected[split], BENCHMARK)
    return files


def _rows(texts: Mapping[str, str], name: str, where: str) -> list[tuple[str, str]]:
    if name not in texts:
        raise MamlrunError(f"{where}/{name} is missing; it comes with the dataset")
    rows = []
    for number, line in enumerate(texts[name].splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise MamlrunError(f"{where}/{name}: line {number} is {line!r}, expected 'id value'")
        rows.append((fields[0], fields[1]))
    return rows


def _split_rows(files: Mapping[str, list[str]], expected: Mapping[str, tuple[str, ...]]):
    """Per split, its images' paths in class order, and the counts per class."""
    order = {s: [p for c in expected[s] for p in files[c]] for s in SPLITS}
    counts = {s: [len(files[c]) for c in expected[s]] for s in SPLITS}
    return order, counts


def _key(expected: Mapping[str, tuple[str, ...]], layout: str, files: list[Path]) -> dict:
    try:
        digest = fingerprint(files)
    except FileNotFoundError as e:
        raise MamlrunError(
            f"{e.filename} is listed in images.txt but missing; the folder needs every image"
        ) from e
    classes = {s: list(expected[s]) for s in SPLITS}
    return {"format": _CACHE_FORMAT, "layout": layout, "classes": classes, "files": digest}


# ---------------------------------------------------------------------------------------------
# The extracted folder


def _from_folder(folder: Path, expected: Mapping[str, tuple[str, ...]]) -> Reading:
    texts = {}
    for name in LISTINGS:
        try:
            texts[name] = (folder / name).read_text()
        except FileNotFoundError:
            raise MamlrunError(f"{folder / name} is missing; it comes with the dataset") from None
        except (OSError, UnicodeDecodeError) as e:
            raise MamlrunError(f"{folder / name}: cannot read it ({one_line(e)})") from e
    files = class_files(texts, str(folder), expected)
    order, counts = _split_rows(files, expected)
    paths = {s: [folder / "images" / p for p in order[s]] for s in SPLITS}
    listed = [folder / n for n in LISTINGS] + [p for s in SPLITS for p in paths[s]]
    key = _key(expected, "folder", listed)

    def deliver(into: Delivery) -> None:
        for s in SPLITS:
            into.split(
                s, ImageSplit(resize_files(paths[s], IMAGE_SIZE), counts[s], list(expected[s]))
            )

    named = [f"{EXTRACTED}/{n}" for n in LISTINGS]
    return _reading(folder.parent, key, "folder", named, deliver)


def _reading(directory: Path, key: dict, layout: str, files: list[str], deliver) -> Reading:
    return Reading(FOLDER, directory, f"cache_{IMAGE_SIZE}.u8", key, _SHAPE, layout, files, deliver)


# ---------------------------------------------------------------------------------------------
# The archive, read in one pass


def _from_archive(archive: Path, expected: Mapping[str, tuple[str, ...]], manual: str) -> Reading:
    key = _key(expected, "archive", [archive])

    def deliver(into: Delivery) -> None:
        if md5sum(archive) != MD5:  # a re-compressed copy is fine once its content checks out
            log.warning("%s is not byte for byte the official archive (md5 %s)", archive, MD5)
        texts, names, images = read_archive(archive, manual)
        files = class_files(texts, f"{archive}:{EXTRACTED}", expected)
        order, counts = _split_rows(files, expected)
        row = {name: i for i, name in enumerate(names)}
        missing = next((p for s in SPLITS for p in order[s] if p not in row), None)
        if missing is not None:
            raise MamlrunError(
                f"{archive}: {EXTRACTED}/images/{missing} is listed in images.txt but not in "
                f"the archive; {manual}"
            )
        for s in SPLITS:
            chosen = images[torch.tensor([row[p] for p in order[s]], dtype=torch.long)]
            into.split(s, ImageSplit(chosen, counts[s], list(expected[s])))

    return _reading(archive.parent, key, "archive", [archive.name], deliver)


def read_archive(path: Path, manual: str) -> tuple[dict[str, str], list[str], torch.Tensor]:
    """The listings, the image paths (under ``images/``) in archive order, and the images
    resized, decoded in parallel as the archive streams past: it is read once, never
    extracted, and only the resized images are kept."""
    again = f"delete it and run again to download it, or {manual}"
    with open(path, "rb") as f:
        if looks_like_html(f.read(2048)):
            raise MamlrunError(f"{path} is an HTML page, not the CUB-200-2011 archive; {again}")
    texts: dict[str, str] = {}
    names: list[str] = []
    parts: list[torch.Tensor] = []
    expected = path.stat().st_size // _BYTES_PER_IMAGE
    try:
        with DecodePool(IMAGE_SIZE, lambda _, px: parts.append(px), str(path), expected) as pool:
            batch: list[bytes] = []
            for member, read in tar_gz_files(path):
                inside = member.removeprefix("./")
                if not inside.startswith(f"{EXTRACTED}/"):
                    continue
                inside = inside.removeprefix(f"{EXTRACTED}/")
                if inside in LISTINGS:
                    texts[inside] = read().decode()
                elif inside.startswith("images/") and inside.lower().endswith(".jpg"):
                    names.append(inside.removeprefix("images/"))
                    batch.append(read())
                    if len(batch) == 64:
                        pool.submit(len(names) - len(batch), batch)
                        batch = []
            if batch:
                pool.submit(len(names) - len(batch), batch)
    except (tarfile.TarError, EOFError, zlib.error, OSError, UnicodeDecodeError) as e:
        raise MamlrunError(f"{path} is truncated or corrupt ({one_line(e)}); {again}") from e
    shape = (0, IMAGE_SIZE, IMAGE_SIZE, 3)
    return texts, names, torch.cat(parts) if parts else torch.zeros(shape, dtype=torch.uint8)

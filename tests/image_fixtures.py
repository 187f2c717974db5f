"""Small copies of the few-shot image datasets in their published on-disk formats, written by
the tests (the real data is not needed): tieredImageNet's PNG pickles, CIFAR-100's python
archive and MetaOptNet's CIFAR-FS / FC100 pickles, CUB-200-2011's folder and archive.

Every image is one flat colour that encodes its class (red) and its index within the class
(green), as in ``test_miniimagenet``, so a test can read back where a sampled image came from.
Python 2 pickles (tieredImageNet's labels, CIFAR-100's archive) are written as Python 2 wrote
them: byte strings as ``BINSTRING`` opcodes, numpy under its old module name ``numpy.core``.
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from test_miniimagenet import colour

from mamlrun.data import cifar, cub

SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------------------------------------
# Pickles as Python 2 wrote them


class _Python2Pickler(pickle._Pickler):
    """Protocol 2 with ``bytes`` written as Python 2's ``str`` (BINSTRING), which Python 3
    reads back according to the unpickler's ``encoding``."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def py2_pickle(obj: object) -> bytes:
    out = io.BytesIO()
    _Python2Pickler(out, protocol=2).dump(obj)
    return out.getvalue().replace(b"numpy._core", b"numpy.core")


def encoded(colour_: tuple[int, int, int], size: tuple[int, int], task_type: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour_).save(out, task_type)
    return out.getvalue()


def counts_of(classes: Sequence[str], per_class: int | Callable[[int], int]) -> list[int]:
    return [per_class(i) if callable(per_class) else per_class for i in range(len(classes))]


# ---------------------------------------------------------------------------------------------
# The published lists, written here and not taken from the loaders: the fixtures write files the
# way the real ones are, so a loader whose own table went wrong fails on them.

#: CIFAR-100's 20 superclasses and their five classes each (Krizhevsky 2009, the table on
#: https://www.cs.toronto.edu/~kriz/cifar.html, with the archive's names). The archive's
#: ``meta`` lists both alphabetically: that order is the label index.
SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
COARSE_LABELS = tuple(sorted(SUPERCLASSES))
FINE_LABELS = tuple(sorted(f for fines in SUPERCLASSES.values() for f in fines))
SUPERCLASS_OF = {fine: coarse for coarse, fines in SUPERCLASSES.items() for fine in fines}

#: CIFAR-FS (Bertinetto et al. 2019): the val and test classes of bertinetto/r2d2's split files
#: (torchmeta's cifar-fs/{val,test}.json); train is the other 64.
CIFARFS_SPLITS: dict[str, tuple[str, ...]] = {
    "val": (
        "beaver", "beetle", "butterfly", "camel", "cattle", "crab", "crocodile", "flatfish",
        "lamp", "maple_tree", "motorcycle", "otter", "sea", "shark", "television", "tractor",
    ),
    "test": (
        "baby", "bed", "bicycle", "chimpanzee", "fox", "leopard", "man", "pickup_truck",
        "plain", "poppy", "rocket", "rose", "snail", "sweet_pepper", "table", "telephone",
        "wardrobe", "whale", "woman", "worm",
    ),
}  # fmt: skip
CIFARFS_SPLITS = {
    "train": tuple(c for c in FINE_LABELS if not any(c in v for v in CIFARFS_SPLITS.values())),
    **CIFARFS_SPLITS,
}

#: FC100 (Oreshkin et al. 2018, supplementary): superclasses by coarse-label index.
FC100_SUPERCLASS_INDICES = {
    "train": (1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19),
    "val": (8, 11, 13, 16),
    "test": (0, 7, 12, 14),
}
FC100_SUPERCLASSES = {
    s: tuple(COARSE_LABELS[i] for i in indices) for s, indices in FC100_SUPERCLASS_INDICES.items()
}
FC100_SPLITS = {
    s: tuple(sorted(f for c in supers for f in SUPERCLASSES[c]))
    for s, supers in FC100_SUPERCLASSES.items()
}

#: CUB-200-2011's ``classes.txt``: the 200 species, id = position from 1.
CUB_CLASSES: tuple[str, ...] = tuple(
    """
    001.Black_footed_Albatross 002.Laysan_Albatross 003.Sooty_Albatross 004.Groove_billed_Ani
    005.Crested_Auklet 006.Least_Auklet 007.Parakeet_Auklet 008.Rhinoceros_Auklet
    009.Brewer_Blackbird 010.Red_winged_Blackbird 011.Rusty_Blackbird 012.Yellow_headed_Blackbird
    013.Bobolink 014.Indigo_Bunting 015.Lazuli_Bunting 016.Painted_Bunting 017.Cardinal
    018.Spotted_Catbird 019.Gray_Catbird 020.Yellow_breasted_Chat 021.Eastern_Towhee
    022.Chuck_will_Widow 023.Brandt_Cormorant 024.Red_faced_Cormorant 025.Pelagic_Cormorant
    026.Bronzed_Cowbird 027.Shiny_Cowbird 028.Brown_Creeper 029.American_Crow 030.Fish_Crow
    031.Black_billed_Cuckoo 032.Mangrove_Cuckoo 033.Yellow_billed_Cuckoo
    034.Gray_crowned_Rosy_Finch 035.Purple_Finch 036.Northern_Flicker 037.Acadian_Flycatcher
    038.Great_Crested_Flycatcher 039.Least_Flycatcher 040.Olive_sided_Flycatcher
    041.Scissor_tailed_Flycatcher 042.Vermilion_Flycatcher 043.Yellow_bellied_Flycatcher
    044.Frigatebird 045.Northern_Fulmar 046.Gadwall 047.American_Goldfinch 048.European_Goldfinch
    049.Boat_tailed_Grackle 050.Eared_Grebe 051.Horned_Grebe 052.Pied_billed_Grebe
    053.Western_Grebe 054.Blue_Grosbeak 055.Evening_Grosbeak 056.Pine_Grosbeak
    057.Rose_breasted_Grosbeak 058.Pigeon_Guillemot 059.California_Gull 060.Glaucous_winged_Gull
    061.Heermann_Gull 062.Herring_Gull 063.Ivory_Gull 064.Ring_billed_Gull 065.Slaty_backed_Gull
    066.Western_Gull 067.Anna_Hummingbird 068.Ruby_throated_Hummingbird 069.Rufous_Hummingbird
    070.Green_Violetear 071.Long_tailed_Jaeger 072.Pomarine_Jaeger 073.Blue_Jay 074.Florida_Jay
    075.Green_Jay 076.Dark_eyed_Junco 077.Tropical_Kingbird 078.Gray_Kingbird
    079.Belted_Kingfisher 080.Green_Kingfisher 081.Pied_Kingfisher 082.Ringed_Kingfisher
    083.White_breasted_Kingfisher 084.Red_legged_Kittiwake 085.Horned_Lark 086.Pacific_Loon
    087.Mallard 088.Western_Meadowlark 089.Hooded_Merganser 090.Red_breasted_Merganser
    091.Mockingbird 092.Nighthawk 093.Clark_Nutcracker 094.White_breasted_Nuthatch
    095.Baltimore_Oriole 096.Hooded_Oriole 097.Orchard_Oriole 098.Scott_Oriole 099.Ovenbird
    100.Brown_Pelican 101.White_Pelican 102.Western_Wood_Pewee 103.Sayornis 104.American_Pipit
    105.Whip_poor_Will 106.Horned_Puffin 107.Common_Raven 108.White_necked_Raven
    109.American_Redstart 110.Geococcyx 111.Loggerhead_Shrike 112.Great_Grey_Shrike
    113.Baird_Sparrow 114.Black_throated_Sparrow 115.Brewer_Sparrow 116.Chipping_Sparrow
    117.Clay_colored_Sparrow 118.House_Sparrow 119.Field_Sparrow 120.Fox_Sparrow
    121.Grasshopper_Sparrow 122.Harris_Sparrow 123.Henslow_Sparrow 124.Le_Conte_Sparrow
    125.Lincoln_Sparrow 126.Nelson_Sharp_tailed_Sparrow 127.Savannah_Sparrow 128.Seaside_Sparrow
    129.Song_Sparrow 130.Tree_Sparrow 131.Vesper_Sparrow 132.White_crowned_Sparrow
    133.White_throated_Sparrow 134.Cape_Glossy_Starling 135.Bank_Swallow 136.Barn_Swallow
    137.Cliff_Swallow 138.Tree_Swallow 139.Scarlet_Tanager 140.Summer_Tanager 141.Artic_Tern
    142.Black_Tern 143.Caspian_Tern 144.Common_Tern 145.Elegant_Tern 146.Forsters_Tern
    147.Least_Tern 148.Green_tailed_Towhee 149.Brown_Thrasher 150.Sage_Thrasher
    151.Black_capped_Vireo 152.Blue_headed_Vireo 153.Philadelphia_Vireo 154.Red_eyed_Vireo
    155.Warbling_Vireo 156.White_eyed_Vireo 157.Yellow_throated_Vireo 158.Bay_breasted_Warbler
    159.Black_and_white_Warbler 160.Black_throated_Blue_Warbler 161.Blue_winged_Warbler
    162.Canada_Warbler 163.Cape_May_Warbler 164.Cerulean_Warbler 165.Chestnut_sided_Warbler
    166.Golden_winged_Warbler 167.Hooded_Warbler 168.Kentucky_Warbler 169.Magnolia_Warbler
    170.Mourning_Warbler 171.Myrtle_Warbler 172.Nashville_Warbler 173.Orange_crowned_Warbler
    174.Palm_Warbler 175.Pine_Warbler 176.Prairie_Warbler 177.Prothonotary_Warbler
    178.Swainson_Warbler 179.Tennessee_Warbler 180.Wilson_Warbler 181.Worm_eating_Warbler
    182.Yellow_Warbler 183.Northern_Waterthrush 184.Louisiana_Waterthrush 185.Bohemian_Waxwing
    186.Cedar_Waxwing 187.American_Three_toed_Woodpecker 188.Pileated_Woodpecker
    189.Red_bellied_Woodpecker 190.Red_cockaded_Woodpecker 191.Red_headed_Woodpecker
    192.Downy_Woodpecker 193.Bewick_Wren 194.Cactus_Wren 195.Carolina_Wren 196.House_Wren
    197.Marsh_Wren 198.Rock_Wren 199.Winter_Wren 200.Common_Yellowthroat
    """.split()
)


# ---------------------------------------------------------------------------------------------
# tieredImageNet: {split}_images_png.pkl and {split}_labels.pkl

#: A few real tieredImageNet classes (ImageNet synsets) and their categories, per split, from
#: renmengye/few-shot-ssl-public's split CSVs (the pickles name them in words; any names do).
TIERED_SMALL = {
    "train": (["n01530575", "n01531178", "n01532829", "n01534433"], ["n01503061", "n01661091"]),
    "val": (["n02099267", "n02099429", "n03207941"], ["n02098550", "n03257877"]),
    "test": (["n02110063", "n02110185", "n02110341"], ["n02084071"]),
}
TIERED_SMALL_SIZES = {s: (len(c), len(g)) for s, (c, g) in TIERED_SMALL.items()}


def full_tiered_classes() -> dict[str, tuple[list[str], list[str]]]:
    """351 / 97 / 160 classes in 20 / 6 / 8 categories, made-up names, for the full-size run."""
    sizes = {"train": (351, 20), "val": (97, 6), "test": (160, 8)}
    return {
        s: ([f"{s} class {i}" for i in range(n)], [f"{s} category {j}" for j in range(m)])
        for s, (n, m) in sizes.items()
    }


def write_tiered(
    root: Path,
    classes: Mapping[str, tuple[list[str], list[str]]] = TIERED_SMALL,
    per_class: int | Callable[[int], int] = 3,
    python2: bool = True,
    interleave: bool = False,
    folder: str = "tieredimagenet",
) -> Path:
    """The six pickles: images as a list of PNGs (Python 2: the uint8 arrays ``cv2.imencode``
    returns; else bytes), labels as a dict of index arrays and name lists. ``interleave``
    stores the images round-robin over classes instead of class after class."""
    directory = root / folder
    directory.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        names, categories = classes[split]
        counts = counts_of(names, per_class)
        pairs = [(c, i) for c, n in enumerate(counts) for i in range(n)]
        if interleave:
            pairs.sort(key=lambda p: (p[1], p[0]))
        pngs = [encoded(colour(c, i), (84, 84), "PNG") for c, i in pairs]
        specific = np.array([c for c, _ in pairs], dtype=np.int32)
        general = np.array([c % len(categories) for c, _ in pairs], dtype=np.int32)
        if python2:
            images = [np.frombuffer(p, np.uint8).reshape(-1, 1) for p in pngs]
            labels = {
                b"label_specific": specific,
                b"label_general": general,
                b"label_specific_str": [n.encode() for n in names],
                b"label_general_str": [g.encode() for g in categories],
            }
            (directory / f"{split}_images_png.pkl").write_bytes(py2_pickle(images))
            (directory / f"{split}_labels.pkl").write_bytes(py2_pickle(labels))
        else:
            labels = {"label_specific": specific, "label_general": general}
            (directory / f"{split}_images_png.pkl").write_bytes(pickle.dumps(pngs, protocol=4))
            (directory / f"{split}_labels.pkl").write_bytes(pickle.dumps(labels, protocol=4))
    return directory


# ---------------------------------------------------------------------------------------------
# CIFAR-100: the python archive, and MetaOptNet's pickles


def cifar_images(labels: Sequence[int], first_index: Sequence[int]) -> np.ndarray:
    """uint8 [N, 32, 32, 3]: image ``k`` has its class's colour for index ``first_index[k]``."""
    return np.stack(
        [
            np.full((32, 32, 3), colour(label, i), np.uint8)
            for label, i in zip(labels, first_index, strict=True)
        ]
    )


def write_cifar_archive(
    root: Path,
    train_per_class: int = 2,
    test_per_class: int = 1,
    folder: str = "cifar100",
    relabelled: Mapping[str, str] | None = None,
) -> Path:
    """``cifar-100-python.tar.gz`` with all 100 classes: ``meta`` (class names), ``train`` and
    ``test`` (``data`` N×3072 in channel planes, fine and coarse labels), Python 2 pickles.
    Class ``c``'s test images continue its index after its training images. ``relabelled``
    puts classes in other superclasses (an archive that is not CIFAR-100's)."""
    path = root / folder / cifar.ARCHIVE
    path.parent.mkdir(parents=True, exist_ok=True)
    superclass_of = {**SUPERCLASS_OF, **(relabelled or {})}
    members = {
        "meta": {
            b"fine_label_names": [n.encode() for n in FINE_LABELS],
            b"coarse_label_names": [n.encode() for n in COARSE_LABELS],
        }
    }
    for part, per_class, first in (("train", train_per_class, 0), ("test", test_per_class, 1)):
        labels = [c for i in range(per_class) for c in range(100)]  # classes interleaved
        indices = [i + first * train_per_class for i in range(per_class) for _ in range(100)]
        pixels = cifar_images(labels, indices).transpose(0, 3, 1, 2).reshape(len(labels), -1)
        coarse = [COARSE_LABELS.index(superclass_of[FINE_LABELS[c]]) for c in labels]
        members[part] = {
            b"data": np.ascontiguousarray(pixels),
            b"fine_labels": labels,
            b"coarse_labels": coarse,
            b"filenames": [f"{part}_{k}.png".encode() for k in range(len(labels))],
        }
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            data = py2_pickle(blob)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_cifar_pickles(
    root: Path,
    name: str,
    splits: Mapping[str, Sequence[str]],
    per_class: int = 3,
    python2: bool = True,
) -> Path:
    """MetaOptNet's ``CIFAR_FS_{split}.pickle`` / ``FC100_{split}.pickle``: ``data``
    (N×32×32×3 uint8, classes interleaved as in CIFAR) and ``labels`` (fine-label indices)."""
    benchmark = cifar.BENCHMARKS[name]
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        fine = [FINE_LABELS.index(c) for c in splits[split]]
        labels = [f for i in range(per_class) for f in fine]
        index = [i for i in range(per_class) for _ in fine]
        data = cifar_images(labels, index)
        key = (lambda k: k.encode()) if python2 else (lambda k: k)
        blob = {key("data"): data, key("labels"): labels}
        body = py2_pickle(blob) if python2 else pickle.dumps(blob, protocol=4)
        (directory / benchmark.pickle_name.format(split)).write_bytes(body)
    return directory


# ---------------------------------------------------------------------------------------------
# CUB-200-2011: CUB_200_2011/ and CUB_200_2011.tgz


def write_cub_folder(
    root: Path,
    species: Sequence[str] = CUB_CLASSES,
    per_class: int | Callable[[int], int] = 2,
) -> Path:
    """``CUB_200_2011/`` with ``images/<species>/*.jpg`` (small, varied sizes) for ``species``
    and the three listings; ``classes.txt`` names all 200 species, as the real one does.
    Image ids run over the species in order; images get the colour of their species' index
    among ``species``."""
    folder = root / "cub" / cub.EXTRACTED
    (folder / "images").mkdir(parents=True, exist_ok=True)
    ids = {name: i + 1 for i, name in enumerate(CUB_CLASSES)}
    (folder / "classes.txt").write_text("".join(f"{i} {n}\n" for n, i in ids.items()))
    images, labels, image_id = [], [], 0
    for c, (name, count) in enumerate(zip(species, counts_of(species, per_class), strict=True)):
        (folder / "images" / name).mkdir(exist_ok=True)
        for i in range(count):
            image_id += 1
            path = f"{name}/{name.split('.', 1)[1]}_{i + 1:04d}_{700000 + image_id}.jpg"
            size = (10 + 3 * i, 12 + c % 5)
            (folder / "images" / path).write_bytes(encoded(colour(c, i), size, "JPEG"))
            images.append(f"{image_id} {path}\n")
            labels.append(f"{image_id} {ids[name]}\n")
    (folder / "images.txt").write_text("".join(images))
    (folder / "image_class_labels.txt").write_text("".join(labels))
    return folder


def write_cub_archive(root: Path, **folder_settings) -> Path:
    """``CUB_200_2011.tgz`` as published: the folder above under ``CUB_200_2011/``, plus the
    top-level ``attributes.txt`` the real archive has; the folder itself is removed."""
    staging = root / "staging"
    folder = write_cub_folder(staging, **folder_settings)
    path = root / "cub" / cub.ARCHIVE
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        attributes = b"1 has_bill_shape::curved\n"
        info = tarfile.TarInfo("attributes.txt")
        info.size = len(attributes)
        tar.addfile(info, io.BytesIO(attributes))
        tar.add(folder, arcname=cub.EXTRACTED)
    _remove(staging)
    return path


def _remove(path: Path) -> None:
    for child in sorted(path.rglob("*"), reverse=True):
        child.rmdir() if child.is_dir() else child.unlink()
    path.rmdir()

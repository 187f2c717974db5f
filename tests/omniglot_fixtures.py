"""Test data for the Omniglot task source: fixture zips in the official layout, and a synthetic
full-size dataset that stands in for the preprocessed real one.

Small zips keep the validation and cache tests fast; their counts only pass validation when a
test shrinks ``omniglot.EXPECTED_COUNTS`` to ``SMALL_COUNTS``.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from mamlrun.data.omniglot import DRAWINGS, SETS, OmniglotData

# alphabet -> number of characters, per zip
SMALL_LAYOUT = {
    "images_background": {"Alpha": 2, "Beta": 2, "Gamma": 2},
    "images_evaluation": {"Delta": 2, "Epsilon": 2},
}
SMALL_COUNTS = {s: (len(a), sum(a.values())) for s, a in SMALL_LAYOUT.items()}
STROKE_BOX = (30, 30, 75, 75)  # black square drawn on every fixture image (105x105 pixels)


def png_bytes(size: int = 105, box: tuple[int, int, int, int] = STROKE_BOX) -> bytes:
    """A 1-bit PNG as in Omniglot: white background, a black 'stroke' in ``box``."""
    image = Image.new("1", (size, size), 1)
    ImageDraw.Draw(image).rectangle(box, fill=0)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def write_zip(
    path: Path,
    set_name: str,
    layout: dict[str, int],
    *,
    drop: str | None = None,
    replace: dict[str, bytes] | None = None,
    stored: bool = False,
) -> Path:
    """Write a zip in the official layout ``<set>/<Alphabet>/characterNN/IIII_DD.png``.

    ``drop`` leaves out one entry (given relative to the set folder, e.g.
    ``"Beta/character02/0004_20.png"``; ``IIII`` counts from 1 within each fixture zip);
    ``replace`` swaps entries' bytes. Naming an entry that does not exist is an error, so a
    typo cannot turn a test of a defect into a test of a clean zip.
    """
    replace = replace or {}
    good = png_bytes()
    compression = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    character_id = 0
    written: set[str] = set()
    with zipfile.ZipFile(path, "w", compression) as zf:
        zf.writestr(f"{set_name}/", b"")
        for alphabet in sorted(layout):
            zf.writestr(f"{set_name}/{alphabet}/", b"")
            for c in range(1, layout[alphabet] + 1):
                character_id += 1
                folder = f"{alphabet}/character{c:02d}"
                zf.writestr(f"{set_name}/{folder}/", b"")
                for d in range(1, DRAWINGS + 1):
                    relative = f"{folder}/{character_id:04d}_{d:02d}.png"
                    written.add(relative)
                    if relative != drop:
                        zf.writestr(f"{set_name}/{relative}", replace.get(relative, good))
    unused = ({drop} | set(replace)) - written - {None}
    assert not unused, f"fixture names entries that are not in the layout: {unused}"
    return path


def write_small_dataset(root: Path, **overrides: dict) -> Path:
    """Both small zips under ``root/omniglot``; ``overrides[set_name]`` goes to ``write_zip``."""
    directory = root / "omniglot"
    directory.mkdir(parents=True, exist_ok=True)
    for set_name in SETS:
        write_zip(
            directory / f"{set_name}.zip",
            set_name,
            SMALL_LAYOUT[set_name],
            **overrides.get(set_name, {}),
        )
    return directory


def _alphabet_sizes(alphabets: int, characters: int) -> list[int]:
    base, extra = divmod(characters, alphabets)
    return [base + (i < extra) for i in range(alphabets)]


def synthetic_data(image_size: int = 28, seed: int = 0) -> OmniglotData:
    """A full-size stand-in (1,623 characters in 30 + 20 alphabets) with random images.

    Random pixels make every drawing, and every rotation of it, distinct, so a sampled image
    can be traced back to the exact class and drawing it came from.
    """
    names: list[str] = []
    sources: list[str] = []
    for prefix, set_name, alphabets, characters in (
        ("Bg", SETS[0], 30, 964),
        ("Ev", SETS[1], 20, 659),
    ):
        for a, count in enumerate(_alphabet_sizes(alphabets, characters)):
            names += [f"{prefix}{a:02d}/character{c:02d}" for c in range(1, count + 1)]
            sources += [set_name] * count
    generator = torch.Generator().manual_seed(seed)
    shape = (len(names), DRAWINGS, image_size, image_size)
    images = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    return OmniglotData(images, names, sources, {s: "0" * 32 for s in SETS})

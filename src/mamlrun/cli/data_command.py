"""``mamlrun data prepare|check dataset=X``: get a dataset ready before a run needs it.

``prepare`` builds the dataset exactly as ``train`` does (the same code: find the files,
download what has an official URL, verify, decode into the cache) and prints what it holds;
``check`` does the same without downloading anything, so it says whether the files that are
there are the right ones. Either ends with a table: split, classes, images, image size, then
where the data came from and, for an image dataset, its memory-mapped cache and its size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mamlrun import config
from mamlrun.cli import messages
from mamlrun.data.download import offline
from mamlrun.errors import MamlrunError

USAGE = """usage: mamlrun data {prepare,check} dataset=NAME [dataset.KEY=VALUE ...]

  prepare  find the dataset's files under its root (dataset.root, else $MAMLRUN_DATA, else
           ~/.cache/mamlrun), download what has an official URL, verify, build the cache
  check    the same without downloading: are the files there the right ones?
"""
ACTIONS = ("prepare", "check")


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0
    if not argv or argv[0] not in ACTIONS:
        got = f" {argv[0]!r}" if argv else ""
        raise MamlrunError(f"data needs prepare or check, got{got or ' nothing'} "
                           "(mamlrun data prepare dataset=NAME)")  # fmt: skip
    action, overrides = argv[0], argv[1:]
    if not any(o.startswith("dataset=") for o in overrides):
        raise MamlrunError(f"data {action} needs dataset=NAME (see mamlrun train --help)")
    if bad := [o for o in overrides if not o.startswith(("dataset=", "dataset."))]:
        raise MamlrunError(
            f"data {action} takes only dataset=NAME and dataset.KEY=VALUE, got {bad[0]}"
        )
    node = _dataset_config(overrides)
    if action == "check":
        source = _checked(node, " ".join(overrides))
    else:
        source = config.instantiate(node, device="cpu")
    print(render(source.describe(), action))
    return 0


def _checked(node: Any, overrides: str) -> Any:
    """The dataset built from what is on disk; files it would download are named, with the
    command that fetches them, instead of a download error."""
    with offline() as missing:
        try:
            return config.instantiate(node, device="cpu")
        except MamlrunError as ex:
            if not missing:
                raise
            by_hand = str(ex).split("; ", 1)[-1]  # the loader's way to get the files by hand
    folders = sorted({str(path.parent) for path in missing})
    names = " and ".join(path.name for path in missing)
    verb = "is" if len(missing) == 1 else "are"
    raise MamlrunError(
        f"{names} {verb} missing from {' and '.join(folders)} (a check downloads nothing); "
        f"`mamlrun data prepare {overrides}` downloads and verifies "
        f"{'it' if verb == 'is' else 'them'} (or {by_hand})"
    )


def _dataset_config(overrides: list[str]) -> Any:
    """The ``dataset`` node as ``mamlrun train`` composes it, checked against its target."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    config.register_schemas()

    def composed(args: list[str]) -> Any:
        with initialize_config_dir(str(config.config_dir()), version_base="1.3"):
            return compose("train", overrides=args)

    def known_keys(bad: str) -> list[str]:  # for "did you mean": the config without ``bad``
        try:
            return list(config.flatten(composed([o for o in overrides if o.split("=")[0] != bad])))
        except (HydraException, OmegaConfBaseException):
            return []

    try:
        cfg = composed(overrides)
    except (HydraException, OmegaConfBaseException) as ex:
        raise messages.composition_error(ex, "train", known_keys) from ex
    config.check_component(cfg.dataset, "dataset", injected=config.INJECTED["dataset"])
    return cfg.dataset


def render(described: dict[str, Any], action: str) -> str:
    """The table of what a prepared dataset holds, and where it came from."""
    name = described.get("name", "dataset")
    if "classes" not in described:
        return f"{name}: generated on the fly, nothing to {action}"
    shape = "×".join(str(n) for n in described.get("input_shape", [])) or "?"
    rows = [["split", "classes", "images", "image size"]]
    for split, classes in described["classes"].items():
        images = described.get("images", {}).get(split, "?")
        rows.append([split, f"{classes:,}", f"{images:,}" if isinstance(images, int) else images,
                     shape])  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{name}: {'ready' if action == 'prepare' else 'checked'}"]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.append("  " + _provenance(described))
    lines += [f"  {line}" for line in _own_folder(described)]
    if "cache" in described:
        lines.append("  " + _cache(Path(described["cache"])))
    return "\n".join(line.rstrip() for line in lines)


def _cache(path: Path) -> str:
    """Where the images are cached and how much disk they take: what to delete, or to move
    with ``$XDG_CACHE_HOME``, when the disk fills."""
    try:
        size = path.stat().st_size
    except OSError:
        return f"cache: {path}"
    amount = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
    return f"cache: {path} ({amount})"


def _provenance(described: dict[str, Any]) -> str:
    if "official_zips" in described:  # Omniglot: the two zips' md5 against the official ones
        if described["official_zips"]:
            return "verified: both zips have the official md5"
        return "verified: the zips differ from the official ones (md5), their content is valid"
    layout, split = described.get("layout", "?"), described.get("split", "?")
    if "split_rule" in described:  # dataset=images: a folder of the user's, split by a rule
        return f"read: {described['root']}, layout {layout}; split rule: {described['split_rule']}"
    return f"verified: layout {layout}; every split's classes match the {split} split lists"


def _own_folder(described: dict[str, Any]) -> list[str]:
    """For a folder of the user's (``dataset=images``): where the split is written down, and
    every file that was left out because it does not decode."""
    if "split_file" not in described:
        return []
    left_out = described.get("unreadable") or []
    lines = [f"classes of each split: {described['split_file']}"]
    if left_out:
        files = "1 file that does" if len(left_out) == 1 else f"{len(left_out)} files that do"
        lines.append(f"left out, {files} not decode (skip_unreadable):")
        lines += [f"  {name}" for name in left_out]
    return lines

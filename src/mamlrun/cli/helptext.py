"""``mamlrun train|test|adapt|pretrain --help``: the command's own options, with the one-line
comments of its YAML file, and the config groups it accepts with each choice's first comment
line.

The YAML files are the one place defaults are written and explained, so the help is read
from them rather than written a second time.
"""

from __future__ import annotations

import re
from pathlib import Path

from mamlrun import config

#: The groups each command composes (``test`` and ``adapt`` rebuild theirs from a checkpoint).
GROUPS = {
    "train": ("dataset", "backbone", "meta_optimizer", "experiment", "debug", "hparams_search"),
    "test": ("baseline",),
    "adapt": ("baseline",),
    "pretrain": ("dataset", "backbone", "preset", "pretrain_debug"),  # debug=X: pretrain_debug=X
}
#: Hydra's own choices beside ours in ``hydra/launcher``.
LAUNCHERS = {"basic": "one job at a time in this process (Hydra's default)"}
_KEY = re.compile(
    r"^(?P<indent>  )?(?P<key>[a-z_]+):\s*(?P<value>[^#]*?)\s*(#\s*(?P<comment>.*))?$"
)
_SKIP = {"defaults", "hydra"}


def options(command: str, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(key, default, comment)`` for each top-level key of ``conf/<command>.yaml`` (or of
    another file under ``conf/``, its keys shown under ``prefix``); a key without a value
    (``backbone:``) is shown by the keys under it (``backbone.init``)."""
    rows: list[tuple[str, str, str]] = []
    skipping, parent = False, ""
    for line in (config.config_dir() / f"{command}.yaml").read_text().splitlines():
        match = _KEY.match(line)
        if match and match["indent"] and parent and not skipping:
            rows.append(
                (f"{prefix}{parent}.{match['key']}", match["value"], match["comment"] or "")
            )
        elif match and not match["indent"]:
            skipping = match["key"] in _SKIP
            parent = match["key"] if not match["value"] else ""
            if not skipping and not parent:
                rows.append((prefix + match["key"], match["value"], match["comment"] or ""))
        elif rows and not skipping and line.strip().startswith("#") and line.startswith(" "):
            key, value, comment = rows[-1]  # a comment continued on the next line
            rows[-1] = (key, value, f"{comment} {line.strip().lstrip('#').strip()}".strip())
    return rows


def choices(group: str) -> list[tuple[str, str]]:
    """``(choice, first comment line)`` for each YAML file of a config group."""
    found = []
    for path in sorted((config.config_dir() / group).glob("*.yaml")):
        found.append((path.stem, _first_comment(path)))
    if group == "hydra/launcher":
        found = [*LAUNCHERS.items(), *found]
    return found


def _first_comment(path: Path, width: int = 80) -> str:
    """The file's leading comment up to its first full stop, cut to ``width``: a
    one-line summary even when the sentence wraps in the YAML."""
    words: list[str] = []
    for line in path.read_text().splitlines():
        text = line.strip()
        if text.startswith("# @package"):
            continue
        if not text.startswith("#"):
            break
        words += text.lstrip("#").split()
    summary = ""
    for word in words:
        summary = f"{summary} {word}".strip()
        if word.endswith(".") and not word.endswith(("al.", "e.g.", "i.e.")):
            break
    return summary if len(summary) <= width else summary[: width - 1].rsplit(" ", 1)[0] + "…"


def render(command: str, description: str) -> str:
    lines = [f"usage: mamlrun {command} [group=choice ...] [key=value ...] [hydra flags]", ""]
    lines += [description, ""]
    groups = list(GROUPS[command]) + (["hydra/launcher"] if command == "train" else [])
    if groups:
        lines.append("config groups (group=choice):")
        for group in groups:
            lines.append(f"  {group}:")
            for name, text in choices(group):
                lines.append(
                    f"    {name:<24}{text}" if len(name) < 24 else f"    {name}\n    {'':<24}{text}"
                )
        lines.append("")
    if command in ("test", "adapt"):
        lines += [
            "dataset, backbone and algorithm come from the checkpoint's own config; dataset=NAME",
            "(one of train's datasets) makes it a cross-domain test on NAME's test classes.",
            "",
        ]
    lines.append(f"options (key=value; defaults from conf/{command}.yaml):")
    baseline = options("baseline/default", "baseline.") if command in GROUPS else []
    for key, value, comment in options(command) + baseline:
        setting = key + "=" + value
        lines.append(
            f"  {setting:<32}{comment}"
            if len(setting) < 32
            else f"  {setting}\n  {'':<32}{comment}"
        )
    lines += [
        "",
        "Nested keys are set with dots (meta_optimizer.inner_lr=0.4); `--cfg job` prints the",
        "composed config, `-m` runs a sweep, --hydra-help shows Hydra's own flags.",
    ]
    return "\n".join(lines) + "\n"

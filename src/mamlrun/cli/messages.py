"""Errors as one line that keeps what the user needs: the choices that exist, the key they
probably meant, the keys a command takes.

Hydra's own messages span several lines (the useful part is often not the first one) and
OmegaConf's say "Key 'ways' is not in struct"; researchers scanning a sweep's logs want one
line that names the problem and its fix.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable

from mamlrun.errors import MamlrunError, plain

_NOT_FOUND = re.compile(r"Could not find '(?P<path>[^']+)'")
_NO_OVERRIDE = re.compile(r"Could not override '(?P<key>[^']+)'")
_NOT_IN_STRUCT = re.compile(r"Key '(?P<key>[^']+)' is not in struct")
_NOT_IN_DEFAULTS = "No match in the defaults list"
#: Groups that ``train`` composes and ``test``/``adapt`` take from the checkpoint.
#: (``dataset`` is one of ``test``'s too: another dataset makes it a cross-domain test.)
TRAIN_GROUPS = ("backbone", "meta_optimizer", "experiment", "debug", "hparams_search")


def one_line(ex: BaseException) -> str:
    """The first line of the message, plus the first line of its cause when that adds detail;
    no object reprs (``errors.plain``)."""
    return plain(_first_line(ex))


def _first_line(ex: BaseException) -> str:
    lines = _lines(ex)
    first = lines[0] if lines else type(ex).__name__
    key = getattr(ex, "full_key", None)
    if key and key not in first:
        first = f"{key}: {first}"
    cause = ex.__cause__ or (None if ex.__suppress_context__ else ex.__context__)
    if cause is not None and _lines(cause) and _lines(cause)[0] not in first:
        first = f"{first.rstrip('.:')}: {_lines(cause)[0]}"
    return first


def _lines(ex: BaseException) -> list[str]:
    return [ln.strip() for ln in str(ex).splitlines() if ln.strip()]


def composition_error(
    ex: BaseException, command: str, known_keys: Callable[[str], Iterable[str]]
) -> MamlrunError:
    """A Hydra composition error as one helpful line.

    ``known_keys(key)`` lists the config's keys, composed without the offending override
    ``key`` (so that the suggestion comes from the config the user is actually building).
    """
    text = str(ex)
    missing = _NOT_FOUND.search(text)
    if missing:
        return MamlrunError(_unknown_choice(missing["path"], _options(text)))
    bad = _NO_OVERRIDE.search(text) or _NOT_IN_STRUCT.search(text)
    if bad:
        key = bad["key"]
        if command in ("test", "adapt") and key.split(".")[0] in TRAIN_GROUPS:
            return MamlrunError(_not_for_evaluation(command, key, known_keys(key)))
        if command in ("test", "adapt") and key.startswith("dataset."):
            return MamlrunError(
                f"{key}: {command} reads the run's own dataset (data_root=DIR says where its "
                f"data is now); a cross-domain test names its dataset first: dataset=NAME {key}=…"
            )
        if _NOT_IN_DEFAULTS in text and command == "pretrain" and key == "experiment":
            return MamlrunError(
                "experiment is not a config group of pretrain: its recipes are preset=NAME "
                "(see mamlrun pretrain --help)"
            )
        if _NOT_IN_DEFAULTS in text:
            return MamlrunError(f"{key} is not a config group of {command} ({one_line(ex)})")
        return MamlrunError(unknown_key(key, list(known_keys(key))))
    return MamlrunError(one_line(ex))


def _options(text: str) -> list[str]:
    """The "Available options in 'group':" list of a Hydra message (indented lines)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Available options"):
            found = []
            for option in lines[i + 1 :]:
                if not option.startswith(("\t", " ")) or not option.strip():
                    break
                found.append(option.strip())
            return found
    return []


def _unknown_choice(path: str, options: list[str]) -> str:
    group, _, choice = path.rpartition("/")
    if not options:
        return f"{group}={choice}: no such choice"
    guess = difflib.get_close_matches(choice, options, n=1)
    hint = f"; did you mean {group}={guess[0]}?" if guess else ""
    return f"{group}={choice}: no such choice (available: {', '.join(options)}){hint}"


def unknown_key(key: str, known: list[str]) -> str:
    """``iteratons`` → did you mean ``iterations``; ``inner_lr`` → ``meta_optimizer.inner_lr``;
    ``dataset.ways`` on a dataset without ways → the keys it has."""
    parent, _, leaf = key.rpartition(".")
    same_leaf = [k for k in known if k.rpartition(".")[2] == leaf and k != key]
    prefix = f"{parent}." if parent else ""
    siblings = sorted(
        {k[len(prefix) :].split(".")[0] for k in known if k.startswith(prefix)}
        - {"_target_", "_preset_"}
    )
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.8)
    guess = same_leaf[:1] or [prefix + c for c in close]
    if guess:
        return f"unknown key {key}; did you mean {guess[0]}?"
    if parent and siblings:
        return f"unknown key {key}: {parent} has no {leaf} (its keys: {', '.join(siblings)})"
    return f"unknown key {key} (the keys: {', '.join(siblings)})"


def _not_for_evaluation(command: str, key: str, known: Iterable[str]) -> str:
    top = sorted({k.split(".")[0] for k in known})
    return (
        f"{command} takes backbone and algorithm from the checkpoint, so {key} is not "
        f"one of its settings (its keys: {', '.join(top)})"
    )

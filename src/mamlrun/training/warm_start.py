"""``backbone.init=PATH``: a backbone's weights read from a file before meta-training starts.

The file is a ``mamlrun pretrain`` checkpoint (``kind: pretrain``; its ``model`` is the
backbone trained to classify all its training classes at once), a ``mamlrun train``
checkpoint (its ``model`` is the meta-model: the backbone's tensors are taken, under
``backbone.`` where the algorithm wrapped it, and the algorithm's own meta-parameters, learned
rates or a context, are left behind: the new run's algorithm builds its own), or a plain
PyTorch ``state_dict`` (``torch.save(model.state_dict(), PATH)``). Everything is read with
``weights_only=True``, so a file never runs code.

Keys match strictly, but for the classification head (``selection.head``): its width is the
N-way of whatever the file was trained on, and it keeps the initialisation the factory gave it
for this run's N ways. A missing or unexpected key, a tensor of another shape or inputs of
another shape is refused in one line that says which and what it suggests, before the run
writes anything. The run records the file's absolute path and the sha256 of its bytes
(``Init``), in its checkpoints, ``results.json`` and the HParams row.

The weights are loaded into the backbone the factory built, before the algorithm wraps it
(``meta_model``: Meta-SGD's rates, CAVIA's context are built around them) and before the
optimizer exists; loading draws no random number, so a run's seed means what it did.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from mamlrun import config
from mamlrun.algorithms import selection
from mamlrun.errors import MamlrunError
from mamlrun.results import checkpoint

log = logging.getLogger("mamlrun")

#: How many keys an error names before it counts the rest.
SHOWN = 3
#: Where a ``mamlrun train`` checkpoint's backbone may sit in its meta-model: bare, in a
#: ``MetaModel`` (learned rates, per-step batch norm), in CAVIA's ``Contextual`` or in both.
WRAPPINGS = ("", "backbone.", "backbone.backbone.")


@dataclass(frozen=True)
class Init:
    """What a run's backbone started from, as its records keep it."""

    path: str  # absolute
    sha256: str  # of the file's bytes: the file a path named may change
    kind: str  # pretrain | train | state_dict

    def record(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Weights:
    """The backbone tensors a file holds, and what it says about them."""

    tensors: dict[str, torch.Tensor]
    kind: str
    head: str | None  # the file's own head module, where it names it
    input_shape: list[int] | None  # the inputs it was trained on, where it records them
    backbone: Mapping[str, Any] | None  # the backbone config it was built from, if recorded
    path: Path | None = None  # the file, resolved
    where: str = "backbone.init"  # the setting as the user gave it, for messages


def read(given: str) -> Weights:
    """``backbone.init=given`` read and checked to hold weights, before the run builds its
    data (which can take minutes): a wrong file is said at once."""
    path = _file(given)
    where = f"backbone.init={given}"
    return replace(_read(path, where), path=path, where=where)


def load_into(
    backbone: nn.Module, weights: Weights, input_shape: Sequence[int], node: Mapping[str, Any]
) -> Init:
    """Load ``weights`` (``read``) into ``backbone`` (built from config ``node`` for inputs
    of ``input_shape``) and say what was loaded; everything but the head must match."""
    path, where = weights.path, weights.where
    if weights.input_shape is not None and list(weights.input_shape) != list(input_shape):
        raise MamlrunError(
            f"{where} was trained on inputs of shape {_shape(weights.input_shape)}, this run's "
            f"dataset gives {_shape(input_shape)}: an init must come from images of that shape"
        )
    head = selection.head(backbone)
    tensors = weights.tensors
    if weights.kind == "train":  # the meta-model's backbone, its other meta-parameters left
        tensors = _unwrapped(backbone.state_dict(), tensors)
    ours = {k: v for k, v in backbone.state_dict().items() if not _under(k, head)}
    theirs = {
        k: v
        for k, v in tensors.items()
        if not _under(k, head) and not (weights.head and _under(k, weights.head))
    }
    recorded = _recorded(weights.backbone, node)
    _check_keys(where, ours, theirs, recorded)
    _check_shapes(where, ours, theirs, recorded)
    backbone.load_state_dict({**backbone.state_dict(), **theirs}, strict=True)
    init = Init(str(path), _sha256(path), weights.kind)
    log.info(
        f"backbone.init: {len(theirs)} tensors from {path} ({_described(weights.kind)}, sha256 "
        f"{init.sha256[:12]}); the head (module {head}) keeps its fresh initialisation"
    )
    return init


def _read(path: Path, where: str) -> Weights:
    """The backbone tensors in a checkpoint or state_dict file, or one line on what it is."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as ex:  # not a zip or pickle, truncated, an unsafe pickle: unusable
        raise MamlrunError(
            f"{where} is not a mamlrun checkpoint or a PyTorch state_dict: torch.load cannot "
            f"read it ({type(ex).__name__}: {_first_line(ex)})"
        ) from None
    if isinstance(state, dict) and "format" in state:
        return _from_checkpoint(where, state)
    if _is_state_dict(state):
        return Weights(dict(state), "state_dict", None, None, None)
    raise MamlrunError(
        f"{where} holds {_what(state)}, not a mamlrun checkpoint or a state_dict "
        "(a dict of tensors, as torch.save(model.state_dict(), PATH) writes)"
    )


def _from_checkpoint(where: str, state: dict[str, Any]) -> Weights:
    """A mamlrun checkpoint: a pretrain one as it is, a train one's backbone."""
    if state.get("format") != checkpoint.FORMAT or not _is_state_dict(state.get("model")):
        raise MamlrunError(
            f"{where} is not a mamlrun checkpoint of this version (format "
            f"{checkpoint.FORMAT}) with its weights under model"
        )
    kind = state.get("kind")
    if kind == "pretrain":
        shape = state.get("input_shape")
        return Weights(state["model"], "pretrain", state.get("head"), shape, state.get("backbone"))
    if kind is not None:
        raise MamlrunError(
            f"{where} is a mamlrun {kind} checkpoint; an init is a pretrain or "
            "train checkpoint, or a state_dict"
        )
    components = (state.get("config") or {}).get("components") or {}
    shape = (state.get("data") or {}).get("input_shape")
    return Weights(state["model"], "train", None, shape, components.get("backbone"))


def _check_keys(where: str, ours: dict, theirs: dict, recorded: str) -> None:
    missing = [k for k in ours if k not in theirs]
    unexpected = [k for k in theirs if k not in ours]
    if not missing and not unexpected:
        return
    parts = [f"{name} {len(keys)} ({_listed(keys)})" for name, keys in
             (("missing", missing), ("unexpected", unexpected)) if keys]  # fmt: skip
    shared = sum(k in theirs for k in ours)
    hint = "another backbone?" if shared < len(ours) / 2 else "another version of this backbone?"
    raise MamlrunError(
        f"{where} does not fit this run's backbone: {'; '.join(parts)}: {hint}{recorded}"
    )


def _unwrapped(ours: Mapping[str, Any], theirs: dict) -> dict[str, torch.Tensor]:
    """A train checkpoint's tensors under the wrapping (``WRAPPINGS``) that holds most of
    ``ours``, with the wrapping's prefix taken off; what lies outside it is not the backbone."""
    prefix = max(WRAPPINGS, key=lambda p: (sum(p + k in theirs for k in ours), -len(p)))
    return {k[len(prefix) :]: v for k, v in theirs.items() if k.startswith(prefix)}


def _check_shapes(where: str, ours: dict, theirs: dict, recorded: str) -> None:
    differing = [k for k in ours if tuple(ours[k].shape) != tuple(theirs[k].shape)]
    if not differing:
        return
    first = next(iter(ours))
    mine, its = ours[first].shape, theirs[first].shape
    if len(mine) == len(its) == 4 and mine[1] != its[1]:  # the first conv's input channels
        raise MamlrunError(
            f"{where} is for inputs of another shape: its first layer {first} is "
            f"{_shape(theirs[first].shape)}, this run's is {_shape(ours[first].shape)} "
            f"({theirs[first].shape[1]} input channels against {ours[first].shape[1]})"
        )
    shown = ", ".join(
        f"{k} {_shape(theirs[k].shape)} against {_shape(ours[k].shape)}" for k in differing[:SHOWN]
    )
    more = f" and {len(differing) - SHOWN} more" if len(differing) > SHOWN else ""
    raise MamlrunError(
        f"{where} has {len(differing)} tensors of other shapes than this run's backbone "
        f"({shown}{more}): another backbone's settings?{recorded}"
    )


def _recorded(theirs: Mapping[str, Any] | None, ours: Mapping[str, Any]) -> str:
    """How the backbone the file records differs from this run's, where the file says."""
    if not isinstance(theirs, Mapping) or "_target_" not in theirs:
        return ""
    if theirs["_target_"] != ours["_target_"]:
        named = [config.choice("backbone", OmegaConf.create(n)) for n in (theirs, ours)]
        return f" (the file holds {named[0]}, this run builds {named[1]})"
    keys = [k for k in theirs if not str(k).startswith("_") and k in ours and k != "init"]
    differing = [k for k in keys if theirs[k] != ours[k]]
    if not differing:
        return ""
    listed = "; ".join(f"backbone.{k}={theirs[k]} in the file, {ours[k]} here" for k in differing)
    return f" ({listed})"


def _file(given: str) -> Path:
    path = Path(given).expanduser()
    if path.is_dir():
        best = path / "checkpoints" / "best.pt"
        hint = f": name a file in it, e.g. backbone.init={best}" if best.is_file() else ""
        raise MamlrunError(f"backbone.init={given} is a directory{hint}")
    if not path.is_file():
        raise MamlrunError(f"backbone.init={given}: no such file{_pretrain_hint(path)}")
    return path.resolve()


def _pretrain_hint(path: Path) -> str:
    """Where a preset's init is missing, the command that writes it: a pretrain preset's
    run folder is outputs/pretrain/NAME (conf/preset/NAME.yaml), which is what the train
    presets that start from it name."""
    parts = path.parts
    if len(parts) < 4 or parts[-2] != "checkpoints" or parts[-4] != "pretrain":
        return ""
    name = parts[-3]
    if not (config.config_dir() / "preset" / f"{name}.yaml").is_file():
        return ""
    return (
        f"; `mamlrun pretrain preset={name}` writes it (run it from this directory first), "
        "or set backbone.init=null to start from random weights"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_state_dict(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(k, str) and torch.is_tensor(v) for k, v in value.items())
    )


def _what(value: Any) -> str:
    if isinstance(value, dict):
        keys = [str(k) for k in value]
        return f"a dict of other things (keys {_listed(keys)})" if keys else "an empty dict"
    return f"a {type(value).__name__}"


def _under(key: str, module: str) -> bool:
    return key.startswith(f"{module}.")


def _listed(keys: Sequence[str]) -> str:
    more = f", … and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(int(n)) for n in shape)


def _described(kind: str) -> str:
    return {
        "pretrain": "a mamlrun pretrain checkpoint",
        "train": "a mamlrun train checkpoint's backbone",
        "state_dict": "a state_dict",
    }[kind]


def _first_line(ex: BaseException) -> str:
    lines = [ln.strip() for ln in str(ex).splitlines() if ln.strip()]
    return lines[0] if lines else type(ex).__name__

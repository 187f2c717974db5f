"""Checkpoints that survive interruption and resume a run bit for bit.

A checkpoint holds everything a run's future depends on: meta-parameters, optimizer state,
step, the task generator's state, the global RNG states and the config. It is written to a
temporary file and renamed, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from mamlrun import config
from mamlrun.errors import MamlrunError

FORMAT = 1


def save(path: Path, state: dict[str, Any]) -> None:
    """Atomically write ``state`` to ``path`` (temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``: loading never runs code from the file."""
    path = Path(path)
    if not path.is_file():
        raise MamlrunError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as ex:  # truncated (OSError), not a zip, unsafe pickle, ...: all unusable
        first = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
        msg = f"checkpoint {path} is corrupt or not a mamlrun checkpoint: {first}"
        raise MamlrunError(msg) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise MamlrunError(f"{path} is not a mamlrun checkpoint (format {FORMAT})")
    saved = state.get("config")
    if isinstance(saved, dict):  # written by an older mamlrun: read forward (config.RETIRED)
        try:
            state["config"] = {k: config.read_forward(v) for k, v in saved.items()}
        except MamlrunError as ex:
            raise MamlrunError(f"{path}: {ex}") from None
    return state


def rng_state() -> dict[str, Any]:
    """The global RNG states (CPU and every CUDA device)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

"""Task batches and the interface every task distribution implements.

A meta-batch is a fixed-shape stack of tasks so the engine can run the tasks either one at a
time or batched with ``torch.func.vmap`` without caring where they came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

import torch

from mamlrun.errors import MamlrunError


class TaskBatch(NamedTuple):
    """Support and query sets of ``B`` tasks; the leading dimension indexes the task.

    Regression: ``x``/``y`` are float ``[B, n, 1]``.
    Classification: ``x`` is ``[B, n, C, H, W]`` float, ``y`` is ``[B, n]`` int64 labels in
    ``0..ways-1`` (shuffled per task, so a label carries no information across tasks).
    """

    x_support: torch.Tensor
    y_support: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor

    @property
    def num_tasks(self) -> int:
        return self.x_support.shape[0]


class TaskSource(Protocol):
    """A task distribution with train / val / test splits.

    ``task_type`` picks loss and metric (``"regression"`` → MSE, ``"classification"`` →
    cross-entropy and accuracy). ``input_shape`` and ``output_size`` are what a backbone
    builder needs to size its first and last layers.
    """

    task_type: str
    input_shape: tuple[int, ...]
    output_size: int
    device: torch.device

    def sample(self, split: str, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        """Draw ``num_tasks`` tasks of ``split`` (``train``, ``val`` or ``test``).

        All randomness comes from ``generator`` (on ``self.device``), which makes training
        resumable bit for bit and evaluation sets fixed by their seed.
        """
        ...

    def describe(self) -> dict:
        """A small JSON-able summary (name, ways/shots, split sizes) for results files."""
        ...

    def save_splits(self, directory: Path) -> None:
        """Write what defines each split (e.g. class lists) into the run directory."""
        ...


@runtime_checkable
class Fingerprinted(Protocol):
    """Optional for a task source: what identifies its data, so that a test of a checkpoint
    can tell whether it reads the data the run trained on (``training.provenance``). A source
    without it (a user's own, data drawn from seeds) is tested without that check."""

    def fingerprint(self) -> dict[str, dict[str, int]] | None:
        """``{split: {class: images}}`` (``data.fingerprint``); None for data that files do
        not define."""
        ...


SPLITS = ("train", "val", "test")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise MamlrunError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")

"""Metric loggers behind one small interface: ``log_dict(payload, step)`` and ``close()``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch


class MetricLogger(Protocol):
    def log_dict(self, payload: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardLogger:
    """Scalars, hyperparameters and images as TensorBoard event files under ``log_dir``."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow to load

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log_dict(self, payload: Mapping[str, float], step: int) -> None:
        for key, value in payload.items():
            self.writer.add_scalar(key, value, step)

    def log_hparams(self, hparams: Mapping[str, object], metrics: Mapping[str, float]) -> None:
        """One HParams row per run, written beside the scalars so a sweep lines up."""
        self.writer.add_hparams(dict(hparams), dict(metrics), run_name=".")

    def log_image(self, tag: str, image: torch.Tensor, step: int = 0) -> None:
        self.writer.add_image(tag, image, step, dataformats="CHW")

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NullLogger:
    """What ranks other than 0 log to under torchrun: nothing, so one run has one log."""

    def log_dict(self, payload: Mapping[str, float], step: int) -> None:
        pass

    def log_hparams(self, hparams: Mapping[str, object], metrics: Mapping[str, float]) -> None:
        pass

    def log_image(self, tag: str, image: torch.Tensor, step: int = 0) -> None:
        pass

    def close(self) -> None:
        pass


def hparams_of(components: Mapping[str, Any]) -> dict[str, int | float | str]:
    """The component configs as HParams columns: ``dataset.ways``, ``meta_optimizer`` (the
    algorithm's class name, from ``_target_``), …

    TensorBoard stores a bool as the number 1.0 and cannot show a list, so both become text;
    ``_partial_`` and the like say nothing about the run and are left out.
    """
    flat: dict[str, int | float | str] = {}
    for key, value in components.items():
        if isinstance(value, Mapping):
            for sub, v in hparams_of(value).items():
                name = key if sub == "_target_" else f"{key}.{sub}"
                flat[name] = v
        elif key == "_target_":
            flat[key] = str(value).rsplit(".", 1)[-1]
        elif key.startswith("_"):
            continue
        elif isinstance(value, bool):
            flat[key] = str(value).lower()
        elif isinstance(value, int | float | str):
            flat[key] = value
        else:
            flat[key] = "null" if value is None else str(value)
    return flat

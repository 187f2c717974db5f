"""Metric loggers behind one small interface: ``log_dict(payload, step)`` and ``close()``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

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
        clean = {
            k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in hparams.items()
        }
        self.writer.add_hparams(clean, dict(metrics), run_name=".")

    def log_image(self, tag: str, image: torch.Tensor, step: int = 0) -> None:
        self.writer.add_image(tag, image, step, dataformats="CHW")

    def close(self) -> None:
        self.writer.close()


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


class ConsoleLogger:
    """One plain line per call through ``logging``: Hydra sends it to the console and to the
    run's log file; under ``logging_redirect_tqdm`` it does not break a progress bar."""

    def __init__(self) -> None:
        self.log = logging.getLogger("mamlrun")

    def log_dict(self, payload: Mapping[str, float], step: int) -> None:
        parts = " ".join(f"{k}={v:.4g}" for k, v in payload.items())
        self.log.info("step %d: %s", step, parts)

    def close(self) -> None:
        pass

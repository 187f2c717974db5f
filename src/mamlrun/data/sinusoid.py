"""Sinusoid regression tasks from the MAML paper (Finn et al. 2017, section 5.1)."""

from __future__ import annotations

from pathlib import Path

import torch

from mamlrun.data.tasks import TaskBatch, check_split


class SinusoidTasks:
    """``y = A sin(x - φ)`` with ``A ~ U[0.1, 5]``, ``φ ~ U[0, π]``, ``x ~ U[-5, 5]``.

    The task distribution is the same for every split; the splits differ only in the seed of
    the generator that draws them, which the episode loop fixes for validation and test.
    """

    task_type = "regression"
    input_shape = (1,)
    output_size = 1

    def __init__(
        self,
        *,
        shots: int,
        query: int,
        amplitude: tuple[float, float],
        phase: tuple[float, float],
        x_range: tuple[float, float],
        device: str | torch.device = "cpu",
    ) -> None:
        self.shots, self.query = shots, query
        self.amplitude, self.phase, self.x_range = tuple(amplitude), tuple(phase), tuple(x_range)
        self.device = torch.device(device)

    def sample(self, split: str, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        check_split(split)
        u = torch.rand(num_tasks, 2, generator=generator, device=self.device)
        amp = _lerp(self.amplitude, u[:, :1, None])
        phase = _lerp(self.phase, u[:, 1:, None])
        n = self.shots + self.query
        u_x = torch.rand(num_tasks, n, 1, generator=generator, device=self.device)
        x = _lerp(self.x_range, u_x)
        y = amp * torch.sin(x - phase)
        k = self.shots
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])

    def describe(self) -> dict:
        return {"name": "sinusoid", "shots": self.shots, "query": self.query}

    def save_splits(self, directory: Path) -> None:
        """Nothing to write: the splits are defined by their seeds, saved with the config."""


def _lerp(bounds: tuple[float, float], u: torch.Tensor) -> torch.Tensor:
    lo, hi = bounds
    return lo + (hi - lo) * u

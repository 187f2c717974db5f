"""Choosing how to run the tasks of a meta-batch by measuring, not by guessing.

Batching tasks with ``vmap`` is ~9× faster for the sinusoid MLP on a CPU but ~2.3× slower for
conv4 on the same CPU (shared/MEASUREMENTS.md), and expected to win on a GPU: the winner
depends on model and device together, so ``auto`` times both on the actual workload.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from mamlrun.data.tasks import TaskSource

MODES = ("loop", "vmap")


def probe(
    algorithm: Any,
    model: nn.Module,
    source: TaskSource,
    batch_size: int,
    seed: int,
    repeats: int = 2,
) -> tuple[str, dict[str, float]]:
    """Time one meta-gradient per mode (after a warm-up) and return the fastest mode.

    Uses its own generator so the training task stream is the same whatever is chosen. A mode
    that fails (an operation without a batching rule, say) is reported as infinitely slow.
    An algorithm that supports a single mode (``algorithm.batching_modes``) gets it untimed,
    with no timings.
    """
    modes = getattr(algorithm, "batching_modes", MODES)
    if len(modes) == 1:
        return modes[0], {}
    generator = torch.Generator(device=source.device).manual_seed(seed)
    batch = source.sample("train", batch_size, generator)
    seconds: dict[str, float] = {}
    for mode in modes:
        try:
            times = []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                algorithm.meta_gradient(model, batch, source.kind, mode)
                _synchronize(source.device)
                times.append(time.perf_counter() - start)
            seconds[mode] = min(times[1:])
        except RuntimeError:
            seconds[mode] = float("inf")
        finally:
            model.zero_grad(set_to_none=True)
    return min(seconds, key=seconds.__getitem__), seconds


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

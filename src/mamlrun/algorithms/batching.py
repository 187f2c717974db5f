"""How the tasks of a meta-batch run: one at a time (``loop``) or together (``vmap``).

``map_tasks`` is the one place the switch is written. Which mode is faster depends on the
model and the device together (``vmap`` is ~9× faster for the sinusoid MLP on a CPU but ~2.3×
slower for conv4 on the same CPU, shared/MEASUREMENTS.md, and expected to win on a GPU), so
``auto`` times both on the actual workload (``choose``) instead of guessing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mamlrun.data.tasks import TaskBatch

MODES = ("loop", "vmap")


def map_tasks(fn: Callable[..., Any], shared: Any, batch: TaskBatch, mode: str) -> Any:
    """``fn(shared, x_support, y_support, x_query, y_query)`` for every task of ``batch``,
    outputs stacked over tasks (any tree of tensors).

    ``shared`` (the meta-parameters) is the same for every task; ``vmap`` batches the rest.
    """
    if mode == "vmap":
        return torch.func.vmap(fn, in_dims=(None, 0, 0, 0, 0))(shared, *batch)
    if mode != "loop":
        raise ValueError(f"unknown task batching {mode!r}")
    outputs = [fn(shared, *task) for task in zip(*batch, strict=True)]
    return _stack(outputs)


def _stack(outputs: Sequence[Any]) -> Any:
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(list(outputs))
    if isinstance(first, dict):
        return {k: _stack([o[k] for o in outputs]) for k in first}
    if isinstance(first, tuple | list):
        return type(first)(_stack(column) for column in zip(*outputs, strict=True))
    raise TypeError(f"map_tasks cannot stack outputs of type {type(first).__name__}")


def choose(
    modes: Sequence[str],
    step: Callable[[str], None],
    device: torch.device,
    repeats: int = 2,
) -> tuple[str, dict[str, float]]:
    """Time ``step(mode)`` (one meta-gradient) for each mode after a warm-up; the fastest.

    A mode that fails (an operation without a batching rule, say) counts as infinitely slow.
    With a single mode there is nothing to measure: it is returned with no timings.
    """
    if len(modes) == 1:
        return modes[0], {}
    seconds: dict[str, float] = {}
    for mode in modes:
        try:
            times = []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                step(mode)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
            seconds[mode] = min(times[1:])
        except RuntimeError:
            seconds[mode] = float("inf")
    return min(seconds, key=seconds.__getitem__), seconds

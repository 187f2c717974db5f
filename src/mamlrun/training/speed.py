"""How fast a run goes and how much memory it holds, measured as it trains.

"Why is it slow, why does it run out of memory" has an answer only in numbers, so every run
measures its own: tasks and iterations per second, the share of that time spent drawing the
meta-batch (``next(episodes)``, which also puts it on the device) rather than in the
meta-step, and the peak memory.

What the clock covers: each iteration's sampling and its meta-step (forward, backward, the
optimizer), and nothing else. Validation, checkpoints and logging run between iterations
and are left out, so the rate does not depend on ``val_every``; the progress display's
``it/s`` is wall time and includes them.

Cheap by design: on the CPU a ``perf_counter`` read at three points of an iteration; on
CUDA three events recorded on the stream (no synchronisation) and read back in ``flush``,
once per log interval, after one ``synchronize``. Two events are as far apart as the GPU's
timeline between them: when the GPU is the bottleneck, CPU work it overlaps costs nothing
(sampling counts for its kernels), and when the CPU is, the GPU waits for it and the events
are as far apart as the CPU's marks; either way the run is timed as it ran.

Peak memory (``peak_mib``): on CUDA ``torch.cuda.max_memory_allocated`` (the tensors this
process allocated on the device, not the caching allocator's reserve); on the CPU the
process's peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``): the
whole process (Python, torch's libraries, the data in memory, every thread's tensors), and
monotonic: it never comes down, so a later interval shows the highest so far.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

#: Iterations of each process left out of results.json's speed (lazy initialisation, the
#: allocator's first growth, cuDNN's autotuning make the first one slow).
WARMUP_ITERATIONS = 1


def shown(scalars: dict[str, float]) -> dict[str, str]:
    """``flush``'s scalars as the progress display shows them: ``tasks/s 41.2, sampling
    3.1%, peak 812 MiB`` (``images/s`` for ``pretrain``)."""
    out = {}
    for key, value in scalars.items():
        name = key.split("/")[-1]
        if name.endswith("_per_s") and name != "iterations_per_s":
            out[name.removesuffix("_per_s") + "/s"] = f"{value:.3g}"
    if "speed/sampling_share" in scalars:
        out["sampling"] = f"{100 * scalars['speed/sampling_share']:.1f}%"
    if "memory/peak_mib" in scalars:
        out["peak"] = f"{scalars['memory/peak_mib']:,.0f} MiB"
    return out


def peak_mib(device: torch.device) -> float:
    """The peak memory this process has used so far, in MiB (see the module's docstring)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes there, KiB here


def peak_source(device: torch.device) -> str:
    """What ``peak_mib`` measures on ``device``, as results.json records it."""
    return "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS"


@dataclass
class _Totals:
    iterations: int = 0
    tasks: int = 0
    sampling_s: float = 0.0
    step_s: float = 0.0

    def add(self, tasks: int, sampling: float, step: float) -> None:
        self.iterations += 1
        self.tasks += tasks
        self.sampling_s += sampling
        self.step_s += step

    def rates(self, unit: str) -> dict[str, float]:
        seconds = self.sampling_s + self.step_s
        if not self.iterations or seconds <= 0:
            return {}
        return {
            f"{unit}_per_s": self.tasks / seconds,
            "iterations_per_s": self.iterations / seconds,
            "sampling_share": self.sampling_s / seconds,
        }


class SpeedMeter:
    """Times each iteration's sampling and meta-step (``sampled``, ``stepped``, after a
    ``begin``); ``flush`` gives the rates since the last flush, ``summary`` the rates of
    this process's iterations after its first ``warmup`` (lazy initialisation, the
    allocator's first growth, cuDNN's autotuning), for results.json. What an iteration
    processes is counted in ``unit`` (``tasks`` for meta-training, ``images`` for
    ``pretrain``)."""

    def __init__(self, device: torch.device, warmup: int, first_step: int, unit: str) -> None:
        self.device, self.warmup, self.first_step = device, warmup, first_step
        self.unit = unit
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[Any, Any, Any, int]] = []
        self.seen = 0  # iterations this process has timed
        self.interval, self.run, self.whole = _Totals(), _Totals(), _Totals()
        self._marks: list[Any] = []

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def begin(self) -> None:
        self._marks = [self._now()]

    def sampled(self) -> None:
        self._marks.append(self._now())

    def stepped(self, tasks: int) -> None:
        """The meta-step of an iteration that processed ``tasks`` (in ``unit``) is done."""
        start, sampled = self._marks
        self.pending.append((start, sampled, self._now(), tasks))

    def _seconds(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) / 1000 if self.cuda else b - a

    def flush(self) -> dict[str, float]:
        """The interval's rates and the peak so far, as TensorBoard scalars; {} when no
        iteration ran since the last flush."""
        if self.cuda and self.pending:
            torch.cuda.synchronize(self.device)
        for start, sampled, end, tasks in self.pending:
            times = (tasks, self._seconds(start, sampled), self._seconds(sampled, end))
            self.interval.add(*times)
            self.whole.add(*times)
            self.seen += 1
            if self.seen > self.warmup:
                self.run.add(*times)
        self.pending = []
        rates, self.interval = self.interval.rates(self.unit), _Totals()
        if not rates:
            return {}
        scalars = {f"speed/{k}": v for k, v in rates.items()}
        return scalars | {"memory/peak_mib": peak_mib(self.device)}

    def summary(self) -> dict[str, Any]:
        """results.json's ``speed`` block: this process's segment of the run (a resumed run
        reports the iterations it ran itself, from ``from_step``), its first ``warmup``
        iterations left out unless there were no others (then ``warmup_iterations`` is 0)."""
        self.flush()
        totals, warmup = (self.run, self.warmup) if self.run.iterations else (self.whole, 0)
        return {
            **totals.rates(self.unit),
            "iterations_timed": totals.iterations,
            "warmup_iterations": warmup,
            "from_step": self.first_step,
            "peak_mib": peak_mib(self.device),
            "peak_of": peak_source(self.device),
            "device": str(self.device),
        }

"""How much memory a piece of work takes, and how much the device has free: what
``task_batching=auto`` weighs its candidates by (``auto_batching``), and what
``scripts/bench.py`` reports beside their speed.

The peak that matters is the memory the work itself allocates, not what the allocator keeps.
On CUDA that is ``torch.cuda.max_memory_allocated``. On a CPU, RSS also counts the pages
malloc keeps after a free (fragmentation, a raised mmap threshold), which moves by tens of MiB
from run to run whatever the work; the bytes malloc has handed out and not got back (glibc's
``mallinfo2``, summed over its arenas, so the worker threads of ``task_batching=threads``
count too) are the CPU's analogue of ``max_memory_allocated``. There is no hook for their
peak, so a thread polls them every millisecond while the work runs (``PeakMemory``): a spike
shorter than that can be missed, and the whole of a step of a few milliseconds (the sinusoid's
MLP, whose peaks are KiB) sometimes is. Peaks of the size that matters (MiB and more, held for
the length of a convolution's backward) are seen.
"""

from __future__ import annotations

import ctypes
import functools
import resource
import sys
import threading
from collections.abc import Callable
from typing import Any

import torch

MIB = 2**20
#: How often ``PeakMemory`` looks.
POLL_SECONDS = 0.001


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks "
        "keepcost".split()
    ]


@functools.cache
def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):  # not glibc, or a glibc before 2.33
        return None
    return libc.mallinfo2


def heap_bytes() -> float:
    """Bytes malloc has handed out and not got back (glibc's ``mallinfo2``); NaN where there
    is no such count (another C library)."""
    mallinfo2 = _mallinfo2()
    if mallinfo2 is None:
        return float("nan")
    info = mallinfo2()
    return float(info.uordblks + info.hblkhd)


def rss_bytes() -> float:
    """The process's resident set now."""
    with open("/proc/self/statm") as f:
        return float(int(f.read().split()[1]) * resource.getpagesize())


class PeakMemory:
    """The highest RSS and malloc'd bytes seen while the block runs (polled every
    millisecond), and the heap's peak growth above its level at the start (``heap_growth``)."""

    def __enter__(self) -> PeakMemory:
        self.rss, self.heap, self._stop = rss_bytes(), heap_bytes(), threading.Event()
        self.start_heap = self.heap
        # The poller needs the GIL, which a busy Python thread hands on only every switch
        # interval (5 ms by default): shortened while polling, or short steps go unseen.
        self._interval = sys.getswitchinterval()
        sys.setswitchinterval(POLL_SECONDS / 4)
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self._look()

    def _look(self) -> None:
        self.rss = max(self.rss, rss_bytes())
        self.heap = max(self.heap, heap_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        sys.setswitchinterval(self._interval)
        self._look()

    @property
    def heap_growth(self) -> float:
        """Bytes of peak malloc'd memory above those at the start of the block."""
        return self.heap - self.start_heap


def peak_growth(work: Callable[[], Any], device: torch.device) -> float:
    """The peak bytes ``work()`` allocates above what was allocated when it started: on CUDA
    from the allocator's own peak, on a CPU from the polled heap (NaN without ``mallinfo2``)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        work()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    with PeakMemory() as peak:
        work()
    return peak.heap_growth


def free_bytes(device: torch.device) -> float:
    """What the device has free now: CUDA's ``mem_get_info``; on a CPU the kernel's
    ``MemAvailable`` (free memory plus the caches it can drop), from ``/proc/meminfo``."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable line")


def show(size: float) -> str:
    """``512 MiB``, ``2.1 GiB``, ``68 KiB``: a size as a person reads it."""
    if size != size:  # NaN: not measured
        return "?"
    for unit, scale in (("GiB", 2**30), ("MiB", MIB), ("KiB", 2**10)):
        if abs(size) >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size:.0f} B"

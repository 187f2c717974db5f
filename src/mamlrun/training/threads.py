"""Torch's intra-op threads for one command: the ``threads`` setting of train, test and adapt.

Torch starts one thread per core. When other work holds some of the cores, the threads of each
operation wait on each other longer than the extra cores save (README, "Threads": ``debug=smoke``
3 to 5.6 times slower with two threads than with one on a 2-core machine with one core busy),
so the number is a setting, said at start-up and recorded in ``results.json``.
``task_batching=threads`` runs that many tasks side by side (``algorithms/batching.py``).
Inter-op threads are left as torch sets them: mamlrun does not use torch's inter-op pool, and
torch allows setting it only before its first parallel work.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

log = logging.getLogger("mamlrun")


@contextmanager
def kept() -> Iterator[None]:
    """Gives torch's thread count back after a command, so that a Python caller (a notebook,
    the tests, which run many commands in one process) keeps its own."""
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


def use(setting: int | None) -> int:
    """Sets ``threads`` (None: torch's default, left alone), says so, and returns the number
    torch now uses."""
    if setting is not None:
        torch.set_num_threads(setting)
    used = torch.get_num_threads()
    if setting is not None:
        why = f"threads={setting}"
    elif os.environ.get("OMP_NUM_THREADS"):
        why = f"from OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}; set threads=N"
    else:
        why = "torch's default; set threads=N"
    log.info(f"threads: {used} ({why})")
    return used

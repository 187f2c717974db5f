"""Ctrl-C and SIGTERM (Slurm's time limit, ``kill``) at any moment of a command.

While training, a signal only raises a flag: the loop finishes its step, saves ``last.pt``
and stops, so nothing done is lost. Anywhere else (a test, the final evaluation after
training, writing results) there is nothing half-done worth saving, so the signal interrupts
at once with ``Interrupted``, which the CLI turns into one line that says what is on disk.
A second signal takes the default action, so a stuck process can still be killed.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """A signal stopped the command; ``str()`` says what was saved and how to go on."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@dataclass
class StopFlag:
    """Set by the first signal. ``deferred``: the code running now checks ``signal`` itself
    (the training loop); otherwise the signal raises ``Interrupted`` with ``doing``."""

    signal: int | None = None
    deferred: bool = False
    doing: str = "starting"

    @contextmanager
    def deferring(self) -> Iterator[StopFlag]:
        self.deferred = True
        try:
            yield self
        finally:
            self.deferred = False


@contextmanager
def catch_signals() -> Iterator[StopFlag]:
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signal handlers can only be set from the main thread (joblib workers)
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}

    def handler(signum: int, frame: Any) -> None:
        flag.signal = signum
        for s, h in previous.items():
            signal.signal(s, h)
        if not flag.deferred:
            raise Interrupted(signum, f"stopped during {flag.doing}")

    for s in SIGNALS:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)

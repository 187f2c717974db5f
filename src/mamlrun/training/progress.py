"""Signs of life: a tqdm bar on a terminal, a log line at a steady pace everywhere else.

Under nohup, Slurm or CI nobody sees a bar, and validation may be an hour apart; a line every
``every_s`` seconds (step, rate, loss, metric, ETA) shows that the run is alive and how far
it has to go, without flooding the log the way a line per step would.

While a bar is shown, the log's console lines go through tqdm (``above_the_bar``): tqdm
clears the bar, the line is written on a line of its own, and the bar is drawn again below
it. Written plainly, a line would start where the bar's text ends. The log file gets every
line as before.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from tqdm import tqdm

log = logging.getLogger("mamlrun")


class Progress:
    """Counts work done (``update``); shows it as a bar or as periodic log lines."""

    def __init__(
        self,
        desc: str,
        total: int,
        *,
        initial: int = 0,
        unit: str = "it",
        every_s: float = 60.0,
        enabled: bool = True,
        terminal: bool | None = None,
    ) -> None:
        self.desc, self.total, self.done, self.unit = desc, total, initial, unit
        self.every_s = every_s
        self.enabled = enabled
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.postfix: dict[str, Any] = {}
        self._start_done = initial
        self._start = self._last = time.monotonic()
        self.bar = None
        self._shown = ExitStack()  # while the bar is shown, the log writes above it
        if enabled and self.terminal:
            self.bar = tqdm(
                total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=None
            )
            self._shown.enter_context(above_the_bar())

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.done += n
        if postfix:
            self.postfix.update(postfix)
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix({k: _short(v) for k, v in self.postfix.items()}, refresh=False)
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.enabled and self.every_s > 0 and now - self._last >= self.every_s:
            self._last = now
            log.info(self.line(now))

    def line(self, now: float | None = None) -> str:
        """``train: 1200/60000 it (2.0%), 2.61 it/s, loss 0.345, ETA 6h 02m``."""
        now = time.monotonic() if now is None else now
        rate = (self.done - self._start_done) / max(now - self._start, 1e-9)
        parts = [f"{self.desc}: {self.done}/{self.total} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.1f}%)"
        parts.append(f"{rate:.3g} {self.unit}/s")
        parts += [f"{k} {_short(v)}" for k, v in self.postfix.items()]
        if rate > 0 and self.total:
            parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        return ", ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self._shown.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _AboveTheBar(logging.Handler):
    """A console handler's lines, written while tqdm has cleared its bars (which it then
    draws again); level, filters and format stay the console handler's own."""

    def __init__(self, console: logging.StreamHandler) -> None:
        super().__init__(console.level)
        self.console = console

    def handle(self, record: logging.LogRecord) -> bool:
        with tqdm.external_write_mode(file=self.console.stream):
            return bool(self.console.handle(record))


def _is_console(handler: logging.Handler) -> bool:
    """A handler writing to the terminal: not the log file, nor a capture (pytest's)."""
    streams = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    return (
        isinstance(handler, logging.StreamHandler)
        and not isinstance(handler, logging.FileHandler)
        and handler.stream in streams
    )


@contextmanager
def above_the_bar(logger: logging.Logger | None = None) -> Iterator[None]:
    """While a bar is shown: the console handlers of ``logger`` (the root logger, where Hydra
    puts them) write through tqdm. Nested bars find them already wrapped and change nothing."""
    logger = logger or logging.getLogger()
    wrapped = {id(h): _AboveTheBar(h) for h in logger.handlers if _is_console(h)}
    logger.handlers = [wrapped.get(id(h), h) for h in logger.handlers]
    try:
        yield
    finally:
        mine = {id(w): w.console for w in wrapped.values()}
        logger.handlers = [mine.get(id(h), h) for h in logger.handlers]


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"

"""Signs of life: a tqdm bar on a terminal, a log line at a steady pace everywhere else.

Under nohup, Slurm or CI nobody sees a bar, and validation may be an hour apart; a line every
``every_s`` seconds (step, rate, loss, metric, ETA) shows that the run is alive and how far
it has to go, without flooding the log the way a line per step would.
"""

from __future__ import annotations

import logging
import sys
import time
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
        if enabled and self.terminal:
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)

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

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"

"""A one-line progress bar on stderr for long copies: bytes done of the total, rate, ETA.

The command line decides whether to show it (by default only on a terminal); `Bar` draws it,
redrawing at most every `interval` seconds so a fast copy does not spend its time printing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from thinstack.sizes import format_size

WIDTH = 24


def line(label: str, done: int, total: int, elapsed: float) -> str:
    """The bar's text: a pure function of where the copy is."""
    fraction = min(1.0, done / total) if total else 1.0
    filled = round(fraction * WIDTH)
    rate = done / elapsed if elapsed > 0 else 0.0
    if fraction >= 1.0:
        eta = "done"
    elif rate > 0:
        eta = "ETA " + _clock((total - done) / rate)
    else:
        eta = "ETA --:--"
    return (f"{label} [{'#' * filled}{'.' * (WIDTH - filled)}] {fraction * 100:3.0f}% "
            f"{format_size(done)}/{format_size(total)} {format_size(int(rate))}/s {eta}")


def _clock(seconds: float) -> str:
    s = int(seconds + 0.5)
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


class Bar:
    def __init__(self, label: str, total: int, *, stream: TextIO = sys.stderr,
                 clock: Callable[[], float] = time.monotonic, interval: float = 0.2):
        self.label, self.total, self.stream = label, total, stream
        self.clock, self.interval = clock, interval
        self.started = clock()
        self.drawn_at: float | None = None
        self.width = 0

    def update(self, done: int) -> None:
        now = self.clock()
        if self.drawn_at is not None and now - self.drawn_at < self.interval:
            return
        self._draw(done, now)

    def finish(self, done: int) -> None:
        self._draw(done, self.clock())
        self.stream.write("\n")
        self.stream.flush()

    def _draw(self, done: int, now: float) -> None:
        text = line(self.label, done, self.total, now - self.started)
        # Pad over whatever a longer previous line left on screen.
        self.stream.write("\r" + text.ljust(self.width))
        self.stream.flush()
        self.width = len(text)
        self.drawn_at = now

"""Progress for long jobs: a bar redrawn in place on a terminal, a plain line now and then elsewhere.

    verify  [##########··········]  51%  1.2 GiB / 2.4 GiB  830 MiB/s  ETA 0:02

Not a terminal (a log, a pipe, CI): one line every `PLAIN_EVERY` seconds, so logs stay short.
"""

import sys
import time
from typing import Optional, TextIO

from minimal_registry.content.formatting import human_bytes, human_duration

BAR_WIDTH = 24
REDRAW_EVERY = 0.1
PLAIN_EVERY = 5.0


class Progress:
    def __init__(self, label: str, total: int, stream: Optional[TextIO] = None,
                 enabled: bool = True, tty: Optional[bool] = None):
        self.label = label
        self.total = max(0, total)
        self.done = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty() if tty is None else tty
        self.started = time.monotonic()
        self._last_draw = self.started  # the first line comes after one interval: short jobs stay quiet
        self._drawn = False

    def add(self, count: int) -> None:
        self.done += count

    @property
    def elapsed(self) -> float:
        return max(time.monotonic() - self.started, 1e-9)

    @property
    def rate(self) -> float:
        return self.done / self.elapsed

    def tick(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        interval = REDRAW_EVERY if self.tty else PLAIN_EVERY
        if not force and now - self._last_draw < interval:
            return
        self._last_draw = now
        if self.tty:
            self.stream.write("\r" + self.line() + "\x1b[K")
            self._drawn = True
        else:
            self.stream.write(self.line() + "\n")
            self._drawn = True
        self.stream.flush()

    def finish(self) -> None:
        """Leave the terminal on a fresh line; plain output gets one last line."""
        if not self.enabled:
            return
        if self._drawn:
            self.stream.write(("\r" + self.line() + "\x1b[K\n") if self.tty else self.line() + "\n")
        self.stream.flush()

    def line(self) -> str:
        rate = self.rate
        parts = [self.label]
        if self.total:
            fraction = min(self.done / self.total, 1.0)
            if self.tty:
                filled = int(fraction * BAR_WIDTH)
                parts.append("[" + "#" * filled + "·" * (BAR_WIDTH - filled) + "]")
            parts.append(f"{fraction * 100:3.0f}%")
            parts.append(f"{human_bytes(self.done)} / {human_bytes(self.total)}")
        else:
            parts.append(human_bytes(self.done))
        parts.append(f"{human_bytes(rate)}/s")
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f"ETA {human_duration((self.total - self.done) / rate)}")
        return "  ".join(parts)

"""Progress of a long run on stderr: a bar on a terminal, plain lines otherwise, with the estimated time left.

The estimate is ``elapsed / done × (total − done)`` (items of unequal cost make it approximate).  Plain lines come at
most every :data:`LINE_SECONDS`, so a short run prints nothing; ``enabled=False`` (``--quiet``) silences it.
"""

from __future__ import annotations

import sys
import time

LINE_SECONDS = 15.0  # plain-line mode: seconds between lines
BAR_SECONDS = 0.1  # terminal mode: seconds between redraws


def duration(seconds: float) -> str:
    """``75`` → ``1m15s``; ``3725`` → ``1h02m``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """``with Progress(total, "quantize") as bar: bar.step("layer")``."""

    def __init__(self, total: int, label: str, enabled: bool | None = None) -> None:
        self.total = max(total, 1)
        self.label = label
        self.count = 0
        self.start = time.perf_counter()
        self.enabled = True if enabled is None else enabled
        self.terminal = sys.stderr.isatty()
        self._last_line = self.start
        self._drawn = False

    def __enter__(self) -> Progress:
        return self

    def step(self, item: str = "") -> None:
        self.count += 1
        if not self.enabled:
            return
        now = time.perf_counter()
        elapsed = now - self.start
        wait = BAR_SECONDS if self.terminal else LINE_SECONDS
        if now - self._last_line < wait and not (self.terminal and self.count == self.total):
            return
        self._last_line = now
        left = elapsed / self.count * (self.total - self.count)
        status = f"{self.count}/{self.total}, {duration(elapsed)} elapsed, ~{duration(left)} left"
        if self.terminal:
            width = 24
            bar = "#" * int(width * self.count / self.total) + "." * (width - int(width * self.count / self.total))
            sys.stderr.write(f"\r{self.label} [{bar}] {status} {item[:40]:<40}")
        else:
            sys.stderr.write(f"{self.label}: {status} ({item})\n")
        self._drawn = True
        sys.stderr.flush()

    def __exit__(self, *exc: object) -> None:
        if self.enabled and self.terminal and self._drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()

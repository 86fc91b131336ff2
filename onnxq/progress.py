"""A dependency-free progress bar on stderr (silent when stderr is not a terminal, unless forced)."""

from __future__ import annotations

import os
import sys
import time


class Progress:
    """``with Progress(total, "quantize") as bar: bar.step("layer")`` prints ``quantize [####....] 3/8 layer``."""

    def __init__(self, total: int, label: str, enabled: bool | None = None) -> None:
        self.total = max(total, 1)
        self.label = label
        self.count = 0
        self.start = time.perf_counter()
        if enabled is None:
            enabled = sys.stderr.isatty() or os.environ.get("ONNXQ_PROGRESS") == "1"
        self.enabled = enabled
        self._last_line = 0.0

    def __enter__(self) -> Progress:
        return self

    def step(self, item: str = "") -> None:
        self.count += 1
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.count < self.total and now - self._last_line < 0.1:
            return
        self._last_line = now
        width = 24
        filled = int(width * self.count / self.total)
        bar = "#" * filled + "." * (width - filled)
        line = f"\r{self.label} [{bar}] {self.count}/{self.total} {now - self.start:6.1f}s {item[:40]:<40}"
        sys.stderr.write(line)
        sys.stderr.flush()

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()

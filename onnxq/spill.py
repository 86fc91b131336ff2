"""Arrays moved out of RAM into memory-mapped ``.npy`` files of a temporary folder (created on first use).

A spilled array is read-only and costs no resident memory until it is read again; the operating system keeps
the file's pages in its cache and may drop them.  Used for calibration activations past ``--max-memory``
(:class:`onnxq.calibration.sequential.FrontierStore`) and for solved codes held until the model is written
(:func:`onnxq.passes.quantize.quantize_in_place`)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np


class SpillFolder:
    """``put(array)`` writes ``array`` to a new file and returns it memory-mapped read-only; ``close`` removes
    the folder (mappings still open stay valid on POSIX systems)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._files = 0

    def put(self, value: np.ndarray) -> np.ndarray:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=self.prefix, ignore_cleanup_errors=True)
        self._files += 1
        path = Path(self._tmp.name) / f"{self._files}.npy"
        mapped = np.lib.format.open_memmap(path, mode="w+", dtype=value.dtype, shape=value.shape)
        mapped[...] = value
        mapped.flush()
        del mapped
        return np.load(path, mmap_mode="r")

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

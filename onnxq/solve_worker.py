"""Entry point of a solver worker process (``python -m onnxq.solve_worker``): see :mod:`onnxq.solve_pool`."""

from __future__ import annotations

import signal
import sys

from onnxq.heap import reuse_freed_memory
from onnxq.solve_pool import serve

if __name__ == "__main__":
    reuse_freed_memory()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the workers on Ctrl-C
    channel = sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write to the answer channel
    serve(sys.stdin.buffer, channel)

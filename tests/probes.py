"""Run a Python snippet in a fresh interpreter and read what it prints (for measurements that must not share this
process's heap, page-fault counters or ORT environment)."""

from __future__ import annotations

import os
import subprocess
import sys


def probe_output(script: str, *args: str, one_blas_thread: bool = False) -> str:
    """stdout of ``python -c script args`` (raises with its stderr when it fails); ``one_blas_thread`` pins
    OpenBLAS/OpenMP/MKL to one thread."""
    env = dict(os.environ)
    if one_blas_thread:
        env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise AssertionError(f"probe failed ({run.returncode}): {run.stderr.strip()[-2000:]}")
    return run.stdout

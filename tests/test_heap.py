"""``reuse_freed_memory`` (set in solver workers and the command line): a decoupleQ solve keeps reusing its heap
pages instead of faulting fresh ones in for every temporary array (glibc only)."""

from __future__ import annotations

import pytest
from probes import probe_output

from onnxq.heap import _libc_function

PROBE = """
import resource, sys
import numpy as np
from onnxq.heap import reuse_freed_memory
from onnxq.solvers.decoupleq import quantize_decoupleq
if sys.argv[1] == "reuse":
    reuse_freed_memory()
rng = np.random.default_rng(0)
x = rng.standard_normal((3072, 1536))
weight, hessian = rng.standard_normal((512, 1536)), x.T @ x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
quantize_decoupleq(weight, hessian, 2, 64)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    return int(probe_output(PROBE, mode, one_blas_thread=True))


@pytest.mark.skipif(_libc_function("mallopt") is None, reason="not glibc")
def test_a_solve_reuses_freed_memory():
    default, reused = _faults("default"), _faults("reuse")
    # measured (512 x 1536, one SmolLM2 down_proj task): 48 k minor faults with glibc's defaults, 9-10 k after
    assert reused * 3 < default, (default, reused)

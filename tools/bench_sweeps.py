"""decoupleQ on LLM-shaped layers with the compiled column sweeps and with their numpy twins, side by side.

    python -m tools.bench_sweeps                     # SmolLM2's shapes: [576, 576], [1536, 576], [576, 1536]
    python -m tools.bench_sweeps --shapes 2048x2048 --repeat 1

Each layer (:func:`tools.bench_solve_memory.problem`: random rows, ``H = XᵀX`` of correlated inputs) is solved by
:func:`onnxq.solvers.decoupleq.quantize_decoupleq` (W2 g64, float16 parameters, as the LLM harness stores them) with
one BLAS thread, once with ``libonnxq_sweeps`` and once with ``ONNXQ_NATIVE_SWEEPS``'s numpy path.  Prints seconds
per mode and the ratio, and fails when the two results differ in a single byte.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

from onnxq.solvers import sweeps
from onnxq.solvers.decoupleq import quantize_decoupleq
from onnxq.solvers.hessian import PreparedHessian
from tools.bench_solve_memory import problem


def solve(weight: np.ndarray, hessian: PreparedHessian) -> tuple[float, bytes]:
    start = time.perf_counter()
    with threadpool_limits(limits=1):
        qw, _ = quantize_decoupleq(weight, hessian, 2, 64, param_dtype=np.float16)
    seconds = time.perf_counter() - start
    return seconds, qw.codes.tobytes() + qw.scales.tobytes() + qw.float_zeros.tobytes()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["576x576", "1536x576", "576x1536"], help="ROWSxK")
    parser.add_argument("--repeat", type=int, default=2, help="best of this many runs per mode")
    args = parser.parse_args(argv)
    if not sweeps.native():
        raise SystemExit(f"{sweeps.LIBRARY} is not built: reinstall onnxq (pip install -e .) with CMake present")
    native_module = sweeps._NATIVE
    print(f"{'layer':>12} {'compiled s':>11} {'numpy s':>8} {'ratio':>6}")
    totals = [0.0, 0.0]
    for shape in args.shapes:
        rows, k = (int(v) for v in shape.split("x"))
        weight, stats = problem(rows, k)  # tools.bench_solve_memory's layer: rows and H of correlated inputs
        hessian = stats.hessians[0]
        results = []
        for module in (native_module, None):
            sweeps._NATIVE = module
            runs = [solve(weight, hessian) for _ in range(max(1, args.repeat))]
            results.append((min(s for s, _ in runs), runs[0][1]))
        sweeps._NATIVE = native_module
        if results[0][1] != results[1][1]:
            raise SystemExit(f"{shape}: the compiled and numpy sweeps gave different bytes")
        totals = [totals[0] + results[0][0], totals[1] + results[1][0]]
        print(f"{shape:>12} {results[0][0]:11.2f} {results[1][0]:8.2f} {results[1][0] / results[0][0]:5.2f}x")
    print(f"{'all':>12} {totals[0]:11.2f} {totals[1]:8.2f} {totals[1] / totals[0]:5.2f}x  (same bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

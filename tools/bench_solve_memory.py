"""Peak memory of solving one wide layer on the solve workers, with and without shared task arrays, side by side.

    python -m tools.bench_solve_memory                       # a TinyLlama down_proj: W [2048, 5632], 2 workers
    python -m tools.bench_solve_memory --rows 1024 --k 2048 --iters 1

The layer (random rows, ``H = XᵀX`` of correlated random inputs, ``C = H`` as float targets would send) is cut into
row tasks by :func:`onnxq.solvers.base.plan` and solved by :class:`onnxq.solve_pool.SolvePool`, once with the task
arrays in shared memory (the default, :class:`onnxq.solve_pool.SharedArrays`) and once with every array sent
through the pipe (``SHARE_BYTES`` set past any array).  A thread samples the proportional set size (``Pss`` of
``/proc/<pid>/smaps_rollup``: a shared page counts once over the processes that map it) of this process plus the
workers every 0.1 s.  Prints wall time and peak PSS per mode and fails if the two solutions differ.
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np

from onnxq import solve_pool
from onnxq.solvers.base import DecoupleqParams, LayerStats, assemble, plan
from onnxq.solvers.hessian import prepare_hessian
from tools.tree_memory import process_memory


class PeakSampler:
    """Samples ``Σ PSS`` of this process and the pool's workers in a thread; ``peak`` is the largest sum seen."""

    def __init__(self, pool: solve_pool.SolvePool) -> None:
        self.pool, self.peak, self._stop = pool, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import os

        while not self._stop.is_set():
            pids = [os.getpid(), *(p.pid for p in self.pool._processes)]
            self.peak = max(self.peak, sum(process_memory(pid).pss for pid in pids))
            time.sleep(0.1)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def problem(rows: int, k: int, seed: int = 0) -> tuple[np.ndarray, LayerStats]:
    """Random rows and the prepared ``H`` of correlated inputs, with ``C = H`` (the tasks then carry ``C``)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4 * k, k // 8)).astype(np.float32) @ rng.standard_normal((k // 8, k)).astype(np.float32)
    x += rng.standard_normal((4 * k, k)).astype(np.float32)
    hessian = (x.T @ x).astype(np.float64)
    weight = rng.standard_normal((rows, k)) * 0.02
    return weight, LayerStats((prepare_hessian(hessian, act_order=True),), (hessian,))


def _start_workers(pool: solve_pool.SolvePool) -> None:
    """Start the pool's workers (and their imports) on a tiny problem, outside the measurement."""
    weight, stats = problem(16, 64)
    work, solve_pool.PARALLEL_WORK = solve_pool.PARALLEL_WORK, 0
    try:
        pool.run(plan(weight, DecoupleqParams(bits=2, group_size=64, iters=0), stats, None) * pool.workers)
    finally:
        solve_pool.PARALLEL_WORK = work


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--k", type=int, default=5632)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--iters", type=int, default=4)
    args = parser.parse_args(argv)
    weight, stats = problem(args.rows, args.k)
    tasks = plan(weight, DecoupleqParams(bits=2, group_size=64, iters=args.iters), stats, None)
    prepared = stats.hessians[0]
    upper = prepared.inverse_cholesky_upper(prepared.act_order())  # the factor the tasks use (cached)
    statistics = sum(a.nbytes for a in (prepared.damped, stats.crosses[0], upper))
    print(f"W [{args.rows}, {args.k}] in {len(tasks)} tasks on {args.workers} workers; H, U, C: "
          f"{statistics / 2**30:.2f} GiB in this process")
    print("| mode | wall s | peak PSS, this process + workers |")
    print("| --- | ---: | ---: |")
    solutions, share_bytes = {}, solve_pool.SHARE_BYTES
    for mode, threshold in (("shared memory", share_bytes), ("through the pipe", 1 << 62)):
        solve_pool.SHARE_BYTES = threshold
        with solve_pool.SolvePool(args.workers) as pool:
            _start_workers(pool)
            with PeakSampler(pool) as sampler:
                start = time.perf_counter()
                solved, _ = assemble(pool.run(tasks))
                seconds = time.perf_counter() - start
        solutions[mode] = solved
        print(f"| {mode} | {seconds:.1f} | {sampler.peak / 2**30:.2f} GiB |")
    solve_pool.SHARE_BYTES = share_bytes
    first, second = solutions.values()
    if not (np.array_equal(first.codes, second.codes) and np.array_equal(first.scales, second.scales)):
        raise SystemExit("the two modes gave different solutions")
    print("same solution in both modes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

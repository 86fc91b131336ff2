"""Sequential calibration alone (float targets, no solving) of SmolLM2-135M at several batch sizes, side by side.

    python -m tools.bench_calibration                    # 16 windows of 512 tokens, batch 8 vs 2 vs 1
    python -m tools.bench_calibration --windows 64 --batch-sizes 8 2
    python -m tools.bench_calibration --windows 16 --batch-sizes 2 --breakdown   # where a run's time goes
    python -m tools.bench_calibration --job llama-1b --groups 8 --batch-sizes 0 --breakdown

``--job llama-1b`` is the 1.1 B model of ``docs/performance.md`` (``python -m models.llama_1b`` builds it) with its
run's calibration (32 × 512 tokens of Emma, as ``--calib-text``), ``--groups`` its first layer groups; batch size 0
is the model's default batch.

Runs :class:`onnxq.calibration.sequential.SequentialCalibration` over every layer group of the harness's SmolLM2
job (lm_head left float), committing nothing (the weights stay float; the work per step is the same), and prints
wall and CPU seconds per batch size and each one's ratio to the first.  ``--breakdown`` also prints the seconds
spent in each part, summed over the threads that ran it (two parts running at once both count, so the parts add up
to more than the wall time): the quantized and the float session's ORT runs, the ``H`` and ``C`` updates, building
the step sessions, and the wall seconds of the steps by layer group kind (q/k/v, o, gate/up, down).  The windows
are the harness's (:func:`tools.lm_metrics.make_smollm2_calibration`, seed 0).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import onnx

from models.llama_1b import scale_run
from models.smollm2 import build_smollm2
from onnxq.calibration import sequential
from onnxq.calibration.data import iter_batches
from onnxq.calibration.sequential import SequentialCalibration
from onnxq.calibration.sources.make import build_calibration
from onnxq.calibration.stream import process_cpu_seconds
from onnxq.ir.targets import find_targets
from onnxq.passes.quantize import layer_groups_of
from onnxq.stats.hessian import HessianSum
from tools.lm_metrics import make_smollm2_calibration

GROUP_KINDS = ("q/k/v", "o", "gate/up", "down")  # a Llama block's layer groups, in order


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", choices=["smollm2", "llama-1b"], default="smollm2")
    parser.add_argument("--windows", type=int, default=16, help="SmolLM2's calibration windows of 512 tokens")
    parser.add_argument("--groups", type=int, help="calibrate only the first N layer groups")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 2, 1])
    parser.add_argument("--breakdown", action="store_true", help="seconds per part of the calibration")
    args = parser.parse_args(argv)
    model, data, what = _job(args.job, args.windows)
    targets = [t for t in find_targets(model, exclude="lm_head").targets if not t.is_lookup]
    groups = layer_groups_of(targets)
    steps = len(groups) if args.groups is None else min(args.groups, len(groups))
    print(f"{steps} of {len(groups)} layer groups, {what}, float targets")
    print(f"{'batch':>5} {'wall s':>7} {'cpu s':>7} {'ratio':>6}")
    first = None
    for batch_size in args.batch_sizes:
        batches = iter_batches(data, batch_size or None, model)
        seconds: dict[str, float] = collections.defaultdict(float)
        start, cpu_start = time.perf_counter(), process_cpu_seconds()
        calibration = SequentialCalibration(model, groups, batches, float_targets=True)
        with _timed_parts(seconds) if args.breakdown else contextlib.nullcontext():
            try:
                for index in range(steps):
                    step_start = time.perf_counter()
                    calibration.step(index)
                    seconds[f"steps {GROUP_KINDS[index % 4]}"] += time.perf_counter() - step_start
            finally:
                calibration.close()
        wall = time.perf_counter() - start
        first = first or wall
        print(f"{batch_size:>5} {wall:7.1f} {process_cpu_seconds() - cpu_start:7.1f} {wall / first:5.2f}x")
        if args.breakdown:
            print("      " + ", ".join(f"{part} {value:.1f}" for part, value in sorted(seconds.items())))
    return 0


def _job(name: str, windows: int) -> tuple[onnx.ModelProto, dict, str]:
    """The model, its calibration arrays and their description."""
    if name == "smollm2":
        return onnx.load(build_smollm2()), make_smollm2_calibration(windows, 512, 0), f"{windows} windows of 512 tokens"
    path, options = scale_run()
    samples, seq_len = options["calib_samples"], options["calib_seq_len"]
    made = build_calibration(path, text=options["calib_text"], samples=samples, seq_len=seq_len, seed=0)
    return onnx.load(path), made.arrays, f"{samples} × {seq_len} tokens of Emma"


@contextlib.contextmanager
def _timed_parts(seconds: dict[str, float]) -> Iterator[None]:
    """Add each part's seconds to ``seconds`` while the block runs (wrapping the functions that do the parts)."""
    lock = threading.Lock()

    def timed(function: Callable, name: Callable[..., str]) -> Callable:
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                with lock:
                    seconds[name(*args, **kwargs)] += time.perf_counter() - start
        return run

    originals = (sequential.run_session, HessianSum._add_blocks, SequentialCalibration._session)
    sequential.run_session = timed(originals[0], lambda *_: f"ORT {threading.current_thread().name.split('_')[0]}")
    HessianSum._add_blocks = timed(originals[1], lambda _, x, ref, upper, **__: "sum H" if upper else "sum C")
    SequentialCalibration._session = timed(originals[2], lambda *_: "session builds")
    try:
        yield
    finally:
        sequential.run_session, HessianSum._add_blocks, SequentialCalibration._session = originals


if __name__ == "__main__":
    raise SystemExit(main())

"""Sequential calibration alone (float targets, no solving) of SmolLM2-135M at several batch sizes, side by side.

    python -m tools.bench_calibration                    # 16 windows of 512 tokens, batch 8 vs 2 vs 1
    python -m tools.bench_calibration --windows 64 --batch-sizes 8 2

Runs :class:`onnxq.calibration.sequential.SequentialCalibration` over every layer group of the harness's SmolLM2
job (lm_head left float), committing nothing (the weights stay float; the work per step is the same), and prints
wall and CPU seconds per batch size and each one's ratio to the first.  The windows are the harness's
(:func:`tools.lm_metrics.make_smollm2_calibration`, seed 0).
"""

from __future__ import annotations

import argparse
import time

import onnx

from models.smollm2 import build_smollm2
from onnxq.calibration.data import iter_batches
from onnxq.calibration.sequential import SequentialCalibration
from onnxq.calibration.stream import process_cpu_seconds
from onnxq.ir.targets import find_targets
from onnxq.passes.quantize import layer_groups_of
from tools.lm_metrics import make_smollm2_calibration


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 2, 1])
    args = parser.parse_args(argv)
    model = onnx.load(build_smollm2())
    targets = [t for t in find_targets(model, exclude="lm_head").targets if not t.is_lookup]
    groups = layer_groups_of(targets)
    data = make_smollm2_calibration(args.windows, 512, 0)
    print(f"{len(groups)} layer groups, {args.windows} windows of 512 tokens, float targets")
    print(f"{'batch':>5} {'wall s':>7} {'cpu s':>7} {'ratio':>6}")
    first = None
    for batch_size in args.batch_sizes:
        batches = iter_batches(data, batch_size, model)
        start, cpu_start = time.perf_counter(), process_cpu_seconds()
        calibration = SequentialCalibration(model, groups, batches, float_targets=True)
        try:
            for index in range(len(groups)):
                calibration.step(index)
        finally:
            calibration.close()
        wall = time.perf_counter() - start
        first = first or wall
        print(f"{batch_size:>5} {wall:7.1f} {process_cpu_seconds() - cpu_start:7.1f} {wall / first:5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

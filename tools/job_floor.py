"""The SmolLM2 job's compute floor on this machine: each part of its work alone, on both cores, added up.

    python -m tools.solve_tasks dump smollm2 --block 5 --out /tmp/tasks.pkl   # one block's real row tasks
    python -m tools.job_floor --tasks /tmp/tasks.pkl

The job (``tools/compare.py smollm2 --configs 2:64 --methods decoupleq``) is sequential decoupleQ W2 g64 with float
targets on 64 × 512 tokens.  Whatever the schedule, it must do this work:

- **forward**: the model up to its last layer group's input, over the 64 windows, twice (the partially quantized and
  the float model): ``2·F``, measured as calibration runs them, two ORT sessions of one thread side by side
  (calibration's options, batch 8; one session on two threads is slower: 124 s per pass here);
- **sums**: per block and batch, ``H += xᵀx`` (``syrk``) and ``C += xᵀx_float`` for its four layer inputs
  (q/k/v, o, gate/up: ``K = 576``; down: ``K = 1536``), run as calibration runs them (:meth:`HessianSum.parts` on
  two threads, one BLAS thread each) on arrays of the real shapes;
- **solve**: one block's dumped row tasks (``--tasks``) solved on one thread, times the blocks, over two cores.

``floor = 2·F + sums + solve`` is what two cores need even if nothing ever waited.  The tool also prints what the
known levers would leave: ``F`` without its non-MatMul operators (ORT's profile of one batch: the dynamo export's
decomposed attention, norms and activations), and ``C`` of ``down_proj`` replaced by ``xᵀy_float`` (``K × N``
with ``y_float = x_float Wᵀ``, ``N = 576``), which would need the float model's layer outputs.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from threadpoolctl import threadpool_limits

from models.smollm2 import build_smollm2
from onnxq.calibration.data import iter_batches
from onnxq.calibration.keys import plan_keys
from onnxq.calibration.sessions import SessionFactory, open_session, run_session
from onnxq.ir.targets import Target, find_targets
from onnxq.passes.quantize import layer_groups_of
from onnxq.stats.hessian import HessianSum
from onnxq.stats.unfold import ROW_BLOCK
from tools.compare import SMOLLM2_CALIBRATION_WINDOWS
from tools.lm_metrics import make_smollm2_calibration
from tools.solve_tasks import GROUPS_PER_BLOCK, solve

BATCH = 8  # windows per batch: the job's default for this export
SEQ_LEN = 512
BATCH_ROWS = BATCH * SEQ_LEN
TARGET_SECONDS = 300.0  # issue #14: the job in at most 5 minutes


def forward_seconds(model: onnx.ModelProto, tensor: str, data: dict) -> tuple[float, float]:
    """``(2·F, MatMul share)``: two passes of the slice of ``model`` computing ``tensor`` over ``data``, side by side
    on the two cores (one ORT session of one thread each, as calibration runs the quantized and the float model),
    and the share of MatMul in ORT's profile of one batch."""
    factory = SessionFactory(model, 1)
    try:
        path, _ = factory.write([tensor])
        sessions = [open_session(str(path), 1) for _ in range(2)]
        batches = list(iter_batches(data, BATCH, model))
        for session in sessions:
            run_session(session, [tensor], batches[0], "warm-up")

        def one_pass(session: ort.InferenceSession) -> None:
            for index, feed in enumerate(batches):
                run_session(session, [tensor], feed, f"batch {index}")

        start = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            for done in [pool.submit(one_pass, session) for session in sessions]:
                done.result()
        seconds = time.perf_counter() - start
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.enable_profiling = 1, True
        options.profile_file_prefix = str(factory.folder / "profile")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        profiled = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        profiled.run([tensor], batches[0])
        by_op: dict[str, float] = collections.defaultdict(float)
        for event in json.loads(Path(profiled.end_profiling()).read_text()):
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                by_op[event["args"]["op_name"]] += event["dur"]
        return seconds, by_op["MatMul"] / sum(by_op.values())
    finally:
        factory.close()


def sums_seconds(block_groups: list[list[Target]], blocks: int, rows: int) -> float:
    """The seconds of one block's ``H`` and ``C`` updates (``block_groups``: its layer groups) for one batch of
    :data:`BATCH` windows, run as calibration runs them, scaled to ``rows`` rows and ``blocks`` blocks."""
    rng = np.random.default_rng(0)
    seconds = 0.0
    with ThreadPoolExecutor(2) as pool, threadpool_limits(limits=1, user_api="blas"):
        for group in block_groups:
            for unit in plan_keys(group).values():
                x, ref = (rng.standard_normal((BATCH_ROWS, unit.size), dtype=np.float32) for _ in range(2))
                hessian_sum = HessianSum(unit, cross=True)
                hessian_sum.add(x, ref)  # allocation and warm-up
                start = time.perf_counter()
                for done in [pool.submit(part) for part in hessian_sum.parts(x, ref)]:
                    done.result()
                seconds += time.perf_counter() - start
    return seconds * blocks * rows / BATCH_ROWS


def product_seconds(k: int, n: int, blocks: int, rows: int) -> float:
    """``Σ xᵀy`` (``K × N``, float64 sum of float32 products over blocks of ``ROW_BLOCK`` rows, as
    :class:`HessianSum` adds ``C``) for one batch on one thread, scaled to ``rows`` rows and ``blocks`` blocks."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH_ROWS, k), dtype=np.float32)
    y = rng.standard_normal((BATCH_ROWS, n), dtype=np.float32)
    with threadpool_limits(limits=1, user_api="blas"):
        start = time.perf_counter()
        product = np.zeros((k, n))
        for block in range(0, BATCH_ROWS, ROW_BLOCK):
            product += x[block:block + ROW_BLOCK].T @ y[block:block + ROW_BLOCK]
        seconds = time.perf_counter() - start
    return seconds * blocks * rows / BATCH_ROWS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=Path, required=True, help="python -m tools.solve_tasks dump smollm2 ...")
    args = parser.parse_args(argv)
    model = onnx.load(build_smollm2())
    targets = [t for t in find_targets(model, exclude="lm_head").targets if not t.is_lookup]
    groups = layer_groups_of(targets)
    blocks = len(groups) // GROUPS_PER_BLOCK
    last_input = next(iter(plan_keys(groups[-1]).values())).tensor
    windows = SMOLLM2_CALIBRATION_WINDOWS
    data = make_smollm2_calibration(windows, SEQ_LEN, 0)
    rows = windows * SEQ_LEN

    forwards, matmul_share = forward_seconds(model, last_input, data)
    sums = sums_seconds(groups[:GROUPS_PER_BLOCK], blocks, rows)
    # down_proj's C (K × K) and xᵀy_float (K × N); two sum threads share C's work: one thread's time over two
    n, k = groups[GROUPS_PER_BLOCK - 1][0].matrix_shape
    down_cross = product_seconds(k, k, blocks, rows) / 2
    down_output_cross = product_seconds(k, n, blocks, rows) / 2
    block = solve(args.tasks)
    solve_seconds = blocks * sum(g["seconds"] for g in block["groups"]) / 2

    floor = forwards + sums + solve_seconds
    levers = forwards * matmul_share + sums - down_cross + down_output_cross + solve_seconds
    print(f"SmolLM2 job, {windows} × {SEQ_LEN} tokens, {blocks} blocks, 2 cores")
    print(f"  forward 2 · F      {forwards:7.1f} s   (two passes side by side, one thread each; MatMul "
          f"{100 * matmul_share:.0f} % of ORT's profile)")
    print(f"  sums H and C       {sums:7.1f} s   (down_proj's C {down_cross:.1f} s; as xᵀy {down_output_cross:.1f} s)")
    print(f"  solve              {solve_seconds:7.1f} s   (one block {2 * solve_seconds / blocks:.2f} s on one "
          f"thread, × {blocks} / 2)")
    print(f"  floor              {floor:7.1f} s   = {floor / TARGET_SECONDS:.2f} × the {TARGET_SECONDS:.0f} s target")
    print(f"  with both levers   {levers:7.1f} s   = {levers / TARGET_SECONDS:.2f} × (forward = its MatMuls only; "
          "down's C as xᵀy)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

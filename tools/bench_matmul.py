"""Side-by-side CPU latency of one quantized linear layer ``Y = A·Wᵀ`` in ONNX Runtime.

Variants, all in one process and measured round-robin (one run of each variant per round, so load
changes hit every variant alike), median over the rounds after warm-up.  All sessions share ORT's global
intra-op thread pool (``--threads`` threads), so no session's spinning workers slow down another's:

- ``fp32``: MatMul with the fp32 weight;
- ``nb2-acc0`` / ``nb2-acc4`` / ``nb2-lut``: com.microsoft::MatMulNBits bits=2, accuracy_level 0, 4,
  and 0 with the session config ``mlas.use_lut_gemm=1``;
- ``nb4-acc4``: MatMulNBits bits=4, accuracy_level 4;
- ``oq2`` / ``oq4``: onnxq::MatMulLowBit bits 2 / 4 (exact fp32 accumulation).

``err`` columns: max |Y − Y_ref| / max |Y_ref| against the float64 product with the dequantized weight.
``--timer thread-cpu`` runs one intra-op thread (ORT then computes on the calling thread) and measures that
thread's CPU time: robust on a loaded, shared machine, where wall-clock medians are not.

    python -m tools.bench_matmul                      # the full table (M 1 8 128, K=N 768 2048 4096, g 64 128)
    python -m tools.bench_matmul --m 1 --sizes 4096 --groups 64
    python -m tools.bench_matmul --timer thread-cpu   # single-thread compute time
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxq import custom_ops
from onnxq.formats.lowbit_layout import DOMAIN, OPSET_VERSION, emit_matmul_lowbit
from onnxq.packing import pack_bits
from onnxq.quantized_weight import QuantizedWeight

IR_VERSION = 10
VARIANTS = ("fp32", "nb2-acc0", "nb2-acc4", "nb2-lut", "nb4-acc4", "oq2", "oq4")


@dataclass
class Layer:
    """A random quantized weight (integer zero points, as MatMulNBits takes them) and its activation."""

    weight: dict[int, QuantizedWeight]  # bits -> weight
    activation: np.ndarray


def random_weight(n: int, k: int, bits: int, group: int, rng: np.random.Generator) -> QuantizedWeight:
    groups = -(-k // group)
    codes = rng.integers(0, 1 << bits, (n, k), dtype=np.uint8)
    scales = (0.01 + 0.02 * rng.random((n, groups))).astype(np.float32)
    zero_points = rng.integers(0, 1 << bits, (n, groups), dtype=np.uint8)
    return QuantizedWeight(codes, scales, zero_points, None, bits, group)


def _model(node: onnx.NodeProto, m: int, k: int, n: int, initializers: list[onnx.TensorProto]) -> bytes:
    graph = helper.make_graph(
        [node],
        "layer",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])],
        initializers,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1),
              helper.make_opsetid(DOMAIN, OPSET_VERSION)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION).SerializeToString()


def fp32_model(weight: QuantizedWeight, m: int) -> bytes:
    n, k = weight.shape
    w = numpy_helper.from_array(weight.dequantize(np.float32).T.copy(), "W")
    return _model(helper.make_node("MatMul", ["A", "W"], ["Y"]), m, k, n, [w])


def matmulnbits_model(weight: QuantizedWeight, m: int, accuracy_level: int) -> bytes:
    n, k = weight.shape
    group, groups = weight.group_size, weight.num_groups
    codes = np.zeros((n, groups * group), np.uint8)
    codes[:, :k] = weight.codes
    codes[:, k:] = weight.zero_points[:, -1:]
    initializers = [
        numpy_helper.from_array(pack_bits(codes.reshape(n, groups, group), weight.bits), "B"),
        numpy_helper.from_array(weight.scales.reshape(-1), "S"),
        numpy_helper.from_array(pack_bits(weight.zero_points, weight.bits), "Z"),
    ]
    node = helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft", K=k, N=n,
                            bits=weight.bits, block_size=group, accuracy_level=accuracy_level)
    return _model(node, m, k, n, initializers)


def lowbit_model(weight: QuantizedWeight, m: int) -> bytes:
    n, k = weight.shape
    nodes, initializers = emit_matmul_lowbit("A", "Y", weight, None, "layer")
    return _model(nodes[0], m, k, n, initializers)


_POOL = {"threads": 2, "global": False}


def use_global_thread_pool(threads: int) -> None:
    """One intra-op pool of ``threads`` threads for every session of this process (call before any session)."""
    from onnxruntime.capi import onnxruntime_pybind11_state

    onnxruntime_pybind11_state.set_global_thread_pool_sizes(threads, 1)
    _POOL["global"] = True


def session(model: bytes | str, config: dict[str, str] | None = None, custom: bool = False):
    """An ORT CPU session (serialized model or path) on the shared pool, with optional session config."""
    so = custom_ops.session_options() if custom else ort.SessionOptions()
    if _POOL["global"]:
        so.use_per_session_threads = False
    else:
        so.intra_op_num_threads = _POOL["threads"]
        so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def build_variants(layer: Layer, m: int) -> dict[str, Callable[[], np.ndarray]]:
    w2, w4 = layer.weight[2], layer.weight[4]
    models = {
        "fp32": (fp32_model(w2, m), None, False),
        "nb2-acc0": (matmulnbits_model(w2, m, 0), None, False),
        "nb2-acc4": (matmulnbits_model(w2, m, 4), None, False),
        "nb2-lut": (matmulnbits_model(w2, m, 0), {"mlas.use_lut_gemm": "1"}, False),
        "nb4-acc4": (matmulnbits_model(w4, m, 4), None, False),
        "oq2": (lowbit_model(w2, m), None, True),
        "oq4": (lowbit_model(w4, m), None, True),
    }
    feeds = {"A": layer.activation}
    runs = {}
    for name, (model, config, custom) in models.items():
        sess = session(model, config, custom)
        runs[name] = lambda s=sess: s.run(None, feeds)[0]
    return runs


def measure(runs: dict[str, Callable[[], np.ndarray]], warmup: int, min_rounds: int, max_rounds: int,
            budget: float, clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median milliseconds per variant (by ``clock``), interleaving the variants round by round."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    start = time.perf_counter()
    for round_index in range(max_rounds):
        for name, run in runs.items():
            t0 = clock()
            run()
            times[name].append(clock() - t0)
        if round_index + 1 >= min_rounds and time.perf_counter() - start > budget:
            break
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def relative_error(y: np.ndarray, weight: QuantizedWeight, a: np.ndarray) -> float:
    reference = a.astype(np.float64) @ weight.dequantize(np.float64).T
    return float(np.abs(y - reference).max() / np.abs(reference).max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--m", type=int, nargs="+", default=[1, 8, 128], help="rows of A")
    parser.add_argument("--sizes", type=int, nargs="+", default=[768, 2048, 4096], help="K = N")
    parser.add_argument("--groups", type=int, nargs="+", default=[64, 128], help="group (block) sizes")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (wall timer)")
    parser.add_argument("--timer", choices=("wall", "thread-cpu"), default="wall",
                        help="wall-clock with --threads threads, or 1 thread timed by its CPU time")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--min-rounds", type=int, default=7)
    parser.add_argument("--max-rounds", type=int, default=200)
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of rounds per configuration")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    threads = args.threads if args.timer == "wall" else 1
    clock = time.perf_counter if args.timer == "wall" else time.thread_time
    _POOL["threads"] = threads
    use_global_thread_pool(threads)
    timer = "wall-clock" if args.timer == "wall" else "CPU time of the computing thread"
    print(f"onnxruntime {ort.__version__}, {threads} intra-op thread(s), onnxq CPU kernels: {custom_ops.cpu_isa()}; "
          f"milliseconds, {timer}, median of interleaved rounds")
    header = ("| M | K=N | group | " + " | ".join(VARIANTS)
              + " | fp32/oq2 | nb2-acc4/oq2 | nb4-acc4/oq4 | fp32/oq4 | oq2 err | oq4 err | nb2-acc4 err |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    rng = np.random.default_rng(args.seed)
    for m in args.m:
        for size in args.sizes:
            for group in args.groups:
                layer = Layer({b: random_weight(size, size, b, group, rng) for b in (2, 4)},
                              rng.standard_normal((m, size)).astype(np.float32))
                runs = build_variants(layer, m)
                ms = measure(runs, args.warmup, args.min_rounds, args.max_rounds, args.budget, clock)
                errors = [relative_error(runs[v](), layer.weight[b], layer.activation)
                          for v, b in (("oq2", 2), ("oq4", 4), ("nb2-acc4", 2))]
                cells = [f"{ms[v]:.3f}" for v in VARIANTS]
                ratios = [ms["fp32"] / ms["oq2"], ms["nb2-acc4"] / ms["oq2"], ms["nb4-acc4"] / ms["oq4"],
                          ms["fp32"] / ms["oq4"]]
                print(f"| {m} | {size} | {group} | " + " | ".join(cells) + " | "
                      + " | ".join(f"{r:.2f}x" for r in ratios) + " | "
                      + " | ".join(f"{e:.1e}" for e in errors) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

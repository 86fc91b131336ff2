"""Correctness and speed of onnxq::MatMulLowBit on the CUDA execution provider, where a GPU exists.

For each case (M, K=N, bits, activation dtype) it checks the op against the float64 product with the
dequantized weight (fp32: 1e-5 relative, fp16: 1e-3) and times it against an fp16 (or fp32) MatMul with
the dequantized weight and against com.microsoft::MatMulNBits, inputs and outputs bound on the device.
Without a GPU (or without onnxruntime's CUDA provider, or the CUDA custom-op library) it says so and exits 0.

    python -m tools.gpu_selftest            # exit code 1 if any result is wrong
    python -m tools.gpu_selftest --cpu-dry-run --sizes 256   # the same steps on the CPU provider (tool check)
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxq import custom_ops
from onnxq.errors import OnnxqError
from onnxq.formats.lowbit_layout import DOMAIN, OPSET_VERSION, emit_matmul_lowbit, lowbit_tensors
from onnxq.packing import pack_bits
from onnxq.quantized_weight import QuantizedWeight

CUDA = {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"], "device": "cuda", "library": "cuda"}
CPU_DRY_RUN = {"providers": ["CPUExecutionProvider"], "device": "cpu", "library": "cpu"}


def gpu_count() -> tuple[int, str]:
    """(number of CUDA devices, reason if none) via the driver API, without any CUDA Python package."""
    try:
        driver = ctypes.CDLL("libcuda.so.1" if sys.platform != "win32" else "nvcuda.dll")
    except OSError:
        return 0, "no CUDA driver (libcuda) on this machine"
    if driver.cuInit(0) != 0:
        return 0, "the CUDA driver found no usable device"
    count = ctypes.c_int(0)
    if driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0, "cuDeviceGetCount failed"
    return count.value, "" if count.value else "zero CUDA devices"


def _model(nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto], m: int, k: int, n: int,
           elem: int) -> bytes:
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("A", elem, [m, k])],
                              [helper.make_tensor_value_info("Y", elem, [m, n])], initializers)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1),
              helper.make_opsetid(DOMAIN, OPSET_VERSION)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def models(weight: QuantizedWeight, m: int, dtype: np.dtype) -> dict[str, bytes]:
    n, k = weight.shape
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    nodes, inits = emit_matmul_lowbit("A", "Y", weight, None, "layer", dtype)
    dense = numpy_helper.from_array(weight.dequantize(dtype).T.copy(), "W")
    group, groups = weight.group_size, weight.num_groups
    codes = np.zeros((n, groups * group), np.uint8)
    codes[:, :k] = weight.codes
    codes[:, k:] = weight.zero_points[:, -1:]
    nbits = [numpy_helper.from_array(pack_bits(codes.reshape(n, groups, group), weight.bits), "B"),
             numpy_helper.from_array(weight.scales.reshape(-1).astype(dtype), "S"),
             numpy_helper.from_array(pack_bits(weight.zero_points, weight.bits), "Z")]
    nbits_node = helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft", K=k, N=n,
                                  bits=weight.bits, block_size=group)
    return {
        "onnxq": _model(nodes, inits, m, k, n, elem),
        "matmul": _model([helper.make_node("MatMul", ["A", "W"], ["Y"])], [dense], m, k, n, elem),
        "matmulnbits": _model([nbits_node], nbits, m, k, n, elem),
    }


def timed_session(model: bytes, a: np.ndarray, custom: bool, repeats: int, target: dict) -> tuple[np.ndarray, float]:
    so = custom_ops.session_options(target["library"]) if custom else ort.SessionOptions()
    if target["device"] == "cuda":
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")  # every node must run on the GPU
    session = ort.InferenceSession(model, so, providers=target["providers"])
    binding = session.io_binding()
    binding.bind_ortvalue_input("A", ort.OrtValue.ortvalue_from_numpy(a, target["device"], 0))
    binding.bind_output("Y", target["device"], 0)
    for _ in range(3):
        session.run_with_iobinding(binding)
    times = []
    for _ in range(repeats):
        binding.synchronize_inputs()
        start = time.perf_counter()
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        times.append(time.perf_counter() - start)
    return binding.copy_outputs_to_cpu()[0], 1e3 * statistics.median(times)


def random_weight(n: int, k: int, bits: int, group: int, rng: np.random.Generator) -> QuantizedWeight:
    groups = -(-k // group)
    return QuantizedWeight(rng.integers(0, 1 << bits, (n, k), dtype=np.uint8),
                           (0.01 + 0.02 * rng.random((n, groups))).astype(np.float32),
                           rng.integers(0, 1 << bits, (n, groups), dtype=np.uint8), None, bits, group)


def reference(a: np.ndarray, weight: QuantizedWeight, dtype: np.dtype) -> np.ndarray:
    _, scales, zeros = lowbit_tensors(weight, dtype)
    k, g = weight.shape[1], weight.group_size
    w = np.repeat(scales.astype(np.float64), g, 1)[:, :k] * weight.codes + np.repeat(zeros.astype(np.float64), g,
                                                                                     1)[:, :k]
    return a.astype(np.float64) @ w.T


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", type=int, nargs="+", default=[1, 8, 128])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096])
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--cpu-dry-run", action="store_true", help="run the same steps on the CPU provider")
    args = parser.parse_args(argv)

    target = CPU_DRY_RUN if args.cpu_dry_run else CUDA
    if not args.cpu_dry_run:
        devices, reason = gpu_count()
        if not devices:
            print(f"no GPU: {reason}; nothing to test")
            return 0
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            print("no GPU support in this onnxruntime (install onnxruntime-gpu); nothing to test")
            return 0
        print(f"{devices} CUDA device(s), onnxruntime {ort.__version__}; median ms with device-bound inputs")
    try:
        custom_ops.library_path(target["library"])
    except OnnxqError as exc:
        print(f"no custom-op library: {exc}")
        return 1

    print("| dtype | bits | M | K=N | onnxq ms | MatMul ms | MatMulNBits ms | MatMul/onnxq | NBits/onnxq | onnxq err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    failures = 0
    rng = np.random.default_rng(0)
    for dtype in (np.dtype(np.float16), np.dtype(np.float32)):
        tolerance = 1e-3 if dtype == np.float16 else 1e-5
        for bits in (2, 4):
            for size in args.sizes:
                weight = random_weight(size, size, bits, args.group, rng)
                for m in args.m:
                    a = rng.standard_normal((m, size)).astype(dtype)
                    built = models(weight, m, dtype)
                    y, t_ours = timed_session(built["onnxq"], a, True, args.repeats, target)
                    ref = reference(a, weight, dtype)
                    err = float(np.abs(y.astype(np.float64) - ref).max() / np.abs(ref).max())
                    _, t_dense = timed_session(built["matmul"], a, False, args.repeats, target)
                    try:
                        _, t_nbits = timed_session(built["matmulnbits"], a, False, args.repeats, target)
                    except Exception:  # e.g. no CUDA MatMulNBits kernel for this dtype/bits
                        t_nbits = float("nan")
                    ok = err <= tolerance
                    failures += not ok
                    print(f"| {dtype.name} | {bits} | {m} | {size} | {t_ours:.3f} | {t_dense:.3f} | {t_nbits:.3f} | "
                          f"{t_dense / t_ours:.2f}x | {t_nbits / t_ours:.2f}x | {err:.1e}{'' if ok else ' FAIL'} |",
                          flush=True)
    print("all results within tolerance" if not failures else f"{failures} case(s) out of tolerance")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

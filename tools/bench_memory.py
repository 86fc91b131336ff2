"""Peak memory of ``onnxq quantize`` on a model of ≥ 2 GB of fp32 weights, as a ratio to the weight bytes.

    python -m tools.bench_memory                       # builds <cache>/bench_memory/model.onnx (2.2 GB) once
    python -m tools.bench_memory --layers 8            # a smaller model
    python -m tools.bench_memory -- --method rtn --bits 4 --format qdq   # options after -- go to onnxq quantize

The model is a chain of ``layers`` MatMuls with fp32 ``[width, width]`` weights (random, seeded) and a ReLU between
them, saved with external data.  The command runs under ``/usr/bin/time -v`` (its "Maximum resident set size" is
the peak RSS of the whole process), and the script prints weight bytes, peak RSS and their ratio.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.cache import cache_dir


def build_chain(path: Path, layers: int, width: int, seed: int = 0) -> int:
    """Write the MatMul chain to ``path`` (+ ``path.data``); returns its weight bytes."""
    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "x"
    for i in range(layers):
        weight = (rng.standard_normal((width, width), dtype=np.float32) / np.float32(np.sqrt(width)))
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"h{i}"], name=f"layer{i}"))
        if i + 1 < layers:
            nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"]))
            current = f"r{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", width])],
                              [helper.make_tensor_value_info(f"h{layers - 1}", TensorProto.FLOAT, ["b", width])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
    return layers * width * width * 4


def peak_rss_bytes(command: list[str]) -> int:
    """Run ``command`` under ``/usr/bin/time -v``; its maximum resident set size in bytes."""
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"command failed ({result.returncode}): {result.stderr[-2000:]}")
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    if match is None:
        raise SystemExit("could not read the peak RSS from /usr/bin/time -v")
    return int(match.group(1)) * 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=34)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("options", nargs="*", help="onnxq quantize options (after --); default --method rtn --bits 4")
    args = parser.parse_args(argv)
    folder = cache_dir("bench_memory", f"{args.layers}x{args.width}")
    model = folder / "model.onnx"
    weight_bytes = args.layers * args.width * args.width * 4
    if not model.exists():
        print(f"building {model} ({weight_bytes / 1e9:.2f} GB of fp32 weights)")
        build_chain(model, args.layers, args.width)
    options = args.options or ["--method", "rtn", "--bits", "4"]
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "onnxq", "quantize", str(model), "-o", str(Path(out) / "q.onnx"), *options]
        peak = peak_rss_bytes(command)
    print(f"onnxq quantize {' '.join(options)}: weights {weight_bytes / 2**30:.2f} GiB, "
          f"peak RSS {peak / 2**30:.2f} GiB, ratio {peak / weight_bytes:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

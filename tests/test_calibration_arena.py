"""Calibration sessions share one CPU arena per process (``sessions._shared_cpu_arena``): a new session per layer
group reuses the pages of the sessions before it instead of faulting in a fresh working set."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import resource, sys
import numpy as np, onnx
from onnx import TensorProto, helper, numpy_helper
from onnxq.calibration import sessions
if sys.argv[1] == "own":  # every session with its own arena, as before
    sessions.SHARED_ARENA = False
weight = numpy_helper.from_array(np.full((64, 12288), 0.01, np.float32), "w")
nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Sigmoid", ["r"], ["y"])]
graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 12288])], [weight])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()
x = np.ones((1024, 64), np.float32)  # h, r and y are 48 MiB each (an attention score tensor)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # one session per layer group
    session = sessions.open_session(model, threads=1)
    y = session.run(["y"], {"x": x})[0]
    del session, y
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_sessions_reuse_one_arena():
    own, shared = _faults("own"), _faults("shared")
    assert shared * 3 < own, (own, shared)

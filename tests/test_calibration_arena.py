"""Sequential calibration's sessions share one CPU arena per process (``sessions._shared_cpu_arena``): a new
session per layer group reuses the pages of the sessions before it instead of faulting in a fresh working set.  A
one-off session (the batch probe's whole model) keeps its own arena, so its activations are freed with it."""

from __future__ import annotations

from probes import probe_output

PROBE = """
import resource, sys
import numpy as np, onnx
from onnx import TensorProto, helper, numpy_helper
from onnxq.calibration import sessions
weight = numpy_helper.from_array(np.full((64, 12288), 0.01, np.float32), "w")
nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Sigmoid", ["r"], ["y"])]
graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 12288])], [weight])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()
x = np.ones((1024, 64), np.float32)  # h, r and y are 48 MiB each (an attention score tensor)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # one session per layer group
    session = sessions.open_session(model, threads=1, shared_arena=sys.argv[1] == "shared")
    y = session.run(["y"], {"x": x})[0]
    del session, y
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    return int(probe_output(PROBE, mode))


def test_sessions_reuse_one_arena():
    own, shared = _faults("own"), _faults("shared")
    assert shared * 3 < own, (own, shared)



PROBE_LEAVES = """
import sys
import numpy as np
from onnx import TensorProto, helper, numpy_helper
from onnxq.calibration import sessions
from onnxq.calibration.data import CalibrationBatches
from onnxq.heap import release_free_memory
def rss_mib():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) / 1024
weight = numpy_helper.from_array(np.full((64, 12288), 0.01, np.float32), "w")
nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1024, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1024, 12288])], [weight])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
sessions.open_session(model.SerializeToString(), 1, shared_arena=True)  # a sequential step registered the arena
x = np.ones((4, 1024, 64), np.float32)  # the probe runs 2 samples: h and y are 96 MiB each
release_free_memory()
before = rss_mib()
batches = CalibrationBatches({"x": x}, model=model)  # probes the batch with a whole-model session
release_free_memory()
print(rss_mib() - before)
"""


def test_the_batch_probe_keeps_no_activations():
    """The probe's whole-model session allocates from its own arena: its activations go with it (on the shared
    arena they stayed for the rest of the run: 0.34 GB on SmolLM2, more on a 1 B model)."""
    growth = float(probe_output(PROBE_LEAVES))
    assert growth < 48, growth


RELEASE = """
import numpy as np
from onnx import TensorProto, helper, numpy_helper
from onnxq.calibration import sessions
from onnxq.heap import release_free_memory
def rss_mib():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) / 1024
sessions.release_shared_arena()  # before any session: nothing to do
weight = numpy_helper.from_array(np.full((64, 12288), 0.01, np.float32), "w")
nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 12288])], [weight])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()
x = np.ones((4096, 64), np.float32)  # h and y are 192 MiB each
session = sessions.open_session(model, 1, shared_arena=True)
expected = session.run(["y"], {"x": x})[0].copy()
del session
release_free_memory()
kept = rss_mib()
sessions.release_shared_arena()
release_free_memory()
released = rss_mib()
session = sessions.open_session(model, 1, shared_arena=True)  # the arena still serves the next step
assert np.array_equal(session.run(["y"], {"x": x})[0], expected)
print(kept - released)
"""


def test_release_gives_the_arena_back():
    """Before a large solve the pass releases what the arena kept from the calibration steps."""
    released = float(probe_output(RELEASE))
    assert released > 150, released

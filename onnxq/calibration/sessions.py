"""ONNX Runtime sessions on slices of a model (saved with external data in a temp folder, so > 2 GB works) and
running them with one-line errors."""

from __future__ import annotations

import functools
import re
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from onnxq.custom_ops import library_path
from onnxq.errors import OnnxqError
from onnxq.formats.lowbit_layout import DOMAIN as CUSTOM_OP_DOMAIN
from onnxq.ir.index import backward_slice, reads

Feed = dict[str, np.ndarray]  # input name → array, one batch

INLINE_TENSOR_BYTES = 1024  # smaller initializers stay inside the session model file


ORT_THREADS = 2


class SessionFactory:
    """Writes the model's weights once to a temp folder (external data) and builds pruned ORT sessions.

    A session for a set of tensors has exactly those tensors as graph outputs and only the nodes they need, so
    early key groups run only the beginning of the graph.  Building from a file with external data works for
    models over 2 GB.
    """

    def __init__(self, model: onnx.ModelProto, threads: int = ORT_THREADS, purpose: str = "calibration") -> None:
        self.model = model
        self.threads = threads
        self.purpose = purpose  # named in the error when ORT cannot load the model
        self._tmp = tempfile.TemporaryDirectory(prefix="onnxq-calib-")
        self.folder = Path(self._tmp.name)
        self.data_name = "weights.data"
        self.initializers = self._write_initializers()
        self._count = 0

    def _write_initializers(self) -> dict[str, onnx.TensorProto]:
        """Initializer protos whose data lives in ``weights.data`` (small ones stay inline)."""
        out: dict[str, onnx.TensorProto] = {}
        offset = 0
        with open(self.folder / self.data_name, "wb") as data:
            for tensor in self.model.graph.initializer:
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    raise OnnxqError(
                        f"initializer '{tensor.name}' is external data that was not loaded; "
                        "load the model with onnxq.ir.model.load_model"
                    )
                if tensor.data_type == onnx.TensorProto.STRING:
                    out[tensor.name] = tensor
                    continue
                raw = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
                if len(raw) <= INLINE_TENSOR_BYTES:
                    out[tensor.name] = tensor
                    continue
                pad = -offset % 64
                data.write(b"\0" * pad)
                offset += pad
                data.write(raw)
                stub = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
                stub.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", self.data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                    stub.external_data.add(key=key, value=value)
                out[tensor.name] = stub
                offset += len(raw)
                del raw
        return out

    def session(self, outputs: list[str]) -> ort.InferenceSession:
        """An ORT session whose outputs are ``outputs`` (intermediate tensors of the model)."""
        path, custom_ops = self.write(outputs)
        return open_session(str(path), self.threads, custom_ops, self.purpose)

    def write(self, outputs: list[str]) -> tuple[Path, bool]:
        """The slice of the model computing ``outputs``, saved in this factory's folder (its weights external);
        its path, and whether it holds onnxq custom ops."""
        graph = self.model.graph
        keep_nodes = [graph.node[i] for i in backward_slice(graph, outputs)]
        needed = set().union(*(reads(node) for node in keep_nodes))
        pruned = model_shell(self.model)
        pruned.graph.node.extend(keep_nodes)
        pruned.graph.input.extend(graph.input)
        pruned.graph.initializer.extend(t for name, t in self.initializers.items() if name in needed)
        pruned.graph.sparse_initializer.extend(t for t in graph.sparse_initializer if t.values.name in needed)
        pruned.graph.value_info.extend(v for v in graph.value_info if v.name in needed)
        pruned.graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)
        self._count += 1
        path = self.folder / f"calibration_{self._count}.onnx"
        path.write_bytes(pruned.SerializeToString())
        return path, any(node.domain == CUSTOM_OP_DOMAIN for node in keep_nodes)

    def close(self) -> None:
        self._tmp.cleanup()


def model_shell(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` without its graph's contents: opsets, IR version, functions, metadata and the graph's name."""
    shell = onnx.ModelProto()
    for descriptor, value in model.ListFields():
        if descriptor.name != "graph":
            if hasattr(value, "extend"):  # repeated field
                getattr(shell, descriptor.name).extend(value)
            elif descriptor.message_type is not None:
                getattr(shell, descriptor.name).CopyFrom(value)
            else:
                setattr(shell, descriptor.name, value)
    shell.graph.name = model.graph.name or "calibration"
    return shell


@functools.cache
def _shared_cpu_arena() -> None:
    """Register one CPU arena in ORT's environment for the sessions that opt in (once per process).

    Sequential calibration opens two sessions per layer group.  Each with its own arena faulted in a fresh working
    set of activation pages every time (SmolLM2, 8 windows: 3.8 M minor page faults, 10.5 s of system time; with
    this arena 1.1 M and 5.4 s, the same peak RSS).  The arena keeps what it has grown to for the rest of the
    process, so one-off sessions (a whole-model probe, verification) keep their own arenas, freed with them.  When
    ORT refuses (one is registered already), the sessions use that one."""
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    config = ort.OrtArenaCfg(0, 1, -1, -1)  # no limit; grow by what is requested (not by powers of two)
    try:
        ort.create_and_register_allocator(info, config)
    except Exception:  # noqa: BLE001 - ORT raises several pybind types
        pass


def release_shared_arena() -> None:
    """Give the shared arena's unused chunks back to the system (a no-op before any session used it).

    The arena keeps what sequential calibration's largest step needed, so that the next steps reuse those pages;
    before a solve that needs more memory than that (a 1 B model's ``down_proj``: ``H``, ``U`` and ``C`` of
    ``K = 5632`` are 0.71 GiB, and each worker's temporaries as much again) the pass hands them back.  ORT shrinks
    an arena at the end of a run with ``memory.enable_memory_arena_shrinkage``: one run of a one-node session on
    the arena does it."""
    if _shared_cpu_arena.cache_info().currsize == 0:
        return
    value = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "release", [value],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=8)
    session = open_session(model.SerializeToString(), 1, purpose="releasing memory", shared_arena=True)
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    session.run(["y"], {"x": np.zeros(1, np.float32)}, options)


def open_session(
    model: str | bytes, threads: int, custom_ops: bool = False, purpose: str = "calibration",
    shared_arena: bool = False,
) -> ort.InferenceSession:
    """A CPU session (basic graph optimizations, ``threads`` intra-op threads) for a calibration sub-model; with
    ``custom_ops`` the onnxq custom-op library is registered (``onnxq::MatMulLowBit``); with ``shared_arena`` it
    allocates from the process's shared arena (for the many short sessions of sequential calibration), else from
    its own, freed with it."""
    options = ort.SessionOptions()
    if shared_arena:
        _shared_cpu_arena()
        options.add_session_config_entry("session.use_env_allocators", "1")
    if custom_ops:
        options.register_custom_ops_library(library_path())
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    # the calling thread adds the previous batch into the Hessians meanwhile: spinning ORT workers would steal its
    # core (measured on SmolLM2 sequential calibration: 17 % less wall time without spinning)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises several pybind types
        raise OnnxqError(
            f"ONNX Runtime cannot load the model for {purpose} ({first_line(exc)}); "
            "check that the model runs in onnxruntime"
        ) from None


def first_line(exc: BaseException) -> str:
    """The first line of an error, without ORT's ``[ONNXRuntimeError] : 1 : FAIL :`` prefix and source paths."""
    text = str(exc).strip().splitlines()
    if not text:
        return type(exc).__name__
    line = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text[0])
    return re.sub(r"\S*onnxruntime_src/\S+:\d+ ", "", line)[:300]


class OrtRunError(OnnxqError):
    """ONNX Runtime failed on one batch; ``reason`` is ORT's first line."""

    def __init__(self, origin: str, reason: str) -> None:
        super().__init__(f"{origin}: ONNX Runtime failed on this batch ({reason}); check the input shapes and values")
        self.reason = reason


def run_session(
    session: ort.InferenceSession | None, names: list[str], feed: Feed, origin: str
) -> dict[str, np.ndarray]:
    """``{name: value}`` of ``names`` computed by ``session`` on ``feed``; an ORT failure is an :class:`OrtRunError`
    (ORT's own error log is silenced: the error says it in one line)."""
    if session is None or not names:
        return {}
    options = ort.RunOptions()
    options.log_severity_level = 4
    try:
        values = session.run(names, feed, options)
    except Exception as exc:  # noqa: BLE001 - ORT raises several pybind types
        raise OrtRunError(origin, first_line(exc)) from None
    return dict(zip(names, values, strict=True))

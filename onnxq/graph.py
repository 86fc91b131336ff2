"""ONNX graph I/O and target discovery: no quantization math lives here.

A *target* is a MatMul, Gemm or Conv node whose weight is a constant initializer.  Every
target exposes its weight as the solver matrix ``W[N, K]`` (N outputs, K reduction axis) and
knows how to turn such a matrix back into the tensor its node consumes.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from onnxq.errors import OnnxqError

TARGET_OP_TYPES = ("MatMul", "Gemm", "Conv")
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_THRESHOLD = 1 << 30  # save weights externally once they pass 1 GiB


# ----------------------------------------------------------------------------- I/O


def load_model(path: str | os.PathLike, external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX file or raise a one-line :class:`OnnxqError`.

    Every external-data file is checked (a regular file inside the model's folder); its bytes are read only when
    ``external_data`` is set (without, the initializers keep their shapes and types but no values).
    """
    path = Path(path)
    if not path.exists():
        raise OnnxqError(f"{path}: no such file; check the path to the input model")
    if path.is_dir():
        raise OnnxqError(f"{path}: is a directory, not an ONNX file; pass the .onnx file inside it")
    if not path.is_file():
        raise OnnxqError(f"{path}: not a regular file (a device, pipe or socket); pass an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise OnnxqError(
            f"{path}: not a readable ONNX model ({type(exc).__name__}); the file is truncated or not ONNX"
        ) from None
    except OSError as exc:
        raise OnnxqError(f"{path}: cannot read the model ({exc.strerror}); check its permissions") from None
    if not model.graph.node and not model.graph.initializer:
        raise OnnxqError(f"{path}: not an ONNX model (no graph found); the file is empty, truncated or not ONNX")
    files = external_data_files(model, path)
    if external_data:
        load_external_data(model, files)
    return model


def external_data_files(model: onnx.ModelProto, path: str | os.PathLike) -> dict[str, Path]:
    """``{location: resolved file}`` for the external data of the model stored at ``path``; a one-line error when a
    location is outside the model's folder (``../x``, absolute, a symlink leading out) or its file is missing."""
    path = Path(path)
    folder = path.parent.resolve()
    files: dict[str, Path] = {}
    for tensor in _all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = _external_info(tensor).get("location", "")
            if location not in files:
                files[location] = _data_file(path, folder, location, tensor.name)
    return files


def _data_file(path: Path, folder: Path, location: str, tensor_name: str) -> Path:
    if not location:
        raise OnnxqError(f"{path}: external data of tensor '{tensor_name}' has no location; the model is damaged, "
                         "export it again")
    resolved = (folder / location).resolve()
    if Path(location).is_absolute() or not resolved.is_relative_to(folder):
        raise OnnxqError(
            f"{path}: external data '{location}' of tensor '{tensor_name}' is outside the model folder; "
            "move the data file next to the .onnx file and set its location to the bare file name"
        )
    if resolved.is_dir():
        raise OnnxqError(f"{path}: external data '{location}' of tensor '{tensor_name}' is a folder, not a file; "
                         "keep the data file next to the .onnx file under that name")
    if not resolved.is_file():
        raise OnnxqError(
            f"{path.parent / location}: external-data file of tensor '{tensor_name}' is missing; "
            "keep it next to the .onnx file under that name"
        )
    return resolved


def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def load_external_data(model: onnx.ModelProto, files: dict[str, Path]) -> None:
    """Read every external tensor's bytes (from :func:`external_data_files`) into the model."""
    for tensor in _all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = _external_info(tensor)
        data_path = files[info.get("location", "")]
        need = tensor_nbytes(tensor)
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", need))
            with open(data_path, "rb") as data:
                data.seek(offset)
                raw = data.read(max(length, 0))
        except (OSError, ValueError) as exc:
            raise OnnxqError(
                f"{data_path}: cannot read the external data of tensor '{tensor.name}' ({exc}); "
                "check the file and the tensor's offset/length"
            ) from None
        if len(raw) < max(length, need):
            raise OnnxqError(
                f"{data_path}: external data of tensor '{tensor.name}' is truncated ({len(raw)} bytes at offset "
                f"{offset}, {max(length, need)} needed); copy the data file again"
            )
        tensor.raw_data = raw
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT


def _all_tensors(model: onnx.ModelProto) -> Iterable[onnx.TensorProto]:
    yield from onnx.external_data_helper._get_all_tensors(model)


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy, so that the caller's model is never modified."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def model_bytes(model: onnx.ModelProto) -> int:
    """Total bytes of all initializers (weights), the measure of model size."""
    return sum(tensor_nbytes(t) for t in model.graph.initializer)


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """Stored bytes of a tensor, from its shape and type (no copy of the data)."""
    return int(np.ceil(int(np.prod(tensor.dims, dtype=np.int64)) * _element_size(tensor.data_type)))


def _element_size(data_type: int) -> float:
    if data_type in (onnx.TensorProto.UINT4, onnx.TensorProto.INT4):
        return 0.5
    if data_type in (onnx.TensorProto.UINT2, onnx.TensorProto.INT2):
        return 0.25
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize


def check_output_folder(path: str | os.PathLike, option: str = "-o") -> Path:
    """The folder ``path`` will be written into; an error naming ``option`` if it is missing or read-only."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxqError(f"{folder}: output folder does not exist; create it or choose another {option} path")
    if not os.access(folder, os.W_OK):
        raise OnnxqError(f"{folder}: output folder is not writable; choose another {option} path")
    return folder


def check_output_file(path: str | os.PathLike, option: str = "-o", inputs: Iterable[Path] = ()) -> Path:
    """The folder ``path`` will be written into; a one-line error naming ``option`` when ``path`` is one of the
    ``inputs`` (through symlinks and hard links too), is a directory or not a regular file (a device must never be
    replaced by a file), or when its folder is missing or read-only."""
    path = Path(path)
    for existing in inputs:
        if same_file(path, existing):
            raise OnnxqError(f"{path}: {option} path equals the input file {existing}; choose another {option} path "
                             "(the input is never modified)")
    if path.is_dir():
        raise OnnxqError(f"{path}: is a directory; give {option} a file path")
    if path.exists() and not path.is_file():
        raise OnnxqError(f"{path}: not a regular file (a device, pipe or socket); choose another {option} path")
    return check_output_folder(path, option)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: same device and inode when both exist, else the same resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def data_file_of(path: str | os.PathLike) -> Path:
    """Where :func:`save_model` puts the external data of a model saved to ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".data")


OUTPUT_TEMP = ".onnxq-"  # temp files beside an output (renamed into place when complete)
RUN_TEMP = "onnxq-"  # the folder in TMPDIR holding every temp file of one command-line run


def _temp_prefix(kind: str = OUTPUT_TEMP) -> str:
    """Temp names carry the pid (``.onnxq-<pid>-xxxxxxxx``) so that later runs can tell a killed run's leftovers."""
    return f"{kind}{os.getpid()}-"


def remove_stale_temps(folder: str | os.PathLike, kind: str = OUTPUT_TEMP) -> list[Path]:
    """Remove the ``<kind><pid>-xxxxxxxx`` temp files and folders in ``folder`` whose process is gone (a run
    killed outright); returns what was removed."""
    pattern = re.compile(re.escape(kind) + r"(\d+)-[a-z0-9_]{8}")  # tempfile's names: 8 characters of [a-z0-9_]
    removed = []
    for entry in Path(folder).glob(kind + "*"):
        match = pattern.fullmatch(entry.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    return removed


@contextmanager
def run_temp_dir() -> Iterator[Path]:
    """A private folder ``$TMPDIR/onnxq-<pid>-xxxxxxxx`` that holds every temp file made through :mod:`tempfile`
    while the context is open, and is removed however the context ends (error, Ctrl-C, SIGTERM); folders left by
    runs killed outright (``kill -9``) are removed first."""
    base = Path(tempfile.gettempdir())
    remove_stale_temps(base, RUN_TEMP)
    folder = Path(tempfile.mkdtemp(prefix=_temp_prefix(RUN_TEMP), dir=base))
    previous, tempfile.tempdir = tempfile.tempdir, str(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(folder, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def write_text(path: str | os.PathLike, text: str, option: str = "-o") -> None:
    """Write a text file atomically (temp file in the same folder, then rename)."""
    folder = check_output_folder(path, option)
    remove_stale_temps(folder)
    try:
        handle, tmp = tempfile.mkstemp(prefix=_temp_prefix(), dir=folder)
    except OSError as exc:
        raise OnnxqError(f"{folder}: cannot write {path} ({exc.strerror}); choose another {option} path") from None
    try:
        with os.fdopen(handle, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OnnxqError(f"{path}: writing failed ({exc.strerror}); check free space and permissions") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None) -> None:
    """Write ``model`` atomically: temp files in the target folder, then rename (data first).

    Weights go to ``<name>.data`` beside the model when ``external_data`` is set, or (by
    default) when they exceed 1 GiB, since a protobuf cannot exceed 2 GiB.
    """
    path = Path(path)
    folder = check_output_folder(path)
    remove_stale_temps(folder)
    if external_data is None:
        external_data = model_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = data_file_of(path).name
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=_temp_prefix(), dir=folder))
    except OSError as exc:
        raise OnnxqError(f"{folder}: cannot write the output ({exc.strerror}); choose another -o path") from None
    try:
        tmp_model = tmp_dir / path.name
        if external_data:
            _save_with_external_data(model, tmp_model, tmp_dir / data_name, data_name)
            os.replace(tmp_dir / data_name, folder / data_name)
        else:
            tmp_model.write_bytes(model.SerializeToString())
        os.replace(tmp_model, path)
    except OSError as exc:
        raise OnnxqError(f"{path}: writing failed ({exc.strerror}); check free space and permissions") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _save_with_external_data(model: onnx.ModelProto, model_path: Path, data_path: Path, data_name: str) -> None:
    """Write tensors ≥ 1 KiB to ``data_path`` and the rest to ``model_path``, without copying the model.

    Tensors are moved out one at a time and restored afterwards, so peak memory stays at one
    tensor beyond the model and the caller's model is unchanged.
    """
    moved: list[tuple[onnx.TensorProto, bytes]] = []
    try:
        with open(data_path, "wb") as data:
            for tensor in _all_tensors(model):
                if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor_nbytes(tensor) < 1024:
                    continue
                if not tensor.HasField("raw_data"):
                    tensor.raw_data = numpy_helper.to_array(tensor).tobytes()
                    for typed in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                        tensor.ClearField(typed)
                raw = tensor.raw_data
                offset = data.tell()
                data.write(raw)
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                    tensor.external_data.add(key=key, value=value)
                moved.append((tensor, raw))
        model_path.write_bytes(model.SerializeToString())
    finally:
        for tensor, raw in moved:
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = raw


# ----------------------------------------------------------------------------- targets


@dataclass
class Target:
    """A quantizable node and how its constant weight maps to the solver matrix ``W[N, K]``.

    ``orientation``: ``"nk"`` when the node consumes ``W`` itself, ``"kn"`` when it consumes
    ``Wᵀ``, ``"conv"`` when it consumes ``W.reshape(weight_shape)``.
    """

    node: onnx.NodeProto
    node_index: int
    input_index: int  # which input of the node carries the weight
    weight_name: str  # the initializer's name
    orientation: str
    weight_shape: tuple[int, ...]  # the initializer's shape
    through_transpose: bool = False  # the node reads the initializer through a 2-D Transpose
    dtype: int = onnx.TensorProto.FLOAT

    @property
    def name(self) -> str:
        return self.node.name or self.node.output[0]

    @property
    def op_type(self) -> str:
        return self.node.op_type

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(N, K)`` of the solver matrix."""
        if self.orientation == "conv":
            return self.weight_shape[0], int(np.prod(self.weight_shape[1:]))
        rows, cols = self.consumed_shape
        return (rows, cols) if self.orientation == "nk" else (cols, rows)

    @property
    def consumed_shape(self) -> tuple[int, ...]:
        """Shape of the tensor the node consumes (after the optional Transpose)."""
        if self.through_transpose:
            return tuple(reversed(self.weight_shape))
        return self.weight_shape

    def matrix_from_initializer(self, values: np.ndarray) -> np.ndarray:
        """``W[N, K]`` from the initializer's values."""
        consumed = values.T if self.through_transpose else values
        if self.orientation == "conv":
            return consumed.reshape(consumed.shape[0], -1)
        return consumed if self.orientation == "nk" else consumed.T

    def consumed_from_matrix(self, matrix: np.ndarray) -> np.ndarray:
        """The tensor the node consumes, built from ``W[N, K]``."""
        if self.orientation == "conv":
            return matrix.reshape(self.weight_shape)
        return matrix if self.orientation == "nk" else matrix.T

    def initializer_from_matrix(self, matrix: np.ndarray) -> np.ndarray:
        """The initializer's values (before the optional Transpose) from ``W[N, K]``."""
        consumed = self.consumed_from_matrix(matrix)
        return consumed.T if self.through_transpose else consumed

    @property
    def matrix_key(self) -> tuple[str, str]:
        """The initializer and how ``W[N, K]`` is read from it; targets with equal keys see the same matrix.

        A weight read by several nodes in different orientations (``x·W`` and ``W·z``, or MatMul and Gemm with
        ``transB=1``) gives different keys, so each orientation is solved on its own matrix.
        """
        if self.orientation == "conv":
            return self.weight_name, "conv"
        transposed = self.through_transpose != (self.orientation == "kn")
        return self.weight_name, "transposed" if transposed else "as stored"

    @property
    def groups(self) -> int:
        """Conv groups (1 for MatMul/Gemm)."""
        return next((a.i for a in self.node.attribute if a.name == "group"), 1) if self.op_type == "Conv" else 1


@dataclass
class Skipped:
    name: str
    op_type: str
    reason: str


@dataclass
class TargetReport:
    targets: list[Target] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def find_targets(
    model: onnx.ModelProto,
    op_types: Iterable[str] = TARGET_OP_TYPES,
    include: str | None = None,
    exclude: str | None = None,
) -> TargetReport:
    """Find every MatMul/Gemm/Conv with a constant weight in the main graph; list the rest as skipped."""
    op_types = tuple(op_types)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    transposes = {
        n.output[0]: n
        for n in graph.node
        if n.op_type == "Transpose" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2
        and list(_attr(n, "perm", [1, 0])) == [1, 0]
    }
    include_re = re.compile(include) if include else None
    exclude_re = re.compile(exclude) if exclude else None
    report = TargetReport()

    for index, node in enumerate(graph.node):
        if node.op_type not in TARGET_OP_TYPES:
            _note_subgraphs(node, op_types, report)
            continue
        name = node.name or node.output[0]
        if node.op_type not in op_types:
            continue
        if include_re and not include_re.search(name):
            continue
        if exclude_re and exclude_re.search(name):
            continue
        target, reason = _classify(node, index, inits, transposes)
        if target is None:
            report.skipped.append(Skipped(name, node.op_type, reason))
        else:
            report.targets.append(target)
    return report


def _note_subgraphs(node: onnx.NodeProto, op_types: tuple[str, ...], report: TargetReport) -> None:
    for attr in node.attribute:
        subgraphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for sub in subgraphs:
            for inner in sub.node:
                if inner.op_type in op_types:
                    report.skipped.append(
                        Skipped(
                            inner.name or inner.output[0],
                            inner.op_type,
                            f"inside the '{attr.name}' subgraph of {node.op_type} node '{node.name}'; "
                            "subgraphs are left in float",
                        )
                    )
                _note_subgraphs(inner, op_types, report)


def _classify(
    node: onnx.NodeProto, index: int, inits: dict[str, onnx.TensorProto], transposes: dict[str, onnx.NodeProto]
) -> tuple[Target | None, str]:
    """Return the node's Target, or ``None`` and the reason it is skipped."""

    def weight_of(input_name: str) -> tuple[onnx.TensorProto | None, bool]:
        if input_name in inits:
            return inits[input_name], False
        if input_name in transposes:
            return inits[transposes[input_name].input[0]], True
        return None, False

    def make(
        input_index: int, tensor: onnx.TensorProto, through: bool, orientation: str
    ) -> tuple[Target | None, str]:
        if 0 in tensor.dims:
            return None, f"weight '{tensor.name}' is empty (shape {list(tensor.dims)}); nothing to quantize"
        return (
            Target(node, index, input_index, tensor.name, orientation, tuple(tensor.dims), through, tensor.data_type),
            "",
        )

    if node.op_type == "MatMul":
        right, right_t = weight_of(node.input[1])
        left, left_t = weight_of(node.input[0])
        if right is not None and left is not None:
            return None, "both inputs are constant (fold constants first)"
        tensor, through, input_index = (right, right_t, 1) if right is not None else (left, left_t, 0)
        if tensor is None:
            return None, "no constant weight input (activation × activation)"
        if len(tensor.dims) != 2:
            return None, f"weight '{tensor.name}' is {len(tensor.dims)}-D; only 2-D MatMul weights are quantized"
        if tensor.data_type not in FLOAT_TYPES:
            return None, f"weight '{tensor.name}' is not float32/float16"
        # Y = X·B: B is [K, N] → W = Bᵀ; Y = A·X: A is [N, K] → W = A.
        return make(input_index, tensor, through, "kn" if input_index == 1 else "nk")

    if node.op_type == "Gemm":
        if _attr(node, "transA", 0):
            return None, "transA=1 is not supported"
        tensor, through = weight_of(node.input[1])
        if tensor is None:
            return None, "input B is not a constant"
        if tensor.data_type not in FLOAT_TYPES:
            return None, f"weight '{tensor.name}' is not float32/float16"
        return make(1, tensor, through, "nk" if _attr(node, "transB", 0) else "kn")

    # Conv
    tensor = inits.get(node.input[1])
    if tensor is None:
        return None, "weight is not a constant initializer"
    if len(tensor.dims) not in (3, 4):
        return None, f"{len(tensor.dims) - 2}-D convolution is not supported (only 1-D and 2-D)"
    if tensor.data_type not in FLOAT_TYPES:
        return None, f"weight '{tensor.name}' is not float32/float16"
    return make(1, tensor, False, "conv")


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Turn main-graph ``Constant`` nodes holding a float tensor of rank ≥ 2 (weights, as some exporters write them)
    into initializers of the same name, so they are found as targets; returns how many were turned."""
    graph = model.graph
    keep, turned = [], 0
    for node in graph.node:
        value = _attr(node, "value", None) if node.op_type == "Constant" and node.domain in ("", "ai.onnx") else None
        if value is not None and value.data_type in FLOAT_TYPES and len(value.dims) >= 2:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            turned += 1
        else:
            keep.append(node)
    if turned:
        del graph.node[:]
        graph.node.extend(keep)
    return turned


def initializer_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    """The numpy value of initializer ``name``."""
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    raise KeyError(name)


# ----------------------------------------------------------------------------- editing


class NameScope:
    """Hands out tensor/node names that do not clash with any name already in the graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.used: set[str] = {t.name for t in g.initializer} | {v.name for v in g.input} | {n.name for n in g.node}
        self.used |= {o for n in g.node for o in n.output} | {v.name for v in g.output}

    def fresh(self, base: str) -> str:
        base = re.sub(r"[^0-9A-Za-z_./:-]", "_", base)
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name


def remove_unused(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nobody reads (repeatedly), and initializers nobody reads (with their graph-input
    entries, for models that also list initializers as inputs)."""
    graph = model.graph
    while True:
        needed = {o.name for o in graph.output}
        needed |= {i for n in graph.node for i in n.input}
        needed |= _subgraph_inputs(graph)
        dead = [n for n in graph.node if n.output and not any(o in needed for o in n.output if o)]
        if not dead:
            break
        keep = [n for n in graph.node if n not in dead]
        del graph.node[:]
        graph.node.extend(keep)
    needed = {i for n in graph.node for i in n.input} | {o.name for o in graph.output} | _subgraph_inputs(graph)
    keep_init = [t for t in graph.initializer if t.name in needed]
    if len(keep_init) != len(graph.initializer):
        dropped = {t.name for t in graph.initializer} - {t.name for t in keep_init}
        del graph.initializer[:]
        graph.initializer.extend(keep_init)
        # an initializer also listed as a graph input (IR < 4 style) leaves the inputs with it
        keep_inputs = [v for v in graph.input if v.name not in dropped]
        if len(keep_inputs) != len(graph.input):
            del graph.input[:]
            graph.input.extend(keep_inputs)


def allow_free_initializers(model: onnx.ModelProto) -> None:
    """Raise IR < 4 to 4, where an initializer need not be listed as a graph input (the one change between IR 3
    and 4 that matters here), so the initializers a pass adds are valid without input entries."""
    if model.ir_version < 4:
        model.ir_version = 4


def _subgraph_inputs(graph: onnx.GraphProto) -> set[str]:
    """Names read by nodes inside subgraphs (they may refer to outer-scope tensors)."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                names |= {i for n in sub.node for i in n.input}
                names |= _subgraph_inputs(sub)
    return names


def opset_version(model: onnx.ModelProto, domain: str = "") -> int:
    """The model's opset for ``domain`` (0 if not imported)."""
    for op in model.opset_import:
        if op.domain in (domain, "ai.onnx" if domain == "" else domain):
            return op.version
    return 0


def ensure_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    """Import ``domain`` at ``version`` at least (for custom domains, just add the import)."""
    for op in model.opset_import:
        if op.domain == domain:
            op.version = max(op.version, version)
            return
    model.opset_import.append(onnx.helper.make_opsetid(domain, version))


def set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    """Set (or replace) one ``metadata_props`` entry."""
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    model.metadata_props.add(key=key, value=value)

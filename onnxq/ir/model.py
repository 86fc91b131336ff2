"""Load, copy and save ONNX models (external data read and written by onnxq itself, atomically); sizes and
opsets.  No quantization math and no graph rewriting lives here."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from onnxq.errors import OnnxqError
from onnxq.ir.paths import check_output_folder, data_file_of, remove_stale_temps, temp_prefix

PROTOBUF_LIMIT = 2**31 - 1


EXTERNAL_DATA_THRESHOLD = 1 << 30  # save weights externally once they pass 1 GiB


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
    for tensor in all_tensors(model):
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
    for tensor in all_tensors(model):
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


def all_tensors(model: onnx.ModelProto) -> Iterable[onnx.TensorProto]:
    yield from onnx.external_data_helper._get_all_tensors(model)


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy, so that the caller's model is never modified."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def copy_model_without(model: onnx.ModelProto, tensors: set[str]) -> onnx.ModelProto:
    """A copy of ``model`` in which the main-graph initializers named in ``tensors`` are data-less placeholders
    (same name, type and shape, order kept, marked external), for tools that serialize the model (< 2 GB, and no
    copy of the weights)."""
    out = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(out, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(out.graph, field, value)
    for tensor in model.graph.initializer:
        if tensor.name not in tensors:
            out.graph.initializer.add().CopyFrom(tensor)
            continue
        stub = out.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        stub.external_data.add(key="location", value="onnxq-placeholder")
    return out


def _copy_field(target: object, field: object, value: object) -> None:
    """Copy one set protobuf field (repeated, message or scalar) of a message into ``target``."""
    if hasattr(value, "extend"):  # a repeated field
        getattr(target, field.name).extend(value)
    elif field.message_type is not None:
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


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
        tmp_dir = Path(tempfile.mkdtemp(prefix=temp_prefix(), dir=folder))
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
            for tensor in all_tensors(model):
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

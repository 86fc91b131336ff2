"""Where real-model recipes keep what they build: ``$ONNXQ_CACHE`` or ``~/.cache/onnxq``."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from onnxq.calibration.sources.save import write_npz as save_npz

CACHE_ENV = "ONNXQ_CACHE"


def cache_root() -> Path:
    """The cache root: ``$ONNXQ_CACHE`` if set, else ``~/.cache/onnxq`` (not created)."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "onnxq"


def cache_dir(*parts: str, create: bool = True) -> Path:
    """A sub-directory of the cache root, e.g. ``cache_dir("minilm")``; created unless ``create=False``."""
    path = cache_root().joinpath(*parts)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def file_sha256(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffix); rename it onto ``path`` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp_path = target.with_name(f".{target.name}.{os.getpid()}.tmp{target.suffix}")
    try:
        yield temp_path
        os.replace(temp_path, target)
    finally:
        if temp_path.exists():
            temp_path.unlink()


def write_npz(path: str | os.PathLike[str], arrays: dict[str, np.ndarray], compress: bool = True) -> Path:
    """Write ``arrays`` as an ``.npz`` that ``np.load`` reads, byte-identical across runs (fixed zip timestamps,
    sorted keys: :func:`onnxq.calibration.sources.save.write_npz`), creating the folder; replaces ``path``
    atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return save_npz(path, arrays, compress, option="the .npz path")


def onnx_file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 over an ``.onnx`` file's bytes and then each external-data file it references (sorted by location)."""
    import onnx

    model_file = Path(path)
    digest = hashlib.sha256()
    digest.update(bytes.fromhex(file_sha256(model_file)))
    model = onnx.load(str(model_file), load_external_data=False)
    for location in sorted(_external_locations(model.graph)):
        digest.update(location.encode())
        digest.update(bytes.fromhex(file_sha256(model_file.parent / location)))
    return digest.hexdigest()


def _external_locations(graph) -> set[str]:
    """External-data file names used by a graph's initializers, its Constant nodes and its subgraphs."""
    import onnx

    tensors = list(graph.initializer)
    locations: set[str] = set()
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                tensors.append(attribute.t)
            elif attribute.type == onnx.AttributeProto.GRAPH:
                locations |= _external_locations(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    locations |= _external_locations(subgraph)
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations |= {entry.value for entry in tensor.external_data if entry.key == "location"}
    return locations

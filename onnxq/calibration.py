"""Calibration: stream named model inputs through ONNX Runtime and accumulate layer Hessians ``H = Σ xᵀx``.

Each target layer computes ``y = W x`` for rows ``x`` (length ``K``) of its unfolded activation:

* MatMul ``Y = X·B`` and Gemm (transA=0): the rows of ``X`` reshaped to ``[-1, K]``;
* MatMul ``Y = A·X`` (constant ``A``): the columns of ``X[..., K, N']``, i.e. ``X`` moved to ``[-1, K]``;
* Conv (1-D/2-D): the im2col patches, ordered ``(cin, kh, kw)`` like ``W = weight.reshape(Cout, -1)``; conv group
  ``g`` has its own ``H_g`` over its ``Cin/groups·kh·kw`` inputs, so a grouped conv's H is ``[groups, K', K']``.

``H`` is accumulated in float64 (per block of ≤ 2048 rows: float32 BLAS ``syrk``, relative error ~1e-7), one ``H``
per :func:`hessian_key`, so layers that read the same tensor with the same unfolding share it.  Activations live for
at most two batches (ORT computes batch i+1 while batch i is accumulated); under ``max_memory`` the keys are split
into groups, one pass over the data per group.  ORT runs a copy of the model saved with external data in a temp
folder, pruned to the nodes the requested activations need, so models over 2 GB work.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import resource
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from numpy.lib.stride_tricks import sliding_window_view
from onnx import numpy_helper
from scipy.linalg import blas

from onnxq.custom_ops import library_path
from onnxq.errors import OnnxqError
from onnxq.formats.custom_op import DOMAIN as CUSTOM_OP_DOMAIN
from onnxq.ir.index import attribute, backward_slice, reads
from onnxq.ir.targets import Target

try:  # ships with scikit-learn; without it BLAS keeps its own thread count
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None

DEFAULT_BATCH_SIZE = 8  # samples per ORT run when neither the caller nor the model fixes it
PROBE_TOLERANCE = 1e-2  # relative L2 error allowed between a sample's outputs in a batch and alone (mixing is O(1))
ROW_BLOCK = 2048  # rows per float32 syrk before adding into the float64 sum
PATCH_BLOCK_BYTES = 32 << 20  # bound on one block of im2col patches
INLINE_TENSOR_BYTES = 1024  # smaller initializers stay inside the session model file
ORT_THREADS = 2

REFERENCE_SUFFIX = "\0reference"  # run results: the reference (float model) value of a layer input
HessianKey = tuple
Feed = dict[str, np.ndarray]
ProgressCallback = Callable[[int, int, str], None]  # (batches done, total or 0 if unknown, message)


# ----------------------------------------------------------------------------- calibration data


def load_calibration(path: str | os.PathLike) -> list[Path]:
    """The .npz files of a calibration source: the file itself, or a folder's ``*.npz`` sorted by name."""
    path = Path(path)
    if not path.exists():
        raise OnnxqError(f"{path}: calibration data not found; pass an .npz file or a folder of .npz files")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".npz" and p.is_file())
        if not files:
            raise OnnxqError(f"{path}: folder holds no .npz files; put the calibration arrays in <name>.npz files")
        return files
    if path.suffix != ".npz":
        raise OnnxqError(f"{path}: calibration data must be an .npz file (np.savez) or a folder of them")
    return [path]


@dataclass(frozen=True)
class InputSpec:
    """What the model expects of one graph input: numpy dtype and dims (int, symbolic str or None)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...] | None  # None: rank unknown
    required: bool  # False when an initializer gives a default value

    @property
    def fixed_batch(self) -> int | None:
        if self.dims and isinstance(self.dims[0], int):
            return self.dims[0]
        return None


def model_input_specs(model: onnx.ModelProto) -> dict[str, InputSpec]:
    """The model's graph inputs (an input that is also an initializer is optional)."""
    initializers = {t.name for t in model.graph.initializer}
    specs = {}
    for value in model.graph.input:
        tensor_type = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        dims = None
        if tensor_type.HasField("shape"):
            dims = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim
            )
        specs[value.name] = InputSpec(value.name, dtype, dims, value.name not in initializers)
    return specs


def check_feed(specs: Mapping[str, InputSpec], feed: Mapping[str, np.ndarray], origin: str) -> Feed:
    """Keep the arrays the model reads, cast within a kind (int64←int32, float32←float64), ignore other names.

    Raises a one-line :class:`OnnxqError` naming the input and ``origin`` for a missing input, a dtype of another
    kind, a wrong rank or a wrong fixed dimension.
    """
    out: Feed = {}
    for name, spec in specs.items():
        if name not in feed:
            if spec.required:
                _missing(name, feed, origin)
            continue
        array = np.asarray(feed[name])
        check_input(spec, array.shape, array.dtype, origin)
        out[name] = array if array.dtype == spec.dtype else array.astype(spec.dtype)
    return out


def _missing(name: str, present: Iterable[str], origin: str) -> None:
    raise OnnxqError(
        f"{origin}: model input '{name}' is missing (found {sorted(present)}); "
        f"add an array named '{name}' with samples along axis 0"
    )


def check_input(spec: InputSpec, shape: tuple[int, ...], dtype: np.dtype, origin: str) -> None:
    """Check one array's dtype kind, rank and fixed dimensions against a model input."""
    name = spec.name
    if dtype != spec.dtype and _dtype_family(dtype) != _dtype_family(spec.dtype):
        raise OnnxqError(
            f"{origin}: input '{name}' has dtype {dtype}, the model expects {spec.dtype}; save it as {spec.dtype}"
        )
    if spec.dims is None:
        return
    if len(shape) != len(spec.dims):
        raise OnnxqError(
            f"{origin}: input '{name}' has rank {len(shape)} (shape {tuple(shape)}), the model expects rank "
            f"{len(spec.dims)} {_format_dims(spec.dims)}; store samples along axis 0 in the model's layout"
        )
    for axis, (have, want) in enumerate(zip(shape, spec.dims, strict=True)):
        if isinstance(want, int) and want > 0 and have != want:
            hint = f"use batch size {want}" if axis == 0 else "resize the data to the model's input shape"
            raise OnnxqError(
                f"{origin}: input '{name}' has shape {tuple(shape)}, the model expects "
                f"{_format_dims(spec.dims)} (axis {axis} must be {want}); {hint}"
            )


def _dtype_family(dtype: np.dtype) -> str:
    return {"i": "int", "u": "int", "f": "float", "b": "bool"}.get(dtype.kind, dtype.str)


def _format_dims(dims: tuple) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


class CalibrationBatches:
    """Re-iterable batches of named model inputs (``dict[str, ndarray]``, samples along axis 0).

    The source is an .npz file, a folder of .npz files (sorted by name), an in-memory ``dict`` of arrays, or another
    ``CalibrationBatches`` (same data; its batch size is kept once settled).  Files are read one at a time, so only one
    file is in memory.  With ``model`` every batch is checked by :func:`check_feed`.

    Batch size: ``batch_size`` if given, else the model's fixed batch, else :data:`DEFAULT_BATCH_SIZE`, checked once
    with ``model`` by :func:`probe_batch`: a model that fails or mixes samples in a batch gets batch 1, and
    :attr:`notes` says so.
    """

    def __init__(
        self,
        source: str | os.PathLike | Mapping[str, np.ndarray] | CalibrationBatches,
        batch_size: int | None = None,
        model: onnx.ModelProto | None = None,
    ) -> None:
        check_batch_size(batch_size)
        self.notes: list[str] = []
        if isinstance(source, CalibrationBatches):
            self.files, self.arrays = source.files, source.arrays
            if batch_size is None and source.settled:
                batch_size, self.notes = source.batch_size, list(source.notes)
        elif isinstance(source, Mapping):
            self.files: list[Path] = []
            self.arrays: Mapping[str, np.ndarray] | None = source
            _check_arrays("in-memory calibration arrays", dict(source))
        else:
            self.files = load_calibration(source)
            self.arrays = None
        self.specs = model_input_specs(model) if model is not None else None
        if batch_size is None and self.specs:
            batch_size = next((s.fixed_batch for s in self.specs.values() if s.fixed_batch), None)
        self.settled = batch_size is not None  # chosen by the caller or the model, or probed below
        self.batch_size = batch_size or DEFAULT_BATCH_SIZE
        self._sample_counts: list[int] | None = None
        if model is not None and not self.settled:
            self.check(model)
            note = probe_batch(model, self)
            if note is not None:
                self.batch_size = 1
                self.notes.append(note)
            self.settled = True

    def sample_counts(self) -> list[int]:
        """Samples per file (read from the .npz headers only)."""
        if self._sample_counts is None:
            if self.arrays is not None:
                self._sample_counts = [_check_arrays("in-memory calibration arrays", dict(self.arrays))]
            else:
                self._sample_counts = [_header_samples(path) for path in self.files]
        return self._sample_counts

    def __len__(self) -> int:
        return sum(math.ceil(n / self.batch_size) for n in self.sample_counts())

    @property
    def num_samples(self) -> int:
        return sum(self.sample_counts())

    def check(self, model: onnx.ModelProto) -> None:
        """Check every file's array names, dtypes and ranks against ``model`` from the headers (no data read)."""
        specs = model_input_specs(model)
        for origin, headers in self._headers():
            _check_headers(specs, headers, origin)

    def _headers(self) -> Iterator[tuple[str, dict[str, tuple[tuple[int, ...], np.dtype]]]]:
        if self.arrays is not None:
            headers = {name: (np.shape(v), np.asarray(v).dtype) for name, v in self.arrays.items()}
            yield "in-memory calibration arrays", headers
        else:
            for path in self.files:
                yield str(path), _npz_headers(path)

    def with_origin(self) -> Iterator[tuple[str, Feed]]:
        """``(where the batch comes from, batch)`` pairs."""
        sources: Iterable[tuple[str, Callable[[], dict[str, np.ndarray]]]]
        if self.arrays is not None:
            sources = [("in-memory calibration arrays", lambda: dict(self.arrays))]
        else:
            sources = [(str(path), lambda path=path: _read_npz(path)) for path in self.files]
        for origin, read in sources:
            arrays = read()
            count = _check_arrays(origin, arrays)
            for start in range(0, count, self.batch_size):
                stop = min(start + self.batch_size, count)
                where = f"{origin} (samples {start}-{stop - 1})"
                batch = {name: array[start:stop] for name, array in arrays.items()}
                yield where, check_feed(self.specs, batch, where) if self.specs else batch
            del arrays

    def __iter__(self) -> Iterator[Feed]:
        for _, batch in self.with_origin():
            yield batch


def check_batch_size(batch_size: int | None) -> None:
    """A one-line error unless ``batch_size`` is None (automatic) or at least 1 sample per ORT run."""
    if batch_size is not None and batch_size < 1:
        raise OnnxqError(f"--calib-batch-size {batch_size} is out of range; use 1 or more samples per ONNX Runtime "
                         "run, or leave it unset (automatic)")


def iter_batches(
    source: str | os.PathLike | Mapping[str, np.ndarray] | CalibrationBatches,
    batch_size: int | None = None,
    model: onnx.ModelProto | None = None,
) -> CalibrationBatches:
    """Batches of ``batch_size`` samples from an .npz, folder, dict or :class:`CalibrationBatches` (default: the
    model's fixed batch, else 8 unless :func:`probe_batch` finds that ``model`` needs batch 1).

    The result can be iterated several times (one pass per key group in :func:`collect_hessians`).
    """
    return CalibrationBatches(source, batch_size, model)


def probe_batch(model: onnx.ModelProto, batches: CalibrationBatches) -> str | None:
    """Why ``model`` cannot run ``batches`` at their batch size (a note), or None when it can.

    The first batch of more than one sample runs through the whole model, and its first sample alone.  The batch is
    fine when every graph output of the batch holds the sample's output: the leading ``rows`` of an output whose axis
    0 is ``n·rows`` for ``n`` samples (``rows`` for one), or the whole output when its shape does not depend on the
    batch; equal within relative L2 error :data:`PROBE_TOLERANCE`.  An ORT failure of the sample alone is raised.
    """
    first = _probe_feed(batches)
    if first is None:
        return None
    origin, feed = first
    count = _batch_samples(feed)
    factory = SessionFactory(model)
    try:
        names = [value.name for value in model.graph.output]
        session = factory.session(names)
        try:
            batched = _run(session, names, feed, origin)
        except OrtRunError as exc:
            return f"calibration: the model fails with batch {count} ({exc.reason}); ran batch 1"
        single = _run(session, names, {k: v[:1] for k, v in feed.items()}, origin)
    finally:
        factory.close()
    for name in names:
        mismatch = _batch_mismatch(batched[name], single[name], count)
        if mismatch is not None:
            return (f"calibration: the model mixes samples in a batch of {count} (output '{name}' {mismatch}); "
                    "ran batch 1")
    return None


def _probe_feed(batches: CalibrationBatches) -> tuple[str, Feed] | None:
    """The first batch holding more than one sample (None if there is none: every run is then batch 1 anyway)."""
    if batches.batch_size == 1 or max(batches.sample_counts()) == 1:
        return None
    for origin, batch in batches.with_origin():
        if _batch_samples(batch) > 1:
            return origin, batch
    return None


def _batch_mismatch(batched: np.ndarray, single: np.ndarray, count: int) -> str | None:
    """How an output of ``count`` samples fails to hold the output of the first sample alone (None if it does)."""
    batched, single = np.asarray(batched), np.asarray(single)
    if batched.ndim and single.ndim and batched.shape == (count * single.shape[0], *single.shape[1:]):
        batched = batched[: single.shape[0]]
    elif batched.shape != single.shape:
        return f"has shape {batched.shape} for {count} samples and {single.shape} for one"
    if batched.dtype.kind not in "fc":
        same = np.array_equal(batched, single)
        return None if same else "differs for the first sample between the batch and its run alone"
    a, b = batched.astype(np.float64).ravel(), single.astype(np.float64).ravel()
    finite = np.isfinite(b)
    if not (np.array_equal(a[~finite], b[~finite], equal_nan=True) and np.isfinite(a[finite]).all()):
        return "has inf/NaN at other places for the first sample in the batch than alone"
    error = np.linalg.norm(a[finite] - b[finite]) / max(np.linalg.norm(b[finite]), 1e-30)
    if error <= PROBE_TOLERANCE:
        return None
    return f"differs by {error:.3g} (relative L2) for the first sample between the batch and its run alone"


def _check_headers(
    specs: Mapping[str, InputSpec], headers: Mapping[str, tuple[tuple[int, ...], np.dtype]], origin: str
) -> None:
    for name, spec in specs.items():
        if name in headers:
            shape, dtype = headers[name]
            # axis 0 is the sample axis of the file, not the batch: a fixed batch is checked per batch
            check_input(spec, shape if spec.fixed_batch is None else (spec.fixed_batch, *shape[1:]), dtype, origin)
        elif spec.required:
            _missing(name, headers, origin)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise OnnxqError(
            f"{path}: not a readable .npz ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "write it with numpy.savez"
        ) from None
    return arrays


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each array of an .npz, read from the .npy headers without loading the data."""
    headers = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if not member.endswith(".npy"):
                    continue
                with archive.open(member) as handle:
                    version = np.lib.format.read_magic(handle)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
                    else:
                        return {k: (v.shape, v.dtype) for k, v in _read_npz(path).items()}
                headers[member[: -len(".npy")]] = (tuple(shape), np.dtype(dtype))
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise OnnxqError(f"{path}: not a readable .npz ({type(exc).__name__}); write it with numpy.savez") from None
    if not headers:
        raise OnnxqError(f"{path}: the .npz holds no arrays; save the model inputs into it with numpy.savez")
    return headers


def _header_samples(path: Path) -> int:
    headers = _npz_headers(path)
    return _check_sample_axis(str(path), {name: shape for name, (shape, _) in headers.items()})


def _check_arrays(origin: str, arrays: Mapping[str, np.ndarray]) -> int:
    """Number of samples (the shared first axis) of a set of arrays, or a one-line error."""
    if not arrays:
        raise OnnxqError(f"{origin}: holds no arrays; save the model inputs (name → array) with numpy.savez")
    return _check_sample_axis(origin, {name: np.shape(array) for name, array in arrays.items()})


def _check_sample_axis(origin: str, shapes: Mapping[str, tuple[int, ...]]) -> int:
    if not shapes:
        raise OnnxqError(f"{origin}: holds no arrays; save the model inputs (name → array) with numpy.savez")
    for name, shape in shapes.items():
        if len(shape) == 0:
            raise OnnxqError(f"{origin}: array '{name}' is a scalar; store samples along axis 0")
    counts = {name: shape[0] for name, shape in shapes.items()}
    if len(set(counts.values())) != 1:
        raise OnnxqError(f"{origin}: arrays disagree on the number of samples (axis 0): {counts}; make them equal")
    count = next(iter(counts.values()))
    if count == 0:
        raise OnnxqError(f"{origin}: holds 0 samples; put at least one sample along axis 0")
    return count


# ----------------------------------------------------------------------------- Hessian keys


@dataclass(frozen=True)
class Unfolding:
    """How one key turns its activation tensor into rows ``x`` of length ``K`` (per conv group)."""

    tensor: str
    kind: str  # "rows", "columns" or "conv"
    size: int  # K (conv: K' = Cin/groups·prod(kernel))
    groups: int = 1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()  # begins then ends, as in ONNX
    dilations: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"

    @property
    def hessian_shape(self) -> tuple[int, ...]:
        return (self.groups, self.size, self.size) if self.groups > 1 else (self.size, self.size)

    @property
    def hessian_bytes(self) -> int:
        return 8 * self.groups * self.size * self.size




def unfolding(target: Target) -> Unfolding:
    """The activation tensor of ``target`` and how it is unfolded into rows."""
    node = target.node
    k = target.matrix_shape[1]
    if target.op_type == "Conv":
        kernel = tuple(int(v) for v in target.weight_shape[2:])
        spatial = len(kernel)
        auto_pad = attribute(node, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        pads = tuple(int(v) for v in attribute(node, "pads", [0] * 2 * spatial)) if auto_pad == "NOTSET" else ()
        return Unfolding(
            tensor=node.input[0],
            kind="conv",
            size=k,
            groups=int(attribute(node, "group", 1)),
            kernel=kernel,
            strides=tuple(int(v) for v in attribute(node, "strides", [1] * spatial)),
            pads=pads,
            dilations=tuple(int(v) for v in attribute(node, "dilations", [1] * spatial)),
            auto_pad=auto_pad,
        )
    if target.op_type == "MatMul" and target.input_index == 0:
        return Unfolding(tensor=node.input[1], kind="columns", size=k)
    return Unfolding(tensor=node.input[0], kind="rows", size=k)


def hessian_key(target: Target) -> HessianKey:
    """Key of the Hessian a target reads: equal for layers reading one tensor with one unfolding.

    MatMul ``X·B``/Gemm: ``(tensor, "rows")``; MatMul ``A·X``: ``(tensor, "columns")``; Conv:
    ``(tensor, "conv", kernel, strides, pads or auto_pad, dilations, groups)``.
    """
    u = unfolding(target)
    if u.kind == "conv":
        return (u.tensor, "conv", u.kernel, u.strides, u.pads or u.auto_pad, u.dilations, u.groups)
    return (u.tensor, u.kind)


# ----------------------------------------------------------------------------- unfolding math


def conv_pads(unfold: Unfolding, spatial_shape: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """Begin and end padding per spatial axis (explicit pads, or the ``auto_pad`` rule of ONNX Conv)."""
    n = len(unfold.kernel)
    if unfold.auto_pad == "NOTSET":
        return list(unfold.pads[:n]), list(unfold.pads[n:])
    if unfold.auto_pad == "VALID":
        return [0] * n, [0] * n
    begins, ends = [], []
    for size, k, s, d in zip(spatial_shape, unfold.kernel, unfold.strides, unfold.dilations, strict=True):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        begins.append(small if unfold.auto_pad == "SAME_UPPER" else total - small)
        ends.append(total - begins[-1])
    return begins, ends


def conv_patches(x: np.ndarray, unfold: Unfolding) -> Iterator[np.ndarray]:
    """im2col of ``x[B, C, *spatial]`` in blocks: float32 ``[rows, C·prod(kernel)]``, columns ordered (c, kh, kw).

    Row order is (batch, *output position); group ``g`` owns columns ``g·K' … (g+1)·K'``.
    """
    spatial = x.shape[2:]
    if len(spatial) != len(unfold.kernel):
        raise OnnxqError(
            f"activation '{unfold.tensor}' has shape {x.shape}, expected {len(unfold.kernel)} spatial axes for the "
            "convolution reading it; the model is inconsistent"
        )
    begins, ends = conv_pads(unfold, spatial)
    padded = np.pad(x, [(0, 0), (0, 0), *zip(begins, ends, strict=True)])
    spans = [d * (k - 1) + 1 for k, d in zip(unfold.kernel, unfold.dilations, strict=True)]
    axes = tuple(range(2, 2 + len(spatial)))
    windows = sliding_window_view(padded, spans, axis=axes)  # [B, C, *full positions, *spans]
    step = tuple(slice(None, None, s) for s in unfold.strides) + tuple(slice(None, None, d) for d in unfold.dilations)
    windows = windows[(slice(None), slice(None), *step)]  # [B, C, *out, *kernel]
    n_spatial = len(spatial)
    # → [B, *out, C, *kernel]
    order = (0, *range(2, 2 + n_spatial), 1, *range(2 + n_spatial, 2 + 2 * n_spatial))
    windows = windows.transpose(order)
    out_shape = windows.shape[1 : 1 + n_spatial]
    width = math.prod(windows.shape[1 + n_spatial :])
    row_bytes = 4 * width
    sample_bytes = row_bytes * math.prod(out_shape)
    if sample_bytes <= PATCH_BLOCK_BYTES:  # whole samples per block
        step = max(1, PATCH_BLOCK_BYTES // max(sample_bytes, 1))
        for start in range(0, windows.shape[0], step):
            yield np.ascontiguousarray(windows[start : start + step], dtype=np.float32).reshape(-1, width)
        return
    step = max(1, PATCH_BLOCK_BYTES // (row_bytes * math.prod(out_shape[1:])))  # slices of the first output axis
    for b in range(windows.shape[0]):
        for start in range(0, out_shape[0], step):
            yield np.ascontiguousarray(windows[b, start : start + step], dtype=np.float32).reshape(-1, width)


def unfold_rows(x: np.ndarray, unfold: Unfolding) -> Iterator[np.ndarray]:
    """Blocks of rows ``x`` (float32 ``[rows, K]``, or ``[rows, groups·K']`` for conv) of one activation."""
    if unfold.kind == "conv":
        yield from conv_patches(x, unfold)
        return
    if unfold.kind == "columns":
        x = x.reshape(1, -1) if x.ndim == 1 else np.swapaxes(x, -1, -2)  # 1-D X is one column
    if x.shape[-1] != unfold.size:
        raise OnnxqError(
            f"activation '{unfold.tensor}' has shape {x.shape}; its reduction axis should have {unfold.size} "
            "entries for the layer reading it; the model is inconsistent"
        )
    rows = x.reshape(-1, unfold.size)
    for start in range(0, rows.shape[0], ROW_BLOCK):
        yield np.ascontiguousarray(rows[start : start + ROW_BLOCK], dtype=np.float32)


class HessianSum:
    """Running ``H = Σ xᵀx`` in float64 (upper triangle until :meth:`result`) and the number of rows seen.

    With ``cross``, also ``C = Σ xᵀx_ref`` for a reference activation ``x_ref`` of the same shape (the float
    model's input of the same layer, while ``x`` comes from the partially quantized model).
    """

    def __init__(self, unfold: Unfolding, cross: bool = False) -> None:
        self.unfold = unfold
        self.upper = np.zeros((unfold.groups, unfold.size, unfold.size), dtype=np.float64)
        self.cross = np.zeros_like(self.upper) if cross else None
        self.rows = 0

    def add(self, x: np.ndarray, reference: np.ndarray | None = None) -> None:
        """Add every row of one activation tensor (and of its reference, for :attr:`cross`)."""
        groups, size = self.unfold.groups, self.unfold.size
        references = unfold_rows(reference, self.unfold) if reference is not None else itertools.repeat(None)
        for block, ref in zip(unfold_rows(x, self.unfold), references, strict=False):  # same shapes
            if block.shape[1] != groups * size:
                raise OnnxqError(
                    f"activation '{self.unfold.tensor}' unfolds to {block.shape[1]} columns, the layer expects "
                    f"{groups}·{size}; the model is inconsistent"
                )
            self.rows += block.shape[0]
            if groups == 1:
                self.upper[0] += blas.ssyrk(1.0, block.T, trans=0)  # block.T is F-contiguous: no copy
            else:
                per_group = block.reshape(-1, groups, size).transpose(1, 0, 2)  # [G, rows, K']
                self.upper += np.matmul(per_group.transpose(0, 2, 1), per_group)
            if self.cross is not None and ref is not None:
                ref_groups = ref.reshape(-1, groups, size).transpose(1, 0, 2)
                block_groups = block.reshape(-1, groups, size).transpose(1, 0, 2)
                self.cross += np.matmul(block_groups.transpose(0, 2, 1), ref_groups)

    def result(self) -> np.ndarray:
        """The symmetric ``H`` (``[K, K]``, or ``[groups, K', K']`` for a grouped conv)."""
        upper = np.triu(self.upper)
        full = upper + np.swapaxes(np.triu(self.upper, 1), -1, -2)
        return full[0] if self.unfold.groups == 1 else full

    def cross_result(self) -> np.ndarray | None:
        """``C = Σ xᵀx_ref`` (same layout as :meth:`result`), or None without references."""
        if self.cross is None:
            return None
        return self.cross[0] if self.unfold.groups == 1 else self.cross.copy()


# ----------------------------------------------------------------------------- ORT sessions


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
        custom_ops = any(node.domain == CUSTOM_OP_DOMAIN for node in keep_nodes)
        return open_session(str(path), self.threads, custom_ops, self.purpose)

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


def open_session(
    model: str | bytes, threads: int, custom_ops: bool = False, purpose: str = "calibration"
) -> ort.InferenceSession:
    """A CPU session (basic graph optimizations, ``threads`` intra-op threads) for a calibration sub-model; with
    ``custom_ops`` the onnxq custom-op library is registered (``onnxq::MatMulLowBit``)."""
    options = ort.SessionOptions()
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
            f"ONNX Runtime cannot load the model for {purpose} ({_first_line(exc)}); "
            "check that the model runs in onnxruntime"
        ) from None


def _first_line(exc: BaseException) -> str:
    """The first line of an error, without ORT's ``[ONNXRuntimeError] : 1 : FAIL :`` prefix and source paths."""
    text = str(exc).strip().splitlines()
    if not text:
        return type(exc).__name__
    line = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text[0])
    return re.sub(r"\S*onnxruntime_src/\S+:\d+ ", "", line)[:300]


# ----------------------------------------------------------------------------- accumulation


@dataclass
class CalibrationStats:
    """What one calibration did: rows per key (normalise with ``H / rows``), passes, time and peak memory."""

    rows: dict[HessianKey, int] = field(default_factory=dict)
    samples: int = 0  # samples per pass
    batches: int = 0  # batches per pass
    passes: int = 0
    keys_per_pass: list[int] = field(default_factory=list)
    seconds: float = 0.0  # wall time
    cpu_seconds: float = 0.0  # process user + system time (wall time misleads on a busy machine)
    peak_rss_bytes: int = 0  # process peak resident memory (getrusage), after calibration
    hessian_bytes: int = 0  # float64 bytes of all H returned
    activation_bytes_per_batch: int = 0  # largest extra-output bytes ORT returned for one batch

    def summary(self) -> str:
        return (
            f"calibration: {len(self.rows)} Hessians from {self.samples} samples in {self.batches} batches, "
            f"{self.passes} pass(es), {self.seconds:.1f} s (CPU {self.cpu_seconds:.1f} s), "
            f"Hessians {self.hessian_bytes / 2**20:.0f} MiB, activations {self.activation_bytes_per_batch / 2**20:.0f} "
            f"MiB per batch, peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB"
        )

    def merge(self, other: CalibrationStats) -> None:
        self.rows.update(other.rows)
        self.samples, self.batches = other.samples, other.batches
        self.passes += other.passes
        self.keys_per_pass += other.keys_per_pass
        self.seconds += other.seconds
        self.cpu_seconds += other.cpu_seconds
        self.peak_rss_bytes = max(self.peak_rss_bytes, other.peak_rss_bytes)
        self.hessian_bytes += other.hessian_bytes
        self.activation_bytes_per_batch = max(self.activation_bytes_per_batch, other.activation_bytes_per_batch)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _as_batches(batches, model: onnx.ModelProto) -> Iterable[Feed]:
    if isinstance(batches, (Mapping, str, os.PathLike)):
        return iter_batches(batches, model=model)
    return batches


def _origins(batches: Iterable[Feed]) -> Iterator[tuple[str, Feed]]:
    if isinstance(batches, CalibrationBatches):
        yield from batches.with_origin()
    else:
        for index, batch in enumerate(batches):
            yield f"calibration batch {index}", batch


def plan_keys(targets: Iterable[Target]) -> dict[HessianKey, Unfolding]:
    """Distinct Hessian keys of ``targets`` in graph order, each with its unfolding."""
    keys: dict[HessianKey, Unfolding] = {}
    for target in sorted(targets, key=lambda t: t.node_index):
        keys.setdefault(hessian_key(target), unfolding(target))
    return keys


def iter_hessian_groups(
    model: onnx.ModelProto,
    targets: list[Target],
    batches: Iterable[Feed] | str | os.PathLike | Mapping[str, np.ndarray],
    max_memory: int | None = None,
    progress: ProgressCallback | None = None,
    threads: int = ORT_THREADS,
    token_mask: str | None = None,
) -> Iterator[tuple[dict[HessianKey, np.ndarray], CalibrationStats]]:
    """Yield ``(H per key, stats)`` one key group at a time, one pass over ``batches`` per group.

    Groups (contiguous in graph order) keep ``Σ H bytes + activations of two batches + working memory`` under
    ``max_memory``; the activation bytes are measured on a one-sample probe run and scaled to the first batch.
    A caller that solves each group and drops its H stays within ``max_memory`` for the calibration data.

    ``token_mask``: name of a ``[batch, sequence]`` model input (e.g. ``attention_mask``); rows of a MatMul/Gemm
    activation laid out ``[batch, sequence, K]`` (or ``[batch·sequence, K]``) where it is 0 are left out of H,
    so padding does not weigh on the solution.  Other activations are used whole.
    """
    batches = _as_batches(batches, model)
    keys = plan_keys(targets)
    if not keys:
        return
    specs = model_input_specs(model)
    if isinstance(batches, CalibrationBatches):
        batches.check(model)  # every file's names, dtypes and ranks, before the first ORT run
    constants = {t.name: t for t in model.graph.initializer}
    factory = SessionFactory(model, threads)
    try:
        intermediates = [u.tensor for u in keys.values() if u.tensor not in specs and u.tensor not in constants]
        intermediates = list(dict.fromkeys(intermediates))
        groups: list[list[HessianKey]] = [list(keys)]
        probe_session = None
        activation_bytes: dict[str, int] = {}
        one_shot = iter(batches) is batches
        if max_memory is not None:
            first = _first_batch(batches, specs)
            if one_shot:  # put the probed batch back in front
                batches = itertools.chain([first[1]], batches)
            probe_session = factory.session(intermediates) if intermediates else None
            activation_bytes = _measure_activations(probe_session, intermediates, first, specs)
            groups = _group_keys(keys, activation_bytes, max_memory)
            if len(groups) > 1:
                probe_session = None
        if len(groups) > 1 and one_shot:
            raise OnnxqError(
                f"calibration needs {len(groups)} passes over the data to fit in max_memory, but the batches are a "
                "one-shot iterator; pass a list or iter_batches(...), or raise max_memory"
            )
        counter = _BatchCounter(progress, len(batches) * len(groups) if hasattr(batches, "__len__") else 0)
        for index, group in enumerate(groups):
            start, cpu_start = time.perf_counter(), _cpu_seconds()
            group_units = {key: keys[key] for key in group}
            needed = list(dict.fromkeys(u.tensor for u in group_units.values() if u.tensor in intermediates))
            if len(groups) == 1 and probe_session is not None:
                session = probe_session
            else:
                session = factory.session(needed) if needed else None
            counter.label = f"calibration pass {index + 1}/{len(groups)}"
            sums, samples, count, peak_outputs = accumulate_pass(
                lambda _, origin, feed, session=session, needed=needed: _run(session, needed, feed, origin),
                batches, specs, constants, group_units, token_mask, counter.step,
            )
            session = None
            yield finish_pass(sums, samples, count, peak_outputs, start, cpu_start)
            del sums
        probe_session = None
    finally:
        factory.close()


class _BatchCounter:
    """Calls ``progress(done, total, message)`` once per processed batch."""

    def __init__(self, progress: ProgressCallback | None, total: int) -> None:
        self.progress, self.total, self.done, self.label = progress, total, 0, ""

    def step(self, origin: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total, f"{self.label}, {origin}")


def accumulate_pass(
    run: Callable[[int, str, Feed], dict[str, np.ndarray]],
    batches: Iterable[Feed],
    specs: Mapping[str, InputSpec],
    constants: Mapping[str, onnx.TensorProto],
    units: Mapping[HessianKey, Unfolding],
    token_mask: str | None,
    report: Callable[[str], None],
    cross: bool = False,
) -> tuple[dict[HessianKey, HessianSum], int, int, int]:
    """One pass over the batches: ``run(index, origin, feed)`` (ORT) computes batch i+1 in a worker thread while
    batch i is added to the sums.  Its result holds the layer inputs that are not graph inputs or constants, and
    with ``cross`` their reference values under ``name + REFERENCE_SUFFIX`` (see :class:`HessianSum`).

    The sums are updated in batch order on the calling thread with single-threaded BLAS (many mid-sized
    ``syrk`` calls: threading them costs more than it gains, and ORT has the other core), so results do not
    depend on timing.  At most two batches of activations are alive at once.
    """
    sums = {key: HessianSum(unit, cross) for key, unit in units.items()}
    users = _by_tensor(units)
    samples = count = peak_outputs = 0

    def accumulate(origin: str, feed: Feed, values: dict[str, np.ndarray]) -> None:
        nonlocal samples, count, peak_outputs
        peak_outputs = max(peak_outputs, sum(v.nbytes for v in values.values()))
        keep = _token_mask(feed, token_mask, origin)
        for tensor, keys in users.items():
            x = values.pop(tensor) if tensor in values else _source_value(tensor, feed, constants, origin)
            ref = values.pop(tensor + REFERENCE_SUFFIX, None)
            for key in keys:
                if keep is not None and units[key].kind == "rows":
                    sums[key].add(_masked_rows(x, keep), None if ref is None else _masked_rows(ref, keep))
                else:
                    sums[key].add(x, ref)
            del x, ref
        samples += _batch_samples(feed)
        count += 1
        report(origin)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxq-ort") as pool, _single_threaded_blas():
        pending = None
        for index, (origin, batch) in enumerate(_origins(batches)):
            feed = check_feed(specs, batch, origin)
            running = pool.submit(run, index, origin, feed)
            if pending is not None:
                accumulate(*pending)
            pending = (origin, feed, running.result())
            del running
        if pending is not None:
            accumulate(*pending)
    return sums, samples, count, peak_outputs


def finish_pass(
    sums: Mapping[HessianKey, HessianSum], samples: int, count: int, peak_outputs: int, start: float, cpu_start: float
) -> tuple[dict[HessianKey, np.ndarray], CalibrationStats]:
    """The symmetric H of each sum and the pass's stats (``start``/``cpu_start``: when the pass began)."""
    if count == 0:
        raise OnnxqError("calibration data holds no batches; pass at least one sample")
    hessians = {key: s.result() for key, s in sums.items()}
    stats = CalibrationStats(
        rows={key: s.rows for key, s in sums.items()},
        samples=samples,
        batches=count,
        passes=1,
        keys_per_pass=[len(sums)],
        seconds=time.perf_counter() - start,
        cpu_seconds=_cpu_seconds() - cpu_start,
        peak_rss_bytes=_peak_rss_bytes(),
        hessian_bytes=sum(h.nbytes for h in hessians.values()),
        activation_bytes_per_batch=peak_outputs,
    )
    return hessians, stats


def _single_threaded_blas():
    if threadpool_limits is None:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def collect_hessians(
    model: onnx.ModelProto,
    targets: list[Target],
    batches: Iterable[Feed] | str | os.PathLike | Mapping[str, np.ndarray],
    max_memory: int | None = None,
    progress: ProgressCallback | None = None,
    threads: int = ORT_THREADS,
    token_mask: str | None = None,
) -> tuple[dict[HessianKey, np.ndarray], CalibrationStats]:
    """``H = Σ xᵀx`` (float64) for every :func:`hessian_key` of ``targets``, with rows, time and peak memory.

    ``batches``: dicts of named model inputs (re-iterable when ``max_memory`` forces several passes), or an .npz
    path / folder / dict of arrays.  See :func:`iter_hessian_groups` for the memory bound; the returned dict holds
    every H at once.
    """
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    hessians: dict[HessianKey, np.ndarray] = {}
    stats = CalibrationStats()
    groups = iter_hessian_groups(model, targets, batches, max_memory, progress, threads, token_mask)
    for group, group_stats in groups:
        hessians.update(group)
        stats.merge(group_stats)
    stats.seconds = time.perf_counter() - start
    stats.cpu_seconds = _cpu_seconds() - cpu_start
    stats.peak_rss_bytes = _peak_rss_bytes()
    return hessians, stats


def _by_tensor(units: Mapping[HessianKey, Unfolding]) -> dict[str, list[HessianKey]]:
    users: dict[str, list[HessianKey]] = {}
    for key, unit in units.items():
        users.setdefault(unit.tensor, []).append(key)
    return users


class OrtRunError(OnnxqError):
    """ONNX Runtime failed on one batch; ``reason`` is ORT's first line."""

    def __init__(self, origin: str, reason: str) -> None:
        super().__init__(f"{origin}: ONNX Runtime failed on this batch ({reason}); check the input shapes and values")
        self.reason = reason


def _run(session: ort.InferenceSession | None, names: list[str], feed: Feed, origin: str) -> dict[str, np.ndarray]:
    """``{name: value}`` of ``names`` computed by ``session`` on ``feed``; an ORT failure is an :class:`OrtRunError`
    (ORT's own error log is silenced: the error says it in one line)."""
    if session is None or not names:
        return {}
    options = ort.RunOptions()
    options.log_severity_level = 4
    try:
        values = session.run(names, feed, options)
    except Exception as exc:  # noqa: BLE001 - ORT raises several pybind types
        raise OrtRunError(origin, _first_line(exc)) from None
    return dict(zip(names, values, strict=True))


def _token_mask(feed: Feed, name: str | None, origin: str) -> np.ndarray | None:
    if name is None:
        return None
    if name not in feed or feed[name].ndim != 2:
        raise OnnxqError(
            f"{origin}: token mask '{name}' is not a [batch, sequence] input of this batch; "
            "name a 2-D model input such as attention_mask, or leave the token mask unset"
        )
    return feed[name] != 0


def _masked_rows(x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The rows of ``x`` at kept tokens when ``x`` is ``[batch, sequence, K]`` or ``[batch·sequence, K]``."""
    if x.shape[:-1] == keep.shape:
        return x[keep]
    if x.ndim == 2 and x.shape[0] == keep.size:
        return x[keep.reshape(-1)]
    return x


def _source_value(tensor: str, feed: Feed, constants: Mapping[str, onnx.TensorProto], origin: str) -> np.ndarray:
    """A layer input that is a graph input (from the feed) or an initializer (constant)."""
    if tensor in feed:
        return feed[tensor]
    if tensor in constants:
        return numpy_helper.to_array(constants[tensor])
    raise OnnxqError(f"{origin}: layer input '{tensor}' is neither computed nor fed; the model is inconsistent")


def _batch_samples(feed: Feed) -> int:
    return max((np.shape(a)[0] for a in feed.values() if np.ndim(a) > 0), default=1)


def _first_batch(batches: Iterable[Feed], specs: Mapping[str, InputSpec]) -> tuple[str, Feed]:
    for origin, batch in _origins(batches):
        return origin, check_feed(specs, batch, origin)
    raise OnnxqError("calibration data holds no batches; pass at least one sample")


def _measure_activations(
    session: ort.InferenceSession | None, names: list[str], first: tuple[str, Feed], specs: Mapping[str, InputSpec]
) -> dict[str, int]:
    """Bytes of each layer-input tensor for one batch: one-sample probe run, scaled to the first batch's size.

    Graph inputs and initializers cost nothing extra (they are in memory anyway).
    """
    origin, feed = first
    if any(spec.fixed_batch is not None for spec in specs.values()):
        return {name: int(v.nbytes) for name, v in _run(session, names, feed, origin).items()}
    one = {name: a[:1] if np.ndim(a) > 0 else a for name, a in feed.items()}
    scale = _batch_samples(feed)
    return {name: int(v.nbytes) * scale for name, v in _run(session, names, one, origin).items()}


def _working_bytes(unit: Unfolding, activation: int) -> int:
    """Transient memory of one key's update: copies of the activation, one block of rows, one syrk result."""
    if unit.kind == "conv":
        copies = activation  # the padded copy
        patches = activation * math.prod(unit.kernel) // math.prod(unit.strides) + 1
        block = min(PATCH_BLOCK_BYTES, patches)
    else:
        copies = activation if unit.kind == "columns" else 0
        block = min(ROW_BLOCK * unit.size * 4, activation)
    return copies + block + 4 * unit.groups * unit.size * unit.size


def _group_keys(
    keys: Mapping[HessianKey, Unfolding], activation_bytes: Mapping[str, int], max_memory: int
) -> list[list[HessianKey]]:
    """Split keys (in order) into groups with ``Σ H + Σ distinct activations + max working memory ≤ max_memory``."""
    groups: list[list[HessianKey]] = []
    current: list[HessianKey] = []

    def cost(members: list[HessianKey]) -> int:
        tensors = {keys[k].tensor for k in members}
        return (
            sum(keys[k].hessian_bytes for k in members)
            + 2 * sum(activation_bytes.get(t, 0) for t in tensors)  # two batches in flight
            + max(_working_bytes(keys[k], activation_bytes.get(keys[k].tensor, 0)) for k in members)
        )

    for key in keys:
        alone = cost([key])
        if alone > max_memory:
            unit = keys[key]
            raise OnnxqError(
                f"max_memory {_mib(max_memory)} is too small: the Hessian of layer input '{unit.tensor}' "
                f"({_mib(unit.hessian_bytes)}) plus one batch of its activations needs {_mib(alone)}; "
                "raise --max-memory or use a smaller calibration batch size"
            )
        if current and cost([*current, key]) > max_memory:
            groups.append(current)
            current = []
        current.append(key)
    if current:
        groups.append(current)
    return groups


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


__all__ = [
    "CalibrationBatches",
    "CalibrationStats",
    "HessianSum",
    "InputSpec",
    "Unfolding",
    "check_feed",
    "collect_hessians",
    "conv_patches",
    "hessian_key",
    "iter_batches",
    "iter_hessian_groups",
    "load_calibration",
    "model_input_specs",
    "plan_keys",
    "unfolding",
]

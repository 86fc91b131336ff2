"""Calibration data: read ``.npz`` files (or folders of them, or dicts), check them against the model's inputs, and cut
them into batches; a probe falls back to batch 1 for models that declare a dynamic batch but only run batch 1."""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxq.calibration.sessions import Feed, OrtRunError, SessionFactory, run_session
from onnxq.errors import OnnxqError
from onnxq.heap import release_free_memory

DEFAULT_BATCH_SIZE = 8  # samples per ORT run when neither the caller nor the model fixes it
# ... or, for token ids ([samples, positions] integers), as many samples as give this many positions per run (at least
# one, at most DEFAULT_BATCH_SIZE): an attention's [batch, heads, positions, positions] scores then stay near the
# cache.  SmolLM2, 16 windows of 512 tokens, sequential calibration with float targets: 116.6 s at batch 8, 87.6 s
# at batch 2 (docs/performance.md)
TOKENS_PER_BATCH = 1024


PROBE_TOLERANCE = 1e-2  # relative L2 error allowed between a sample's outputs in a batch and alone (mixing is O(1))




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
        """The batch the model fixes on axis 0: a positive dim (paddle2onnx writes -1 for a dynamic one)."""
        if self.dims and isinstance(self.dims[0], int) and self.dims[0] > 0:
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

    Batch size: ``batch_size`` if given, else the model's fixed batch, else :data:`DEFAULT_BATCH_SIZE` samples
    (for token ids: :data:`TOKENS_PER_BATCH` positions, see :meth:`default_batch_size`), checked once
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
        self.batch_size = batch_size or self.default_batch_size()
        self._sample_counts: list[int] | None = None
        if model is not None and not self.settled:
            self.check(model)
            note = probe_batch(model, self)
            release_free_memory()  # the probe's whole-model session is gone: give its pages back
            if note is not None:
                self.batch_size = 1
                self.notes.append(note)
            self.settled = True

    def default_batch_size(self) -> int:
        """:data:`DEFAULT_BATCH_SIZE`, or for token ids (integer ``[samples, positions]`` arrays, the longest
        ``positions`` over the inputs) ``TOKENS_PER_BATCH // positions`` clamped to ``1 … DEFAULT_BATCH_SIZE``."""
        lengths = [shape[1] for _, headers in self._headers() for shape, dtype in headers.values()
                   if len(shape) == 2 and np.dtype(dtype).kind in "iu"]
        if not lengths:
            return DEFAULT_BATCH_SIZE
        return max(1, min(DEFAULT_BATCH_SIZE, TOKENS_PER_BATCH // max(max(lengths), 1)))

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


PROBE_SAMPLES = 2  # samples of the batch the probe runs


def probe_batch(model: onnx.ModelProto, batches: CalibrationBatches) -> str | None:
    """Why ``model`` cannot run ``batches`` at their batch size (a note), or None when it can.

    The first :data:`PROBE_SAMPLES` samples of the first batch of more than one sample run through the whole model,
    and its first sample alone (two samples show a failure or a mix as well as eight, at a quarter of the cost).
    The batch is fine when every graph output of the batch holds the sample's output: the leading ``rows`` of an
    output whose axis 0 is ``n·rows`` for ``n`` samples (``rows`` for one), or the whole output when its shape does
    not depend on the batch; equal within relative L2 error :data:`PROBE_TOLERANCE`.  An ORT failure of the sample
    alone is raised.
    """
    first = _probe_feed(batches)
    if first is None:
        return None
    origin, feed = first
    count = batch_samples(feed)  # the batch size the notes speak of (the run's)
    feed = {name: value[:PROBE_SAMPLES] for name, value in feed.items()}
    factory = SessionFactory(model)
    try:
        names = [value.name for value in model.graph.output]
        session = factory.session(names)
        try:
            batched = run_session(session, names, feed, origin)
        except OrtRunError as exc:
            return f"calibration: the model fails with batch {count} ({exc.reason}); ran batch 1"
        single = run_session(session, names, {k: v[:1] for k, v in feed.items()}, origin)
    finally:
        factory.close()
    for name in names:
        mismatch = _batch_mismatch(batched[name], single[name], batch_samples(feed))
        if mismatch is not None:
            return (f"calibration: the model mixes samples in a batch of {count} (output '{name}' {mismatch}); "
                    "ran batch 1")
    return None


def _probe_feed(batches: CalibrationBatches) -> tuple[str, Feed] | None:
    """The first batch holding more than one sample (None if there is none: every run is then batch 1 anyway)."""
    if batches.batch_size == 1 or max(batches.sample_counts()) == 1:
        return None
    for origin, batch in batches.with_origin():
        if batch_samples(batch) > 1:
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


def batch_samples(feed: Feed) -> int:
    return max((np.shape(a)[0] for a in feed.values() if np.ndim(a) > 0), default=1)

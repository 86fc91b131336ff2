"""Calibration arrays for a model, made from one source (a text file, a folder of photos, or random values) and
the model's own input specs.

Which input gets what (in the model's input order; :mod:`onnxq.calibration.sources.specs` gives the kinds and shapes):

* ``--set NAME=file.npy`` inputs: the array as given (see :func:`set_value`), whatever the source (it overrides
  what the source made);
* ``--text``: the one ``ids`` input gets the token windows (:mod:`~onnxq.calibration.sources.text`);
* ``--images``: the one ``image`` input gets the photos (:mod:`~onnxq.calibration.sources.images`);
* ``--random``: every input gets :func:`~onnxq.calibration.sources.specs.generated_values` (one generator seeded
  with ``seed``, inputs drawn in model order);
* with every source: masks 1, positions ``0..L−1``, token types 0, key/value caches empty (past length 0, so the
  file stays small: 128 windows of 512 SmolLM2 tokens take about 200 KB).

An input left over is a one-line :class:`OnnxqError` naming it and ``--set``.  Optional inputs (an initializer gives
a default) are left out unless ``--set`` gives them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxq.calibration.data import InputSpec, check_input, model_input_specs
from onnxq.calibration.sources.configs import CacheSizes, cache_sizes
from onnxq.calibration.sources.images import image_batch
from onnxq.calibration.sources.specs import (
    calibration_shape,
    generated_values,
    image_layout,
    input_kind,
    set_remedy,
)
from onnxq.calibration.sources.text import text_windows
from onnxq.errors import OnnxqError
from onnxq.ir.model import load_model

DEFAULT_SAMPLES = 128
DEFAULT_SEQ_LEN = 512
LAYOUTS = ("NCHW", "NHWC")
RANDOM_NOTE = ("--random: the values come from the input specs, not from real data; calibration on real text or "
               "photos (--text, --images) quantizes better")
STRUCTURAL = ("mask", "position", "token_type", "cache")  # kinds filled from the specs alone
KIND_WORDS = {"ids": "token ids", "image": "an image", "other": "of no kind onnxq can fill from data"}

ModelOrPath = onnx.ModelProto | str | os.PathLike
SetValue = str | os.PathLike | np.ndarray


@dataclass
class Calibration:
    """The arrays (samples along axis 0, model input order), their sample count, the source and notes."""

    arrays: dict[str, np.ndarray]
    samples: int
    source: str
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: samples, source, then each input's dtype and shape (inputs of one dtype and shape grouped)."""
        groups: dict[tuple[str, tuple[int, ...]], list[str]] = {}
        for name, array in self.arrays.items():
            groups.setdefault((str(array.dtype), array.shape), []).append(name)
        parts = []
        for (dtype, shape), names in groups.items():
            label = ", ".join(names) if len(names) <= 3 else f"{len(names)} inputs {names[0]} … {names[-1]}"
            parts.append(f"{label} {dtype} {list(shape)}")
        return f"{self.samples} samples from {self.source}: " + ", ".join(parts)


def make_calibration(model: ModelOrPath, **options: object) -> dict[str, np.ndarray]:
    """Calibration arrays for ``model`` (name → array, samples along axis 0); options as for
    :func:`build_calibration`.  Notes (e.g. the ``--random`` warning) are issued with :func:`warnings.warn`.

    ``make_calibration("model.onnx", text="book.txt", samples=128, seq_len=512)``
    """
    calibration = build_calibration(model, **options)  # type: ignore[arg-type]
    for note in calibration.notes:
        warnings.warn(note, stacklevel=2)
    return calibration.arrays


def build_calibration(
    model: ModelOrPath,
    *,
    text: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    images: str | os.PathLike | None = None,
    size: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    layout: str | None = None,
    random: bool = False,
    samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 0,
    set_inputs: Mapping[str, SetValue] | None = None,
) -> Calibration:
    """The arrays of one source (``text``, ``images`` or ``random``) plus the spec-filled inputs (module rules)."""
    if sum((text is not None, images is not None, bool(random))) != 1:
        raise OnnxqError("give one calibration source: --text FILE, --images DIR or --random")
    _check_options(samples, seq_len, size, layout, images is not None, mean, std)
    model_path = None if isinstance(model, onnx.ModelProto) else Path(model)
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model, external_data=False)
    specs = model_input_specs(proto)
    given = _read_set(set_inputs or {}, specs)
    wanted = {name: spec for name, spec in specs.items() if spec.required or name in given}
    filled: dict[str, np.ndarray] = {}
    notes: list[str] = []
    size = tuple(size) if size is not None else None
    if text is not None:
        spec = _source_input(wanted, given, "ids", "--text fills token ids (an integer input named *ids*)")
        fixed = spec.dims[1] if spec.dims and len(spec.dims) == 2 else None
        if isinstance(fixed, int) and fixed > 0 and fixed != seq_len:
            raise OnnxqError(f"input '{spec.name}' has a fixed length {fixed}; pass --seq-len {fixed}")
        filled[spec.name] = text_windows(text, tokenizer, model_path, samples, seq_len, seed).astype(spec.dtype)
        source = f"text {text}"
    elif images is not None:
        spec = _source_input(wanted, given, "image", "--images fills a float image input [N, C, H, W] or [N, H, W, C]")
        layout = image_layout(spec, layout)
        size = _image_size(spec, size, layout)
        channels = spec.dims[1] if layout == "NCHW" else spec.dims[3]
        filled[spec.name] = image_batch(images, size, channels if channels in (1, 3) else 3, layout, spec.dtype,
                                        mean, std, samples, seed)
        samples = filled[spec.name].shape[0]
        source = f"images {images}"
    else:
        notes.append(RANDOM_NOTE)
        source = f"random values, seed {seed}"
    rng = np.random.default_rng(seed)
    cache = cache_sizes(model_path)
    arrays: dict[str, np.ndarray] = {}
    for name, spec in wanted.items():
        if name in given:
            arrays[name] = set_value(spec, given[name], samples)
        elif name in filled:
            arrays[name] = filled[name]
        else:
            arrays[name] = _spec_value(spec, samples, seq_len, cache, size, layout, rng, random, source)
        check_input(spec, arrays[name].shape, arrays[name].dtype, "onnxq calib")
    return Calibration(arrays, samples, source, notes)


def _check_options(samples: int, seq_len: int, size: Sequence[int] | None, layout: str | None, images: bool,
                   mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
    if samples < 1:
        raise OnnxqError(f"--samples {samples} is out of range; use 1 or more")
    if seq_len < 1:
        raise OnnxqError(f"--seq-len {seq_len} is out of range; use 1 or more tokens")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise OnnxqError(f"--size {' '.join(map(str, size))}: give two positive numbers, H W")
    if layout is not None and layout not in LAYOUTS:
        raise OnnxqError(f"--layout {layout}: use NCHW or NHWC")
    if not images and (mean is not None or std is not None or layout is not None):
        raise OnnxqError("--mean, --std and --layout apply to --images only; drop them or pass --images DIR")


def _source_input(wanted: Mapping[str, InputSpec], given: Mapping[str, np.ndarray], kind: str, what: str) -> InputSpec:
    """The one input of ``kind`` the source fills: the one not given by ``--set``, else the one ``--set`` then
    overrides."""
    found = [spec for spec in wanted.values() if input_kind(spec) == kind]
    free = [spec for spec in found if spec.name not in given]
    if len(free if free else found) != 1:
        if not found:
            raise OnnxqError(f"{what}; the model has none (inputs: {name_list(wanted)}); use another source, or "
                             "--set NAME=file.npy for each input")
        raise OnnxqError(f"{what}; the model has several ({name_list(s.name for s in free)}); give all but one "
                         "with --set NAME=file.npy")
    return (free or found)[0]


def _image_size(spec: InputSpec, size: tuple[int, ...] | None, layout: str | None) -> tuple[int, int]:
    """``--size`` or the model's fixed height and width (a ``--size`` that contradicts them is refused)."""
    dims = spec.dims
    fixed = (dims[2], dims[3]) if layout == "NCHW" else (dims[1], dims[2])
    declared = tuple(d if isinstance(d, int) and d > 0 else None for d in fixed)
    if size is None:
        if None in declared:
            raise OnnxqError(f"input '{spec.name}' has a free image size {list(dims)}; pass --size H W")
        return declared  # type: ignore[return-value]
    for want, have in zip(declared, size, strict=True):
        if want is not None and want != have:
            raise OnnxqError(f"--size {size[0]} {size[1]}: input '{spec.name}' is fixed at {list(dims)} "
                             f"({layout}); pass --size {fixed[0]} {fixed[1]}")
    return size[0], size[1]


def _spec_value(spec: InputSpec, samples: int, seq_len: int, cache: CacheSizes, size: tuple[int, ...] | None,
                layout: str | None, rng: np.random.Generator, random: bool, source: str) -> np.ndarray:
    kind = input_kind(spec)
    if not random and kind not in STRUCTURAL:
        raise OnnxqError(f"input '{spec.name}' ({KIND_WORDS[kind]}, {spec.dtype} {list(spec.dims or [])}) is not "
                         f"filled by {source.split()[0]}; {set_remedy(spec.name)}")
    shape = calibration_shape(spec, samples, seq_len, cache, size, layout)  # type: ignore[arg-type]
    if kind == "cache" and not random:
        return np.zeros(shape, spec.dtype)
    return generated_values(spec, shape, rng, set_remedy(spec.name))


def name_list(names: Iterable[str], most: int = 6) -> str:
    """Up to ``most`` names, then how many there are in all (an LLM has 60 cache inputs)."""
    names = list(names)
    shown = ", ".join(names[:most])
    return shown if len(names) <= most else f"{shown}, … ({len(names)} in all)"


def _read_set(set_inputs: Mapping[str, SetValue], specs: Mapping[str, InputSpec]) -> dict[str, np.ndarray]:
    """``--set`` arrays by input name (an ``.npy`` path is read; a name the model lacks is refused)."""
    arrays = {}
    for name, value in set_inputs.items():
        if name not in specs:
            raise OnnxqError(f"--set {name}: the model has no input '{name}' (inputs: {name_list(specs)})")
        if isinstance(value, np.ndarray):
            arrays[name] = value
            continue
        try:
            arrays[name] = np.load(value, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise OnnxqError(f"--set {name}={value}: not a readable .npy file ({type(exc).__name__}); write it "
                             "with numpy.save") from None
        if not isinstance(arrays[name], np.ndarray):
            raise OnnxqError(f"--set {name}={value}: holds several arrays; give one .npy file (numpy.save)")
    return arrays


def set_value(spec: InputSpec, array: np.ndarray, samples: int) -> np.ndarray:
    """A ``--set`` array as ``samples`` samples: of the input's rank, axis 0 holds ``samples`` samples (or 1,
    repeated for every sample); one rank less, it is a single sample repeated ``samples`` times."""
    rank = len(spec.dims) if spec.dims is not None else array.ndim
    if array.ndim == rank - 1:
        array = array[None]
    if array.ndim != rank or array.shape[0] not in (1, samples):
        raise OnnxqError(f"--set {spec.name}: array of shape {list(array.shape)} fits neither {samples} samples "
                         f"(rank {rank}, axis 0 = {samples}) nor one sample (rank {rank - 1}) of input "
                         f"{list(spec.dims or [])}")
    if array.shape[0] != samples:
        array = np.repeat(array, samples, axis=0)
    check_input(spec, array.shape, array.dtype, f"--set {spec.name}")
    return np.ascontiguousarray(array, dtype=spec.dtype)

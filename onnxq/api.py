"""The Python API: orchestration only (load, run a pass, save)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path

import onnx

from onnxq.calibration.data import load_calibration
from onnxq.calibration.sources.make import Calibration, build_calibration
from onnxq.calibration.sources.save import write_npz
from onnxq.config import QuantizeConfig
from onnxq.custom_ops import custom_op_library_note, library_path
from onnxq.errors import OnnxqError
from onnxq.formats.lowbit_layout import DOMAIN as ONNXQ_DOMAIN
from onnxq.ir.genai_folder import check_output_dir, decoder_file, provider_device, write_folder
from onnxq.ir.model import copy_model, external_data_files, load_external_data, load_model, save_model
from onnxq.ir.paths import check_output_file, data_file_of, same_file, write_text
from onnxq.ir.targets import constants_to_initializers
from onnxq.layer_table import InspectReport, inspect_model
from onnxq.passes.convert import ConvertSummary, check_format, convert_in_place
from onnxq.passes.quantize import QuantizeSummary
from onnxq.passes.split_report import SplitReport
from onnxq.passes.splitquant import split_in_place
from onnxq.pipeline import checker_error, finish, quantize_pipeline

ModelOrPath = onnx.ModelProto | str | os.PathLike
PathOrNone = str | os.PathLike | None


def _open(model_or_path: ModelOrPath, outputs: Mapping[str, PathOrNone] | None = None, calibration: object = None,
          external_data: bool = True, extra_reads: Iterable[Path] = ()) -> onnx.ModelProto:
    """The model to work on (a copy, or loaded from its file), once every output path has been checked by
    :func:`check_outputs` against the files this run reads (model, external data, calibration)."""
    if isinstance(model_or_path, onnx.ModelProto):
        check_outputs(outputs or {}, [*_calibration_files(calibration), *extra_reads])
        return copy_model(model_or_path)
    path = Path(model_or_path)
    model = load_model(path, external_data=False)
    files = external_data_files(model, path)
    check_outputs(outputs or {}, [path, *files.values(), *_calibration_files(calibration), *extra_reads])
    if external_data:
        load_external_data(model, files)
    return model


def _calibration_files(calibration: object) -> list[Path]:
    if not isinstance(calibration, (str, os.PathLike)):
        return []
    return load_calibration(calibration)


def check_outputs(outputs: Mapping[str, PathOrNone], reads: Iterable[str | os.PathLike] = ()) -> None:
    """Before any work: each output path (``{option: path}``, e.g. ``{"-o": ..., "--log": ...}``) is a writable
    file path that is none of the files read (``reads``) and none of the other outputs; a model output's external
    data file (``<out>.data``) is none of the files read either."""
    reads = [Path(r) for r in reads]
    written: dict[Path, str] = {}
    for option, path in outputs.items():
        if path is None:
            continue
        check_output_file(path, option, reads)
        for other, other_option in written.items():
            if same_file(path, other):
                raise OnnxqError(f"{path}: {option} and {other_option} name the same file; give each its own path")
        written[Path(path)] = option
        if option == "-o":
            _check_data_file(Path(path), reads)


def _check_data_file(output: Path, reads: list[Path]) -> None:
    data = data_file_of(output)
    for existing in reads:
        if same_file(data, existing):
            raise OnnxqError(f"{output}: the output's external-data file {data.name} would replace the input file "
                             f"{existing}; choose another -o name (the input is never modified)")


def quantize_with_summary(
    model_or_path: ModelOrPath, output: PathOrNone = None, layer_log: PathOrNone = None, **options: object,
) -> tuple[onnx.ModelProto, QuantizeSummary]:
    """Like :func:`quantize`, also returning the summary (layers, bytes, notes, time); ``layer_log`` gets the
    per-layer table of :meth:`QuantizeSummary.layer_log`.

    An onnxruntime-genai model folder (holding ``genai_config.json``) as input: its decoder is quantized and
    ``output`` is a folder, a copy of the input with the quantized decoder (:mod:`onnxq.ir.genai_folder`); the
    ``onnxq`` format also gets the custom-op library, named in ``genai_config.json``."""
    config = QuantizeConfig(**options)  # type: ignore[arg-type]
    config.validate()
    source = config.source_options()
    extra_reads = [Path(p) for p in (config.calib_text, config.calib_tokenizer) if p is not None]
    folder = _genai_input(model_or_path, output)
    if folder is not None:
        model_or_path = decoder_file(folder)
    model_output = None if folder is not None else output
    model = _open(model_or_path, {"-o": model_output, "--log": layer_log}, config.calibration,
                  extra_reads=extra_reads)
    notes = []
    if source is not None:  # --calib-text / --calib-images: made here, where the model's folder is known
        made = build_calibration(model_or_path if not isinstance(model_or_path, onnx.ModelProto) else model, **source)
        notes = [*made.notes, f"calibration data: {made.summary()}"]
        config = replace(config, calibration=made.arrays, calib_text=None, calib_images=None, calib_tokenizer=None,
                         calib_samples=None, calib_seq_len=None)
    summary = quantize_pipeline(model, config)  # the model is this call's own (loaded, or a copy of the caller's)
    summary.notes[:0] = notes
    custom_ops = any(n.domain == ONNXQ_DOMAIN for n in model.graph.node)
    note = custom_op_library_note() if custom_ops else None
    if note:
        summary.notes.append(note)
    if folder is not None and output is not None:
        library = _genai_library(folder, summary) if custom_ops else None
        write_folder(folder, output, model, library)
    elif output is not None:
        save_model(model, output)
    if layer_log is not None:
        write_text(layer_log, summary.layer_log(), "--log")
    return model, summary


def model_file(path: str | os.PathLike) -> Path:
    """The ONNX file ``path`` names: itself, or the decoder of an onnxruntime-genai folder."""
    return decoder_file(path) if Path(path).is_dir() else Path(path)


def _genai_input(model_or_path: ModelOrPath, output: PathOrNone) -> Path | None:
    """The genai folder given as input (checked with its output folder before any work), else ``None``."""
    if isinstance(model_or_path, onnx.ModelProto) or not Path(model_or_path).is_dir():
        return None
    folder = Path(model_or_path)
    decoder_file(folder)  # a folder without genai_config.json or its decoder: a one-line error
    if output is not None:
        check_output_dir(folder, output)
    return folder


def _genai_library(folder: Path, summary: QuantizeSummary) -> str | None:
    """The custom-op library a genai output folder gets for the ``onnxq`` format (None, with a note, when it is
    not built)."""
    try:
        library = library_path(provider_device(folder))
    except OnnxqError as exc:
        summary.notes.append(f"{folder.name}: genai_config.json gets no custom_ops_library ({exc})")
        return None
    summary.notes.append(f"genai_config.json: decoder session_options.custom_ops_library = "
                         f"{Path(library).name} (copied into the output folder, where onnxruntime-genai loads it)")
    return library


def quantize(model_or_path: ModelOrPath, output: str | os.PathLike | None = None, **options: object) -> onnx.ModelProto:
    """Quantize MatMul/Gemm/Conv weights; options are the fields of :class:`QuantizeConfig`.

    ``onnxq.quantize("m.onnx", "m.q.onnx", bits=2, group_size=64, format="matmulnbits")``
    """
    return quantize_with_summary(model_or_path, output, **options)[0]


def convert_with_summary(model_or_path: ModelOrPath, output: PathOrNone = None, format: str = "matmulnbits",
                         accuracy_level: int | None = None) -> tuple[onnx.ModelProto, ConvertSummary]:
    """Like :func:`convert`, also returning the summary (layers, bytes, time, notes)."""
    check_format(format)
    model = _open(model_or_path, {"-o": output})
    input_error = checker_error(model)
    summary = convert_in_place(model, format, accuracy_level)
    summary.notes += finish(model, input_error)
    note = custom_op_library_note() if any(n.domain == ONNXQ_DOMAIN for n in model.graph.node) else None
    if note:
        summary.notes.append(note)
    if output is not None:
        save_model(model, output)
    return model, summary


def convert(model_or_path: ModelOrPath, output: PathOrNone = None, format: str = "matmulnbits",  # noqa: A002
            accuracy_level: int | None = None) -> onnx.ModelProto:
    """Re-emit an onnxq-quantized model in another ``format`` from its stored codes, scales and zeros (no solve:
    the dequantized weights are the stored ones, bit for bit).

    ``onnxq.convert("m.q2.onnx", "m.q2.qdq.onnx", format="qdq")``
    """
    return convert_with_summary(model_or_path, output, format, accuracy_level)[0]


def inspect(model_or_path: ModelOrPath) -> InspectReport:
    """Quantizable and quantized layers with shapes, parameters and stored bytes (external data is not read).
    Weights held by Constant nodes are listed, as quantize finds them."""
    model = _open(model_or_path, external_data=False)
    constants_to_initializers(model)
    return inspect_model(model)


def split_with_report(
    model_or_path: ModelOrPath,
    output: str | os.PathLike | None = None,
    activations: bool = False,
    calibration: object = None,
    seed: int = 0,
) -> tuple[onnx.ModelProto, SplitReport]:
    """Like :func:`split`, also returning the cost report."""
    if activations and calibration is None:
        raise OnnxqError("--activations needs calibration data to place the thresholds; pass --calib data.npz")
    model = _open(model_or_path, {"-o": output}, calibration)
    input_error = checker_error(model)
    report = split_in_place(model, activations=activations, calibration=calibration, seed=seed)
    report.notes += finish(model, input_error)
    if output is not None:
        save_model(model, output)
    return model, report


def split(model_or_path: ModelOrPath, output: str | os.PathLike | None = None, **options: object) -> onnx.ModelProto:
    """SplitQuant: each layer (and optionally activation) becomes three k-means branches summed by Add."""
    return split_with_report(model_or_path, output, **options)[0]  # type: ignore[arg-type]


def calibrate(model_or_path: ModelOrPath, output: str | os.PathLike, **options: object) -> Calibration:
    """``onnxq calib``: calibration arrays made from the model's input specs and one source (options of
    :func:`onnxq.calibration.sources.make.build_calibration`), written to ``output`` (a byte-identical ``.npz``;
    never one of the files read); a genai model folder stands for its decoder."""
    if not isinstance(model_or_path, onnx.ModelProto):
        model_or_path = model_file(model_or_path)
    reads = [] if isinstance(model_or_path, onnx.ModelProto) else [Path(model_or_path)]
    reads += [Path(options[key]) for key in ("text", "tokenizer") if options.get(key) is not None]  # type: ignore
    sets = options.get("set_inputs") or {}
    reads += [Path(v) for v in sets.values() if isinstance(v, (str, os.PathLike))]  # type: ignore[union-attr]
    check_outputs({"-o": output}, reads)
    calibration = build_calibration(model_or_path, **options)  # type: ignore[arg-type]
    write_npz(output, calibration.arrays, reads=reads)
    return calibration

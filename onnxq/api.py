"""The Python API: orchestration only (load, run a pass, save)."""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from onnxq.errors import OnnxqError
from onnxq.graph import check_output_folder, copy_model, load_model, save_model, write_text
from onnxq.inspect import InspectReport, inspect_model
from onnxq.passes.quantize import QuantizeConfig, QuantizeSummary, quantize_model

ModelOrPath = onnx.ModelProto | str | os.PathLike


def _load(model_or_path: ModelOrPath) -> onnx.ModelProto:
    if isinstance(model_or_path, onnx.ModelProto):
        return copy_model(model_or_path)
    return load_model(model_or_path)


def check_output_path(model_or_path: ModelOrPath, output: str | os.PathLike | None) -> None:
    """Refuse to overwrite the input, and fail early on an output folder that cannot be written."""
    if output is None:
        return
    out = Path(output)
    if not isinstance(model_or_path, onnx.ModelProto) and Path(model_or_path).resolve() == out.resolve():
        raise OnnxqError(f"{out}: output path equals the input; choose another -o path (the input is never modified)")
    check_output_folder(out)


def quantize_with_summary(
    model_or_path: ModelOrPath, output: str | os.PathLike | None = None, layer_log: str | os.PathLike | None = None,
    **options: object,
) -> tuple[onnx.ModelProto, QuantizeSummary]:
    """Like :func:`quantize`, also returning the summary (layers, bytes, notes, time); ``layer_log`` gets the
    per-layer table of :meth:`QuantizeSummary.layer_log`."""
    config = QuantizeConfig(**options)  # type: ignore[arg-type]
    config.validate()
    check_output_path(model_or_path, output)
    if layer_log is not None:
        check_output_folder(layer_log, "--log")
    model = _load(model_or_path)
    quantized, summary = quantize_model(model, config)
    if output is not None:
        save_model(quantized, output)
    if layer_log is not None:
        write_text(layer_log, summary.layer_log(), "--log")
    return quantized, summary


def quantize(model_or_path: ModelOrPath, output: str | os.PathLike | None = None, **options: object) -> onnx.ModelProto:
    """Quantize MatMul/Gemm/Conv weights; options are the fields of :class:`QuantizeConfig`.

    ``onnxq.quantize("m.onnx", "m.q.onnx", bits=2, group_size=64, format="matmulnbits")``
    """
    return quantize_with_summary(model_or_path, output, **options)[0]


def inspect(model_or_path: ModelOrPath) -> InspectReport:
    """Quantizable and quantized layers with shapes, parameters and stored bytes."""
    return inspect_model(_load(model_or_path))


def split_with_report(
    model_or_path: ModelOrPath,
    output: str | os.PathLike | None = None,
    activations: bool = False,
    calibration: object = None,
    seed: int = 0,
) -> tuple[onnx.ModelProto, object]:
    """Like :func:`split`, also returning the cost report."""
    from onnxq.passes.splitquant import split_model

    if activations and calibration is None:
        raise OnnxqError("--activations needs calibration data to place the thresholds; pass --calib data.npz")
    check_output_path(model_or_path, output)
    model, report = split_model(_load(model_or_path), activations=activations, calibration=calibration, seed=seed)
    if output is not None:
        save_model(model, output)
    return model, report


def split(model_or_path: ModelOrPath, output: str | os.PathLike | None = None, **options: object) -> onnx.ModelProto:
    """SplitQuant: each layer (and optionally activation) becomes three k-means branches summed by Add."""
    return split_with_report(model_or_path, output, **options)[0]  # type: ignore[arg-type]

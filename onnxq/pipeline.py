"""The quantize pipeline: in-place passes on one model, then cleanup → toposort → ``onnx.checker``.

    constants → initializers  →  [split (SplitQuant)]  →  quantize  →  [activation QDQ]  →  finish

Calibration data is opened once (:func:`~onnxq.calibration.data.iter_batches`, which also settles the batch
size, batch 1 when the model needs it) and handed to every pass that calibrates.
"""

from __future__ import annotations

import time
from dataclasses import replace

import onnx

from onnxq.calibration.data import iter_batches
from onnxq.config import QuantizeConfig
from onnxq.errors import OnnxqError
from onnxq.ir.index import remove_unused, toposort
from onnxq.ir.model import copy_model, copy_model_without, model_bytes, tensor_nbytes
from onnxq.ir.targets import constants_to_initializers
from onnxq.passes.activation_quant import activation_qdq_in_place
from onnxq.passes.quantize import QuantizeSummary, quantize_in_place
from onnxq.passes.splitquant import split_in_place

STUB_BYTES = 1024  # initializers this large are checked as empty tensors of their type (the checker serializes)


def quantize_pipeline(model: onnx.ModelProto, config: QuantizeConfig) -> QuantizeSummary:
    """Run ``onnxq quantize``'s passes on ``model`` in place; returns the quantize pass's summary (bytes and time
    of the whole pipeline)."""
    config.validate()
    start = time.perf_counter()
    bytes_before = model_bytes(model)
    input_error = checker_error(model)
    constants_to_initializers(model)
    notes: list[str] = []
    if config.needs_calibration:
        batches = iter_batches(config.calibration, config.calib_batch_size, model)
        notes = list(batches.notes)
        config = replace(config, calibration=batches)
    if config.split:
        split_in_place(model, activations=config.split_activations, calibration=config.calibration, seed=config.seed)
    summary = quantize_in_place(model, config)
    if config.act_bits is not None:
        activation_qdq_in_place(model, config.act_bits, config.calibration)
    summary.notes = notes + summary.notes + finish(model, input_error)
    summary.bytes_before = bytes_before
    summary.bytes_after = model_bytes(model)
    summary.seconds = time.perf_counter() - start
    return summary


def quantize_copy(model: onnx.ModelProto, config: QuantizeConfig) -> tuple[onnx.ModelProto, QuantizeSummary]:
    """:func:`quantize_pipeline` on a copy of ``model`` (which is never modified)."""
    quantized = copy_model(model)
    return quantized, quantize_pipeline(quantized, config)


def checker_error(model: onnx.ModelProto) -> str | None:
    """``onnx.checker``'s first line about ``model`` (None when it passes), checked without the weights: initializers
    of ``STUB_BYTES`` or more are stood in for by empty tensors of their type (the checker serializes)."""
    shell = copy_model_without(model, {t.name for t in model.graph.initializer if tensor_nbytes(t) >= STUB_BYTES})
    for tensor in shell.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            del tensor.external_data[:], tensor.dims[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.dims.append(0)
    try:
        onnx.checker.check_model(shell)
    except onnx.checker.ValidationError as exc:
        return str(exc).strip().splitlines()[0][:200]
    return None


def finish(model: onnx.ModelProto, input_error: str | None = None) -> list[str]:
    """Drop what nothing reads, order the nodes, and check the graph; returns notes.

    A model that failed the checker before the passes (``input_error``) is not held to it afterwards (onnxq does
    not repair what it was given); one that passed must still pass, else nothing is written."""
    remove_unused(model)
    toposort(model)
    error = checker_error(model)
    if error is None:
        return []
    if input_error is None:
        raise OnnxqError(f"internal error: the rewritten graph fails onnx.checker ({error}); nothing was written; "
                         "please report it with the model")
    return [f"the input model already fails onnx.checker ({input_error}); the output was not held to it"]

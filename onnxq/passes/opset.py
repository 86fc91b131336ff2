"""Raise a model's default-domain opset in place (DequantizeLinear of 2/4-bit codes needs opset 21+)."""

from __future__ import annotations

import onnx

from onnxq.errors import OnnxqError
from onnxq.ir.model import copy_model_without, opset_version, tensor_nbytes

PLACEHOLDER_BYTES = 1024  # initializers this large are left out of the model ONNX's version converter sees


def convert_opset_in_place(model: onnx.ModelProto, version: int) -> None:
    """Bring ``model`` to default-domain opset ≥ ``version`` (ONNX's version converter when needed).

    The converter serializes the model, so it sees a copy without the large initializers (under 2 GB and fast);
    they are put back afterwards.  IR version is raised to one that carries the new opset's types."""
    current = opset_version(model)
    if current >= version:
        return
    weights = {t.name: t for t in model.graph.initializer if tensor_nbytes(t) >= PLACEHOLDER_BYTES}
    shell = copy_model_without(model, set(weights))
    try:
        converted = onnx.version_converter.convert_version(shell, version)
    except Exception as exc:  # noqa: BLE001 - the converter raises many types
        raise OnnxqError(
            f"qdq format needs opset {version} but the model is opset {current} and ONNX's version converter "
            f"failed ({str(exc).splitlines()[0][:120]}); use --format matmulnbits or fake"
        ) from None
    if converted.ir_version < 10:
        converted.ir_version = 10 if version < 23 else 11
    for tensor in converted.graph.initializer:
        if tensor.name in weights:
            tensor.CopyFrom(weights[tensor.name])
    model.CopyFrom(converted)

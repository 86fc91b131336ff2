"""``onnxq`` format layout: the custom op ``onnxq::MatMulLowBit`` computing ``Y = A·dequant(B)ᵀ (+ bias)``.

Layout (docs/custom_ops.md): B uint8 ``[N, G, ceil(group·bits/8)]`` with codes LSB-first along K and K
padded to ``G·group`` with zero codes; scales and zeros ``[N, G]`` in the activation dtype;
``w = s·q + z`` with ``q`` the unsigned code.  From a :class:`QuantizedWeight`
(``w = s·(q − zp) + float_zeros``): ``z = float_zeros − s·zp`` (computed in float64 from the scale as stored).
Running the op needs the library: :func:`onnxq.custom_ops.session_options`.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.packing import pack_bits
from onnxq.quantized_weight import SUPPORTED_BITS, QuantizedWeight

DOMAIN = "onnxq"
OP_TYPE = "MatMulLowBit"
OPSET_VERSION = 1
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


def lowbit_tensors(weight: QuantizedWeight, dtype: np.dtype | type = np.float32) -> tuple[np.ndarray, ...]:
    """``(B, scales, zeros)`` of the op for ``weight``: ``w = scales·q + zeros`` equals ``weight.dequantize()``."""
    dtype = np.dtype(dtype)
    n, k = weight.shape
    groups = weight.num_groups
    codes = np.zeros((n, groups * weight.group_size), dtype=np.uint8)
    codes[:, :k] = weight.codes
    packed = pack_bits(codes.reshape(n, groups, weight.group_size), weight.bits)
    scales = weight.scales.astype(dtype)
    float_zeros = np.zeros((n, groups)) if weight.float_zeros is None else weight.float_zeros.astype(np.float64)
    zeros = (float_zeros - scales.astype(np.float64) * weight.zero_points.astype(np.float64)).astype(dtype)
    return packed, scales, zeros


def emit_matmul_lowbit(
    input_name: str,
    output_name: str,
    weight: QuantizedWeight,
    bias: np.ndarray | None,
    name_prefix: str,
    dtype: np.dtype | type = np.float32,
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes and initializers computing ``output = input · dequant(weight)ᵀ (+ bias)`` with one MatMulLowBit.

    ``weight`` is ``W[N, K]`` (for a MatMul ``Y = X·B``, ``W = Bᵀ``); ``input`` has any leading dims and
    last dim K; ``output`` has the same leading dims and last dim N.  Initializer names start with
    ``name_prefix``; the model must import the opset ``(DOMAIN, OPSET_VERSION)``.
    """
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32 or float16, got {dtype}")
    if weight.bits not in SUPPORTED_BITS:
        raise ValueError(f"MatMulLowBit supports bits {SUPPORTED_BITS}, got {weight.bits}")
    n = weight.shape[0]
    packed, scales, zeros = lowbit_tensors(weight, dtype)
    initializers = [
        numpy_helper.from_array(packed, f"{name_prefix}_B"),
        numpy_helper.from_array(scales, f"{name_prefix}_scales"),
        numpy_helper.from_array(zeros, f"{name_prefix}_zeros"),
    ]
    inputs = [input_name] + [t.name for t in initializers]
    if bias is not None:
        bias = np.asarray(bias)
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},), got {bias.shape}")
        initializers.append(numpy_helper.from_array(bias.astype(dtype), f"{name_prefix}_bias"))
        inputs.append(initializers[-1].name)
    return [lowbit_node(inputs, output_name, weight, name_prefix)], initializers


def lowbit_node(inputs: list[str], output: str, weight: QuantizedWeight, name: str) -> onnx.NodeProto:
    """The MatMulLowBit node reading ``inputs`` (A, B, scales, zeros[, bias]) for ``weight`` (its K, N, bits and
    group size)."""
    n, k = weight.shape
    return helper.make_node(OP_TYPE, inputs, [output], name=name, domain=DOMAIN, K=k, N=n, bits=weight.bits,
                            group_size=weight.group_size)

"""What every emitter shares: the emit context, initializer helpers, Gemm's alpha and the integer part."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from onnxq.ir.index import NameScope, add_initializer, tensor_types
from onnxq.ir.targets import Target
from onnxq.quantized_weight import QuantizedWeight


@dataclass
class EmitContext:
    """State shared by all emissions into one model."""

    model: onnx.ModelProto
    names: NameScope
    accuracy_level: int = 0
    storage: dict[tuple[str, str], np.dtype] = field(default_factory=dict)  # matrix key → dtype of s and z (fp32)
    cache: dict = field(default_factory=dict)  # artifacts shared between nodes (same weight)
    notes: list[str] = field(default_factory=list)  # what the summary must say (fallbacks, containers)
    _ranks: dict[str, int] | None = None

    def rank(self, tensor: str) -> int:
        """Rank of ``tensor`` from shape inference (run once, on first use); 0 if unknown."""
        if self._ranks is None:
            ranks = tensor_types(self.model).items()
            self._ranks = {name: rank for name, (_, rank) in ranks if rank is not None}
        return self._ranks.get(tensor, 0)

    def param_dtype(self, target: Target) -> np.dtype:
        """How ``target``'s scales and float zeros are stored: float16 in fp16 models, else as chosen (float32 when
        nothing was chosen)."""
        if target.dtype == onnx.TensorProto.FLOAT16:
            return np.dtype(np.float16)
        return np.dtype(self.storage.get(target.matrix_key, np.float32))

    def add_initializer(self, base: str, values: np.ndarray) -> str:
        return add_initializer(self.model, self.names, base, values)

    def add_raw_initializer(self, base: str, data_type: int, dims: tuple[int, ...], raw: bytes) -> str:
        name = self.names.fresh(base)
        self.model.graph.initializer.append(helper.make_tensor(name, data_type, dims, raw, raw=True))
        return name

    def node(self, op_type: str, inputs: list[str], outputs: list[str], base: str, **attrs) -> onnx.NodeProto:
        domain = attrs.pop("domain", "")
        return helper.make_node(op_type, inputs, outputs, name=self.names.fresh(base), domain=domain, **attrs)


@dataclass
class Rewrite:
    """Nodes to insert before the target, and optionally nodes that replace it (``None``: the target stays)."""

    before: list[onnx.NodeProto] = field(default_factory=list)
    replacement: list[onnx.NodeProto] | None = None

    def nodes(self, target_node: onnx.NodeProto) -> list[onnx.NodeProto]:
        """What stands where ``target_node`` stood."""
        return self.before + (self.replacement if self.replacement is not None else [target_node])


def with_input(node: onnx.NodeProto, index: int, name: str) -> onnx.NodeProto:
    """A copy of ``node`` reading ``name`` as input ``index`` (emitters never change the model's nodes)."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.input[index] = name
    return copy


def float_dtype(target: Target) -> np.dtype:
    return np.dtype(np.float16) if target.dtype == onnx.TensorProto.FLOAT16 else np.dtype(np.float32)


def stored_parameter(
    ctx: EmitContext, base: str, values: np.ndarray, dtype: np.dtype, param_dtype: np.dtype
) -> tuple[list[onnx.NodeProto], str]:
    """``values`` as an initializer of ``param_dtype`` read through ``Cast(to=dtype)`` (the activation type the
    consumer needs), or of ``dtype`` itself when the two agree or a value is not exactly representable in
    ``param_dtype`` (storage never changes a value); returns the Cast (or nothing) and the name to read."""
    values = np.asarray(values)
    narrow = values.astype(param_dtype)
    if np.dtype(param_dtype) == np.dtype(dtype) or not np.array_equal(narrow.astype(dtype), values.astype(dtype)):
        return [], ctx.add_initializer(base, values.astype(dtype))
    name = ctx.add_initializer(base, narrow)
    out = ctx.names.fresh(f"{name}_as_{np.dtype(dtype).name}")
    to = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return [ctx.node("Cast", [name], [out], f"{base}_cast", to=to)], out


def scaled(qw: QuantizedWeight, factor: float) -> QuantizedWeight:
    """The same codes with scales and float_zeros multiplied by ``factor`` (Gemm's alpha)."""
    if factor == 1.0:
        return qw
    float_zeros = None if qw.float_zeros is None else (qw.float_zeros * factor).astype(np.float32)
    return QuantizedWeight(qw.codes, (qw.scales * factor).astype(np.float32), qw.zero_points, float_zeros, qw.bits,
                           qw.group_size)


def integer_part(qw: QuantizedWeight) -> QuantizedWeight:
    """``s·(q − zp)`` alone (float_zeros dropped), the part integer formats carry."""
    return QuantizedWeight(qw.codes, qw.scales, qw.zero_points, None, qw.bits, qw.group_size)

"""Target discovery: no quantization math lives here.

A *target* is a MatMul, Gemm or Conv node whose weight is a constant initializer, or (when asked for) a Gather
looking up rows of a constant 2-D table (an embedding).  Every target exposes its weight as the solver matrix
``W[N, K]`` (N outputs, K reduction axis; a table ``T[V, H]`` is ``W = T``: one row per token, groups along the
hidden axis) and knows how to turn such a matrix back into the tensor its node consumes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnxq.ir.index import attribute, node_name, replace_nodes

TARGET_OP_TYPES = ("MatMul", "Gemm", "Conv")  # the default --op-types
LOOKUP_OP_TYPES = ("Gather",)  # quantized when asked for (--op-types MatMul,Gather)
SUPPORTED_OP_TYPES = TARGET_OP_TYPES + LOOKUP_OP_TYPES
UNSUPPORTED_WEIGHT_OPS = ("ConvTranspose",)  # read a constant weight, listed as skipped


FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


@dataclass
class Target:
    """A quantizable node and how its constant weight maps to the solver matrix ``W[N, K]``.

    ``orientation``: ``"nk"`` when the node consumes ``W`` itself, ``"kn"`` when it consumes
    ``Wᵀ``, ``"conv"`` when it consumes ``W.reshape(weight_shape)``.  A Gather target consumes its table
    ``T[V, H]`` as ``W`` (``"nk"``, input 0).
    """

    node: onnx.NodeProto
    node_index: int
    input_index: int  # which input of the node carries the weight
    weight_name: str  # the initializer's name
    orientation: str
    weight_shape: tuple[int, ...]  # the initializer's shape
    through_transpose: bool = False  # the node reads the initializer through a 2-D Transpose
    dtype: int = onnx.TensorProto.FLOAT

    @property
    def name(self) -> str:
        return node_name(self.node)

    @property
    def op_type(self) -> str:
        return self.node.op_type

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(N, K)`` of the solver matrix."""
        if self.orientation == "conv":
            return self.weight_shape[0], int(np.prod(self.weight_shape[1:]))
        rows, cols = self.consumed_shape
        return (rows, cols) if self.orientation == "nk" else (cols, rows)

    @property
    def consumed_shape(self) -> tuple[int, ...]:
        """Shape of the tensor the node consumes (after the optional Transpose)."""
        if self.through_transpose:
            return tuple(reversed(self.weight_shape))
        return self.weight_shape

    def matrix_from_initializer(self, values: np.ndarray) -> np.ndarray:
        """``W[N, K]`` from the initializer's values."""
        consumed = values.T if self.through_transpose else values
        if self.orientation == "conv":
            return consumed.reshape(consumed.shape[0], -1)
        return consumed if self.orientation == "nk" else consumed.T

    def consumed_from_matrix(self, matrix: np.ndarray) -> np.ndarray:
        """The tensor the node consumes, built from ``W[N, K]``."""
        if self.orientation == "conv":
            return matrix.reshape(self.weight_shape)
        return matrix if self.orientation == "nk" else matrix.T

    def initializer_from_matrix(self, matrix: np.ndarray) -> np.ndarray:
        """The initializer's values (before the optional Transpose) from ``W[N, K]``."""
        consumed = self.consumed_from_matrix(matrix)
        return consumed.T if self.through_transpose else consumed

    @property
    def matrix_key(self) -> tuple[str, str]:
        """The initializer and how ``W[N, K]`` is read from it; targets with equal keys see the same matrix.

        A weight read by several nodes in different orientations (``x·W`` and ``W·z``, or MatMul and Gemm with
        ``transB=1``) gives different keys, so each orientation is solved on its own matrix.
        """
        if self.orientation == "conv":
            return self.weight_name, "conv"
        transposed = self.through_transpose != (self.orientation == "kn")
        return self.weight_name, "transposed" if transposed else "as stored"

    @property
    def is_lookup(self) -> bool:
        """Whether the node looks rows up (Gather) instead of multiplying by the weight: no input statistics."""
        return self.op_type in LOOKUP_OP_TYPES

    @property
    def conv_groups(self) -> int:
        """Conv groups (1 for MatMul/Gemm)."""
        return next((a.i for a in self.node.attribute if a.name == "group"), 1) if self.op_type == "Conv" else 1


@dataclass
class Skipped:
    name: str
    op_type: str
    reason: str


@dataclass
class TargetReport:
    targets: list[Target] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def leave_float(report: TargetReport, names: set[str], reason: str) -> None:
    """Move the targets named in ``names`` to the report's skipped list with ``reason``."""
    report.skipped += [Skipped(t.name, t.op_type, reason) for t in report.targets if t.name in names]
    report.targets = [t for t in report.targets if t.name not in names]


def find_targets(
    model: onnx.ModelProto,
    op_types: Iterable[str] = TARGET_OP_TYPES,
    include: str | None = None,
    exclude: str | None = None,
) -> TargetReport:
    """Find every MatMul/Gemm/Conv with a constant weight (and, when ``op_types`` has Gather, every Gather of a
    constant 2-D float table along axis 0 with run-time indices) in the main graph; list the rest as skipped
    (a Gather that reads no constant table is no embedding and is not listed)."""
    op_types = tuple(op_types)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    transposes = {
        n.output[0]: n
        for n in graph.node
        if n.op_type == "Transpose" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2
        and list(attribute(n, "perm", [1, 0])) == [1, 0]
    }
    include_re = re.compile(include) if include else None
    exclude_re = re.compile(exclude) if exclude else None
    report = TargetReport()

    for index, node in enumerate(graph.node):
        if node.op_type not in SUPPORTED_OP_TYPES:
            _note_subgraphs(node, op_types, report)
            if node.op_type in UNSUPPORTED_WEIGHT_OPS and len(node.input) > 1 and node.input[1] in inits:
                report.skipped.append(Skipped(node_name(node), node.op_type,
                                              f"{node.op_type} is not quantized by onnxq (left in float)"))
            continue
        name = node_name(node)
        if node.op_type not in op_types:
            continue
        if include_re and not include_re.search(name):
            continue
        if exclude_re and exclude_re.search(name):
            continue
        target, reason = _classify(node, index, inits, transposes)
        if target is not None:
            report.targets.append(target)
        elif reason:
            report.skipped.append(Skipped(name, node.op_type, reason))
    return report


def _note_subgraphs(node: onnx.NodeProto, op_types: tuple[str, ...], report: TargetReport) -> None:
    for attr in node.attribute:
        subgraphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for sub in subgraphs:
            for inner in sub.node:
                if inner.op_type in op_types and inner.op_type not in LOOKUP_OP_TYPES:
                    report.skipped.append(
                        Skipped(
                            node_name(inner),
                            inner.op_type,
                            f"inside the '{attr.name}' subgraph of {node.op_type} node '{node.name}'; "
                            "subgraphs are left in float",
                        )
                    )
                _note_subgraphs(inner, op_types, report)


def _classify(
    node: onnx.NodeProto, index: int, inits: dict[str, onnx.TensorProto], transposes: dict[str, onnx.NodeProto]
) -> tuple[Target | None, str]:
    """Return the node's Target, or ``None`` and the reason it is skipped (empty: not a candidate at all)."""

    def weight_of(input_name: str) -> tuple[onnx.TensorProto | None, bool]:
        if input_name in inits:
            return inits[input_name], False
        if input_name in transposes:
            return inits[transposes[input_name].input[0]], True
        return None, False

    def make(
        input_index: int, tensor: onnx.TensorProto, through: bool, orientation: str
    ) -> tuple[Target | None, str]:
        if 0 in tensor.dims:
            return None, f"weight '{tensor.name}' is empty (shape {list(tensor.dims)}); nothing to quantize"
        return (
            Target(node, index, input_index, tensor.name, orientation, tuple(tensor.dims), through, tensor.data_type),
            "",
        )

    if node.op_type == "MatMul":
        right, right_t = weight_of(node.input[1])
        left, left_t = weight_of(node.input[0])
        if right is not None and left is not None:
            return None, "both inputs are constant (fold constants first)"
        tensor, through, input_index = (right, right_t, 1) if right is not None else (left, left_t, 0)
        if tensor is None:
            return None, "no constant weight input (activation × activation)"
        if len(tensor.dims) != 2:
            return None, f"weight '{tensor.name}' is {len(tensor.dims)}-D; only 2-D MatMul weights are quantized"
        if tensor.data_type not in FLOAT_TYPES:
            return None, f"weight '{tensor.name}' is not float32/float16"
        # Y = X·B: B is [K, N] → W = Bᵀ; Y = A·X: A is [N, K] → W = A.
        return make(input_index, tensor, through, "kn" if input_index == 1 else "nk")

    if node.op_type == "Gather":
        tensor, through = weight_of(node.input[0])
        if tensor is None or len(tensor.dims) != 2 or tensor.data_type not in FLOAT_TYPES:
            return None, ""  # shape arithmetic, or a lookup in an activation: not an embedding table
        if attribute(node, "axis", 0) not in (0, -2):
            return None, f"Gather along axis {attribute(node, 'axis', 0)}; only row lookups (axis 0) are quantized"
        if node.input[1] in inits:
            return None, "constant indices (fold constants first)"
        return make(0, tensor, through, "nk")

    if node.op_type == "Gemm":
        if attribute(node, "transA", 0):
            return None, "transA=1 is not supported"
        tensor, through = weight_of(node.input[1])
        if tensor is None:
            return None, "input B is not a constant"
        if tensor.data_type not in FLOAT_TYPES:
            return None, f"weight '{tensor.name}' is not float32/float16"
        return make(1, tensor, through, "nk" if attribute(node, "transB", 0) else "kn")

    # Conv
    tensor = inits.get(node.input[1])
    if tensor is None:
        return None, "weight is not a constant initializer"
    if len(tensor.dims) not in (3, 4):
        return None, f"{len(tensor.dims) - 2}-D convolution is not supported (only 1-D and 2-D)"
    if tensor.data_type not in FLOAT_TYPES:
        return None, f"weight '{tensor.name}' is not float32/float16"
    return make(1, tensor, False, "conv")


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Turn main-graph ``Constant`` nodes holding a float tensor of rank ≥ 2 (weights, as some exporters write them)
    into initializers of the same name, so they are found as targets; returns how many were turned."""
    graph = model.graph
    keep, turned = [], 0
    for node in graph.node:
        is_constant = node.op_type == "Constant" and node.domain in ("", "ai.onnx")
        value = attribute(node, "value", None) if is_constant else None
        if value is not None and value.data_type in FLOAT_TYPES and len(value.dims) >= 2:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            turned += 1
        else:
            keep.append(node)
    if turned:
        replace_nodes(graph, keep)
    return turned


def initializer_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    """The numpy value of initializer ``name``."""
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    raise KeyError(name)


def other_readers(model: onnx.ModelProto, target: Target, targets: list[Target]) -> list[str]:
    """Names of the main-graph nodes that read ``target``'s initializer (directly or through a Transpose) and are not
    targets solving the same matrix (those share its quantized weight): after quantizing, they still need the float
    initializer."""
    same = {id(t.node) for t in targets if t.matrix_key == target.matrix_key}
    sources = {target.weight_name}
    sources |= {n.output[0] for n in model.graph.node if n.op_type == "Transpose" and n.input[0] == target.weight_name}
    return [node_name(n) for n in model.graph.node if id(n) not in same and sources & set(n.input)
            and not (n.op_type == "Transpose" and n.input[0] == target.weight_name)]

"""What a quantized layer costs: every stored tensor it uses, and the bits per weight they make.

A quantized layer is a ``com.microsoft::MatMulNBits``, ``onnxq::MatMulLowBit`` or
``com.microsoft::GatherBlockQuantized`` node, or a MatMul/Gemm/Conv/Gather whose weight is a ``DequantizeLinear`` of
constant codes.  The tensors it uses are the initializers behind

* the op's weight inputs (MatMulNBits: ``B``, scales, zero points; MatMulLowBit: ``B``, scales, zeros;
  GatherBlockQuantized: data, scales, zero points, its ``[V, H]`` from the data's bytes and ``bits``), or the
  DequantizeLinear's (codes, scales, zero points), with onnxq's Conv float-zero DequantizeLinear (its ``z`` and the
  ``ConstantOfShape`` shape, or onnxq 0.1.0's stored zero codes) and the Reshape's shape;
* onnxq's exact float-zero term after the product, ``Add(Y, MatMul(S, Zᵀ))`` (or ``Z·S``,
  :mod:`onnxq.formats.float_zero`): ``Z`` and the constants of the group sums ``S`` of the activation, the
  ``ReduceSum(Reshape(Pad?(A)))`` chain's (axes, shape, pads) or the group indicator ``E`` of ``S = A·E``;

each reached through ``Identity``, ``Cast``, ``Transpose`` and ``Reshape`` nodes, so a float16 tensor cast to float32
counts its float16 bytes.  A bias is not counted (the float model stores it too).  A tensor shared by ``m`` layers (the
group sums' constants of one activation, a weight read in two orientations) counts ``1/m`` of its bytes in each, so
the layers' bytes add up to the bytes of the tensors they use.  Bits per weight of a set of layers:
``8 · Σ bytes / Σ N·K``.  Reads shapes and types only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx

from onnxq.ir.index import attribute
from onnxq.ir.model import tensor_nbytes

FUSED_OPS = {("com.microsoft", "MatMulNBits"): (1, 2, 3), ("onnxq", "MatMulLowBit"): (1, 2, 3),
             ("com.microsoft", "GatherBlockQuantized"): (0, 2, 3)}  # weight inputs
PASS_THROUGH = ("Identity", "Cast", "Transpose", "Reshape")
DQ_READERS = ("MatMul", "Gemm", "Conv", "Gather")


@dataclass(frozen=True)
class QuantizedLayer:
    """One quantized layer: its node's name and op (``MatMul+DQ`` for DequantizeLinear-fed ones), ``(N, K)``, the
    initializers it uses and its share of their bytes."""

    name: str
    op_type: str
    shape: tuple[int, int]
    tensors: tuple[str, ...]
    bytes: float

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.params if self.params else 0.0


def bits_per_weight(layers: Iterable[QuantizedLayer]) -> float:
    """``8 · Σ bytes / Σ N·K`` over ``layers`` (0 for none)."""
    layers = list(layers)
    params = sum(layer.params for layer in layers)
    return 8 * sum(layer.bytes for layer in layers) / params if params else 0.0


class _Graph:
    """Producers, consumers and initializers of a main graph (structure only)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.inits = {t.name: t for t in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)

    def constant(self, name: str) -> str | None:
        """The initializer behind ``name`` through Identity/Cast/Transpose (None: not a constant)."""
        for _ in range(8):
            if name in self.inits:
                return name
            node = self.producer.get(name)
            if node is None or node.op_type not in PASS_THROUGH or not node.input:
                return None
            name = node.input[0]
        return None

    def produced_by(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        readers = self.consumers.get(name, [])
        return readers[0] if len(readers) == 1 else None

    def constants_of(self, node: onnx.NodeProto) -> list[str]:
        """The constants ``node`` reads (see :meth:`constant`), in input order."""
        return [c for c in map(self.constant, node.input) if c is not None]

    def float_zero_tensors(self, output: str, shape: tuple[int, int]) -> list[str]:
        """The tensors of onnxq's float-zero term added to ``output`` (through a Transpose), else nothing: the other
        operand of the Add is ``MatMul`` of a constant ``Z`` (``[G, N]`` or ``[N, G]``, ``G < K``) and the group
        sums (:meth:`group_sums_tensors`)."""
        n, k = shape
        current, reader = output, self.only_consumer(output)
        if reader is not None and reader.op_type == "Transpose":
            current, reader = reader.output[0], self.only_consumer(reader.output[0])
        if reader is None or reader.op_type != "Add" or len(reader.input) != 2 or current not in reader.input:
            return []
        term = self.produced_by(reader.input[1] if reader.input[0] == current else reader.input[0], "MatMul")
        if term is None:
            return []
        constants = self.constants_of(term)
        sums = [name for name in term.input if self.constant(name) is None]
        if len(constants) != 1 or len(sums) != 1:
            return []
        z_dims = list(self.inits[constants[0]].dims)
        if len(z_dims) != 2 or n not in z_dims or z_dims[1 - z_dims.index(n)] >= k:
            return []
        found = self.group_sums_tensors(sums[0], k, z_dims[1 - z_dims.index(n)])
        return [] if found is None else [constants[0], *found]

    def group_sums_tensors(self, sums: str, k: int, groups: int) -> list[str] | None:
        """The constants of onnxq's group sums at ``sums`` (None: not one): the indicator ``E`` (``[K, G]`` or
        ``[G, K]``) of ``MatMul(A, E)``, or the axes, shape and pads of ``ReduceSum(Reshape(Pad?(A)))``."""
        node = self.producer.get(sums)
        if node is not None and node.op_type == "MatMul":
            found = self.constants_of(node)
            dims = list(self.inits[found[0]].dims) if len(found) == 1 else []
            return found if sorted(dims) == sorted([k, groups]) else None
        if node is None or node.op_type != "ReduceSum":
            return None
        found = self.constants_of(node)
        reshape = self.produced_by(node.input[0], "Reshape")
        if reshape is None or len(reshape.input) < 2 or self.constant(reshape.input[1]) is None:
            return None
        found += self.constants_of(reshape)
        pad = self.produced_by(reshape.input[0], "Pad")
        return found + (self.constants_of(pad) if pad is not None else [])


def _dequantize_source(graph: _Graph, name: str) -> tuple[onnx.NodeProto | None, list[str]]:
    """The weight DequantizeLinear behind a MatMul/Gemm/Conv input (through Reshape/Transpose and onnxq's Conv
    float-zero Add) and the constant tensors of that chain; ``(None, [])`` when the input is not one."""
    tensors: list[str] = []
    node = graph.producer.get(name)
    for _ in range(4):
        if node is None:
            return None, []
        if node.op_type == "DequantizeLinear":
            break
        if node.op_type == "Add" and len(node.input) == 2:
            partner = graph.produced_by(node.input[1], "DequantizeLinear")
            if partner is not None:
                ones = graph.produced_by(partner.input[0], "ConstantOfShape")
                tensors += graph.constants_of(partner) + (graph.constants_of(ones) if ones is not None else [])
        elif node.op_type == "Reshape" and len(node.input) > 1 and graph.constant(node.input[1]):
            tensors.append(graph.constant(node.input[1]))
        elif node.op_type not in ("Transpose", "Reshape"):
            return None, []
        node = graph.producer.get(node.input[0])
    if node is None or node.op_type != "DequantizeLinear" or graph.constant(node.input[0]) is None:
        return None, []
    return node, graph.constants_of(node) + tensors


def _matrix_shape(node: onnx.NodeProto, slot: int, dims: list[int]) -> tuple[int, int] | None:
    """``(N, K)`` of a DequantizeLinear-fed weight of ``dims`` read as input ``slot`` of ``node``; None when it is
    not a matrix."""
    if node.op_type == "Conv":  # codes as the Conv weight, or flat [N, K] (onnxq's, reshaped after)
        return (dims[0], int(np.prod(dims[1:]))) if len(dims) >= 2 else None
    if len(dims) != 2:
        return None
    if node.op_type == "Gather":  # the table T[V, H] is W
        return dims[0], dims[1]
    k_first = slot == 1 if node.op_type == "MatMul" else not attribute(node, "transB", 0)
    return (dims[1], dims[0]) if k_first else (dims[0], dims[1])


def quantized_layers(model: onnx.ModelProto) -> list[QuantizedLayer]:
    """Every quantized layer of the main graph in node order, with the tensors it uses and its share of their
    bytes (see the module docstring); malformed nodes are passed over."""
    graph = _Graph(model)
    found: list[tuple[str, str, tuple[int, int], list[str]]] = []
    for node in model.graph.node:
        name = node.name or (node.output[0] if node.output else node.op_type)
        inputs = FUSED_OPS.get((node.domain, node.op_type))
        if inputs is not None:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            tensors = [graph.constant(node.input[i]) for i in inputs if i < len(node.input) and node.input[i]]
            if node.op_type == "GatherBlockQuantized" and tensors and tensors[0]:
                dims = list(graph.inits[tensors[0]].dims)  # [V, H·c/8] (or MatMulNBits' B of a shared table)
                attrs.setdefault("N", dims[0])
                attrs.setdefault("K", int(np.prod(dims[1:])) * 8 // int(attrs.get("bits", 4)))
            if "N" not in attrs or "K" not in attrs:
                continue
            shape = (int(attrs["N"]), int(attrs["K"]))
            tensors += graph.float_zero_tensors(node.output[0], shape)
            found.append((name, node.op_type, shape, [t for t in tensors if t]))
        elif node.op_type in DQ_READERS and len(node.input) > 1:
            for slot in {"MatMul": (1, 0), "Gather": (0,)}.get(node.op_type, (1,)):
                dequantize, tensors = _dequantize_source(graph, node.input[slot])
                if dequantize is not None:
                    break
            if dequantize is None:
                continue
            shape = _matrix_shape(node, slot, list(graph.inits[graph.constant(dequantize.input[0])].dims))
            if shape is None:
                continue
            tensors += graph.float_zero_tensors(node.output[0], shape)
            found.append((name, node.op_type + "+DQ", shape, tensors))
    users: dict[str, int] = {}
    for *_, tensors in found:
        for tensor in set(tensors):
            users[tensor] = users.get(tensor, 0) + 1
    return [QuantizedLayer(name, op_type, shape, tuple(dict.fromkeys(tensors)),
                           sum(tensor_nbytes(graph.inits[t]) / users[t] for t in set(tensors)))
            for name, op_type, shape, tensors in found]

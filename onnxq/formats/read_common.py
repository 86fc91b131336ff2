"""What the readers of quantized layers share: the layer record, a graph view, the float-zero term, regrouping.

A reader turns one quantized layer back into a float node reading a placeholder weight ``W`` and the
:class:`QuantizedWeight` of ``W[N, K]``, such that ``qw.dequantize()`` is the weight the layer computes with
(``s·(q − zp) + z`` exactly as the stored values give it).  Emitting ``qw`` for the rebuilt node then rewrites
the layer in any format without solving again (:mod:`onnxq.passes.convert`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.errors import OnnxqError
from onnxq.formats.float_zero import group_axes, group_indicator
from onnxq.ir.index import attribute, node_name
from onnxq.quantized_weight import QuantizedWeight, expand_groups, num_groups


@dataclass
class ReadLayer:
    """One quantized layer read back.

    ``float_node`` stands where the node at ``node_index`` stood and reads the placeholder weight
    ``weight_name`` (shape ``weight_shape``, ONNX type ``dtype``), whose solver matrix ``W[N, K]`` is ``qw``;
    ``absorbed`` are the indices of the other nodes the layer's quantized form used (DequantizeLinear, the
    float-zero term), dropped with it when nothing else reads them; ``param_dtype`` is float16 when the layer
    stores a scale or float-zero tensor in float16 in an fp32 model (the convert pass keeps that storage);
    ``before`` are nodes put before ``float_node`` (a lookup's Transpose of a shared table).
    """

    node_index: int
    float_node: onnx.NodeProto
    weight_name: str
    weight_shape: tuple[int, ...]
    dtype: int
    qw: QuantizedWeight
    absorbed: list[int] = field(default_factory=list)
    param_dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))  # storage of s and z (fp32 models)
    before: list[onnx.NodeProto] = field(default_factory=list)


class GraphView:
    """Producers, consumers and initializers of a main graph (read-only lookups for the readers)."""

    def __init__(self, model: onnx.ModelProto, ranks: dict[str, int] | None = None) -> None:
        graph = model.graph
        self.model = model
        self.ranks = ranks or {}  # tensor ranks where shape inference knows them
        self.nodes = list(graph.node)
        self.inits = {t.name: t for t in graph.initializer}
        self.producer = {o: i for i, n in enumerate(self.nodes) for o in n.output if o}
        self.consumers: dict[str, list[int]] = {}
        for index, node in enumerate(self.nodes):
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(index)
        self.outputs = {o.name for o in graph.output}

    def array(self, name: str) -> np.ndarray | None:
        """The constant ``name`` as stored (None when it is not one): an initializer, or one read through
        ``Identity`` or an exact widening ``Cast`` (float16 → float32, how onnxq feeds float16-stored scales and
        zeros to fp32 models), whose stored array (e.g. float16) is returned."""
        source = self.stored_name(name)
        tensor = None if source is None else self.inits.get(source)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def read_type(self, name: str) -> np.dtype | None:
        """The numpy dtype consumers of ``name`` read (a Cast's target, else the initializer's type)."""
        index = self.producer.get(name)
        if index is not None and self.nodes[index].op_type == "Cast":
            return np.dtype(helper.tensor_dtype_to_np_dtype(int(attribute(self.nodes[index], "to", 0))))
        if index is not None and self.nodes[index].op_type == "Identity":
            return self.read_type(self.nodes[index].input[0])
        tensor = self.inits.get(name)
        return None if tensor is None else np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))

    def stored_name(self, name: str) -> str | None:
        """The initializer behind ``name`` through Identity and float16 → float32 Casts (None: there is none)."""
        for _ in range(4):
            if name in self.inits:
                return name
            index = self.producer.get(name)
            node = None if index is None else self.nodes[index]
            if node is None or node.domain not in ("", "ai.onnx") or not node.input:
                return None
            if node.op_type == "Cast":
                source = self.inits.get(node.input[0])
                if source is None or source.data_type != onnx.TensorProto.FLOAT16 or \
                        int(attribute(node, "to", 0)) != onnx.TensorProto.FLOAT:
                    return None
            elif node.op_type != "Identity":
                return None
            name = node.input[0]
        return None

    def produced_by(self, name: str, op_type: str) -> int | None:
        """Index of the default-domain ``op_type`` node producing ``name`` (None otherwise)."""
        index = self.producer.get(name)
        if index is None or self.nodes[index].op_type != op_type or self.nodes[index].domain not in ("", "ai.onnx"):
            return None
        return index

    def only_consumer(self, name: str) -> int | None:
        """The one node reading ``name`` when it is not also a graph output (None otherwise)."""
        readers = self.consumers.get(name, [])
        return readers[0] if len(readers) == 1 and name not in self.outputs else None


def refuse(node: onnx.NodeProto, reason: str) -> OnnxqError:
    """The one-line error for a quantized layer that cannot be read."""
    return OnnxqError(f"{node.op_type} node '{node_name(node)}': {reason}; nothing was written")


@dataclass
class FloatZeroTerm:
    """onnxq's exact float-zero term ``S·Zᵀ`` (or ``Z·S``) added to a product (:mod:`onnxq.formats.float_zero`)."""

    float_zeros: np.ndarray  # [N, G] as stored (float32 or float16)
    group_size: int
    output: str  # what the Add wrote: the layer's real output
    nodes: list[int]  # the Add and the term's MatMul (the shared group sums are dropped when unused)


def find_float_zero_term(view: GraphView, product: str, activation: str, k: int, n: int,
                         left: bool) -> FloatZeroTerm | None:
    """The float-zero term onnxq added to ``product`` (see :func:`onnxq.formats.float_zero.float_zero_correction`):
    ``Add(product, MatMul(S, Zᵀ))`` (left products: ``MatMul(Z, S)``) with ``S`` onnxq's group sums of
    ``activation`` in either form (:func:`group_sums_group_size`).  None when ``product`` is not followed by one."""
    add = view.only_consumer(product)
    if add is None or view.nodes[add].op_type != "Add" or view.nodes[add].domain not in ("", "ai.onnx"):
        return None
    add_node = view.nodes[add]
    other = add_node.input[1] if add_node.input[0] == product else add_node.input[0]
    term = view.produced_by(other, "MatMul")
    if term is None:
        return None
    sums_name, zeros_name = view.nodes[term].input[::-1] if left else view.nodes[term].input
    zeros = view.array(zeros_name)
    if zeros is None or zeros.ndim != 2:
        return None
    zeros = zeros if left else zeros.T
    groups = zeros.shape[1]
    group_size = group_sums_group_size(view, sums_name, activation, k, groups, left)
    if group_size is None or zeros.shape[0] != n:
        return None
    return FloatZeroTerm(zeros, group_size, add_node.output[0], [add, term])


def group_sums_group_size(view: GraphView, sums: str, activation: str, k: int, groups: int,
                          left: bool) -> int | None:
    """The group size of ``sums`` when it is onnxq's sums of ``activation`` over ``groups`` groups of K (None
    otherwise), in either form: ``ReduceSum(Reshape(Pad?(A)))`` (:mod:`onnxq.formats.float_zero`) or, as onnxq
    0.1.0 wrote it, ``MatMul(A, E)`` (left: ``MatMul(Eᵀ, X)``) with the group indicator ``E[K, G]``."""
    if view.produced_by(sums, "MatMul") is not None:
        indicator_name, source = view.nodes[view.producer[sums]].input
        if not left:
            indicator_name, source = source, indicator_name
        indicator = view.array(indicator_name)
        if source != activation or indicator is None or indicator.shape != ((groups, k) if left else (k, groups)):
            return None
        group_size = int(np.count_nonzero(indicator[0] if left else indicator[:, 0]))
        if group_size < 1 or num_groups(k, group_size) != groups:
            return None
        expected = group_indicator(k, group_size, np.dtype(np.float64))
        return group_size if np.array_equal(indicator.T if left else indicator, expected) else None
    return _reduced_group_size(view, sums, activation, k, groups, left)


def _reduced_group_size(view: GraphView, sums: str, activation: str, k: int, groups: int,
                        left: bool) -> int | None:
    """The group size of ``ReduceSum(Reshape(Pad?(activation), [0,…,0, G, group(, −1)]), axes=[group axis],
    keepdims=0)`` with zeros padded onto K alone, exactly up to ``G·group`` (None when ``sums`` is not that)."""
    reduce = view.produced_by(sums, "ReduceSum")
    reshape = None if reduce is None else view.produced_by(view.nodes[reduce].input[0], "Reshape")
    if reshape is None or attribute(view.nodes[reduce], "keepdims", 1) != 0 or \
            attribute(view.nodes[reshape], "allowzero", 0) != 0:
        return None
    shape = view.array(view.nodes[reshape].input[1])
    axes = _ints(view, view.nodes[reduce], "axes", 1)
    if shape is None or shape.ndim != 1 or len(shape) < 2 or axes is None or len(axes) != 1:
        return None
    shape = [int(d) for d in shape]
    trailing = [-1] if left and shape[-1] == -1 else []
    axis = len(shape) - 2 - len(trailing)  # the K axis of the activation
    rank = axis + 1 + len(trailing)
    expected = group_axes(rank, left)
    if expected is None or expected != (axis, trailing) or shape[:axis] != [0] * axis or shape[axis] != groups \
            or axes[0] % len(shape) != axis + 1 or left and not trailing and view.ranks.get(activation) != 1:
        return None
    group_size = shape[axis + 1]
    if group_size < 1 or num_groups(k, group_size) != groups:
        return None
    source = view.nodes[reshape].input[0]
    pad = view.produced_by(source, "Pad")
    if pad is not None:
        node = view.nodes[pad]
        pads = _ints(view, node, "pads", 1)
        wanted = [0] * (2 * rank)
        wanted[rank + axis] = groups * group_size - k
        value = view.array(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(())
        if pads != wanted or attribute(node, "mode", b"constant") not in (b"constant", "constant") or \
                value is None or np.any(value != 0) or attribute(node, "value", 0.0) != 0 or \
                len(node.input) > 3 and node.input[3]:
            return None
        source = node.input[0]
    elif groups * group_size != k:
        return None
    return group_size if source == activation else None


def _ints(view: GraphView, node: onnx.NodeProto, name: str, index: int) -> list[int] | None:
    """An int list given as attribute ``name`` or as constant input ``index`` (None when neither)."""
    if len(node.input) > index and node.input[index]:
        values = view.array(node.input[index])
        return None if values is None else [int(v) for v in values.reshape(-1)]
    values = attribute(node, name, None)
    return None if values is None else [int(v) for v in values]


def regroup_to(qw: QuantizedWeight, group_size: int, float_zeros: np.ndarray | None = None) -> QuantizedWeight:
    """``qw`` with its parameters read per groups of ``group_size`` when each such group holds one scale and zero
    point (stored formats may repeat them over smaller blocks), else as it is; ``float_zeros`` (``[N, G]`` in groups
    of ``group_size``) are added in whichever grouping results.  Dequantizes to the same values either way."""
    coarse = _coarsen(qw, group_size) or qw
    if float_zeros is None:
        return coarse
    k = qw.shape[1]
    per_column = expand_groups(float_zeros, k, min(group_size, k))
    grouped = np.ascontiguousarray(per_column[:, ::coarse.group_size])
    if not np.array_equal(expand_groups(grouped, k, coarse.group_size), per_column):
        raise ValueError("float zeros do not fit the weight's groups")
    return QuantizedWeight(coarse.codes, coarse.scales, coarse.zero_points, grouped, coarse.bits, coarse.group_size)


def _coarsen(qw: QuantizedWeight, group_size: int) -> QuantizedWeight | None:
    """``qw`` with groups of ``group_size`` (a multiple of its own, or ≥ K), None if parameters differ inside one."""
    k = qw.shape[1]
    group_size = min(group_size, k)
    if group_size == qw.group_size:
        return qw
    if group_size < qw.group_size or (group_size % qw.group_size and group_size != k):
        return None
    starts = np.arange(0, k, group_size) // qw.group_size
    params = [qw.scales, qw.zero_points] + ([qw.float_zeros] if qw.float_zeros is not None else [])
    coarse = [p[:, starts] for p in params]
    for fine, grouped in zip(params, coarse, strict=True):
        if not np.array_equal(expand_groups(grouped, k, group_size), expand_groups(fine, k, qw.group_size)):
            return None
    float_zeros = coarse[2] if len(coarse) > 2 else None
    return QuantizedWeight(qw.codes, coarse[0], coarse[1], float_zeros, qw.bits, group_size)


def narrowest_bits(codes: np.ndarray, zero_points: np.ndarray, container: int, hint: int | None) -> int:
    """The bits of codes stored in a ``container``-bit field: ``hint`` (the metadata's) when every code and zero
    point fits in it, else the container's."""
    if hint is not None and hint < container:
        top = max(int(codes.max(initial=0)), int(zero_points.max(initial=0)))
        if top < 1 << hint:
            return hint
    return container

"""Readers of the fused quantized products ``com.microsoft::MatMulNBits`` and ``onnxq::MatMulLowBit``.

MatMulNBits (any producer, same layout as :mod:`onnxq.formats.matmulnbits`): B ``[N, ⌈K/block⌉, block·bits/8]``
LSB-first codes, scales ``[N, ⌈K/block⌉]`` (or flat), uint8 zero points packed along the blocks (absent:
``2^(bits−1)``), optional bias; ``w = s·(q − zp)``.  onnxq's float-zero term ``(A·E)·Zᵀ`` after it is absorbed,
so ``w = s·(q − zp) + z`` comes back.  MatMulLowBit (:mod:`onnxq.formats.lowbit_layout`): ``w = s·q + z``, read as
integer zero points ``zp = −z/s`` when every group's ``z`` is exactly what onnxq writes for one, else as
``zp = 0`` and float zeros ``z`` (exact either way: the stored ``z`` is given back as it is).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnxq.formats.read_common import (
    GraphView,
    ReadLayer,
    find_float_zero_term,
    narrowest_bits,
    refuse,
    regroup_to,
)
from onnxq.ir.index import attribute, node_name
from onnxq.packing import unpack_bits
from onnxq.quantized_weight import QuantizedWeight

PLACEHOLDER = "\x00onnxq_convert_weight:"  # input names stood in for until the pass names the placeholders


@dataclass(frozen=True)
class ReadHints:
    """What the model's onnxq metadata says (None: nothing): bits (3-bit codes sit in 4-bit containers), the
    group size asked for (blocks repeating one group's parameters are merged back), and whether onnxq made it."""

    bits: int | None = None
    group_size: int | None = None
    onnxq_made: bool = False

    def group_size_for(self, k: int) -> int | None:
        if self.group_size is None:
            return None
        return k if self.group_size == -1 or self.group_size >= k else self.group_size


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _input(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


def read_matmulnbits(view: GraphView, index: int, hints: ReadHints) -> ReadLayer:
    """The layer of the MatMulNBits node at ``index`` (see the module docstring)."""
    node = view.nodes[index]
    attrs = _attrs(node)
    k, n, container, block = (int(attrs.get(key, 0)) for key in ("K", "N", "bits", "block_size"))
    packed, scales = view.array(_input(node, 1)), view.array(_input(node, 2))
    if packed is None or scales is None:
        raise refuse(node, "its weight or scales are not initializers")
    if _input(node, 4):
        raise refuse(node, "g_idx (act-order) MatMulNBits is not supported")
    if container not in (2, 4, 8) or block < 16 or k < 1 or n < 1:
        raise refuse(node, f"unsupported attributes bits={container} block_size={block} K={k} N={n}")
    blocks = -(-k // block)
    if packed.dtype != np.uint8 or packed.size != n * blocks * block * container // 8 or scales.size != n * blocks:
        raise refuse(node, "B or scales do not have the MatMulNBits layout")
    codes = unpack_bits(packed.reshape(n, blocks, -1), container, block).reshape(n, -1)[:, :k]
    zp_name = _input(node, 3)
    if zp_name:
        packed_zp = view.array(zp_name)
        if packed_zp is None or packed_zp.dtype != np.uint8:
            raise refuse(node, "float or non-constant zero points are not supported")
        zero_points = unpack_bits(packed_zp.reshape(n, -1), container, blocks)
    else:
        zero_points = np.full((n, blocks), 1 << (container - 1), dtype=np.uint8)
    bits = narrowest_bits(codes, zero_points, container, hints.bits)
    qw = QuantizedWeight(codes, scales.reshape(n, blocks).astype(np.float32), zero_points, None, bits, block)
    return _product_layer(view, index, qw, _input(node, 2), [scales.dtype], _input(node, 5), "_MatMulNBits", "_nbits",
                          hints)


def read_lowbit(view: GraphView, index: int, hints: ReadHints) -> ReadLayer:
    """The layer of the MatMulLowBit node at ``index`` (see the module docstring)."""
    node = view.nodes[index]
    attrs = _attrs(node)
    k, n, bits, group = (int(attrs.get(key, 0)) for key in ("K", "N", "bits", "group_size"))
    packed, scales, zeros = (view.array(_input(node, i)) for i in (1, 2, 3))
    if packed is None or scales is None or zeros is None:
        raise refuse(node, "its weight, scales or zeros are not initializers")
    groups = -(-k // max(group, 1))
    if group < 1 or scales.shape != (n, groups) or zeros.shape != (n, groups) or packed.shape[:2] != (n, groups):
        raise refuse(node, "B, scales or zeros do not have the MatMulLowBit layout")
    codes = unpack_bits(packed, bits, group).reshape(n, -1)[:, :k]
    zero_points, float_zeros = integer_zero_points(scales, zeros, bits)
    qw = QuantizedWeight(codes, scales.astype(np.float32), zero_points, float_zeros, bits, group)
    return _product_layer(view, index, qw, _input(node, 2), [scales.dtype, zeros.dtype], _input(node, 4),
                          "_MatMulLowBit", "_lowbit", hints)


def integer_zero_points(scales: np.ndarray, zeros: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``(zp, None)`` with ``z = −s·zp`` exactly as stored (how onnxq writes integer zero points), else
    ``(0, z)``: the float zeros are the stored zeros themselves."""
    s = scales.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        zp = np.where(s != 0, np.rint(-zeros.astype(np.float64) / np.where(s != 0, s, 1)), 0)
    if np.all((zp >= 0) & (zp < 1 << bits)):
        rebuilt = (np.zeros_like(s) - s * zp).astype(zeros.dtype)
        if np.array_equal(rebuilt.view(np.uint8), zeros.view(np.uint8)):
            return zp.astype(np.uint8), None
    return np.zeros(zeros.shape, dtype=np.uint8), zeros.astype(np.float32)


def _product_layer(view: GraphView, index: int, qw: QuantizedWeight, scales_name: str, stored: list[np.dtype],
                   bias: str, op_suffix: str, weight_suffix: str, hints: ReadHints) -> ReadLayer:
    """The float node standing for the fused product ``Y = A·Wᵀ (+ bias)`` at ``index``: ``Gemm(A, W, bias,
    transB=1)`` with a bias (when onnxq made it, which only fuses a bias from a Gemm, or A is known 2-D),
    ``MatMul(W, X)`` for a left product (:func:`_left_product`), else ``MatMul(A, Wᵀ)``; onnxq's float-zero term
    after it is absorbed into ``qw``.  The activation type is the one
    the op reads its scales (``scales_name``) in; ``stored`` are the dtypes its parameters are stored in."""
    node = view.nodes[index]
    dtype = view.read_type(scales_name)
    n, k = qw.shape
    activation, output = node.input[0], node.output[0]
    absorbed: list[int] = []
    left = None if bias else _left_product(view, index)
    if left is not None:
        activation, output, absorbed = left
    term = find_float_zero_term(view, output, activation, k, n, left=left is not None)
    group_size = hints.group_size_for(k) or qw.group_size
    if term is not None:
        try:
            qw = regroup_to(qw, term.group_size, term.float_zeros.astype(np.float32))
        except ValueError:
            raise refuse(node, "its float-zero term does not fit its blocks") from None
        output, absorbed = term.output, absorbed + term.nodes
        stored = [*stored, term.float_zeros.dtype]
    else:
        qw = regroup_to(qw, group_size)
    name = node_name(node).removesuffix(op_suffix) if node.name.endswith(op_suffix) else node_name(node)
    if any(other.name == name for i, other in enumerate(view.nodes) if i != index):
        name = node_name(node)
    weight_base = (view.stored_name(node.input[1]) or node.input[1]).removesuffix(weight_suffix)
    tensor_type = onnx.TensorProto.FLOAT16 if dtype == np.float16 else onnx.TensorProto.FLOAT
    gemm = bool(bias) and (hints.onnxq_made or view.ranks.get(activation) == 2)
    if left is not None:
        token = f"{PLACEHOLDER}{weight_base}\x00nk"
        float_node = helper.make_node("MatMul", [token, activation], [output], name=name)
        shape = (n, k)
    elif gemm:
        token = f"{PLACEHOLDER}{weight_base}\x00nk"
        float_node = helper.make_node("Gemm", [activation, token, bias], [output], name=name, transB=1)
        shape: tuple[int, ...] = (n, k)
    elif bias:
        raise refuse(node, "a bias on an activation not known to be 2-D (cannot be rebuilt as Gemm)")
    else:
        token = f"{PLACEHOLDER}{weight_base}\x00kn"
        float_node = helper.make_node("MatMul", [activation, token], [output], name=name)
        shape = (k, n)
    param_dtype = np.dtype(np.float16 if np.dtype(np.float16) in stored else np.float32)
    return ReadLayer(index, float_node, token, shape, tensor_type, qw, absorbed, param_dtype)


def _left_product(view: GraphView, index: int) -> tuple[str, str, list[int]] | None:
    """``(X, Y, the two Transposes)`` when the fused op at ``index`` computes a left product ``Y = W·X`` as onnxq
    writes one, ``Yᵀ = Xᵀ·Wᵀ``: ``Transpose(op(Transpose(X)))``, both swapping the last two axes and read by nothing
    else (None otherwise)."""
    node = view.nodes[index]
    first = view.produced_by(node.input[0], "Transpose")
    last = view.only_consumer(node.output[0])
    if first is None or last is None or view.nodes[last].op_type != "Transpose" or \
            view.only_consumer(node.input[0]) != index:
        return None
    perms = [list(attribute(view.nodes[i], "perm", [])) for i in (first, last)]
    rank = len(perms[0])
    if rank < 2 or perms != [list(range(rank - 2)) + [rank - 1, rank - 2]] * 2:
        return None
    return view.nodes[first].input[0], view.nodes[last].output[0], [first, last]

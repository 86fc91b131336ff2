"""Which Hessian a target reads: layers that read one tensor with one unfolding share a key, and its H."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from onnxq.ir.index import attribute
from onnxq.ir.targets import Target
from onnxq.stats.unfold import Unfolding

HessianKey = tuple


def unfolding(target: Target) -> Unfolding:
    """The activation tensor of ``target`` and how it is unfolded into rows."""
    node = target.node
    k = target.matrix_shape[1]
    if target.op_type == "Conv":
        kernel = tuple(int(v) for v in target.weight_shape[2:])
        spatial = len(kernel)
        auto_pad = attribute(node, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        pads = tuple(int(v) for v in attribute(node, "pads", [0] * 2 * spatial)) if auto_pad == "NOTSET" else ()
        return Unfolding(
            tensor=node.input[0],
            kind="conv",
            size=k,
            groups=int(attribute(node, "group", 1)),
            kernel=kernel,
            strides=tuple(int(v) for v in attribute(node, "strides", [1] * spatial)),
            pads=pads,
            dilations=tuple(int(v) for v in attribute(node, "dilations", [1] * spatial)),
            auto_pad=auto_pad,
        )
    if target.op_type == "MatMul" and target.input_index == 0:
        return Unfolding(tensor=node.input[1], kind="columns", size=k)
    return Unfolding(tensor=node.input[0], kind="rows", size=k)


def hessian_key(target: Target) -> HessianKey:
    """Key of the Hessian a target reads: equal for layers reading one tensor with one unfolding.

    MatMul ``X·B``/Gemm: ``(tensor, "rows")``; MatMul ``A·X``: ``(tensor, "columns")``; Conv:
    ``(tensor, "conv", kernel, strides, pads or auto_pad, dilations, groups)``.
    """
    u = unfolding(target)
    if u.kind == "conv":
        return (u.tensor, "conv", u.kernel, u.strides, u.pads or u.auto_pad, u.dilations, u.groups)
    return (u.tensor, u.kind)


def plan_keys(targets: Iterable[Target]) -> dict[HessianKey, Unfolding]:
    """Distinct Hessian keys of ``targets`` in graph order, each with its unfolding."""
    keys: dict[HessianKey, Unfolding] = {}
    for target in sorted(targets, key=lambda t: t.node_index):
        keys.setdefault(hessian_key(target), unfolding(target))
    return keys


def keys_by_tensor(units: Mapping[HessianKey, Unfolding]) -> dict[str, list[HessianKey]]:
    users: dict[str, list[HessianKey]] = {}
    for key, unit in units.items():
        users.setdefault(unit.tensor, []).append(key)
    return users

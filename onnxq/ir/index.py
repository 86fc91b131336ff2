"""What a graph reads and writes: fresh names, attribute values, reads through subgraphs, topological order and
cleanup of what nobody reads."""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from onnxq.errors import OnnxqError
from onnxq.ir.model import copy_model_without, tensor_nbytes


def attribute(node: onnx.NodeProto, name: str, default: object) -> object:
    """The value of ``node``'s attribute ``name`` (``default`` when it is absent)."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class NameScope:
    """Hands out tensor/node names that do not clash with any name already in the graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.used: set[str] = {t.name for t in g.initializer} | {v.name for v in g.input} | {n.name for n in g.node}
        self.used |= {o for n in g.node for o in n.output} | {v.name for v in g.output}

    def fresh(self, base: str) -> str:
        base = re.sub(r"[^0-9A-Za-z_./:-]", "_", base)
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs held by ``node``'s attributes (If branches, Loop/Scan bodies)."""
    found: list[onnx.GraphProto] = []
    for attr in node.attribute:
        found.extend(attr.graphs)
        if attr.HasField("g"):
            found.append(attr.g)
    return found


def reads(node: onnx.NodeProto) -> set[str]:
    """Every name ``node`` reads: its inputs and, recursively, the names read inside its subgraphs (which may be
    outer-scope tensors); the empty name of an omitted optional input is left out."""
    names = {name for name in node.input if name}
    for sub in subgraphs(node):
        for inner in sub.node:
            names |= reads(inner)
    return names


def backward_slice(graph: onnx.GraphProto, outputs: Iterable[str], available: Iterable[str] = (),
                   node_reads: Sequence[set[str]] | None = None) -> list[int]:
    """Indices (graph order) of the nodes needed to compute ``outputs`` when the tensors ``available`` are given;
    the graph must be topologically sorted.  ``node_reads``: :func:`reads` of each node, when the caller keeps them."""
    available = set(available)
    needed = set(outputs) - available
    keep = []
    for index in range(len(graph.node) - 1, -1, -1):
        node = graph.node[index]
        if any(name in needed for name in node.output):
            keep.append(index)
            needed |= (reads(node) if node_reads is None else node_reads[index]) - available
    return keep[::-1]


def replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Make ``nodes`` (copied first, as they may be elements of ``graph.node``) the graph's node list."""
    copies = [onnx.NodeProto() for _ in nodes]
    for copy, node in zip(copies, nodes, strict=True):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def splice_nodes(graph: onnx.GraphProto, replacements: dict[int, list[onnx.NodeProto]]) -> None:
    """Replace the node at each index of ``replacements`` by its list of nodes (in place, order kept)."""
    nodes: list[onnx.NodeProto] = []
    for index, node in enumerate(graph.node):
        nodes.extend(replacements.get(index, [node]))
    replace_nodes(graph, nodes)


def toposort(model: onnx.ModelProto) -> None:
    """Order the main graph's nodes topologically, keeping the current order wherever it is already valid."""
    graph = model.graph
    nodes = list(graph.node)
    available = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    available |= {t.values.name for t in graph.sparse_initializer}
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    needs = [{i for i in reads(n) if i not in available and i in producer} for n in nodes]
    waiting: dict[str, list[int]] = {}
    for index, names in enumerate(needs):
        for name in names:
            waiting.setdefault(name, []).append(index)
    ready = [i for i, names in enumerate(needs) if not names]
    heapq.heapify(ready)
    ordered = []
    while ready:
        index = heapq.heappop(ready)
        ordered.append(nodes[index])
        for out in nodes[index].output:
            for consumer in waiting.pop(out, []):
                needs[consumer].discard(out)
                if not needs[consumer]:
                    heapq.heappush(ready, consumer)
    if len(ordered) != len(nodes):
        raise OnnxqError("the graph has a cycle after onnxq's rewrite; please report this model")
    replace_nodes(graph, ordered)


def remove_unused(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nobody reads (repeatedly), and initializers nobody reads (with their graph-input
    entries, for models that also list initializers as inputs)."""
    graph = model.graph
    while True:
        needed = {o.name for o in graph.output}.union(*(reads(n) for n in graph.node))
        keep = [n for n in graph.node if not n.output or any(o in needed for o in n.output if o)]
        if len(keep) == len(graph.node):
            break
        replace_nodes(graph, keep)
    needed = {o.name for o in graph.output}.union(*(reads(n) for n in graph.node))
    keep_init = [t for t in graph.initializer if t.name in needed]
    if len(keep_init) != len(graph.initializer):
        dropped = {t.name for t in graph.initializer} - {t.name for t in keep_init}
        del graph.initializer[:]
        graph.initializer.extend(keep_init)
        # an initializer also listed as a graph input (IR < 4 style) leaves the inputs with it
        keep_inputs = [v for v in graph.input if v.name not in dropped]
        if len(keep_inputs) != len(graph.input):
            del graph.input[:]
            graph.input.extend(keep_inputs)


def allow_free_initializers(model: onnx.ModelProto) -> None:
    """Raise IR < 4 to 4, where an initializer need not be listed as a graph input (the one change between IR 3
    and 4 that matters here), so the initializers a pass adds are valid without input entries."""
    if model.ir_version < 4:
        model.ir_version = 4


def node_name(node: onnx.NodeProto) -> str:
    """A node's name, or its first output's for an unnamed node (how onnxq names layers everywhere)."""
    return node.name or node.output[0]


def add_initializer(model: onnx.ModelProto, names: NameScope, base: str, values: np.ndarray) -> str:
    """Append ``values`` as an initializer under a fresh name made from ``base``; returns the name."""
    name = names.fresh(base)
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(values), name))
    return name


def tensor_types(model: onnx.ModelProto) -> dict[str, tuple[int, int | None]]:
    """``{tensor: (element type, rank or None)}`` for every tensor ONNX shape inference can type (best effort: the
    graph's own declarations when inference fails). Inference runs on a weight-less copy, so > 2 GB models work."""
    shell = copy_model_without(model, {t.name for t in model.graph.initializer if tensor_nbytes(t) >= 1024})
    try:
        inferred = onnx.shape_inference.infer_shapes(shell)
    except Exception:  # noqa: BLE001 - best effort (custom ops, unusual graphs)
        inferred = shell
    types = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        tensor = v.type.tensor_type if v.type.HasField("tensor_type") else None
        if tensor is not None and (tensor.elem_type or tensor.HasField("shape")):
            types[v.name] = (tensor.elem_type, len(tensor.shape.dim) if tensor.HasField("shape") else None)
    return types


def element_types(model: onnx.ModelProto) -> dict[str, int]:
    """``{tensor: ONNX element type}`` of every tensor :func:`tensor_types` can type."""
    return {name: elem for name, (elem, _) in tensor_types(model).items() if elem}

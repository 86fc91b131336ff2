"""Emitting solved (or read) weights in one format: the opset the format needs, then one rewrite per target."""

from __future__ import annotations

import numpy as np
import onnx

from onnxq.formats.common import EmitContext, Rewrite
from onnxq.formats.gather import emit_lookup
from onnxq.formats.registry import EMITTERS, required_opset_for
from onnxq.ir.index import NameScope, allow_free_initializers, remove_unused, splice_nodes
from onnxq.ir.model import opset_version
from onnxq.ir.targets import Target
from onnxq.passes.opset import convert_opset_in_place
from onnxq.quantized_weight import QuantizedWeight


def raise_opset_for(model: onnx.ModelProto, format_name: str, targets: list[Target], group_sizes: list[int],
                    bits: int) -> bool:
    """Bring ``model`` to the default-domain opset ``format_name`` needs for these targets (see
    :func:`~onnxq.formats.registry.required_opset_for`); returns whether it changed (targets must then be found
    again: node indices and Constant weights may have moved)."""
    opset = required_opset_for(format_name, targets, group_sizes, bits, EmitContext(model, NameScope(model)))
    if opset is None or opset_version(model) >= opset:
        return False
    convert_opset_in_place(model, opset)
    return True


def emit_in_place(model: onnx.ModelProto, targets: list[Target], weights: dict[tuple[str, str], QuantizedWeight],
                  format_name: str, accuracy_level: int = 0,
                  storage: dict[tuple[str, str], np.dtype] | None = None) -> list[str]:
    """Rewrite every target with its weight (``weights[target.matrix_key]``) in ``format_name`` (lookups after the
    products, :func:`~onnxq.formats.gather.emit_lookup`), drop what nothing
    reads any more, and import the custom domains the new nodes use; returns the emitters' notes.  ``storage``:
    the dtype of each fp32 weight's scales and float zeros (default float32; see :meth:`EmitContext.param_dtype`)."""
    rewrites: dict[int, Rewrite] = {}
    ctx = EmitContext(model, NameScope(model), accuracy_level=accuracy_level, storage=dict(storage or {}))
    emit = EMITTERS[format_name]
    products = {}  # matrix key → the first product reading it (a lookup of the same table shares its solution)
    for target in targets:
        if not target.is_lookup:
            products.setdefault(target.matrix_key, target.name)
            rewrites[target.node_index] = emit(target, weights[target.matrix_key], ctx)
    for target in targets:  # after the products, so that a tied lookup can read their tensors
        if target.is_lookup:
            rewrites[target.node_index] = emit_lookup(format_name, target, weights[target.matrix_key], ctx,
                                                      products.get(target.matrix_key))
    splice_nodes(model.graph, {index: r.nodes(model.graph.node[index]) for index, r in rewrites.items()})
    remove_unused(model)
    allow_free_initializers(model)
    for domain in {n.domain for n in model.graph.node} - {op.domain for op in model.opset_import} - {"", "ai.onnx"}:
        model.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    return ctx.notes

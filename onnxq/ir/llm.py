"""Language-model structure for LLM-aware defaults: which layer is the output projection (``lm_head``)."""

from __future__ import annotations

import onnx

from onnxq.ir.model import tensor_nbytes
from onnxq.ir.targets import LOOKUP_OP_TYPES, Target, find_targets

PASS_THROUGH = frozenset({"Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Flatten"})
LOGITS = "logits"
LM_HEAD_REASON = ("a language model's output projection stays float by default (low-bit logits cost the most "
                  "quality per byte); --quantize-lm-head quantizes it")
KEPT_FLOAT = "float, kept"  # onnxq inspect's state of a layer quantize leaves float by default


def reads_token_ids(model: onnx.ModelProto) -> bool:
    """Whether a graph input is integer token ids (named ``*ids*``, e.g. ``input_ids``)."""
    integer = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}
    return any("ids" in value.name.lower() and value.type.tensor_type.elem_type in integer
               for value in model.graph.input if "position" not in value.name.lower())


def lm_head_names(model: onnx.ModelProto, targets: list[Target]) -> set[str]:
    """Node names of the targets that are a language model's output projection.

    A model that reads token ids (:func:`reads_token_ids`) has one when a target's output reaches the graph output
    ``logits`` through pass-through ops only (Reshape, Cast, …), or the node or its weight is named ``*lm_head*``."""
    if not reads_token_ids(model):
        return set()
    outputs = {value.name for value in model.graph.output}
    producer = {name: node for node in model.graph.node for name in node.output}
    reaching: set[str] = set()  # tensors that reach `logits` through pass-through ops (the tensor itself included)
    frontier = [LOGITS] if LOGITS in outputs else []
    while frontier:
        name = frontier.pop()
        reaching.add(name)
        node = producer.get(name)
        if node is not None and node.op_type in PASS_THROUGH and node.input[0] not in reaching:
            frontier.append(node.input[0])
    return {t.name for t in targets if t.node.output[0] in reaching
            or "lm_head" in t.name.lower() or "lm_head" in t.weight_name.lower()}


def embedding_note(model: onnx.ModelProto, op_types: tuple[str, ...]) -> str | None:
    """For a language model quantized without ``Gather`` in ``op_types``: which token-embedding tables stay float,
    their size, and the options that quantize them (None otherwise)."""
    if set(LOOKUP_OP_TYPES) & set(op_types) or not reads_token_ids(model):
        return None
    tables = {t.weight_name: t for t in find_targets(model, LOOKUP_OP_TYPES).targets}
    if not tables:
        return None
    inits = {t.name: t for t in model.graph.initializer}
    size = sum(tensor_nbytes(inits[name]) for name in tables)
    first = next(iter(tables.values()))
    return (f"the token embedding '{first.name}' ({'x'.join(map(str, first.matrix_shape))}, {size / 1e6:.1f} MB) "
            f"stays float: --op-types {','.join(op_types)},Gather quantizes it too (with --quantize-lm-head when "
            "the output projection reads the same table)")

"""onnxq's entries in a model's ``metadata_props``: what a pass records for the passes (and tools) after it."""

from __future__ import annotations

import json

import onnx

SPLIT_METADATA_KEY = "onnxq.split"  # JSON {original layer: [branch node names]} written by the split pass
SPLIT_ACTIVATIONS_METADATA_KEY = "onnxq.split_activations"  # JSON {activation: {"output", "branches", ...}}
QUANT_METADATA_KEY = "onnxq.quantize"  # JSON {"method", "bits", "group_size", "format", "symmetric"}
ACT_QUANT_METADATA_KEY = "onnxq.act_quant"  # JSON {"bits", "tensors": {activation: {range(s), "read_as"}}}


def set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    """Set (or replace) one ``metadata_props`` entry."""
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    model.metadata_props.add(key=key, value=value)


def metadata_json(model: onnx.ModelProto, key: str) -> dict:
    """The JSON object stored under ``key`` (empty when the model has none)."""
    for prop in model.metadata_props:
        if prop.key == key:
            return json.loads(prop.value)
    return {}


def split_branch_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of nodes that are branches of a SplitQuant weight split."""
    return {name for branches in metadata_json(model, SPLIT_METADATA_KEY).values() for name in branches}


def split_activations(model: onnx.ModelProto) -> dict[str, dict]:
    """The activation splits recorded by SplitQuant: ``{activation: {"output", "branches", "thresholds"}}``."""
    return metadata_json(model, SPLIT_ACTIVATIONS_METADATA_KEY)

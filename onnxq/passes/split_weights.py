"""SplitQuant on weights: each MatMul/Gemm/Conv becomes three branches ``W = W₀ + W₁ + W₂`` (1-D k-means, k = 3, on
the values; Conv: per output kernel) summed by two Adds; the bias is split the same way."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.ir.index import NameScope, add_initializer, splice_nodes
from onnxq.ir.metadata import (
    SPLIT_METADATA_KEY,
    metadata_json,
    set_metadata,
    split_branch_nodes,
)
from onnxq.ir.targets import Skipped, Target, find_targets
from onnxq.passes.split_report import BRANCH_NAMES, SplitLayer, SplitReport
from onnxq.solvers.kmeans1d import kmeans_1d, kmeans_1d_rows


def split_weights(model: onnx.ModelProto, seed: int, method: str, report: SplitReport) -> None:
    graph = model.graph
    found = find_targets(model)
    report.skipped.extend(found.skipped)
    already = split_branch_nodes(model)
    inits = {t.name: t for t in graph.initializer}
    names = NameScope(model)
    groups = metadata_json(model, SPLIT_METADATA_KEY)
    weight_cache: dict[tuple, tuple[list[str], tuple | None, tuple]] = {}
    bias_cache: dict[str, tuple[list[str | None], str]] = {}
    replacements: dict[int, list[onnx.NodeProto]] = {}

    for target in found.targets:
        if target.name in already:
            report.skipped.append(Skipped(target.name, target.op_type, "already a SplitQuant branch"))
            continue
        key = (target.weight_name, target.through_transpose, target.op_type == "Conv")
        shared = key in weight_cache
        if not shared:
            values = numpy_helper.to_array(inits[target.weight_name])
            consumed = values.T if target.through_transpose else values
            result = _split_weight(consumed, target.op_type == "Conv", method, seed)
            if isinstance(result, str):
                report.skipped.append(Skipped(target.name, target.op_type, result))
                continue
            branches, thresholds, counts = result
            branch_names = [add_initializer(model, names, f"{target.weight_name}_split_{label}", branch)
                            for label, branch in zip(BRANCH_NAMES, branches, strict=True)]
            weight_cache[key] = (branch_names, thresholds, counts)
        weight_names, thresholds, counts = weight_cache[key]
        bias_names, bias_note = _split_bias(model, names, target, inits, method, seed, bias_cache)
        nodes, branch_nodes = _branch_nodes(target, weight_names, bias_names, names)
        replacements[target.node_index] = nodes
        groups[target.name] = branch_nodes
        report.layers.append(SplitLayer(target.name, target.op_type, target.weight_name, target.matrix_shape,
                                        np.dtype(helper.tensor_dtype_to_np_dtype(target.dtype)).itemsize,
                                        thresholds, counts, bias_note, branch_nodes, shared))
    splice_nodes(model.graph, replacements)
    if groups:
        set_metadata(model, SPLIT_METADATA_KEY, json.dumps(groups, sort_keys=True))


def _split_weight(
    consumed: np.ndarray, per_kernel: bool, method: str, seed: int
) -> tuple[list[np.ndarray], tuple[float, float] | None, tuple[int, int, int]] | str:
    """The three branch tensors (same shape/dtype), the thresholds and the values per branch, or why not."""
    values = consumed.astype(np.float64)
    if not np.isfinite(values).all():
        return "weight has inf/NaN values"
    if per_kernel:
        labels, thresholds = _kernel_labels(values.reshape(values.shape[0], -1), method, seed)
        labels = labels.reshape(consumed.shape)
    else:
        distinct = np.unique(values).size
        if distinct < 3:
            return f"only {distinct} distinct weight value(s); three branches need at least 3"
        clustering = kmeans_1d(values, 3, method, seed)
        labels = clustering.labels(values)
        thresholds = tuple(float(np.float32(t)) for t in clustering.boundaries)
    counts = tuple(int(c) for c in np.bincount(labels.ravel(), minlength=3))
    if min(counts) == 0:
        reason = "every kernel has fewer than 3 distinct values" if per_kernel else "k-means left a cluster empty"
        return f"{reason}; a branch would be all zeros"
    branches = [np.where(labels == c, consumed, np.zeros((), consumed.dtype)).astype(consumed.dtype)
                for c in range(3)]
    return branches, thresholds, counts


def _kernel_labels(matrix: np.ndarray, method: str, seed: int) -> tuple[np.ndarray, None]:
    """Per-row (output kernel) cluster labels; a row with < 3 distinct values: middle (1 value) or lower/upper."""
    centres = kmeans_1d_rows(matrix, 3, method, seed)
    bounds = (centres[:, :-1] + centres[:, 1:]) / 2
    labels = ((matrix > bounds[:, :1]).astype(np.int8) + (matrix > bounds[:, 1:2])).astype(np.int8)
    ordered = np.sort(matrix, axis=1)
    distinct = 1 + np.count_nonzero(np.diff(ordered, axis=1) > 0, axis=1)
    labels[distinct == 1] = 1
    two = distinct == 2
    labels[two] = np.where(matrix[two] > ordered[two, :1], 2, 0)
    return labels, None


def _split_bias(
    model: onnx.ModelProto,
    names: NameScope,
    target: Target,
    inits: dict[str, onnx.TensorProto],
    method: str,
    seed: int,
    cache: dict[str, tuple[list[str | None], str]],
) -> tuple[list[str | None], str]:
    """Bias input name per branch (``None``: no bias on that branch) and how it was handled."""
    node = target.node
    if target.op_type == "MatMul" or len(node.input) < 3 or not node.input[2]:
        return [None, None, None], "none"
    name = node.input[2]
    if name in cache:
        return cache[name]
    kept = [name, None, None]
    if name not in inits:
        return kept, "kept on the lower branch (not a constant)"
    values = numpy_helper.to_array(inits[name])
    flat = values.astype(np.float64).ravel()
    distinct = np.unique(flat).size if np.isfinite(flat).all() else 0
    if distinct < 3:
        result = kept, f"kept on the lower branch ({'zero' if not flat.any() else 'fewer than 3 distinct values'})"
    else:
        labels = kmeans_1d(flat, 3, method, seed).labels(values)
        if min(np.bincount(labels.ravel(), minlength=3)) == 0:
            result = kept, "kept on the lower branch (k-means left a cluster empty)"
        else:
            split = [add_initializer(model, names, f"{name}_split_{label}",
                                      np.where(labels == c, values, np.zeros((), values.dtype)).astype(values.dtype))
                     for c, label in enumerate(BRANCH_NAMES)]
            result = split, "split"
    cache[name] = result
    return result


def _branch_nodes(
    target: Target, weights: list[str], biases: list[str | None], names: NameScope
) -> tuple[list[onnx.NodeProto], list[str]]:
    """Three copies of the node (one per branch) and the two Adds that restore its output."""
    node = target.node
    outputs, nodes, branch_names = [], [], []
    for label, weight, bias in zip(BRANCH_NAMES, weights, biases, strict=True):
        branch = onnx.NodeProto()
        branch.CopyFrom(node)
        branch.name = names.fresh(f"{target.name}_split_{label}")
        inputs = list(node.input)
        inputs[target.input_index] = weight
        if len(inputs) > 2:
            inputs = inputs[:2] + ([bias] if bias else []) + inputs[3:]
        del branch.input[:]
        branch.input.extend(inputs)
        out = names.fresh(f"{target.name}_split_{label}_output")
        branch.output[0] = out
        outputs.append(out)
        nodes.append(branch)
        branch_names.append(branch.name)
    partial = names.fresh(f"{target.name}_split_partial_sum")
    nodes.append(helper.make_node("Add", outputs[:2], [partial], name=names.fresh(f"{target.name}_split_add")))
    nodes.append(helper.make_node("Add", [partial, outputs[2]], [node.output[0]],
                                  name=names.fresh(f"{target.name}_split_add")))
    return nodes, branch_names

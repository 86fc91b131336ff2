"""SplitQuant on activations: ``y = Where(y > t₁, 0, y) + Where(t₁ < y ≤ t₂, y, 0) + Where(y > t₂, y, 0)`` with
thresholds from k-means on the activation's values captured with ONNX Runtime (bit-exact in float)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.ir.index import NameScope, add_initializer, element_types, node_name, replace_nodes
from onnxq.ir.metadata import (
    SPLIT_ACTIVATIONS_METADATA_KEY,
    set_metadata,
    split_activations,
)
from onnxq.ir.model import opset_version
from onnxq.ir.targets import Skipped
from onnxq.passes.activation_quant import run_calibration
from onnxq.passes.split_report import BRANCH_NAMES, SplitActivation, SplitReport
from onnxq.solvers.kmeans1d import kmeans_1d

ACTIVATION_SAMPLES = 200_000  # values per activation kept (fixed-seed subsample) for its k-means


ACTIVATION_OP_TYPES = ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "Gelu", "Clip", "HardSigmoid")


@dataclass
class ActivationSite:
    """An activation whose output tensor ``output`` is produced by node ``node_name``."""

    name: str
    op_type: str
    output: str
    thresholds: tuple[float, float] = (0.0, 0.0)
    fractions: tuple[float, float, float] = (0.0, 0.0, 0.0)


def find_activation_sites(model: onnx.ModelProto) -> list[ActivationSite]:
    """Activation outputs in graph order: single ops, Erf-GELU ``x·0.5·(1 + erf(x/√2))`` and SiLU ``x·σ(x)``."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    scalars = _scalar_constants(model)
    order = {id(n): i for i, n in enumerate(graph.node)}
    found: dict[str, tuple[int, ActivationSite]] = {}
    inside: set[int] = set()  # nodes that are part of a pattern (not split on their own)

    def only_consumer(tensor: str, op_type: str) -> onnx.NodeProto | None:
        users = consumers.get(tensor, [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None

    def other_input(node: onnx.NodeProto, tensor: str) -> str | None:
        rest = [i for i in node.input if i != tensor]
        return rest[0] if len(rest) == 1 else (tensor if list(node.input) == [tensor, tensor] else None)

    def near(tensor: str | None, value: float) -> bool:
        return tensor in scalars and abs(scalars[tensor] - value) <= 1e-4 * abs(value)

    for node in graph.node:
        if node.op_type == "Erf":
            gelu = _match_erf_gelu(node, producer, only_consumer, other_input, near)
            if gelu is not None:
                last, members = gelu
                inside.update(id(m) for m in members)
                found[last.output[0]] = (order[id(last)], ActivationSite(node_name(last), "Gelu(erf)", last.output[0]))
        elif node.op_type == "Sigmoid":
            users = consumers.get(node.output[0], [])
            if len(users) == 1 and users[0].op_type == "Mul" and other_input(users[0], node.output[0]) == node.input[0]:
                inside.add(id(node))
                mul = users[0]
                found[mul.output[0]] = (order[id(mul)], ActivationSite(node_name(mul), "SiLU", mul.output[0]))
    for node in graph.node:
        if node.op_type in ACTIVATION_OP_TYPES and id(node) not in inside and node.output[0] not in found:
            found[node.output[0]] = (order[id(node)], ActivationSite(node_name(node), node.op_type, node.output[0]))
    return [site for _, site in sorted(found.values(), key=lambda pair: pair[0])]


def _match_erf_gelu(erf, producer, only_consumer, other_input, near):
    """``(last node, member nodes)`` of an Erf-GELU around ``erf``, or ``None``."""
    pre = producer.get(erf.input[0])
    if pre is None or pre.op_type not in ("Div", "Mul"):
        return None
    if pre.op_type == "Div" and near(pre.input[1], math.sqrt(2)):
        x = pre.input[0]
    elif pre.op_type == "Mul" and near(pre.input[1], 1 / math.sqrt(2)):
        x = pre.input[0]
    elif pre.op_type == "Mul" and near(pre.input[0], 1 / math.sqrt(2)):
        x = pre.input[1]
    else:
        return None
    add = only_consumer(erf.output[0], "Add")
    if add is None or not near(other_input(add, erf.output[0]), 1.0):
        return None
    first = only_consumer(add.output[0], "Mul")
    if first is None:
        return None
    operand = other_input(first, add.output[0])
    members = [pre, erf, add, first]
    if operand == x or near(operand, 0.5):  # (x·(1+erf))·0.5 or ((1+erf)·0.5)·x
        second = only_consumer(first.output[0], "Mul")
        want = 0.5 if operand == x else None
        if second is None:
            return None
        last_operand = other_input(second, first.output[0])
        if (want is not None and near(last_operand, 0.5)) or (want is None and last_operand == x):
            return second, members + [second]
        return None
    half = producer.get(operand)  # (0.5·x)·(1+erf)
    if half is not None and half.op_type == "Mul" and x in half.input and near(other_input(half, x), 0.5):
        return first, members + [half]
    return None


def activation_thresholds(
    model: onnx.ModelProto, sites: list[ActivationSite], calibration: object, seed: int, method: str,
    report: SplitReport,
) -> list[ActivationSite]:
    """Thresholds per site from k-means on a fixed-seed subsample of its calibration output values."""
    if opset_version(model) < 9:
        report.skipped_activations.extend(Skipped(s.name, s.op_type, "opset < 9 has no Where") for s in sites)
        return []
    already = {entry["output"] for entry in split_activations(model).values()}
    for site in sites:
        if site.output in already:
            report.skipped_activations.append(Skipped(site.name, site.op_type, "already split"))
    sites = [s for s in sites if s.output not in already]
    if not sites:
        return []
    rng = np.random.default_rng(seed)
    samples: dict[str, list[np.ndarray]] = {s.output: [] for s in sites}
    for values in run_calibration(model, calibration, [s.output for s in sites]):
        for site in sites:
            flat = np.asarray(values[site.output], dtype=np.float32).ravel()
            flat = flat[np.isfinite(flat)]
            if flat.size > ACTIVATION_SAMPLES:
                flat = flat[rng.choice(flat.size, ACTIVATION_SAMPLES, replace=False)]
            samples[site.output].append(flat)
    kept = []
    for site in sites:
        sample = np.concatenate(samples[site.output]) if samples[site.output] else np.zeros(0, np.float32)
        if sample.size > ACTIVATION_SAMPLES:
            sample = sample[rng.choice(sample.size, ACTIVATION_SAMPLES, replace=False)]
        distinct = np.unique(sample).size
        if distinct < 3:
            report.skipped_activations.append(Skipped(site.name, site.op_type,
                                                      f"only {distinct} distinct value(s) on the calibration data"))
            continue
        clustering = kmeans_1d(sample, 3, method, seed)
        thresholds = tuple(float(np.float32(t)) for t in clustering.boundaries)
        counts = np.bincount(clustering.labels(sample), minlength=3)
        if thresholds[0] >= thresholds[1] or min(counts) == 0:
            report.skipped_activations.append(Skipped(site.name, site.op_type, "k-means left a cluster empty"))
            continue
        site.thresholds = thresholds
        site.fractions = tuple(float(c / sample.size) for c in counts)
        kept.append(site)
    return kept


def split_activation_sites(model: onnx.ModelProto, sites: list[ActivationSite], report: SplitReport) -> None:
    """Rename each activation output ``y`` to ``y_unsplit`` and rebuild ``y`` as the sum of three ranges."""
    graph = model.graph
    names = NameScope(model)
    types = element_types(model)
    producer_index = {o: i for i, n in enumerate(graph.node) for o in n.output}
    record = split_activations(model)
    after: dict[int, list[onnx.NodeProto]] = {}
    for site in sites:
        index = producer_index[site.output]
        node = graph.node[index]
        dtype = helper.tensor_dtype_to_np_dtype(types.get(site.output, onnx.TensorProto.FLOAT))
        full = names.fresh(f"{site.output}_unsplit")
        node.output[list(node.output).index(site.output)] = full
        t1 = add_initializer(model, names, f"{site.name}_split_t1", np.array(site.thresholds[0], dtype=dtype))
        t2 = add_initializer(model, names, f"{site.name}_split_t2", np.array(site.thresholds[1], dtype=dtype))
        zero = add_initializer(model, names, f"{site.name}_split_zero", np.array(0, dtype=dtype))
        above1, above2, middle_mask = (names.fresh(f"{site.name}_split_{s}") for s in ("above_t1", "above_t2", "mid"))
        branches = [names.fresh(f"{site.name}_split_{label}") for label in BRANCH_NAMES]
        partial = names.fresh(f"{site.name}_split_partial_sum")

        def make(op: str, inputs: list[str], output: str, base: str = site.name) -> onnx.NodeProto:
            return helper.make_node(op, inputs, [output], name=names.fresh(f"{base}_split_{op.lower()}"))

        after[index] = [
            make("Greater", [full, t1], above1),
            make("Greater", [full, t2], above2),
            make("Xor", [above1, above2], middle_mask),  # t₁ < y ≤ t₂ (y > t₂ implies y > t₁)
            make("Where", [above1, zero, full], branches[0]),  # y ≤ t₁ (and NaN)
            make("Where", [middle_mask, full, zero], branches[1]),
            make("Where", [above2, full, zero], branches[2]),
            make("Add", branches[:2], partial),
            make("Add", [partial, branches[2]], site.output),
        ]
        record[site.name] = {"op_type": site.op_type, "output": site.output, "branches": branches,
                             "thresholds": list(site.thresholds)}
        report.activations.append(SplitActivation(site.name, site.op_type, site.output, site.thresholds,
                                                  site.fractions))
    ordered = []
    for i, node in enumerate(graph.node):
        ordered.append(node)
        ordered.extend(after.get(i, []))
    replace_nodes(model.graph, ordered)
    set_metadata(model, SPLIT_ACTIVATIONS_METADATA_KEY, json.dumps(record, sort_keys=True))


def _scalar_constants(model: onnx.ModelProto) -> dict[str, float]:
    """Single-element float constants (initializers and Constant nodes) by tensor name."""
    out = {}
    tensors = [(t.name, t) for t in model.graph.initializer]
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    tensors.append((node.output[0], attr.t))
                elif attr.name == "value_float":
                    out[node.output[0]] = float(attr.f)
    for name, tensor in tensors:
        if int(np.prod(tensor.dims, dtype=np.int64)) == 1:
            value = numpy_helper.to_array(tensor)
            if value.dtype.kind == "f":
                out[name] = float(value.ravel()[0])
    return out

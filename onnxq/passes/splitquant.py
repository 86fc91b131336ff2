"""SplitQuant: each MatMul/Gemm/Conv (and, on request, each activation) becomes three k-means branches summed by Add.

Weights: 1-D k-means with k = 3 on the weight values (MatMul/Gemm: the whole tensor; Conv: each output
kernel) gives thresholds ``t₁ < t₂``, the midpoints of the sorted centres.  Branch ``c`` keeps the values
of cluster ``c`` and zeros elsewhere, so ``W = W₀ + W₁ + W₂`` and

    Y = op(X, W₀, C₀) + op(X, W₁, C₁) + op(X, W₂, C₂)        (two Adds, original output name kept)

with the bias split the same way (a bias with fewer than three distinct values stays on the lower branch).
Each branch has a third of the value range to cover, so a uniform quantizer gets a finer grid per branch.

Activations (``activations=True``): with thresholds from k-means on the activation's output values
(captured with ONNX Runtime on calibration data),

    y = Where(y > t₁, 0, y) + Where(t₁ < y ≤ t₂, y, 0) + Where(y > t₂, y, 0),

which is bit-exact in float (adding zeros is exact); activation quantizers then see three narrow ranges.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.errors import OnnxqError
from onnxq.ir.index import NameScope, allow_free_initializers, remove_unused, replace_nodes
from onnxq.ir.metadata import (
    SPLIT_ACTIVATIONS_METADATA_KEY,
    SPLIT_METADATA_KEY,
    metadata_json,
    set_metadata,
    split_activations,
    split_branch_nodes,
)
from onnxq.ir.model import copy_model, model_bytes, opset_version
from onnxq.ir.targets import Skipped, Target, constants_to_initializers, find_targets
from onnxq.passes.activation_quant import elem_types, run_calibration
from onnxq.solvers.kmeans1d import kmeans_1d, kmeans_1d_rows

BRANCH_NAMES = ("lower", "middle", "upper")
METHODS = ("exact", "sklearn")
ACTIVATION_SAMPLES = 200_000  # values per activation kept (fixed-seed subsample) for its k-means
ACTIVATION_OP_TYPES = ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "Gelu", "Clip", "HardSigmoid")
REPORT_BITS = (2, 3, 4, 8)
REPORT_GROUP_SIZE = 64


# ----------------------------------------------------------------------------- report


@dataclass
class SplitLayer:
    """One original layer that became three branches."""

    name: str
    op_type: str
    weight: str
    shape: tuple[int, int]  # (N, K) of the solver matrix
    itemsize: int  # bytes per float weight value
    thresholds: tuple[float, float] | None  # None for Conv (one pair per output kernel)
    counts: tuple[int, int, int]  # weight values per branch
    bias: str  # "split", "kept on the lower branch (…)", or "none"
    branches: list[str]
    shares_weight: bool = False  # the weight was already split for an earlier node (stored once)


@dataclass
class SplitActivation:
    name: str
    op_type: str
    output: str
    thresholds: tuple[float, float]
    fractions: tuple[float, float, float]  # share of calibration values per branch


@dataclass
class SplitReport:
    """What ``onnxq split`` did and what it costs; :meth:`lines` is what the CLI prints."""

    method: str = "exact"
    seed: int = 0
    layers: list[SplitLayer] = field(default_factory=list)
    activations: list[SplitActivation] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    skipped_activations: list[Skipped] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0

    @property
    def extra_nodes(self) -> int:
        return self.nodes_after - self.nodes_before

    def weight_bytes(self, bits: int | None = None, group_size: int = -1, split: bool = True) -> int:
        """Bytes of the split layers' weights (each distinct weight once): float, or ``bits``-bit codes
        plus an fp32 scale and a ``bits``-bit zero point per group of ``group_size`` (-1: per channel)."""
        total = 0
        for layer in self.layers:
            if layer.shares_weight:
                continue
            n, k = layer.shape
            if bits is None:
                one = n * k * layer.itemsize
            else:
                groups = 1 if group_size == -1 else math.ceil(k / group_size)
                one = math.ceil(n * k * bits / 8) + n * groups * 4 + math.ceil(n * groups * bits / 8)
            total += one * (3 if split else 1)
        return total

    def flops_per_position(self, split: bool = True) -> int:
        """Multiply-adds ×2 of the split layers per output position (token / pixel), plus the two Adds."""
        total = 0
        for layer in self.layers:
            n, k = layer.shape
            total += 3 * 2 * n * k + 2 * n if split else 2 * n * k
        return total

    def lines(self) -> list[str]:
        out = [f"SplitQuant: split {len(self.layers)} layers into 3 branches (k-means {self.method}, seed {self.seed})"
               + (f", {len(self.activations)} activations" if self.activations else "")
               + f" in {self.seconds:.1f}s"]
        for layer in self.layers:
            n, k = layer.shape
            where = ("per-kernel thresholds" if layer.thresholds is None
                     else f"thresholds {layer.thresholds[0]:.4g} / {layer.thresholds[1]:.4g}")
            shares = "/".join(f"{100 * c / max(sum(layer.counts), 1):.1f}%" for c in layer.counts)
            out.append(f"  {layer.op_type} '{layer.name}' [{n}x{k}]: {where}, values {shares}, bias {layer.bias}")
        for act in self.activations:
            shares = "/".join(f"{100 * f:.1f}%" for f in act.fractions)
            out.append(f"  {act.op_type} '{act.name}' -> '{act.output}': thresholds {act.thresholds[0]:.4g} / "
                       f"{act.thresholds[1]:.4g}, calibration values {shares}")
        for s in self.skipped + self.skipped_activations:
            out.append(f"left alone: {s.op_type} '{s.name}': {s.reason}")
        out.append(f"extra nodes: {self.extra_nodes} ({self.nodes_before} -> {self.nodes_after})")
        if not self.layers:
            return out
        mb = 1e6
        out.append(f"weights, float: split layers {self.weight_bytes(split=False) / mb:.3f} MB -> "
                   f"{self.weight_bytes() / mb:.3f} MB; model {self.bytes_before / mb:.3f} MB -> "
                   f"{self.bytes_after / mb:.3f} MB ({self.bytes_after / max(self.bytes_before, 1):.2f}x)")
        before, after = self.flops_per_position(False), self.flops_per_position()
        out.append(f"FLOPs per output position (token/pixel), split layers: {before / mb:.3f} M -> {after / mb:.3f} M "
                   f"({after / max(before, 1):.2f}x, incl. 2 Adds per layer)")
        out.append("weights of split layers after quantization (b-bit codes, fp32 scale, b-bit zero point per group):")
        for bits in REPORT_BITS:
            cells = []
            for group_size, label in ((-1, "per-channel"), (REPORT_GROUP_SIZE, f"group-{REPORT_GROUP_SIZE}")):
                plain = self.weight_bytes(bits, group_size, split=False)
                cells.append(f"{label} {plain / mb:.3f} MB -> {self.weight_bytes(bits, group_size) / mb:.3f} MB")
            out.append(f"  INT{bits}: " + "; ".join(cells))
        return out


# ----------------------------------------------------------------------------- the pass


def split_model(
    model: onnx.ModelProto,
    activations: bool = False,
    calibration: object = None,
    seed: int = 0,
    method: str = "exact",
) -> tuple[onnx.ModelProto, SplitReport]:
    """Split a copy of ``model`` (the input is never modified); returns the split model and its report."""
    start = time.perf_counter()
    if method not in METHODS:
        raise OnnxqError(f"k-means method '{method}' is unknown; use one of {', '.join(METHODS)}")
    if activations and calibration is None:
        raise OnnxqError("splitting activations needs calibration data to place the thresholds; pass --calib data.npz")
    model = copy_model(model)
    constants_to_initializers(model)
    report = SplitReport(method=method, seed=seed, nodes_before=len(model.graph.node), bytes_before=model_bytes(model))

    sites: list[ActivationSite] = []
    if activations:
        sites = _activation_thresholds(model, find_activation_sites(model), calibration, seed, method, report)
    _split_weights(model, seed, method, report)
    if sites:
        _split_activation_sites(model, sites, report)
    remove_unused(model)
    allow_free_initializers(model)
    report.nodes_after = len(model.graph.node)
    report.bytes_after = model_bytes(model)
    report.seconds = time.perf_counter() - start
    return model, report


def _split_weights(model: onnx.ModelProto, seed: int, method: str, report: SplitReport) -> None:
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
            branch_names = [_add_initializer(model, names, f"{target.weight_name}_split_{label}", branch)
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
    _replace_nodes(model, replacements)
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
            split = [_add_initializer(model, names, f"{name}_split_{label}",
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


# ----------------------------------------------------------------------------- activations


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
                found[last.output[0]] = (order[id(last)], ActivationSite(_name(last), "Gelu(erf)", last.output[0]))
        elif node.op_type == "Sigmoid":
            users = consumers.get(node.output[0], [])
            if len(users) == 1 and users[0].op_type == "Mul" and other_input(users[0], node.output[0]) == node.input[0]:
                inside.add(id(node))
                mul = users[0]
                found[mul.output[0]] = (order[id(mul)], ActivationSite(_name(mul), "SiLU", mul.output[0]))
    for node in graph.node:
        if node.op_type in ACTIVATION_OP_TYPES and id(node) not in inside and node.output[0] not in found:
            found[node.output[0]] = (order[id(node)], ActivationSite(_name(node), node.op_type, node.output[0]))
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


def _activation_thresholds(
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


def _split_activation_sites(model: onnx.ModelProto, sites: list[ActivationSite], report: SplitReport) -> None:
    """Rename each activation output ``y`` to ``y_unsplit`` and rebuild ``y`` as the sum of three ranges."""
    graph = model.graph
    names = NameScope(model)
    types = elem_types(model)
    producer_index = {o: i for i, n in enumerate(graph.node) for o in n.output}
    record = split_activations(model)
    after: dict[int, list[onnx.NodeProto]] = {}
    for site in sites:
        index = producer_index[site.output]
        node = graph.node[index]
        dtype = helper.tensor_dtype_to_np_dtype(types.get(site.output, onnx.TensorProto.FLOAT))
        full = names.fresh(f"{site.output}_unsplit")
        node.output[list(node.output).index(site.output)] = full
        t1 = _add_initializer(model, names, f"{site.name}_split_t1", np.array(site.thresholds[0], dtype=dtype))
        t2 = _add_initializer(model, names, f"{site.name}_split_t2", np.array(site.thresholds[1], dtype=dtype))
        zero = _add_initializer(model, names, f"{site.name}_split_zero", np.array(0, dtype=dtype))
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


# ----------------------------------------------------------------------------- helpers


def _name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


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


def _add_initializer(model: onnx.ModelProto, names: NameScope, base: str, values: np.ndarray) -> str:
    name = names.fresh(base)
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(values), name))
    return name


def _replace_nodes(model: onnx.ModelProto, replacements: dict[int, list[onnx.NodeProto]]) -> None:
    nodes = []
    for index, node in enumerate(model.graph.node):
        nodes.extend(replacements.get(index, [node]))
    replace_nodes(model.graph, nodes)


